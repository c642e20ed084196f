"""Numeric definitions against independent references: AIMET's formulas written out in numpy,
and onnxruntime's own QuantizeLinear/DequantizeLinear kernels."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import run_onnx, tensor
from onnxqat.errors import EncodingsError
from onnxqat.qparams import Encoding, compute_encoding, dequantize, fake_quantize, grid_bounds, quantize
from onnxqat.spec import QuantSpec

BITWIDTHS = [4, 5, 6, 7, 8, 10, 12, 15, 16]


def aimet_asymmetric(lo, hi, bw):
    """AIMET: widen to include 0, scale = (max-min)/(2^b-1), offset = round(min/scale)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (2**bw - 1)
    offset = round(lo / scale)
    return scale, offset


@pytest.mark.parametrize("bw", BITWIDTHS)
def test_asymmetric_matches_aimet_formula(bw):
    rng = np.random.default_rng(bw)
    for _ in range(50):
        lo, hi = sorted(rng.normal(scale=3, size=2))
        enc = compute_encoding(lo, hi, QuantSpec(bitwidth=bw))
        scale, offset = aimet_asymmetric(lo, hi, bw)
        assert enc.scale == pytest.approx(scale, rel=1e-6)
        assert int(enc.aimet_offset) == offset
        assert int(enc.zero_point) == -offset
        assert (enc.qmin, enc.qmax) == (0, 2**bw - 1)
        assert not enc.signed


@pytest.mark.parametrize("bw", BITWIDTHS)
@pytest.mark.parametrize("strict", [False, True])
def test_symmetric_grids(bw, strict):
    enc = compute_encoding(-3.0, 1.0, QuantSpec(bitwidth=bw, symmetric=True, strict_symmetric=strict))
    half = 2 ** (bw - 1)
    assert enc.scale == pytest.approx(3.0 / (half - 1), rel=1e-6)
    assert enc.signed and int(enc.zero_point) == 0
    assert (enc.qmin, enc.qmax) == ((-half + 1 if strict else -half), half - 1)
    assert int(enc.aimet_offset) == (-half + 1 if strict else -half)


def test_unsigned_symmetric_for_non_negative_data():
    spec = QuantSpec(bitwidth=8, symmetric=True, unsigned_symmetric=True)
    enc = compute_encoding(0.0, 5.1, spec)
    assert not enc.signed and enc.symmetric and int(enc.zero_point) == 0
    assert enc.scale == pytest.approx(5.1 / 255, rel=1e-6)
    signed = compute_encoding(0.0, 5.1, spec.replace(unsigned_symmetric=False))
    assert signed.signed and signed.scale == pytest.approx(5.1 / 127, rel=1e-6)


def test_zero_is_exact_and_range_includes_zero():
    rng = np.random.default_rng(0)
    for spec in [QuantSpec(), QuantSpec(symmetric=True), QuantSpec(bitwidth=4)]:
        for _ in range(100):
            lo, hi = sorted(rng.uniform(-5, 5, size=2))
            enc = compute_encoding(lo + 2, hi + 2, spec)
            assert fake_quantize(np.zeros(1, np.float32), enc)[0] == 0.0
            assert enc.min <= 0 <= enc.max


def test_constant_tensor_gets_minimum_scale():
    enc = compute_encoding(0.0, 0.0, QuantSpec())
    assert enc.scale > 0 and np.isfinite(enc.scale)


def test_per_channel_encoding_shapes():
    lo = np.array([-1.0, -2.0, 0.0])
    hi = np.array([1.0, 0.5, 3.0])
    enc = compute_encoding(lo, hi, QuantSpec(symmetric=True, axis=0, unsigned_symmetric=False))
    assert enc.scale.shape == (3,) and enc.axis == 0
    np.testing.assert_allclose(enc.scale, np.array([1.0, 2.0, 3.0]) / 127, rtol=1e-6)


def test_fake_quantize_error_within_half_lsb_inside_range():
    rng = np.random.default_rng(1)
    x = rng.normal(size=10000).astype(np.float32)
    enc = compute_encoding(x.min(), x.max(), QuantSpec())
    err = np.abs(fake_quantize(x, enc) - x) / enc.scale
    assert err.max() <= 0.5 + 1e-3


def _ort_qdq(x, scale, zp, axis, opset, dequant_input=None):
    """Run onnxruntime's QuantizeLinear (and DequantizeLinear on its result)."""
    attrs = {} if axis is None else {"axis": axis}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], **attrs),
    ]
    zt = numpy_helper.from_array(zp, "z")
    model = helper.make_model(
        helper.make_graph(
            nodes, "g", [tensor("x", list(x.shape))],
            [helper.make_tensor_value_info("q", zt.data_type, list(x.shape)), tensor("d", list(x.shape))],
            [numpy_helper.from_array(scale, "s"), zt],
        ),
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=10 if opset >= 21 else 8,
    )
    onnx.checker.check_model(model)
    return run_onnx(model, {"x": x})


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bitwidth=8),
        QuantSpec(bitwidth=8, symmetric=True),
        QuantSpec(bitwidth=16),
        QuantSpec(bitwidth=16, symmetric=True),
    ],
    ids=["uint8", "int8", "uint16", "int16"],
)
@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_equals_onnxruntime_kernels(spec, per_channel):
    rng = np.random.default_rng(7)
    x = rng.normal(scale=2.0, size=(6, 4, 5)).astype(np.float32)
    if per_channel:
        spec = spec.with_axis(1)
        lo, hi = x.min(axis=(0, 2)), x.max(axis=(0, 2))
    else:
        lo, hi = float(x.min()), float(x.max())
    enc = compute_encoding(np.asarray(lo) * 0.7, np.asarray(hi) * 0.7, spec)  # some values saturate
    # exact ties (k + 0.5) * scale, which round half to even
    k = np.arange(-3, 3, dtype=np.float32)[:, None] + 0.5
    scale = enc.scale.reshape(1, -1) if per_channel else enc.scale
    x[:, :, 0] = k * scale
    q_ort, d_ort = _ort_qdq(x, enc.scale, enc.zero_point.astype(enc.container_dtype),
                            1 if per_channel else None, 21 if spec.bitwidth == 16 else 13)
    np.testing.assert_array_equal(quantize(x, enc), q_ort)
    np.testing.assert_array_equal(dequantize(q_ort, enc), d_ort)


def test_round_half_to_even():
    enc = Encoding(np.float32(1.0), np.int64(128), 8, signed=False, symmetric=False)
    q = quantize(np.array([0.5, 1.5, 2.5, -0.5, -1.5], np.float32), enc)
    assert q.tolist() == [128, 130, 130, 128, 126]


def test_narrow_grid_saturates_at_grid_not_container():
    enc = compute_encoding(-1.0, 1.0, QuantSpec(bitwidth=4, symmetric=True))
    q = quantize(np.array([-100.0, 100.0], np.float32), enc)
    assert q.tolist() == [-8, 7]
    assert enc.narrow and grid_bounds(4, True) == (-8, 7)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bitwidth=8, is_symmetric=False, scale=0.0, offset=-3), "scale"),
        (dict(bitwidth=8, is_symmetric=False, scale=-1.0, offset=-3), "scale"),
        (dict(bitwidth=8, is_symmetric=False, scale=0.1, offset=10), "offset outside"),
        (dict(bitwidth=8, is_symmetric=False, scale=0.1, offset=-300), "offset outside"),
        (dict(bitwidth=0, is_symmetric=False, scale=0.1, offset=0), "bitwidth"),
        (dict(bitwidth=64, is_symmetric=False, scale=0.1, offset=0), "bitwidth"),
        (dict(bitwidth=8, is_symmetric=True, scale=0.1, offset=-5), "symmetric"),
        (dict(bitwidth=8, is_symmetric=False, scale=0.1, offset=-2.5), "integral"),
    ],
)
def test_from_aimet_rejects_impossible_values(kwargs, message):
    with pytest.raises(EncodingsError, match=message):
        Encoding.from_aimet(**kwargs)


@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec(symmetric=True), QuantSpec(symmetric=True, strict_symmetric=True),
                                  QuantSpec(bitwidth=4), QuantSpec(bitwidth=16, symmetric=True)])
def test_aimet_offset_round_trip(spec):
    enc = compute_encoding(-0.7, 2.3, spec)
    back = Encoding.from_aimet(bitwidth=enc.bitwidth, is_symmetric=enc.symmetric, scale=enc.scale,
                               offset=enc.aimet_offset)
    assert back.equals(enc)
