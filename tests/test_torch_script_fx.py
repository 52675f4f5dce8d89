"""roilib.torch beyond eager mode, as torchvision.ops offers it: TorchScript, FX,
NumPy integers as sizes, quantized RoIAlign.

Expected values come from roilib's NumPy reference (an implementation independent of
the torch wrappers under test) or from torchvision through a committed fixture
(``tools/make_quantized_fixture.py``); the test that needs torchvision live skips
without it.
"""
import io
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import roilib  # noqa: E402
import roilib.torch as rt  # noqa: E402

# torch 2.13 marks TorchScript deprecated; it still works, and torchvision supports it
pytestmark = [
    pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings(r"ignore:torch\.quantize_per_tensor.* are deprecated:UserWarning"),
]

# (function, module, the extra positional arguments after output_size)
ROI_OPS = {
    "roi_align": (rt.roi_align, rt.RoIAlign, (0.5, 2, True)),
    "roi_align_max": (rt.roi_align, rt.RoIAlign, (0.5, -1, False, "max")),
    "roi_pool": (rt.roi_pool, rt.RoIPool, (0.5,)),
    "roi_warp": (rt.roi_warp, rt.RoIWarp, (0.5, 2, "max")),
}


def _reference(name, x, rois, output_size, *args):
    op = getattr(roilib, "roi_align" if name.startswith("roi_align") else name)
    return op(x.numpy(), rois.numpy(), output_size, *args)


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.standard_normal((2, 3, 9, 11)))
    lo = rng.uniform(-1.0, 12.0, (5, 2))
    hi = lo + rng.uniform(0.5, 9.0, (5, 2))
    rois = torch.tensor(np.concatenate([[[0], [1], [1], [0], [1]], lo, hi], axis=1))
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    in_order = torch.cat([rois[rois[:, 0] == i] for i in range(2)])
    return x, rois, per_image, in_order


# ----------------------------------------------------------------------- TorchScript


@pytest.mark.parametrize("name", sorted(ROI_OPS))
def test_scripted_functions_take_both_box_formats(name):
    fn, _, args = ROI_OPS[name]
    x, rois, per_image, in_order = _problem()
    scripted = torch.jit.script(fn)
    np.testing.assert_array_equal(scripted(x, rois, (3, 2), *args).numpy(), _reference(name, x, rois, (3, 2), *args))
    # per-image (K_i, 4) boxes: the rois in image order
    np.testing.assert_array_equal(
        scripted(x, per_image, (3, 2), *args).numpy(), _reference(name, x, in_order, (3, 2), *args)
    )
    # an int output_size is broadcast to (n, n), as torchvision's BroadcastingList2
    np.testing.assert_array_equal(scripted(x, rois, 2, *args).numpy(), _reference(name, x, rois, 2, *args))


@pytest.mark.parametrize("name", sorted(ROI_OPS))
def test_scripted_modules_save_load_and_take_both_box_formats(name):
    _, module, args = ROI_OPS[name]
    x, rois, per_image, in_order = _problem(1)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module((2, 3), *args)), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    np.testing.assert_array_equal(loaded(x, rois).numpy(), _reference(name, x, rois, (2, 3), *args))
    np.testing.assert_array_equal(loaded(x, per_image).numpy(), _reference(name, x, in_order, (2, 3), *args))


def test_scripted_spp_function_and_module():
    x, *_ = _problem()
    expected = roilib.spp(x.numpy(), (3, 1), "avg")
    np.testing.assert_array_equal(torch.jit.script(rt.spp)(x, [3, 1], "avg").numpy(), expected)
    np.testing.assert_array_equal(torch.jit.script(rt.SPP((3, 1), "avg"))(x).numpy(), expected)
    np.testing.assert_array_equal(torch.jit.script(rt.spp)(x).numpy(), roilib.spp(x.numpy()))  # default levels


def test_scripted_roi_align_backpropagates_into_input_and_boxes():
    x, rois, per_image, _ = _problem()
    boxes = [b.clone().requires_grad_(True) for b in per_image]
    x.requires_grad_(True)
    scripted = torch.jit.script(rt.roi_align)
    scripted(x, boxes, 2, 0.5, 2, True).square().sum().backward()
    grads = [t.grad.clone() for t in (x, *boxes)]
    for t in (x, *boxes):
        t.grad = None
    rt.roi_align(x, boxes, 2, 0.5, 2, True).square().sum().backward()
    for got, t in zip(grads, (x, *boxes)):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, t.grad, rtol=0, atol=0)


def test_traced_module_replays_with_new_values():
    # torch.jit.trace records the op; a traced model runs on other features and boxes
    x, rois, *_ = _problem()
    x2, rois2, *_ = _problem(5)
    traced = torch.jit.trace(rt.RoIAlign((2, 3), 0.5, -1, True), (x, rois))
    np.testing.assert_array_equal(traced(x2, rois2).numpy(), roilib.roi_align(x2.numpy(), rois2.numpy(), (2, 3), 0.5, -1, True))


def test_scripted_function_rejects_bad_boxes_with_a_clear_error():
    x, rois, *_ = _problem()
    scripted = torch.jit.script(rt.roi_align)
    with pytest.raises(Exception, match=r"rois must have shape \(K, 5\)"):
        scripted(x, rois[:, 1:], 2)
    with pytest.raises(Exception, match=r"boxes\[0\] must be a tensor of shape \(K_0, 4\)"):
        scripted(x, [rois], 2)


# -------------------------------------------------------------------------------- FX


class _Head(torch.nn.Module):
    """A small detector head: convolution, every roilib module, a linear layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1).double()
        self.align = rt.RoIAlign(2, 0.5, 2, aligned=True)
        self.pool = rt.RoIPool(2, 0.5)
        self.warp = rt.RoIWarp(2, 0.5)
        self.spp = rt.SPP((2, 1))
        self.fc = torch.nn.Linear(3 * 4 * 4, 5).double()

    def forward(self, x, rois):
        f = self.conv(x)
        pooled = torch.cat([self.align(f, rois), self.pool(f, rois), self.warp(f, rois)], 1).flatten(1)
        return self.fc(pooled) + self.spp(f).sum() + rt.roi_align(f, rois, 2, 0.5, 2, mode="max").mean()


def test_fx_symbolic_trace_keeps_roilib_ops_as_leaf_calls():
    x, rois, *_ = _problem()
    model = _Head()
    traced = torch.fx.symbolic_trace(model)
    targets = [node.target for node in traced.graph.nodes if node.op == "call_function"]
    for fn in (rt.roi_align, rt.roi_pool, rt.roi_warp, rt.spp):
        assert fn in targets, f"{fn.__name__} is not a node of the traced graph"
    assert targets.count(rt.roi_align) == 2
    with torch.no_grad():
        torch.testing.assert_close(traced(x, rois), model(x, rois), rtol=0, atol=0)
    # the traced graph takes the other box format too (it is a leaf call, not unrolled)
    _, _, per_image, in_order = _problem()
    with torch.no_grad():
        torch.testing.assert_close(traced(x, per_image), model(x, in_order), rtol=0, atol=0)


class _ImportedNames(torch.nn.Module):
    """Calls the functions through names imported into this test module."""

    def forward(self, x, rois):
        return _imported_roi_pool(x, rois, 2, 0.5) + _imported_roi_align(x, rois, 2, 0.5, 2)


from roilib.torch import roi_align as _imported_roi_align  # noqa: E402
from roilib.torch import roi_pool as _imported_roi_pool  # noqa: E402


def test_fx_symbolic_trace_through_names_imported_elsewhere():
    # torch.fx.wrap patches roilib.torch's own namespace only; a Proxy argument makes
    # the function record itself as a leaf however it was imported
    x, rois, *_ = _problem()
    traced = torch.fx.symbolic_trace(_ImportedNames())
    targets = [node.target for node in traced.graph.nodes if node.op == "call_function"]
    assert rt.roi_align in targets and rt.roi_pool in targets
    expected = roilib.roi_pool(x.numpy(), rois.numpy(), 2, 0.5) + roilib.roi_align(x.numpy(), rois.numpy(), 2, 0.5, 2)
    np.testing.assert_array_equal(traced(x, rois).numpy(), expected)


def test_torchvision_feature_extraction_sees_roilib_nodes():
    feature_extraction = pytest.importorskip("torchvision.models.feature_extraction")
    model = _Head()
    train_nodes, eval_nodes = feature_extraction.get_graph_node_names(model)
    for name in ("align.roi_align", "pool.roi_pool", "warp.roi_warp", "spp.spp", "roi_align"):
        assert name in eval_nodes and name in train_nodes
    x, rois, *_ = _problem()
    extractor = feature_extraction.create_feature_extractor(model, return_nodes={"align.roi_align": "aligned"})
    with torch.no_grad():
        got = extractor(x, rois)["aligned"]
        expected = roilib.roi_align(model.conv(x).numpy(), rois.numpy(), 2, 0.5, 2, True)
    np.testing.assert_array_equal(got.numpy(), expected)


# ----------------------------------------------------------------- NumPy integer sizes


@pytest.mark.parametrize(
    "output_size",
    [np.int64(3), np.int32(3), (np.int64(3), np.int16(2)), np.array([3, 2]), [np.uint8(3), 2], torch.Size([3, 2])],
    ids=["int64", "int32", "tuple", "array", "list", "torch.Size"],
)
def test_output_size_accepts_numpy_integers(output_size):
    x, rois, *_ = _problem()
    pair = (3, 3) if np.ndim(output_size) == 0 else (3, 2)
    for name in ("roi_align", "roi_pool", "roi_warp"):
        fn, module, args = ROI_OPS[name]
        expected = _reference(name, x, rois, pair, *args)
        np.testing.assert_array_equal(fn(x, rois, output_size, *args).numpy(), expected)
        m = module(output_size, *args)
        np.testing.assert_array_equal(m(x, rois).numpy(), expected)
        np.testing.assert_array_equal(torch.jit.script(m)(x, rois).numpy(), expected)


def test_numpy_scalars_for_the_other_arguments():
    x, rois, *_ = _problem()
    got = rt.roi_align(x, rois, 2, np.float32(0.5), np.int64(2), np.bool_(True))
    np.testing.assert_array_equal(got.numpy(), roilib.roi_align(x.numpy(), rois.numpy(), 2, 0.5, 2, True))
    np.testing.assert_array_equal(rt.SPP(np.array([2, 1]))(x).numpy(), roilib.spp(x.numpy(), (2, 1)))


@pytest.mark.parametrize(
    "output_size, error, message",
    [
        (2.0, TypeError, "output_size must be an integer"),
        ((2, 2.5), TypeError, "output_size must be an integer"),
        (True, TypeError, "output_size must be an integer, got bool"),
        ((2, 2, 2), ValueError, "output_size must be an integer or a pair"),
        ((0, 2), ValueError, "output_size must be positive"),
        ("7", TypeError, "output_size must be an integer"),
    ],
)
def test_bad_output_size_raises_a_clear_error(output_size, error, message):
    x, rois, *_ = _problem()
    with pytest.raises(error, match=message):
        rt.roi_align(x, rois, output_size)
    with pytest.raises(error, match=message):
        rt.RoIPool(output_size, 1.0)


def test_bad_scalars_and_boxes_raise_clear_errors():
    x, rois, *_ = _problem()
    with pytest.raises(TypeError, match="sampling_ratio must be an int"):
        rt.roi_align(x, rois, 2, 1.0, 2.5)
    with pytest.raises(TypeError, match="spatial_scale must be a real number"):
        rt.roi_pool(x, rois, 2, "0.5")
    with pytest.raises(TypeError, match="boxes must be a \\(K, 5\\) tensor or a list"):
        rt.roi_align(x, rois.numpy(), 2)
    with pytest.raises(TypeError, match=r"boxes\[1\] must be a tensor"):
        rt.roi_align(x, [rois[:1, 1:], rois[:1, 1:].numpy()], 2)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        rt.roi_pool(x.numpy(), rois, 2)
    with pytest.raises(TypeError, match="levels must be a sequence"):
        rt.spp(x, 4)
    with pytest.raises(ValueError, match="levels must be a non-empty sequence of positive"):
        rt.SPP((2, 0))


def test_tuple_of_boxes_equals_list_of_boxes():
    x, rois, per_image, _ = _problem()
    np.testing.assert_array_equal(
        rt.roi_align(x, tuple(per_image), 2, 0.5, 2).numpy(), rt.roi_align(x, per_image, 2, 0.5, 2).numpy()
    )


# ---------------------------------------------------------------------------- quantized

QFIXTURE = np.load(Path(__file__).parent / "fixtures" / "torchvision_qroi_align.npz", allow_pickle=False)
QCASES = [f"case{i:02d}" for i in range(int(QFIXTURE["num_cases"]))]


def _qcase(name):
    case = {key[len(name) + 1 :]: QFIXTURE[key] for key in QFIXTURE.files if key.startswith(name + "_")}
    dtype = getattr(torch, str(case["dtype"]))

    def quantized(ints, scale, zero_point):
        real = (torch.from_numpy(ints.astype(np.float64)) - int(zero_point)) * float(scale)
        q = torch.quantize_per_tensor(real.float(), float(scale), int(zero_point), dtype)
        assert np.array_equal(q.int_repr().numpy(), ints)  # the fixture's integers, exactly
        return q

    qx = quantized(case["input_int"], case["input_scale"], case["input_zero_point"])
    qrois = quantized(case["rois_int"], case["rois_scale"], case["rois_zero_point"])
    args = (tuple(case["output_size"].tolist()), float(case["spatial_scale"]), int(case["sampling_ratio"]), bool(case["aligned"]))
    return qx, qrois, args, case["output_int"]


@pytest.mark.parametrize("name", QCASES)
def test_quantized_roi_align_matches_torchvision(name):
    qx, qrois, args, expected = _qcase(name)
    out = rt.roi_align(qx, qrois, *args)
    assert out.dtype == qx.dtype and out.q_scale() == qx.q_scale() and out.q_zero_point() == qx.q_zero_point()
    diff = np.abs(out.int_repr().numpy().astype(np.int64) - expected.astype(np.int64))
    # torchvision accumulates in its own order: a float sum that lands within rounding
    # of a quantization boundary may round the other way (one step, rarely)
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 0.02 * diff.size, (diff.max(), np.count_nonzero(diff))


def test_quantized_boxes_list_and_float_boxes():
    qx, qrois, args, expected = _qcase(QCASES[0])
    from_list = rt.roi_align(qx, [qrois.dequantize()[:, 1:]], *args)
    from_float = rt.roi_align(qx, qrois.dequantize(), *args)
    np.testing.assert_array_equal(from_list.int_repr().numpy(), from_float.int_repr().numpy())
    assert np.abs(from_float.int_repr().numpy().astype(int) - expected.astype(int)).max() <= 1


def test_quantized_input_is_rejected_by_the_ops_torchvision_does_not_quantize():
    qx, qrois, _, _ = _qcase(QCASES[0])
    for fn in (rt.roi_pool, rt.roi_warp):
        with pytest.raises(TypeError, match="does not take a quantized input"):
            fn(qx, qrois.dequantize(), 2)
    with pytest.raises(TypeError, match="does not take a quantized input"):
        rt.spp(qx)
