"""Deployment targets: the integer arithmetic of onnxruntime's fused kernels, and weights that are
exact on it.

On x86 without VNNI the U8S8 GEMM kernels add pairs of uint8 x int8 products in a saturating
16-bit lane; the ``x86-avx2`` target keeps any two same-sign weights of an output channel within
128 steps. These tests check the arithmetic itself (fused kernels against the unfused op-by-op
graph, in both runtimes), the numerics (integer pair sums, in-graph vs numpy encodings), and the
detection.
"""

from __future__ import annotations

import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from conftest import ROOT, make_model, tensor
from onnxqat import QuantizationSimModel
from onnxqat.calibrate.schemes import weight_encoding
from onnxqat.data import NpzBatches, load_npz
from onnxqat.qparams import pair_safe_scale, quantize
from onnxqat.spec import QuantSpec
from onnxqat.target import TARGETS, detect_target, resolve_target

PLAIN_ORT = ROOT / "onnxqat" / "tools" / "plain_ort.py"
AVX2_HOST = detect_target().name == "x86-avx2"


def top2_same_sign(q: np.ndarray) -> np.ndarray:
    """Largest |q_i| + |q_j| over same-sign pairs of each row (independent of pair_safe_scale)."""
    q = q.astype(np.int64)
    return np.max([np.sort(np.maximum(sign * q, 0), axis=1)[:, -2:].sum(1) for sign in (1, -1)], axis=0)


# -- detection -------------------------------------------------------------------------------------
def test_detection_from_cpu_flags():
    assert detect_target("flags\t: fpu sse2 avx avx2 fma", "x86_64").name == "x86-avx2"
    assert detect_target("flags\t: avx2 avx512f avx512bw", "x86_64").name == "x86-avx2"  # AVX-512 without VNNI
    assert detect_target("flags\t: avx2 avx512f avx512_vnni", "x86_64").name == "x86-vnni"
    assert detect_target("flags\t: avx2 avx_vnni", "x86_64").name == "x86-vnni"
    assert detect_target("", "aarch64").name == "arm64"
    assert resolve_target("htp").default_config == "aimet"
    with pytest.raises(Exception, match="unknown target 'tpu'"):
        resolve_target("tpu")


# -- numerics --------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(0, 2**31 - 1), st.sampled_from(["normal", "ties", "outlier", "knife"]))
def test_pair_safe_weights_never_exceed_the_limit(cols, seed, kind):
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(6, cols)).astype(np.float32)
    if kind == "ties":  # many equal maxima: every pair at the limit
        rows[:, :] = np.float32(rng.uniform(0.1, 3))
    elif kind == "outlier":
        rows[:, 0] *= 20
    elif kind == "knife":  # values on the rounding boundary after scaling
        rows = np.round(rows * 8) / 8 + np.float32(1 / 16)
    spec = QuantSpec(8, symmetric=True, unsigned_symmetric=False, axis=0, pair_limit=128, pair_axis=0)
    enc = weight_encoding(rows, spec)
    q = quantize(rows, enc)
    assert top2_same_sign(q).max() <= 128
    # never coarser than needed: the scale is the larger of the two requirements
    need = np.maximum(np.abs(rows).max(1) / np.float32(127), pair_safe_scale(rows, 128))
    np.testing.assert_array_equal(enc.scale, np.maximum(need, enc.scale.min()))


def test_per_tensor_weights_take_the_largest_channel_need():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 8, 3, 3)).astype(np.float32)
    w[2, :2, 0, 0] = 5.0  # one channel with two big equal weights
    enc = weight_encoding(w, QuantSpec(8, symmetric=True, unsigned_symmetric=False, pair_limit=128, pair_axis=0))
    assert enc.axis is None and float(enc.scale) == pytest.approx(10.0 / 127.5, rel=1e-6)
    assert top2_same_sign(quantize(w, enc).reshape(4, -1)).max() <= 128


def test_annotation_limits_only_saturating_kernels():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="dense", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w2"], ["b"], name="depthwise", pads=[1, 1, 1, 1], group=16),
             helper.make_node("Flatten", ["b"], ["f"]),
             helper.make_node("Gemm", ["f", "w3"], ["y"], name="fc", transB=1)]
    # 16 channels: x86 targets keep a depthwise conv of other channel counts float (kernel.depthwise_unaligned)
    model = make_model(nodes, [tensor("x", ["N", 3, 4, 4])], [tensor("y", ["N", 2])],
                       {"w1": rng.normal(size=(16, 3, 3, 3)).astype(np.float32),
                        "w2": rng.normal(size=(16, 1, 3, 3)).astype(np.float32),
                        "w3": rng.normal(size=(2, 256)).astype(np.float32)})
    avx2 = QuantizationSimModel(model, target="x86-avx2", per_channel=True).plan
    assert {p.name: p.spec.pair_limit for p in avx2.params} == {"w1": 128, "w2": None, "w3": 128}
    assert {p.name: p.spec.pair_axis for p in avx2.params}["w3"] == 0
    for target in ("x86-vnni", "arm64"):
        plan = QuantizationSimModel(model, target=target, per_channel=True).plan
        assert all(p.spec.pair_limit is None for p in plan.params)
    w4 = QuantizationSimModel(model, target="x86-avx2", param_bw=4).plan  # 7 + 7 < 128 anyway
    assert all(p.spec.pair_limit is None for p in w4.params)


@pytest.mark.parametrize("per_channel", [True, False])
def test_training_graph_recomputes_the_same_pair_safe_scale(per_channel):
    """The QAT graph re-encodes weights every step; with the pair limit its fake-quantized weights
    must equal the numpy encoding exactly, or training and deployment see different weights."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 4, 3, 3)).astype(np.float32)
    w[:, 0, 1, 1] = 4.0
    w[:, 1, 1, 1] = 3.9  # the pair limit binds in every channel
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                       [tensor("x", ["N", 4, 5, 5])], [tensor("y", ["N", 3, 5, 5])], {"w": w})
    x = rng.uniform(0, 1, size=(4, 4, 5, 5)).astype(np.float32)
    sim = QuantizationSimModel(model, per_channel=per_channel, target="x86-avx2")
    sim.compute_encodings([{"x": x}], progress=False)
    enc = sim.encodings["w"]
    assert np.all(enc.scale > np.abs(w).max() / 127 * 1.2)  # the limit really binds
    trainer = sim.trainer(loss="mse", target_key="t")
    prediction = trainer.predict({"x": x, "t": np.zeros((4, 3, 5, 5), np.float32)})
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    (plain,) = ort.InferenceSession(sim.model.SerializeToString(), so).run(None, {"x": x})
    np.testing.assert_array_equal(prediction, plain)


# -- the kernels -----------------------------------------------------------------------------------
def qdq_layer(op: str, wq: np.ndarray, w_scale: np.ndarray, x_shape: list[int], group: int = 1) -> onnx.ModelProto:
    """Q(x) -> DQ -> op(DQ(int8 weight)) -> Q -> DQ, output scale wide enough never to clip."""
    axis = {"Conv": 0, "MatMul": 1}[op]
    k = wq.size // wq.shape[axis]
    y_scale = np.float32(255 * 128 * k * float(w_scale.max()) / 127)
    inits = {"wq": wq, "ws": w_scale.astype(np.float32), "wz": np.zeros(wq.shape[axis], np.int8),
             "xs": np.float32(1.0), "xz": np.uint8(0), "ys": y_scale, "yz": np.uint8(128)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=axis),
             helper.make_node(op, ["xd", "wd"], ["c"], **({"group": group} if op == "Conv" else {})),
             helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"])]
    model = make_model(nodes, [tensor("x", x_shape)], [tensor("y", [f"d{i}" for i in range(len(x_shape))])],
                       {k_: np.asarray(v) for k_, v in inits.items()})
    return model


def layer_cases(rng):
    """(name, model, input) with weights at the top of the grid in two same-sign places per row."""
    for name, op, shape, x_shape, group in (("conv3x3", "Conv", (8, 16, 3, 3), [1, 16, 6, 6], 1),
                                             ("conv1x1", "Conv", (8, 16, 1, 1), [1, 16, 6, 6], 1),
                                             ("first-conv", "Conv", (8, 1, 3, 3), [1, 1, 6, 6], 1),
                                             ("grouped", "Conv", (8, 4, 3, 3), [1, 8, 6, 6], 2),
                                             ("depthwise", "Conv", (16, 1, 3, 3), [1, 16, 6, 6], 16),
                                             ("matmul", "MatMul", (64, 8), [4, 64], 1)):
        w = rng.normal(size=shape).astype(np.float32)
        if op == "MatMul":
            w[:2, :] = 3.0
        else:
            w.reshape(shape[0], -1)[:, :2] = 3.0
        yield name, op, w, x_shape, group


def worst_inputs(x_shape, rng):
    return [np.full(x_shape, 255, np.float32), rng.integers(200, 256, size=x_shape).astype(np.float32)]


def run(model: onnx.ModelProto, x: np.ndarray, optimize: bool) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def encoded_layer(op, w, x_shape, group, target):
    depthwise = op == "Conv" and group > 1 and w.shape[1] == 1
    limit = TARGETS[target].pair_limit if not depthwise else None
    axis = 0 if op == "Conv" else 1
    enc = weight_encoding(w, QuantSpec(8, symmetric=True, unsigned_symmetric=False, axis=axis, pair_limit=limit,
                                       pair_axis=axis if limit else None))
    return qdq_layer(op, quantize(w, enc), enc.scale, x_shape, group)


def test_pair_safe_weights_are_exact_in_the_fused_kernels():
    rng = np.random.default_rng(0)
    for name, op, w, x_shape, group in layer_cases(rng):
        model = encoded_layer(op, w, x_shape, group, "x86-avx2")
        for x in worst_inputs(x_shape, rng):
            fused, reference = run(model, x, True), run(model, x, False)
            np.testing.assert_array_equal(fused, reference, err_msg=name)


@pytest.mark.skipif(not AVX2_HOST, reason="this CPU has VNNI: its U8S8 kernels accumulate exactly")
def test_full_range_weights_saturate_on_this_cpu():
    """Why the target exists: on this CPU full-range int8 weights give wrong fused results in
    every GEMM-path kernel, and the depthwise kernel stays exact."""
    rng = np.random.default_rng(0)
    for name, op, w, x_shape, group in layer_cases(rng):
        model = encoded_layer(op, w, x_shape, group, "x86-vnni")
        x = worst_inputs(x_shape, rng)[0]
        fused, reference = run(model, x, True), run(model, x, False)
        lsb = float(np.abs(reference).max()) / 127
        gap = np.abs(fused - reference).max() / lsb
        if name == "depthwise":
            assert gap == 0, name
        else:
            assert gap > 10, (name, gap)


@pytest.mark.deploy
@pytest.mark.slow
def test_demo_deployed_fused_equals_reference(deploy_python, demo_assets, tmp_path):
    """The shipped model, W8A8 per channel for this machine's target, in plain onnxruntime: the fused
    integer kernels give the reference graph's decisions (they differed on 0.7% of the test set
    on AVX2 before the target existed)."""
    model, calib, test = demo_assets
    sim = QuantizationSimModel(model, per_channel=True)
    sim.compute_encodings(NpzBatches(load_npz(calib, ["image"]), 64), progress=False)
    qdq = sim.export(tmp_path)["qdq"]
    np.savez(tmp_path / "in.npz", image=load_npz(test, ["image"])["image"][:2000])
    probs = {}
    for mode in ("fused", "reference"):
        flags = ["--reference"] if mode == "reference" else []
        proc = subprocess.run([deploy_python, str(PLAIN_ORT), *flags, "outputs", qdq, tmp_path / "in.npz",
                               tmp_path / f"{mode}.npz"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        probs[mode] = np.load(tmp_path / f"{mode}.npz")["probs"]
    agree = (probs["fused"].argmax(1) == probs["reference"].argmax(1)).mean()
    lsb = float(sim.encodings["probs"].scale)
    assert agree >= 0.998, agree
    assert np.abs(probs["fused"] - probs["reference"]).max() <= 4 * lsb
