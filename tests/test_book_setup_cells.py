"""Every chapter notebook opens with the same setup cell, wired to the book's repository.

The setup cell installs roilib from the repository named in ``_config.yml`` when
``import roilib`` fails (Colab, a fresh environment), pinned to the release tag whose
outputs the chapters store, installs the CuPy wheel for the runtime's CUDA major version
on a GPU runtime without CuPy, and prints whether a GPU is active. Its output depends on
the machine, so it is tagged ``nbval-ignore-output``. ``tools/sync_setup_cells.py``
writes it from one template; never edit it by hand.

Rules checked here, for every notebook listed in ``_toc.yml``:

* the setup cell is the notebook's first cell, or the second one after a markdown cell
  that holds only the chapter's ``# Title``;
* its source is exactly the one ``tools/sync_setup_cells.py`` renders (run the script);
* it is plain Python (no ``%pip``), its ``REPO_URL`` is ``repository.url`` of
  ``_config.yml``, its ``RELEASE`` is ``v`` + roilib's version, and no other URL
  appears in it;
* run with roilib hidden, it calls pip exactly once, with ``git+REPO_URL@RELEASE``;
* on a (faked) GPU runtime without CuPy it installs ``cupy-cuda<major>x`` for the CUDA
  major version that ``nvidia-smi`` (else ``torch.version.cuda``) reports, and nothing
  for a driver without a device or a CUDA major without a CuPy wheel;
* it was executed and printed one line on stdout (nothing on stderr).
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import book_layout  # noqa: E402

ROOT = book_layout.ROOT
NOTEBOOKS = book_layout.notebook_docnames()
REFERENCE = "chapters/intro"
SYNC = ROOT / "tools" / "sync_setup_cells.py"


def _version() -> str:
    """roilib's version from its single source, read here without the sync script."""
    text = (ROOT / "roilib" / "_version.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"$', text, re.M).group(1)


def _cells(docname: str):
    nb = json.loads((ROOT / f"{docname}.ipynb").read_text(encoding="utf-8"))
    return nb["cells"]


def _source(cell) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def _setup_cell(docname: str):
    """The setup cell of a notebook, enforcing its position."""
    cells = _cells(docname)
    assert cells, f"{docname}.ipynb has no cells"
    first = cells[0]
    if first["cell_type"] == "markdown":
        lines = [line for line in _source(first).splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("# "), (
            f"{docname}.ipynb: before the setup cell only a markdown cell with the '# Title' "
            f"line may come; found {_source(first)[:200]!r}"
        )
        assert len(cells) > 1, f"{docname}.ipynb: no setup cell after the title"
        cell = cells[1]
    else:
        cell = first
    assert cell["cell_type"] == "code", f"{docname}.ipynb: the setup cell must be a code cell"
    return cell


def _string_assignment(tree: ast.AST, name: str) -> str:
    values = [
        node.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    ]
    assert len(values) == 1, f"the setup cell must assign {name} = '...' exactly once"
    return values[0]


def test_toc_and_config_are_read_consistently():
    repo = book_layout.repository()
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repo["url"]), repo
    assert repo["branch"], repo
    names = book_layout.toc_docnames()
    assert names[0] == REFERENCE, "the book's root page is the introduction"
    for name in names:
        book_layout.source_of(name)  # exactly one source file per entry
    assert len(set(names)) == len(names), "a page is listed twice in _toc.yml"
    assert REFERENCE in NOTEBOOKS


def test_layout_reader_agrees_with_pyyaml():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    repo = book_layout.repository()
    for key in ("url", "branch", "path_to_book"):
        assert str(config["repository"][key]) == repo[key], key
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))

    def walk(node):
        if isinstance(node, dict):
            for key in ("root", "file"):
                if key in node:
                    yield node[key]
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key, []):
                    yield from walk(child)

    assert list(walk(toc)) == book_layout.toc_docnames()


def test_book_config_essentials():
    text = (ROOT / "_config.yml").read_text(encoding="utf-8")
    assert re.search(r'^\s*execute_notebooks\s*:\s*"?off"?\s*$', text, re.M), "notebooks must not run at build time"
    assert re.search(r'^\s*colab_url\s*:\s*"?https://colab\.research\.google\.com"?\s*$', text, re.M)
    assert re.search(r"^only_build_toc_files\s*:\s*true\s*$", text, re.M)


@pytest.mark.parametrize("docname", NOTEBOOKS)
def test_chapter_opens_with_the_setup_cell(docname):
    repo = book_layout.repository()
    cell = _setup_cell(docname)
    src = _source(cell)
    assert src == _source(_setup_cell(REFERENCE)), (
        f"{docname}.ipynb: the setup cell differs from chapters/intro.ipynb's; run tools/sync_setup_cells.py"
    )
    assert "nbval-ignore-output" in cell.get("metadata", {}).get("tags", []), (
        f"{docname}.ipynb: tag the setup cell 'nbval-ignore-output' (its output depends on the GPU)"
    )
    tree = ast.parse(src)  # plain Python: no %pip or !pip magics
    assert _string_assignment(tree, "REPO_URL") == repo["url"], "REPO_URL must be repository.url of _config.yml"
    assert _string_assignment(tree, "RELEASE") == f"v{_version()}", "RELEASE must be v + roilib/_version.py's version"
    for url in re.findall(r"https?://[^\s\"'@{}]+", src):
        assert url == repo["url"], f"{docname}.ipynb: unexpected URL in the setup cell: {url}"
    assert "getDeviceCount()" in src and "import cupy" in src, "the setup cell must report the GPU"

    outputs = cell.get("outputs", [])
    assert cell.get("execution_count") is not None and outputs, f"{docname}.ipynb: the setup cell was not run"
    for out in outputs:
        assert out["output_type"] == "stream" and out["name"] == "stdout", (
            f"{docname}.ipynb: the setup cell wrote {out['output_type']} {out.get('name', '')}"
        )
    assert "".join(_source({"source": o["text"]}) for o in outputs).startswith("roilib ")


def test_setup_cells_match_the_template():
    """The committed cells are what the sync script writes (its --check mode)."""
    proc = subprocess.run(
        [sys.executable, str(SYNC), "--check"], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "setup cells out of sync: none", proc.stdout


# Runs the setup cell against fakes: roilib hidden (a fresh Colab), pip recorded instead
# of run, nvidia-smi and CuPy as the scenario (JSON on argv) says.
DRIVER = r"""
import json, shutil, subprocess, sys, types
scenario = json.loads(sys.argv[1])
calls = []

def fake_run(cmd, **kwargs):
    cmd = list(cmd)
    calls.append(cmd)
    if cmd[0] == "nvidia-smi":
        smi = scenario["nvidia_smi"]
        return subprocess.CompletedProcess(cmd, smi["returncode"], stdout=smi["stdout"], stderr="")
    if any(arg.startswith(tuple(scenario.get("pip_fails", []))) for arg in cmd[4:]):
        if kwargs.get("check"):
            raise subprocess.CalledProcessError(1, cmd)
        return subprocess.CompletedProcess(cmd, 1)
    for arg in cmd:  # "installed": the next import succeeds
        if arg.startswith("roilib"):
            sys.modules.pop("roilib", None)
        if arg.startswith("cupy-"):
            sys.modules["cupy"] = fake_cupy
    return subprocess.CompletedProcess(cmd, 0)

fake_cupy = types.ModuleType("cupy")
fake_cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))
subprocess.run = fake_run
shutil.which = lambda name, *a, **k: "/usr/bin/nvidia-smi" if name == "nvidia-smi" and scenario["nvidia_smi"] else None
sys.modules["roilib"] = None  # import roilib raises ImportError, as on a fresh Colab
sys.modules["cupy"] = fake_cupy if scenario["cupy"] else None
if scenario.get("torch_cuda") is not None:
    sys.modules["torch"] = types.SimpleNamespace(version=types.SimpleNamespace(cuda=scenario["torch_cuda"]))
else:
    sys.modules["torch"] = None
exec(compile(sys.stdin.read(), "setup_cell", "exec"), {"__name__": "__main__"})
print("CALLS=" + json.dumps(calls))
"""

SMI_BANNER = (
    "+-----------------------------------------------------------------------------+\n"
    "| NVIDIA-SMI 580.82.07   Driver Version: 580.82.07   CUDA Version: {cuda}     |\n"
    "|   0  Tesla T4            Off | 00000000:00:04.0 Off |                    0 |\n"
)


def _driver(scenario) -> subprocess.CompletedProcess:
    """The setup cell of the reference chapter run by DRIVER under ``scenario``."""
    src = _source(_setup_cell(REFERENCE))
    return subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(scenario)],
        input=src, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )


def _run_setup_cell(scenario):
    """(pip commands, other commands, printed lines) of the setup cell under ``scenario``."""
    proc = _driver(scenario)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    calls = json.loads(lines[-1][len("CALLS="):])
    pips = [c for c in calls if c[1:4] == ["-m", "pip", "install"]]
    others = [c for c in calls if c not in pips]
    return pips, others, lines[:-1]


def test_setup_cell_installs_from_the_configured_repository():
    repo = book_layout.repository()
    pips, others, lines = _run_setup_cell({"nvidia_smi": None, "cupy": False})
    assert len(pips) == 1 and not others, (pips, others)
    cmd = pips[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"], cmd
    target = f"git+{repo['url']}@v{_version()}"
    assert cmd[-1] == f"roilib[plot] @ {target}", (cmd, target)
    assert len(lines) == 1 and lines[0].startswith("roilib ") and "GPU: none" in lines[0], lines


@pytest.mark.parametrize(
    "scenario, wheel",
    [
        # Colab's T4 runtime today: driver banner says CUDA 12.x
        ({"nvidia_smi": {"returncode": 0, "stdout": SMI_BANNER.format(cuda="12.4")}, "cupy": False}, "cupy-cuda12x"),
        ({"nvidia_smi": {"returncode": 0, "stdout": SMI_BANNER.format(cuda="13.0")}, "cupy": False}, "cupy-cuda13x"),
        # a banner without the version: torch's CUDA build decides
        ({"nvidia_smi": {"returncode": 0, "stdout": "GPU 0: Tesla T4\n"}, "cupy": False, "torch_cuda": "12.6"},
         "cupy-cuda12x"),
        # no CuPy wheel for CUDA 11 in CuPy 14: stay on the CPU
        ({"nvidia_smi": {"returncode": 0, "stdout": SMI_BANNER.format(cuda="11.8")}, "cupy": False}, None),
        # a driver without a usable device (nvidia-smi fails)
        ({"nvidia_smi": {"returncode": 9, "stdout": "NVIDIA-SMI has failed\n"}, "cupy": False, "torch_cuda": "12.6"},
         None),
        # no driver at all (CPU runtime): nvidia-smi is never run, torch never imported
        ({"nvidia_smi": None, "cupy": False, "torch_cuda": "12.6"}, None),
        # CuPy already there (Colab's GPU image): nothing to install
        ({"nvidia_smi": {"returncode": 0, "stdout": SMI_BANNER.format(cuda="12.4")}, "cupy": True}, None),
    ],
    ids=["cuda12", "cuda13", "torch-fallback", "cuda11", "smi-fails", "no-driver", "cupy-present"],
)
def test_setup_cell_installs_the_cupy_wheel_for_the_cuda_major(scenario, wheel):
    pips, others, lines = _run_setup_cell(scenario)
    assert pips[0][-1].startswith("roilib[plot] @ git+"), pips
    cupy_installs = [c[-1] for c in pips[1:]]
    if wheel is None:
        assert cupy_installs == [], cupy_installs
    else:
        assert cupy_installs == [f"{wheel}[ctk]"], cupy_installs
    assert others == ([["nvidia-smi"]] if scenario["nvidia_smi"] and not scenario["cupy"] else []), others
    gpu_active = wheel is not None or scenario["cupy"]
    assert len(lines) == 1 and ("GPU: active" in lines[0]) == gpu_active, lines


def test_a_failed_cupy_install_leaves_the_chapter_on_the_cpu():
    smi = {"returncode": 0, "stdout": SMI_BANNER.format(cuda="12.4")}
    pips, _, lines = _run_setup_cell({"nvidia_smi": smi, "cupy": False, "pip_fails": ["cupy-"]})
    assert [c[-1] for c in pips[1:]] == ["cupy-cuda12x[ctk]"], pips
    assert len(lines) == 1 and "GPU: none" in lines[0], lines


def test_a_failed_roilib_install_stops_the_cell():
    proc = _driver({"nvidia_smi": None, "cupy": False, "pip_fails": ["roilib"]})
    assert proc.returncode != 0 and "CalledProcessError" in proc.stderr, proc.stderr


def _sync_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sync_setup_cells", SYNC)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sync_script_inserts_or_replaces_only_the_setup_cell():
    sync = _sync_module()
    title = {"cell_type": "markdown", "id": "t", "metadata": {}, "source": ["# A chapter"]}
    body = {"cell_type": "code", "execution_count": 2, "id": "b", "metadata": {}, "outputs": [], "source": ["x = 1"]}
    old = {"cell_type": "code", "execution_count": 1, "id": "s", "metadata": {"tags": ["mine"]},
           "outputs": [], "source": ["# Setup: an older cell\n", "import roilib"]}
    nb = {"cells": [title, body], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}

    inserted = sync.synced(nb, "# Setup: new", "roilib 9.9; GPU: none\n")
    assert [c["id"] for c in inserted["cells"]] == ["t", "roilib-setup", "b"]
    assert inserted["cells"][1]["outputs"][0]["text"] == ["roilib 9.9; GPU: none\n"]
    assert inserted["cells"][1]["metadata"]["tags"] == ["nbval-ignore-output", "hide-input"]

    replaced = sync.synced(dict(nb, cells=[title, old, body]), "# Setup: new", "roilib 9.9; GPU: none\n")
    setup = replaced["cells"][1]
    assert [c["id"] for c in replaced["cells"]] == ["t", "s", "b"] and setup["source"] == ["# Setup: new"]
    assert setup["metadata"]["tags"] == ["mine", "nbval-ignore-output", "hide-input"]
    assert sync.synced(replaced, "# Setup: new", "roilib 9.9; GPU: none\n") == replaced  # idempotent
    assert replaced["cells"][2] is body and nb["cells"] == [title, body]  # nothing else touched
