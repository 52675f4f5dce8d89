"""Parity with torchvision's CPU ops, through a committed fixture.

The fixture was produced by ``tools/make_torchvision_fixture.py`` with torchvision
(versions stored inside it); torchvision is not needed to run these tests.
"""
from pathlib import Path

import numpy as np
import pytest

import roilib

FIXTURE = Path(__file__).parent / "fixtures" / "torchvision_parity.npz"
DATA = np.load(FIXTURE, allow_pickle=False)
CASES = [f"case{i:03d}" for i in range(int(DATA["num_cases"]))]
TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-11}


def _case(name):
    return {key[len(name) + 1 :]: DATA[key] for key in DATA.files if key.startswith(name + "_")}


def _call(case, backward):
    kwargs = dict(output_size=tuple(case["output_size"].tolist()), spatial_scale=float(case["spatial_scale"]))
    if str(case["op"]) == "roi_align":
        kwargs.update(sampling_ratio=int(case["sampling_ratio"]), aligned=bool(case["aligned"]))
    op = getattr(roilib, str(case["op"]) + ("_backward" if backward else ""))
    args = (case["grad_output"],) if backward else ()
    return op(*args, case["input"], case["rois"], **kwargs)


def test_fixture_records_the_peer_versions():
    assert str(DATA["torchvision_version"]).startswith("0.")
    assert len(CASES) > 100


@pytest.mark.parametrize("name", CASES)
def test_forward_matches_torchvision(name):
    case = _case(name)
    out = _call(case, backward=False)
    assert out.dtype == case["output"].dtype and out.shape == case["output"].shape
    np.testing.assert_allclose(out, case["output"], rtol=0, atol=TOL[out.dtype], err_msg=str(case["name"]))


@pytest.mark.parametrize("name", CASES)
def test_backward_matches_torchvision(name):
    case = _case(name)
    grad = _call(case, backward=True)
    assert grad.dtype == case["grad_input"].dtype and grad.shape == case["input"].shape
    np.testing.assert_allclose(grad, case["grad_input"], rtol=0, atol=TOL[grad.dtype], err_msg=str(case["name"]))


def test_parity_summary_max_error():
    """Largest deviation over all cases, per op and dtype (reported in the closing note)."""
    worst = {}
    for name in CASES:
        case = _case(name)
        key = (str(case["op"]), case["input"].dtype.name)
        err = max(
            float(np.abs(_call(case, False) - case["output"]).max(initial=0)),
            float(np.abs(_call(case, True) - case["grad_input"]).max(initial=0)),
        )
        worst[key] = max(worst.get(key, 0.0), err)
    print("max abs error vs torchvision:", worst)
    assert all(err <= TOL[np.dtype(dt)] for (_, dt), err in worst.items())
