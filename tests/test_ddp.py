"""roilib.torch under DistributedDataParallel: 2 CPU processes (gloo) train a small RoI
head on halves of a batch; their gradients must equal one process's on the whole batch.

The processes rendezvous through a file in the test's temporary directory (no TCP port,
so parallel test runs cannot collide); every RNG is seeded and each process uses one
thread.
"""
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

import roilib.torch as rt  # noqa: E402

WORLD = 2
STEPS = 3
BOXES_PER_IMAGE = 3
IMAGES = 4  # two per process


class RoIHead(nn.Module):
    """Convolution -> RoIAlign and RoIPool -> linear class scores."""

    def __init__(self, channels=3, classes=4):
        super().__init__()
        self.conv = nn.Conv2d(channels, 6, 3, padding=1)
        self.align = rt.RoIAlign((3, 3), 0.5, 2, aligned=True)
        self.pool = rt.RoIPool((2, 2), 0.5)
        self.fc = nn.Linear(6 * (9 + 4), classes)

    def forward(self, images, boxes):
        f = torch.relu(self.conv(images))
        return self.fc(torch.cat([self.align(f, boxes).flatten(1), self.pool(f, boxes).flatten(1)], 1))


def make_data():
    """The whole batch: images, per-image (K_i, 4) boxes, labels (seeded)."""
    rng = np.random.default_rng(20261128)
    images = torch.tensor(rng.standard_normal((IMAGES, 3, 16, 16)))
    lo = rng.uniform(0.0, 20.0, (IMAGES, BOXES_PER_IMAGE, 2))
    hi = lo + rng.uniform(4.0, 12.0, (IMAGES, BOXES_PER_IMAGE, 2))
    boxes = [torch.tensor(np.concatenate([lo[i], hi[i]], 1)) for i in range(IMAGES)]
    labels = torch.tensor(rng.integers(0, 4, (IMAGES, BOXES_PER_IMAGE)))
    return images, boxes, labels


def make_model():
    torch.manual_seed(0)
    return RoIHead().double()


def train(model, images, boxes, labels, steps=STEPS):
    """SGD steps with the mean cross-entropy over the boxes; the gradients of each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    grads = []
    for _ in range(steps):
        optimizer.zero_grad()
        scores = model(images, boxes)
        nn.functional.cross_entropy(scores, labels.flatten()).backward()
        # (DDP names its parameters "module.<name>")
        grads.append({name.removeprefix("module."): p.grad.detach().clone() for name, p in model.named_parameters()})
        optimizer.step()
    return grads


def _worker(rank, store_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        images, boxes, labels = make_data()
        mine = slice(rank * IMAGES // WORLD, (rank + 1) * IMAGES // WORLD)  # this process's images
        model = nn.parallel.DistributedDataParallel(make_model())
        grads = train(model, images[mine], boxes[mine], labels[mine])
        params = {name: p.detach().clone() for name, p in model.module.named_parameters()}
        torch.save({"grads": grads, "params": params}, os.path.join(out_dir, f"rank{rank}.pt"))
        # free DDP's reducer while the process group is registered: a reducer that holds
        # the group's last reference destroys it holding the GIL, which can deadlock with
        # gloo's worker thread
        del model
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def max_gradient_difference(ddp_result):
    """max |DDP gradient - single-process gradient| over every step and parameter."""
    images, boxes, labels = make_data()
    torch.set_num_threads(1)
    single = train(make_model(), images, boxes, labels)
    return max(
        float((step_ddp[name] - step_single[name]).abs().max())
        for step_ddp, step_single in zip(ddp_result["grads"], single)
        for name in step_single
    ), single


def test_ddp_gradients_equal_a_single_process_run(ddp_run):
    difference, single = max_gradient_difference(ddp_run[0])
    # float64: the mean over 12 boxes and the average of two means over 6 differ by rounding only
    assert difference <= 1e-14, difference
    # and the check has teeth: every step moved every parameter
    for step in single:
        assert all(float(g.abs().max()) > 1e-6 for g in step.values())


def test_ddp_replicas_stay_identical(ddp_run):
    for name, p in ddp_run[0]["params"].items():
        assert torch.equal(p, ddp_run[1]["params"][name]), name
    for step0, step1 in zip(ddp_run[0]["grads"], ddp_run[1]["grads"]):
        for name in step0:
            assert torch.equal(step0[name], step1[name]), name


def test_one_process_alone_differs_from_the_whole_batch():
    # without DDP's averaging, half of the batch gives another gradient: the equality
    # above is DDP's doing, not an accident of the data
    images, boxes, labels = make_data()
    half = train(make_model(), images[:2], boxes[:2], labels[:2], steps=1)[0]
    whole = train(make_model(), images, boxes, labels, steps=1)[0]
    assert max(float((half[n] - whole[n]).abs().max()) for n in whole) > 1e-3


if __name__ == "__main__":  # the number for the notes
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(str(Path(tmp) / "store"), tmp), nprocs=WORLD, join=True)
        result = torch.load(Path(tmp) / "rank0.pt")
    difference, _ = max_gradient_difference(result)
    print(f"DDP (gloo, {WORLD} processes) vs single process, {STEPS} SGD steps, float64: "
          f"max |gradient difference| = {difference:.3g}", file=sys.stdout)
