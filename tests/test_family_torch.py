"""roilib.torch's FPN and position-sensitive ops: gradcheck, the MultiScaleRoIAlign
module as a drop-in (against the torchvision fixture), and its errors."""
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import roilib  # noqa: E402
import roilib.torch as rt  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "torchvision_family_parity.npz"


def _ps_problem(seed=0):
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.standard_normal((2, 12, 9, 11)), requires_grad=True)
    f64 = torch.float64
    boxes = [torch.tensor([[1.3, 2.2, 12.7, 14.1], [4.1, 0.6, 9.3, 7.7]], dtype=f64),
             torch.tensor([[0.4, 3.3, 16.2, 15.1]], dtype=f64)]
    return x, boxes


def test_ps_ops_match_the_reference():
    x, boxes = _ps_problem()
    rois = np.array([[0, 1.3, 2.2, 12.7, 14.1], [0, 4.1, 0.6, 9.3, 7.7], [1, 0.4, 3.3, 16.2, 15.1]])
    np.testing.assert_array_equal(
        rt.ps_roi_align(x, boxes, (3, 2), 0.5, 2).detach().numpy(),
        roilib.ps_roi_align(x.detach().numpy(), rois, (3, 2), 0.5, 2),
    )
    np.testing.assert_array_equal(
        rt.PSRoIPool((2, 3), 0.5)(x, boxes).detach().numpy(), roilib.ps_roi_pool(x.detach().numpy(), rois, (2, 3), 0.5)
    )


@pytest.mark.parametrize("op", ["ps_roi_align", "ps_roi_pool"])
def test_ps_ops_pass_gradcheck(op):
    rng = np.random.default_rng(6)
    x = torch.tensor(rng.standard_normal((2, 6, 5, 6)), requires_grad=True)
    boxes = [torch.tensor([[1.3, 2.2, 9.7, 8.1]], dtype=torch.float64), torch.tensor([[0.4, 3.3, 7.2, 9.1]], dtype=torch.float64)]
    fn = getattr(rt, op)
    assert torch.autograd.gradcheck(lambda t: fn(t, boxes, (2, 3), 0.5), (x,))


def test_ps_channel_check_names_the_counts():
    x, boxes = _ps_problem()
    with pytest.raises(ValueError, match="input has 12 channels, which is not a multiple of PH \\* PW = 5 \\* 1 = 5"):
        rt.ps_roi_align(x, boxes, (5, 1))


def _fpn(rng, image_hw=(128, 192), strides=(4, 8, 16), dtype=torch.float64):
    h, w = image_hw
    return OrderedDict(
        (f"p{int(np.log2(s))}", torch.tensor(rng.standard_normal((1, 2, h // s, w // s)), dtype=dtype, requires_grad=True))
        for s in strides
    )


def test_multiscale_passes_gradcheck_in_every_map():
    rng = np.random.default_rng(1)
    feats = _fpn(rng, (32, 48), (4, 8))
    pooler = rt.MultiScaleRoIAlign(["p2", "p3"], 2, 2, canonical_scale=16, canonical_level=3)
    boxes = [torch.tensor([[1.3, 2.2, 10.7, 9.1], [4.1, 0.6, 40.3, 30.7]], dtype=torch.float64)]
    names = list(feats)

    def f(*maps):
        return pooler(OrderedDict(zip(names, maps)), boxes, [(32, 48)])

    assert torch.autograd.gradcheck(f, tuple(feats.values()))
    assert pooler.scales == [0.25, 0.125]


def _fixture_cases():
    data = np.load(FIXTURE, allow_pickle=False)
    for i in range(int(data["num_cases"])):
        p = f"case{i:03d}_"
        if str(data[p + "op"]) == "multiscale_roi_align" and str(data[p + "name"]).endswith("float64"):
            yield {k[len(p):]: data[k] for k in data.files if k.startswith(p)}


@pytest.mark.parametrize("case", list(_fixture_cases()), ids=lambda c: str(c["name"]))
def test_module_is_a_drop_in_for_torchvisions(case):
    """Built like torchvision's module, called like it, it gives torchvision's outputs
    and gradients (and infers torchvision's scales)."""
    n_levels = int(case["num_levels"])
    names = [f"m{i}" for i in range(n_levels)]
    feats = OrderedDict((n, torch.tensor(case[f"feature{i}"], requires_grad=True)) for i, n in enumerate(names))
    feats["unused"] = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    rois = case["rois"]
    n_images = int(rois[:, 0].max()) + 1 if len(rois) else 2
    n_images = max(n_images, case["feature0"].shape[0])
    boxes = [torch.tensor(rois[rois[:, 0] == i, 1:]) for i in range(n_images)]
    pooler = rt.MultiScaleRoIAlign(
        names, tuple(case["output_size"].tolist()), int(case["sampling_ratio"]),
        canonical_scale=int(case["canonical_scale"]), canonical_level=int(case["canonical_level"]),
    )
    out = pooler(feats, boxes, [tuple(s) for s in case["image_shapes"].tolist()])
    assert pooler.scales == case["scales"].tolist()
    np.testing.assert_allclose(out.detach().numpy(), case["output"], rtol=0, atol=1e-11)
    out.backward(torch.tensor(case["grad_output"]))
    for i, n in enumerate(names):
        np.testing.assert_allclose(feats[n].grad.numpy(), case[f"grad_feature{i}"], rtol=0, atol=1e-11)


def test_module_names_missing_maps():
    feats = _fpn(np.random.default_rng(2))
    pooler = rt.MultiScaleRoIAlign(["p2", "p7"], 2, 2)
    with pytest.raises(ValueError, match=r"featmap_names \['p7'\] are not among the feature maps' names"):
        pooler(feats, [torch.zeros(0, 4, dtype=torch.float64)], [(128, 192)])


def test_module_rejects_a_scale_that_differs_between_height_and_width():
    feats = _fpn(np.random.default_rng(3))
    pooler = rt.MultiScaleRoIAlign(["p2", "p3"], 2, 2)
    with pytest.raises(ValueError, match="mismatched scales"):
        pooler(feats, [torch.zeros(0, 4, dtype=torch.float64)], [(128, 96)])


def test_module_rejects_levels_that_skip_a_scale():
    feats = _fpn(np.random.default_rng(4))
    pooler = rt.MultiScaleRoIAlign(["p2", "p4"], 2, 2)
    with pytest.raises(ValueError, match="scales must halve from each level to the next"):
        pooler(feats, [torch.zeros(0, 4, dtype=torch.float64)], [(128, 192)])


def test_functional_form_accepts_a_rois_tensor():
    rng = np.random.default_rng(5)
    feats = list(_fpn(rng).values())
    rois = torch.tensor([[0, 10.0, 12.0, 90.0, 70.0], [0, 1.0, 2.0, 20.0, 30.0]], dtype=torch.float64)
    out = rt.multiscale_roi_align(feats, rois, 3, [0.25, 0.125, 0.0625], 2)
    expected = roilib.multiscale_roi_align([f.detach().numpy() for f in feats], rois.numpy(), 3, [0.25, 0.125, 0.0625], 2)
    np.testing.assert_array_equal(out.detach().numpy(), expected)


def test_ops_trace_with_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 18, 9, 11)
        rois = torch.empty(4, 5)
        assert rt.ps_roi_align(x, rois, 3).shape == (4, 2, 3, 3)
        feats = [torch.empty(2, 4, 16, 16), torch.empty(2, 4, 8, 8)]
        assert rt.multiscale_roi_align(feats, rois, (2, 3), [0.25, 0.125]).shape == (4, 4, 2, 3)


def test_deterministic_mode_alerts_for_the_atomic_only_backward():
    """On CUDA these backwards exist only with atomics: with determinism required they
    raise (or warn with warn_only=True), as torch's own nondeterministic ops do."""
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            rt._alert_not_deterministic("roilib.ps_roi_align_backward (CUDA)")
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="roilib.ps_roi_align_backward"):
            rt._alert_not_deterministic("roilib.ps_roi_align_backward (CUDA)")
        torch.use_deterministic_algorithms(False)
        rt._alert_not_deterministic("roilib.ps_roi_align_backward (CUDA)")  # silent
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def test_cpu_backward_is_deterministic_and_never_alerts():
    x, boxes = _ps_problem()
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        rt.ps_roi_align(x, boxes, (2, 3), 0.5).sum().backward()
        first = x.grad.clone()
        x.grad = None
        rt.ps_roi_align(x, boxes, (2, 3), 0.5).sum().backward()
        assert torch.equal(first, x.grad)
    finally:
        torch.use_deterministic_algorithms(before)
