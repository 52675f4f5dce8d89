"""ONNX export of roilib.torch, checked by running the exported model in onnxruntime.

onnxruntime's RoiAlign and MaxRoiPool are an implementation independent of roilib:
the exported model must reproduce roilib's outputs. Both exporters are covered: the
TorchScript-based one (``dynamo=False``, no extra step) and the dynamo-based one
(through ``roilib.torch.onnx_translations()``). ``python tests/test_onnx_export.py``
prints the round trip's max difference.
"""
import logging
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
import roilib  # noqa: E402
import roilib.torch as rt  # noqa: E402
from roilib._onnx import OnnxExportError  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # the TorchScript exporter is deprecated in torch 2.9+
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode"),
]

#: float32 round off: onnxruntime sums the samples in another order than roilib
TOL = 1e-6

# (output_size, spatial_scale, sampling_ratio, aligned): adaptive (-1, 0) and fixed
# sampling, both coordinate modes, boxes smaller than a cell (the aligned=False clamp)
ALIGN_CONFIGS = [
    (size, scale, ratio, aligned)
    for size in ((2, 3), 7)
    for scale in (1.0, 0.25)
    for ratio in (-1, 0, 2)
    for aligned in (False, True)
]
POOL_CONFIGS = [(size, scale) for size in ((2, 3), 7) for scale in (1.0, 0.5, 0.25)]


class _AllConfigs(torch.nn.Module):
    """Every RoIAlign and RoIPool configuration above, one output each."""

    def forward(self, x, rois):
        outs = [rt.roi_align(x, rois, size, scale, ratio, aligned) for size, scale, ratio, aligned in ALIGN_CONFIGS]
        outs += [rt.roi_pool(x, rois, size, scale) for size, scale in POOL_CONFIGS]
        return tuple(outs)


class _Head(torch.nn.Module):
    """A model as users write it: convolution, roilib modules, linear layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.align = rt.RoIAlign((2, 2), 0.5, 2, aligned=True)
        self.pool = rt.RoIPool(2, 0.5)
        self.fc = torch.nn.Linear(32, 3)

    def forward(self, x, rois):
        f = self.conv(x)
        return self.fc(torch.cat([self.align(f, rois), self.pool(f, rois)], 1).flatten(1))


def _problem(seed=0, n_boxes=40):
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.standard_normal((2, 3, 13, 17)), dtype=torch.float32)
    lo = rng.uniform(-6.0, 20.0, (n_boxes, 2))
    size = rng.uniform(0.1, 18.0, (n_boxes, 2))
    small = min(5, n_boxes)
    size[:small] = rng.uniform(0.05, 0.9, (small, 2))  # smaller than a cell
    index = rng.integers(0, 2, (n_boxes, 1))
    rois = torch.tensor(np.concatenate([index, lo, lo + size], axis=1), dtype=torch.float32)
    return x, rois


def _export(model, args, path, dynamo):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)  # the dynamo exporter logs "torchvision is not installed"
        try:
            if dynamo:
                program = torch.onnx.export(
                    model, args, dynamo=True, custom_translation_table=rt.onnx_translations(), verbose=False
                )
                program.save(str(path))
            else:
                torch.onnx.export(model, args, str(path), dynamo=False)
        finally:
            logging.disable(logging.NOTSET)
    return onnx.load(str(path))


def _run_onnxruntime(path, args):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    return session.run(None, feeds)


def round_trip_max_difference(tmp_path, dynamo):
    """Export every configuration, run onnxruntime; (ONNX model, per-output max |difference|)."""
    x, rois = _problem()
    model = _AllConfigs()
    path = tmp_path / f"all_configs_{'dynamo' if dynamo else 'torchscript'}.onnx"
    proto = _export(model, (x, rois), path, dynamo)
    expected = model(x, rois)
    got = _run_onnxruntime(path, (x, rois))
    assert len(got) == len(expected)
    return proto, [float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected)]


def _nodes(proto, op_type):
    return [n for n in proto.graph.node if n.op_type == op_type]


def _attributes(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnxruntime_reproduces_roi_align_and_roi_pool(tmp_path, dynamo):
    if dynamo:
        pytest.importorskip("onnxscript")
    proto, diffs = round_trip_max_difference(tmp_path, dynamo)
    align, pool = diffs[: len(ALIGN_CONFIGS)], diffs[len(ALIGN_CONFIGS) :]
    assert max(align) <= TOL, dict(zip(ALIGN_CONFIGS, align))
    assert max(pool) == 0.0, dict(zip(POOL_CONFIGS, pool))  # a max of the same floats: exact

    # the standard operators, with the attributes the mapping promises
    align_nodes = _nodes(proto, "RoiAlign")
    # (the dynamo exporter's optimizer merges the identical nodes of sampling_ratio -1 and 0)
    assert len(align_nodes) >= len(ALIGN_CONFIGS) * 2 // 3 and len(_nodes(proto, "MaxRoiPool")) == len(POOL_CONFIGS)
    seen = {
        (
            a["coordinate_transformation_mode"].decode(),
            a["sampling_ratio"],
            a.get("mode", b"avg").decode(),
            round(a["spatial_scale"], 6),
            (a["output_height"], a["output_width"]),
        )
        for a in map(_attributes, align_nodes)
    }
    for size, scale, ratio, aligned in ALIGN_CONFIGS:
        mode = "half_pixel" if aligned else "output_half_pixel"
        h, w = (size, size) if isinstance(size, int) else size
        assert (mode, max(ratio, 0), "avg", scale, (h, w)) in seen
    assert not [n for n in proto.graph.node if n.domain not in ("", "ai.onnx")], "no custom-domain nodes"


def test_onnxruntime_reproduces_the_numpy_reference_too():
    # the same round trip against roilib's NumPy reference directly (not through torch)
    x, rois = _problem(3, n_boxes=12)

    class One(torch.nn.Module):
        def forward(self, x, rois):
            return rt.roi_align(x, rois, (3, 4), 0.5, -1, True)

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "one.onnx"
        _export(One(), (x, rois), path, dynamo=False)
        (got,) = _run_onnxruntime(path, (x, rois))
    expected = roilib.roi_align(x.numpy(), rois.numpy(), (3, 4), 0.5, -1, True)
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_a_model_with_roilib_modules_round_trips(tmp_path, dynamo):
    if dynamo:
        pytest.importorskip("onnxscript")
    x, rois = _problem(1, n_boxes=8)
    model = _Head().eval()
    path = tmp_path / "head.onnx"
    _export(model, (x, rois), path, dynamo)
    (got,) = _run_onnxruntime(path, (x, rois))
    with torch.no_grad():
        expected = model(x, rois).numpy()
    assert np.abs(got - expected).max() <= 10 * TOL


def test_the_number_of_boxes_can_be_a_dynamic_axis(tmp_path):
    x, rois = _problem(4, n_boxes=8)
    model = _Head().eval()
    path = tmp_path / "dynamic.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x, rois), str(path), dynamo=False, input_names=["x", "rois"], dynamic_axes={"rois": {0: "K"}}
        )
    for k in (8, 3, 1):
        (got,) = _run_onnxruntime(path, (x, rois[:k]))
        with torch.no_grad():
            expected = model(x, rois[:k]).numpy()
        assert got.shape == expected.shape and np.abs(got - expected).max() <= 10 * TOL


def test_per_image_boxes_export(tmp_path):
    x, rois = _problem(2, n_boxes=6)
    boxes = [rois[:3, 1:], rois[3:, 1:]]

    class PerImage(torch.nn.Module):
        def forward(self, x, b0, b1):
            return rt.roi_align(x, [b0, b1], 2, 0.5, 2, True)

    path = tmp_path / "per_image.onnx"
    _export(PerImage(), (x, *boxes), path, dynamo=False)
    (got,) = _run_onnxruntime(path, (x, *boxes))
    expected = roilib.roi_align(x.numpy(), [b.numpy() for b in boxes], 2, 0.5, 2, True)
    assert np.abs(got - expected).max() <= TOL


UNSUPPORTED = {
    "roi_align_max": (lambda x, r: rt.roi_align(x, r, 2, mode="max"), "roi_align\\(mode='max'\\) cannot be exported"),
    "roi_warp": (lambda x, r: rt.roi_warp(x, r, 2), "roi_warp \\(RoIWarp\\) cannot be exported"),
    "spp": (lambda x, r: rt.spp(x) + r.sum(), "spp \\(spatial pyramid pooling\\) cannot be exported"),
}


class _Wrap(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, rois):
        return self.fn(x, rois)


def _cause_chain(error):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_what_onnx_cannot_express_fails_at_export(tmp_path, name, dynamo, capfd):
    if dynamo:
        pytest.importorskip("onnxscript")
    fn, message = UNSUPPORTED[name]
    x, rois = _problem(n_boxes=3)
    with pytest.raises(Exception, match=message) as info:
        _export(_Wrap(fn), (x, rois), tmp_path / "unsupported.onnx", dynamo)
    # the TorchScript exporter raises roilib's error itself; the dynamo exporter wraps it
    assert any(isinstance(e, OnnxExportError) for e in _cause_chain(info.value))
    assert not (tmp_path / "unsupported.onnx").exists()


def test_roi_align_needs_opset_16(tmp_path):
    x, rois = _problem(n_boxes=3)
    with pytest.raises(OnnxExportError, match="from opset 16 on"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Wrap(lambda x, r: rt.roi_align(x, r, 2)), (x, rois), str(tmp_path / "m.onnx"), dynamo=False, opset_version=15)


def test_translation_table_names_the_ops():
    table = rt.onnx_translations()
    assert set(table) == {
        torch.ops.roilib.roi_align.default,
        torch.ops.roilib.roi_pool.default,
        torch.ops.roilib.roi_warp.default,
        torch.ops.roilib.spp.default,
    }


if __name__ == "__main__":  # the numbers for the notes: max |onnxruntime - roilib|
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        for dynamo in (False, True):
            _, diffs = round_trip_max_difference(Path(tmp), dynamo)
            print(
                f"{'dynamo' if dynamo else 'torchscript'} exporter: RoiAlign max |diff| = "
                f"{max(diffs[: len(ALIGN_CONFIGS)]):.3g} over {len(ALIGN_CONFIGS)} configurations, "
                f"MaxRoiPool max |diff| = {max(diffs[len(ALIGN_CONFIGS):]):.3g} over {len(POOL_CONFIGS)}"
            )
