"""``make gpu-check``: everything that needs a GPU, in one prepared command.

Meant for a machine with an NVIDIA GPU where Python already has torch, torchvision,
CuPy, pytest and hypothesis, and no network: it installs nothing and runs this
checkout through ``PYTHONPATH``. In order, each step with its own time limit (about
6 minutes in all), appending to one results file as it goes:

1. the machine: GPU name, driver and library versions;
2. the GPU tests (``tests/test_kernels_gpu.py``, ``tests/test_gpu_torch.py``);
3. ``python -m roilib.bench --device cuda`` (forward, atomic and deterministic
   backward against torchvision's CUDA ops, with the memory-traffic floor);
4. the CUDA chapter's code cells, executed on the GPU in one namespace (shell and
   magic lines skipped, matplotlib off-screen); each cell's printed text is compared
   with the output stored in the notebook, except cells tagged ``nbval-ignore-output``.

Usage: ``python tools/gpu_check.py [--out FILE]`` (default ``gpu-check-results.txt``).
The exit status is non-zero when a step fails.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = ROOT / "chapters" / "cuda_kernels.ipynb"
GPU_TESTS = ["tests/test_kernels_gpu.py", "tests/test_gpu_torch.py"]


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("MPLBACKEND", "Agg")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _step(out, title: str, command, timeout: int) -> bool:
    out.write(f"\n## {title}\n$ {' '.join(command)}\n")
    out.flush()
    start = time.time()
    try:
        proc = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
        text, ok = proc.stdout + proc.stderr, proc.returncode == 0
        status = f"exit {proc.returncode}"
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        ok, status = False, f"timed out after {timeout} s"
    out.write(text)
    out.write(f"\n[{title}: {status}, {time.time() - start:.0f} s]\n")
    out.flush()
    print(f"{title}: {status}", flush=True)
    return ok


MACHINE = """
import platform, numpy, torch
print("python", platform.python_version(), "numpy", numpy.__version__, "torch", torch.__version__,
      "cuda", torch.version.cuda)
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i}", torch.cuda.get_device_name(i))
try:
    import torchvision; print("torchvision", torchvision.__version__)
except Exception as e:
    print("torchvision: not importable:", e)
import cupy; print("cupy", cupy.__version__, "runtime", cupy.cuda.runtime.runtimeGetVersion(),
                   "driver", cupy.cuda.runtime.driverGetVersion())
"""


def _cell_text(outputs) -> str:
    """The printed text a stored cell produced (streams, and plain-text results)."""
    parts = []
    for o in outputs:
        if o.get("output_type") == "stream" and o.get("name") == "stdout":
            parts.append("".join(o["text"]))
        elif o.get("output_type") in ("execute_result",) and "text/plain" in o.get("data", {}):
            parts.append("".join(o["data"]["text/plain"]) + "\n")
    return "".join(parts)


def run_chapter(path: Path) -> int:
    """Execute a notebook's code cells in order; compare printed text with the stored one."""
    import matplotlib

    matplotlib.use("Agg")
    nb = json.loads(path.read_text(encoding="utf-8"))
    namespace = {"__name__": "__main__"}
    checked = same = failed = 0
    os.chdir(path.parent)
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("!", "%")))
        buffer = io.StringIO()
        start = time.time()
        try:
            with contextlib.redirect_stdout(buffer):
                exec(compile(code, f"{path.name}[{index}]", "exec"), namespace)
        except Exception as e:  # report and go on: later cells may not depend on it
            failed += 1
            print(f"cell {index}: FAILED {type(e).__name__}: {e}")
            continue
        tags = cell.get("metadata", {}).get("tags", [])
        got = buffer.getvalue()
        note = f"cell {index}: {time.time() - start:.2f} s"
        if "nbval-ignore-output" in tags or "hide-cell" in tags:
            print(f"{note}, output not compared; it printed:\n{got}")
            continue
        checked += 1
        if got.strip() == _cell_text(cell.get("outputs", [])).strip():
            same += 1
            print(f"{note}, output as stored")
        else:
            print(f"{note}, OUTPUT DIFFERS from the stored one:\n--- got\n{got}--- stored\n{_cell_text(cell.get('outputs', []))}")
    print(f"{path.name}: {checked} cells compared, {same} as stored, {failed} failed")
    return 0 if failed == 0 and same == checked else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-check-results.txt", help="results file")
    parser.add_argument("--chapter", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.chapter:
        return run_chapter(Path(args.chapter))
    results = Path(args.out)
    ok = True
    with results.open("w", encoding="utf-8") as out:
        out.write(f"# make gpu-check, {time.strftime('%Y-%m-%d %H:%M:%S')}, {platform.node()}\n")
        ok &= _step(out, "machine", [sys.executable, "-c", MACHINE], 60)
        ok &= _step(out, "GPU tests", [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                       "--timeout=120", *GPU_TESTS], 330)  # fmt: skip
        ok &= _step(out, "GPU benchmark", [sys.executable, "-m", "roilib.bench", "--device", "cuda", "--repeat", "20"],
                    120)  # fmt: skip
        ok &= _step(out, "CUDA chapter on the GPU", [sys.executable, __file__, "--chapter", str(CHAPTER)], 90)
        out.write(f"\n# overall: {'PASS' if ok else 'FAIL'}\n")
    print(f"results in {results}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
