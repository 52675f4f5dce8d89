"""Parity of multiscale RoIAlign and PS-RoIPool/PS-RoIAlign with torchvision's CPU ops.

Expected values come from ``tests/fixtures/torchvision_family_parity.npz``, written by
``tools/make_family_fixture.py`` with torchvision (versions stored inside it). Where
torchvision's CPU op is inconsistent, the test checks exactly that difference:

* PS-RoIPool's backward: torchvision clips bins to ``[0, size]`` in the backward but to
  ``[0, size - 1]`` in the forward; roilib's backward is the forward's transpose. The
  two agree wherever no bin reaches the map's last row or column.
* PS-RoIAlign on a box whose adaptive grid is empty: torchvision divides 0 by 0 (NaN),
  roilib outputs 0.
"""
from pathlib import Path

import numpy as np
import pytest

import roilib
from roilib.geometry import c_round, scale_boxes

FIXTURE = Path(__file__).parent / "fixtures" / "torchvision_family_parity.npz"
DATA = np.load(FIXTURE, allow_pickle=False)
CASES = [f"case{i:03d}" for i in range(int(DATA["num_cases"]))]
TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-11}


def _case(name):
    return {key[len(name) + 1 :]: DATA[key] for key in DATA.files if key.startswith(name + "_")}


def _by_op(op):
    return [c for c in CASES if str(DATA[c + "_op"]) == op]


def _ps(case, backward=False):
    kwargs = dict(output_size=tuple(case["output_size"].tolist()), spatial_scale=float(case["spatial_scale"]))
    if "sampling_ratio" in case:
        kwargs["sampling_ratio"] = int(case["sampling_ratio"])
    op = getattr(roilib, str(case["op"]) + ("_backward" if backward else ""))
    args = (case["grad_output"],) if backward else ()
    return op(*args, case["input"], case["rois"], **kwargs)


def _pyramid(case):
    maps = [case[f"feature{i}"] for i in range(int(case["num_levels"]))]
    kwargs = dict(
        output_size=tuple(case["output_size"].tolist()),
        scales=case["scales"].tolist(),
        sampling_ratio=int(case["sampling_ratio"]),
        canonical_scale=float(case["canonical_scale"]),
        canonical_level=int(case["canonical_level"]),
    )
    return maps, kwargs


def _empty_grid(case):
    """Boxes where torchvision's PS-RoIAlign divides by a sample count of 0 (0 / 0).

    The count is ``ceil(roi_h / PH) * ceil(roi_w / PW)`` without a floor at 1: 0 when
    either size lies in ``(-P, 0]``. (A negative count, an inverted box, gives -0.)
    """
    if int(case["sampling_ratio"]) > 0:
        return np.zeros(len(case["rois"]), dtype=bool)
    dt = case["input"].dtype.type
    b = scale_boxes(case["rois"], float(case["spatial_scale"]), case["input"].dtype)
    half = dt(0.5)
    roi_w = (b[:, 2] - half) - (b[:, 0] - half)
    roi_h = (b[:, 3] - half) - (b[:, 1] - half)
    ph, pw = case["output_size"]
    return (np.ceil(roi_h / dt(ph)) == 0) | (np.ceil(roi_w / dt(pw)) == 0)


def _clipped_to_size_backward(case):
    """torchvision's PS-RoIPool backward rule, written out by hand: the forward's bins
    but clipped to ``[0, size]``, each pixel getting ``grad / area`` (a loop, test-only)."""
    x, rois, g = case["input"], case["rois"], case["grad_output"]
    dt = x.dtype.type
    n, c, h, w = x.shape
    ph, pw = (int(v) for v in case["output_size"])
    q = np.asarray(c_round(rois[:, 1:] * dt(case["spatial_scale"])), dtype=np.int64)
    grad = np.zeros(x.shape, dtype=np.float64)
    for k in range(len(rois)):
        bh = dt(max(q[k, 3] - q[k, 1], 1)) / dt(ph)
        bw = dt(max(q[k, 2] - q[k, 0], 1)) / dt(pw)
        for i in range(ph):
            h0 = min(max(int(np.floor(dt(i) * bh)) + q[k, 1], 0), h)
            h1 = min(max(int(np.ceil(dt(i + 1) * bh)) + q[k, 1], 0), h)
            for j in range(pw):
                w0 = min(max(int(np.floor(dt(j) * bw)) + q[k, 0], 0), w)
                w1 = min(max(int(np.ceil(dt(j + 1) * bw)) + q[k, 0], 0), w)
                if h1 > h0 and w1 > w0:
                    for o in range(g.shape[1]):
                        cin = (o * ph + i) * pw + j
                        grad[int(rois[k, 0]), cin, h0:h1, w0:w1] += g[k, o, i, j] / ((h1 - h0) * (w1 - w0))
    return grad


def test_fixture_records_the_peer_versions():
    assert str(DATA["torchvision_version"]).startswith("0.")
    assert len(_by_op("multiscale_roi_align")) >= 8 and len(_by_op("ps_roi_align")) >= 32


@pytest.mark.parametrize("name", _by_op("ps_roi_pool") + _by_op("ps_roi_align"))
def test_ps_forward_matches_torchvision(name):
    case = _case(name)
    out = _ps(case)
    expected = case["output"].copy()
    assert out.dtype == expected.dtype and out.shape == expected.shape
    if str(case["op"]) == "ps_roi_align":
        nan_rows = np.isnan(expected).any(axis=(1, 2, 3))
        np.testing.assert_array_equal(nan_rows, _empty_grid(case))  # exactly where 0 / 0 happens
        expected[nan_rows] = 0
    np.testing.assert_allclose(out, expected, rtol=0, atol=TOL[out.dtype], err_msg=str(case["name"]))


@pytest.mark.parametrize("name", _by_op("ps_roi_align"))
def test_ps_roi_align_backward_matches_torchvision(name):
    case = _case(name)
    grad = _ps(case, backward=True)
    np.testing.assert_allclose(grad, case["grad_input"], rtol=0, atol=TOL[grad.dtype], err_msg=str(case["name"]))


INSIDE_POOL = [c for c in _by_op("ps_roi_pool") if str(DATA[c + "_name"]).startswith("inside")]


@pytest.mark.parametrize("name", INSIDE_POOL)
def test_ps_roi_pool_backward_matches_torchvision_away_from_the_last_row_and_column(name):
    case = _case(name)
    grad = _ps(case, backward=True)
    np.testing.assert_allclose(grad, case["grad_input"], rtol=0, atol=TOL[grad.dtype], err_msg=str(case["name"]))


@pytest.mark.parametrize("name", _by_op("ps_roi_pool"))
def test_torchvision_ps_roi_pool_backward_clips_bins_to_the_map_size(name):
    """The fixture's gradients follow the rule the module docstring describes (so roilib's
    difference from them is that rule, not an error)."""
    case = _case(name)
    expected = _clipped_to_size_backward(case)
    np.testing.assert_allclose(case["grad_input"], expected, rtol=0, atol=TOL[case["input"].dtype])


def test_ps_roi_pool_backward_differs_from_torchvision_on_boxes_reaching_the_edge():
    """The difference is real (the fixture has edge boxes where the rules part ways)."""
    differing = 0
    for name in _by_op("ps_roi_pool"):
        case = _case(name)
        diff = np.abs(_ps(case, backward=True) - case["grad_input"]) > TOL[case["input"].dtype]
        differing += int(diff.any())
    assert differing > 0


@pytest.mark.parametrize("name", _by_op("multiscale_roi_align"))
def test_multiscale_levels_match_torchvision(name):
    case = _case(name)
    maps, kw = _pyramid(case)
    from roilib.reference.multiscale import box_levels

    levels = box_levels(case["rois"], kw["scales"], kw["canonical_scale"], kw["canonical_level"])
    np.testing.assert_array_equal(levels, case["levels"])


@pytest.mark.parametrize("name", _by_op("multiscale_roi_align"))
def test_multiscale_forward_matches_torchvision(name):
    case = _case(name)
    maps, kw = _pyramid(case)
    out = roilib.multiscale_roi_align(maps, case["rois"], **kw)
    assert out.dtype == case["output"].dtype and out.shape == case["output"].shape
    np.testing.assert_allclose(out, case["output"], rtol=0, atol=TOL[out.dtype], err_msg=str(case["name"]))


@pytest.mark.parametrize("name", _by_op("multiscale_roi_align"))
def test_multiscale_backward_matches_torchvision(name):
    case = _case(name)
    maps, kw = _pyramid(case)
    grads = roilib.multiscale_roi_align_backward(case["grad_output"], maps, case["rois"], **kw)
    assert len(grads) == len(maps)
    for level, g in enumerate(grads):
        expected = case[f"grad_feature{level}"]
        assert g.dtype == expected.dtype and g.shape == expected.shape
        np.testing.assert_allclose(g, expected, rtol=0, atol=TOL[g.dtype], err_msg=f"{case['name']} level {level}")


def test_parity_summary_max_error():
    """Largest deviation per op and dtype over all cases (for the closing note)."""
    worst = {}
    for name in CASES:
        case = _case(name)
        op = str(case["op"])
        if op == "multiscale_roi_align":
            maps, kw = _pyramid(case)
            dt = maps[0].dtype.name
            out = roilib.multiscale_roi_align(maps, case["rois"], **kw)
            grads = roilib.multiscale_roi_align_backward(case["grad_output"], maps, case["rois"], **kw)
            bwd = max(float(np.abs(g - case[f"grad_feature{i}"]).max(initial=0)) for i, g in enumerate(grads))
            fwd = float(np.abs(out - case["output"]).max(initial=0))
        else:
            dt = case["input"].dtype.name
            expected = np.nan_to_num(case["output"], nan=0.0)
            fwd = float(np.abs(_ps(case) - expected).max(initial=0))
            bwd = 0.0
            if op == "ps_roi_align" or name in INSIDE_POOL:  # PS-RoIPool: where the rules agree
                bwd = float(np.abs(_ps(case, True) - case["grad_input"]).max(initial=0))
        key = (op, dt)
        f0, b0 = worst.get(key, (0.0, 0.0))
        worst[key] = (max(f0, fwd), max(b0, bwd))
    print("max abs error vs torchvision (forward, backward):", worst)
    assert all(max(e) <= TOL[np.dtype(dt)] for (_, dt), e in worst.items())
