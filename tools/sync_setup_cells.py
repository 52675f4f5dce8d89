"""Write the setup cell of every chapter notebook from one template.

Every notebook listed in ``_toc.yml`` opens with the same setup cell (after at most a
markdown cell holding the chapter's ``# Title``). It installs roilib from the book's
repository when ``import roilib`` fails (Colab), pinned to the release whose outputs the
book stores, installs the CuPy wheel for the runtime's CUDA major version on a GPU
runtime without CuPy, and prints one line saying whether a GPU is active.

The cell is generated here, never edited by hand. Its two values come from their single
sources:

* ``REPO_URL``: ``repository.url`` in ``_config.yml`` (read by ``tests/book_layout.py``);
* ``RELEASE``: ``v`` + ``__version__`` of ``roilib/_version.py``.

Usage, from the repository root (any Python with NumPy; ``make test``'s ``.venv`` has it)::

    .venv/bin/python tools/sync_setup_cells.py          # rewrite the cells that differ
    .venv/bin/python tools/sync_setup_cells.py --check  # exit 1 if any cell differs

The stored output of the cell is produced by running the rendered cell with this
checkout's roilib on a machine state without CuPy or a GPU, which is what the book
shows (the cell is tagged ``nbval-ignore-output``: its output depends on the machine).
Running the script twice changes nothing the second time.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import string
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import book_layout  # noqa: E402  (the one reader of _config.yml and _toc.yml)

TAGS = ("nbval-ignore-output", "hide-input")
FIRST_LINE = "# Setup: "

# $REPO_URL and $RELEASE are filled in; the cell itself uses no "$".
TEMPLATE = string.Template('''\
# Setup: install roilib if it is missing (Colab), report the GPU.
REPO_URL = "$REPO_URL"  # repository.url in _config.yml
RELEASE = "$RELEASE"  # the roilib release that produced this page's outputs
import importlib, re, shutil, subprocess, sys


def pip_install(requirement, required=True):
    command = [sys.executable, "-m", "pip", "install", "-q", requirement]
    subprocess.run(command, check=required)
    importlib.invalidate_caches()


def cuda_major():
    """CUDA major version of this runtime's NVIDIA driver; None without a GPU."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        smi = subprocess.run(
            ["nvidia-smi"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if smi.returncode != 0:  # a driver without a usable device
        return None
    found = re.search(r"CUDA Version:\\s*(\\d+)", smi.stdout or "")
    if found:
        return int(found.group(1))
    try:  # no version in the driver's banner: the CUDA that torch was built for
        import torch
        return int(torch.version.cuda.split(".")[0])
    except Exception:
        return None


try:
    import roilib
except ImportError:
    pip_install(f"roilib[plot] @ git+{REPO_URL}@{RELEASE}")
    import roilib
try:
    import cupy
except ImportError:  # a GPU runtime without CuPy: the wheel for its CUDA
    # major version
    major = cuda_major()
    if major in (12, 13):  # if this fails, the chapter still runs, on the CPU
        pip_install(f"cupy-cuda{major}x[ctk]", required=False)
try:
    import cupy
    gpu = cupy.cuda.runtime.getDeviceCount() > 0
except Exception:  # no CuPy, no CUDA driver or no device
    gpu = False
print(f"roilib {roilib.__version__}; GPU:",
      "active, CuPy runs the CUDA kernels" if gpu
      else "none, the CUDA kernels' source runs on the CPU")
''')

# Runs the cell as a machine without CuPy and without a GPU driver would: nothing may
# be installed, so any subprocess call is an error.
_CPU_MACHINE = r"""
import shutil, subprocess, sys
sys.modules["cupy"] = None
shutil.which = lambda *args, **kwargs: None
def _refuse(*args, **kwargs):
    raise RuntimeError(f"the setup cell tried to run {args!r} with roilib importable")
subprocess.run = _refuse
exec(compile(sys.stdin.read(), "setup_cell", "exec"), {"__name__": "__main__"})
"""


def version() -> str:
    """``__version__`` of ``roilib/_version.py``, read without importing roilib."""
    tree = ast.parse((ROOT / "roilib" / "_version.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return node.value.value
    raise ValueError("roilib/_version.py assigns no __version__")


def release_tag() -> str:
    """The git tag of the release the setup cells install: ``v`` + the version."""
    return f"v{version()}"


def render() -> str:
    """The setup cell's source for this checkout's ``_config.yml`` and version."""
    source = TEMPLATE.substitute(REPO_URL=book_layout.repository()["url"], RELEASE=release_tag())
    return source.rstrip("\n")  # as Jupyter stores a cell: no final newline


def run_cell(source: str) -> str:
    """The cell's stdout when run with this checkout's roilib, no CuPy and no GPU."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", _CPU_MACHINE], input=source, capture_output=True, text=True,
        env=env, cwd=ROOT, timeout=300,
    )
    if proc.returncode != 0 or proc.stderr.strip() or proc.stdout.count("\n") != 1:
        raise RuntimeError(f"the setup cell did not print one line:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def _lines(text: str):
    """Text as nbformat stores it: a list of lines that keep their newlines."""
    return text.splitlines(keepends=True)


def setup_index(cells) -> int:
    """Where the setup cell belongs: first, or second after a ``# Title``-only markdown cell."""
    if cells and cells[0]["cell_type"] == "markdown":
        lines = [line for line in "".join(cells[0]["source"]).splitlines() if line.strip()]
        if len(lines) == 1 and lines[0].startswith("# "):
            return 1
    return 0


def synced(nb: dict, source: str, stdout: str) -> dict:
    """``nb`` with its setup cell replaced (or inserted) from ``source`` and ``stdout``."""
    cells = nb["cells"]
    index = setup_index(cells)
    old = cells[index] if index < len(cells) else None
    if old is None or old["cell_type"] != "code" or not "".join(old["source"]).startswith(FIRST_LINE):
        old = None
    cell = {
        "cell_type": "code",
        "execution_count": (old or {}).get("execution_count") or 1,
        "metadata": dict((old or {}).get("metadata", {})),
        "outputs": [{"name": "stdout", "output_type": "stream", "text": _lines(stdout)}],
        "source": _lines(source),
    }
    if old is not None and "id" in old:
        cell["id"] = old["id"]
    elif nb.get("nbformat_minor", 0) >= 5 and nb.get("nbformat", 4) >= 4:
        cell["id"] = "roilib-setup"
    tags = list(cell["metadata"].get("tags", []))
    cell["metadata"]["tags"] = tags + [t for t in TAGS if t not in tags]
    cell = {key: cell[key] for key in ("cell_type", "execution_count", "id", "metadata", "outputs", "source") if key in cell}
    new_cells = list(cells)
    if old is None:
        new_cells.insert(index, cell)
    else:
        new_cells[index] = cell
    return dict(nb, cells=new_cells)


def dump(nb: dict) -> str:
    """A notebook as Jupyter writes it (one-space indent, UTF-8, final newline)."""
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report notebooks out of sync, write nothing")
    args = parser.parse_args(argv)
    source = render()
    stdout = run_cell(source)
    stale = []
    for docname in book_layout.notebook_docnames():
        path = ROOT / f"{docname}.ipynb"
        text = path.read_text(encoding="utf-8")
        new = dump(synced(json.loads(text), source, stdout))
        if new != text:
            stale.append(path.relative_to(ROOT).as_posix())
            if not args.check:
                path.write_text(new, encoding="utf-8")
    verb = "out of sync" if args.check else "rewritten"
    print(f"setup cells {verb}: {', '.join(stale) if stale else 'none'}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
