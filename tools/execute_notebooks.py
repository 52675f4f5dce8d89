"""Re-execute chapter notebooks in place, from a fresh kernel, as the book stores them.

    python tools/execute_notebooks.py chapters/cuda_kernels.ipynb [...]

Needs nbclient (installed with the book extra, `pip install -e .[book]`). Runs every cell with nbclient in the notebook's directory (the kernel is this Python's
``python3``), keeps the outputs, and drops nbclient's per-cell execution timestamps so
that a re-run changes only what the cells printed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def execute(path: Path, timeout: int = 600) -> None:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        execute(Path(name))
        print("executed", name)
