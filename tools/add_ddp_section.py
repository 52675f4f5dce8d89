"""Insert (or refresh) the DistributedDataParallel section of chapters/using_roilib.ipynb
and re-execute the chapter so that its stored outputs are current.

Idempotent: the section's cells carry ``"roilib_section": "ddp"`` in their metadata;
a rerun removes them and inserts the current text before the "## float16, float32,
float64" section (after the ``torch.compile`` section). Run from the repository root,
with the project's environment (``make test`` builds it) plus nbclient::

    .venv/bin/pip install nbclient
    .venv/bin/python tools/add_ddp_section.py            # insert and re-execute
    .venv/bin/python tools/add_ddp_section.py --no-run   # insert only
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

NOTEBOOK = Path(__file__).resolve().parent.parent / "chapters" / "using_roilib.ipynb"
MARK = "roilib_section"
SECTION = "ddp"

INTRO = """\
### Several processes: `DistributedDataParallel`

roilib's operations are ordinary autograd operators, so
`torch.nn.parallel.DistributedDataParallel` (DDP) trains a model that contains them
like any other model: each process runs a replica on its share of the batch, and during
`backward()` DDP averages the parameter gradients over the processes, so that every
replica takes the same step. The average is the gradient of the whole batch when each
process scales its loss to its share: below, each process sums the loss over its own
boxes and multiplies by (number of processes) / (boxes in the whole batch).

The cell starts two CPU processes with the `gloo` backend; process $r$ takes image $r$
and its two boxes. They meet through a file rather than a network port. The processes
are forked from this notebook so that they see the functions defined in it; in a script,
start them with `torch.multiprocessing.spawn` under `if __name__ == "__main__":`, and on
GPUs use the `nccl` backend with one GPU per process. The gradients of process 0 are
then compared with those of one process that runs the whole batch:"""

CODE = """\
import tempfile
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2                   # processes
K_TOTAL = len(rois)         # boxes in the whole batch
F = nn.functional


def summed_loss(scores, deltas, labels, targets):
    fg = labels > 0
    picked = deltas[fg, labels[fg] - 1]
    return (F.cross_entropy(scores, labels, reduction="sum")
            + F.smooth_l1_loss(picked, targets[fg], reduction="sum"))


def share(rank):
    # process `rank` gets image `rank` and its boxes (batch index 0 in its
    # own batch)
    mine = torch.from_numpy(rois[:, 0] == rank)
    rois_r = torch.from_numpy(rois)[mine].clone()
    rois_r[:, 0] = 0
    image = torch.from_numpy(features[rank:rank + 1])
    return image, rois_r, labels[mine], targets[mine]


def ddp_step(rank, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}",
                            rank=rank, world_size=WORLD)
    torch.manual_seed(0)         # the same initial weights in every process
    head = BoxHead(channels=8, num_classes=3, stride=8)
    model = nn.parallel.DistributedDataParallel(head)
    x_r, rois_r, labels_r, targets_r = share(rank)
    loss = summed_loss(*model(x_r, rois_r), labels_r, targets_r)
    (loss * WORLD / K_TOTAL).backward()  # DDP averages the gradients here
    if rank == 0:
        grads = {n: p.grad for n, p in model.module.named_parameters()}
        torch.save(grads, out)
    del model                    # DDP's reducer goes before its process group
    dist.destroy_process_group()


with tempfile.TemporaryDirectory() as tmp:
    mp.start_processes(ddp_step, args=(f"{tmp}/store", f"{tmp}/grads.pt"),
                       nprocs=WORLD, start_method="fork")
    ddp_grads = torch.load(f"{tmp}/grads.pt")

torch.manual_seed(0)
single = BoxHead(channels=8, num_classes=3, stride=8)
scores, deltas = single(torch.from_numpy(features), torch.from_numpy(rois))
(summed_loss(scores, deltas, labels, targets) / K_TOTAL).backward()
difference = max(
    (ddp_grads[n] - p.grad).abs().max().item()
    for n, p in single.named_parameters()
)
print(f"{WORLD} processes x {K_TOTAL // WORLD} boxes vs 1 process x {K_TOTAL} boxes")
print("same gradients, up to float32 rounding (1e-6):", difference <= 1e-6)"""

OUTRO = """\
The two runs differ only in the order of float32 additions. `tests/test_ddp.py` checks
the same in float64 over several SGD steps, with RoIAlign and RoIPool in the model."""


def section_cells() -> list:
    cells = [
        nbformat.v4.new_markdown_cell(INTRO),
        nbformat.v4.new_code_cell(CODE),
        nbformat.v4.new_markdown_cell(OUTRO),
    ]
    for i, cell in enumerate(cells):
        cell.id = f"using_ro-ddp-{i}"
        cell.metadata[MARK] = SECTION
    return cells


def insert_section(nb) -> int:
    """Remove any earlier copy of the section, insert the current one; its index."""
    nb.cells = [c for c in nb.cells if c.metadata.get(MARK) != SECTION]
    anchors = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.lstrip().startswith("## float16")]
    if anchors:
        at = anchors[0]
    else:  # after the code cell that compiles the head
        compiled = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "torch.compile(" in c.source]
        if not compiled:
            sys.exit(f"{NOTEBOOK}: found neither a '## float16' section nor a torch.compile cell to insert after")
        at = compiled[-1] + 1
    nb.cells[at:at] = section_cells()
    return at


def execute(nb) -> None:
    from nbclient import NotebookClient

    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", record_timing=False, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()
    for cell in nb.cells:  # one stream output per name, however the kernel flushed them
        if cell.cell_type == "code":
            cell.outputs = _coalesce_streams(cell.outputs)


def _coalesce_streams(outputs: list) -> list:
    merged = []
    for out in outputs:
        if out.output_type == "stream" and merged and merged[-1].output_type == "stream" and merged[-1].name == out.name:
            merged[-1].text += out.text
        else:
            merged.append(out)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true", help="insert the cells without executing the chapter")
    args = parser.parse_args()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = insert_section(nb)
    if not args.no_run:
        execute(nb)
    nbformat.write(nb, NOTEBOOK)
    print(f"{NOTEBOOK.name}: DDP section at cells {at}..{at + 2}" + ("" if args.no_run else ", chapter re-executed"))


if __name__ == "__main__":
    main()
