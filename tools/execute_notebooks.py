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


def merge_streams(nb) -> None:
    """Join consecutive outputs of the same stream in a cell (nbclient splits them where
    the kernel happened to flush), so a cell's printout is one block in the book."""
    for cell in nb.cells:
        merged = []
        for out in cell.get("outputs", []):
            prev = merged[-1] if merged else None
            if out.get("output_type") == "stream" and prev is not None and prev.get("output_type") == "stream" \
                    and prev.get("name") == out.get("name"):
                prev["text"] = "".join(prev["text"]) + "".join(out["text"])
            else:
                merged.append(out)
        if "outputs" in cell:
            cell["outputs"] = merged


def execute(path: Path, timeout: int = 600) -> None:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    merge_streams(nb)
    nbformat.write(nb, path)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--merge-streams"]:  # tidy stored outputs without re-running
        for name in sys.argv[2:]:
            nb = nbformat.read(name, as_version=4)
            merge_streams(nb)
            nbformat.write(nb, name)
        sys.exit(0)
    for name in sys.argv[1:]:
        execute(Path(name))
        print("executed", name)
