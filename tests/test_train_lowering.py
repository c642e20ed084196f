"""Gradient checks of each fake-quant lowering against numpy reference formulas.

The model is one layer, ``y = Q_out(Q_in(x) @ Q_w(W))``, trained with MSE, so every gradient can be
written out by hand: straight-through inside the clamp range, zero outside; LSQ for learned scales
(``dL/ds = g * (round(v/s) - v/s)`` inside, ``g * (bound - zp)`` outside).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper

from conftest import make_model, tensor
from onnxqat import QuantizationSimModel
from onnxqat.qparams import fake_quantize
from onnxqat.train.builder import Builder
from onnxqat.train.ort_training import training_modules

f32 = np.float32


def one_layer(n_in=6, n_out=4, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n_in, n_out)).astype(f32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [tensor("x", ["N", n_in])], [tensor("y", ["N", n_out])], {"w": w})
    return model, w


def calibrated_sim(model, x, **options):
    sim = QuantizationSimModel(model, **options)
    sim.compute_encodings([{"x": x}], progress=False)
    return sim


def in_band(u, enc):
    """Where a straight-through gradient passes: u rounds onto the grid."""
    return (u > enc.qmin - 0.5) & (u < enc.qmax + 0.5)


def reference(sim, x, w):
    """Forward pieces of the one-layer sim in numpy."""
    e = sim.encodings
    xq = fake_quantize(x, e["x"])
    wq = fake_quantize(w, e["w"])
    v = xq @ wq  # pre-quantizer output
    return xq, wq, v


def test_shim_imports_training_api_without_torch():
    import sys

    artifacts, api = training_modules()
    assert hasattr(artifacts, "generate_artifacts") and hasattr(api, "Module")
    assert "torch" not in sys.modules


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("param_bw", [8, 4])
def test_fixed_encodings_gradients_are_straight_through(per_channel, param_bw):
    model, w = one_layer()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 6)).astype(f32)
    sim = calibrated_sim(model, x * 0.8, per_channel=per_channel, param_bw=param_bw)  # some saturation
    t = rng.normal(size=(16, 4)).astype(f32)
    trainer = sim.trainer(loss="mse", target_key="t")
    loss, grads = trainer.compute_gradients({"x": x, "t": t})
    xq, wq, v = reference(sim, x, w)
    e_out = sim.encodings["y"]
    y = fake_quantize(v, e_out)
    assert loss == pytest.approx(float(np.mean((y - t) ** 2)), rel=1e-5)
    g = 2 * (y - t) / y.size
    inside = in_band(v / e_out.scale + e_out.zero_point, e_out)
    dw = xq.T @ (g * inside)  # straight through the weight quantizer: every weight is in range
    np.testing.assert_allclose(grads["w"], dw, rtol=1e-4, atol=1e-6)
    assert (~inside).any() and inside.any()  # both branches exercised


def test_range_learning_gradients_match_lsq_formulas():
    model, w = one_layer()
    rng = np.random.default_rng(2)
    x = rng.normal(size=(32, 6)).astype(f32)
    sim = calibrated_sim(model, x * 0.7, per_channel=True)
    t = rng.normal(size=(32, 4)).astype(f32)
    gain = 10.0
    trainer = sim.trainer(loss="mse", target_key="t", range_learning=True, encoding_lr_scale=gain)
    params = {p.quantizer: p for p in trainer.graph.range_params}
    _, grads = trainer.compute_gradients({"x": x, "t": t})
    xq, wq, v = reference(sim, x, w)
    enc = sim.encodings["y"]
    s, zp = float(enc.scale), float(enc.zero_point)
    y = fake_quantize(v, enc)
    g = 2 * (y - t) / y.size
    u = v / np.float32(s) + zp
    inside = in_band(u, enc)
    bound = np.where(u < enc.qmin, enc.qmin, enc.qmax) - zp
    dl_ds = np.where(inside, np.rint(u) - u, bound)  # = round(v/s) - v/s inside (zp integer)
    rp = params["y"]
    np.testing.assert_allclose(grads[rp.scale_param], np.sum(g * dl_ds) * s * gain, rtol=1e-3)
    dl_dzp = np.where(inside, 0.0, -s)
    np.testing.assert_allclose(grads[rp.zero_point_param], np.sum(g * dl_dzp) * rp.zero_point_gain, rtol=1e-3)
    dw = xq.T @ (g * inside)
    np.testing.assert_allclose(grads["w"], dw, rtol=1e-4, atol=1e-6)
    assert not inside.all()


def test_range_learning_write_back_moves_encodings_and_matches_training_graph():
    model, w = one_layer()
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 6)).astype(f32)
    sim = calibrated_sim(model, x * 0.5, per_channel=True)
    before = sim.encodings["y"]
    trainer = sim.trainer(loss="mse", target_key="t", range_learning=True, lr=1e-2)
    target = (x @ w).astype(f32)
    trainer.fit([{"x": x, "t": target}] * 5, epochs=2, progress=False)
    after = sim.encodings["y"]
    assert float(after.scale) != float(before.scale)
    # the trained graph's prediction (float semantics) equals the sim's QDQ graph evaluated op by op
    prediction = trainer.predict({"x": x, "t": target})
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    (plain,) = ort.InferenceSession(sim.model.SerializeToString(), so).run(None, {"x": x})
    np.testing.assert_allclose(prediction, plain, atol=float(after.scale) * 1.01)
    assert np.mean(np.abs(prediction - plain) < 1e-6) > 0.98


def test_bias_and_relu_lowering_equal_the_simulation():
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    model = make_model(nodes, [tensor("x", ["N", 2, 5, 5])], [tensor("y", ["N", 3, 5, 5])],
                       {"w": rng.normal(size=(3, 2, 3, 3)).astype(f32), "b": rng.normal(size=3).astype(f32)})
    x = rng.normal(size=(4, 2, 5, 5)).astype(f32)
    sim = QuantizationSimModel(model, per_channel=True, param_bw=4)
    sim.compute_encodings([{"x": x}], progress=False)
    assert [b.name for b in sim.plan.biases] == ["b"]
    trainer = sim.trainer(loss="mse", target_key="t")
    ops = [n.op_type for n in trainer.graph.model.graph]
    assert "Relu" not in ops  # implied by the output quantizer's clamp at 0
    prediction = trainer.predict({"x": x, "t": np.zeros((4, 3, 5, 5), f32)})
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    (plain,) = ort.InferenceSession(sim.model.SerializeToString(), so).run(None, {"x": x})
    np.testing.assert_allclose(prediction, plain, atol=1e-5)


def test_stop_gradient_is_bit_exact():
    rng = np.random.default_rng(5)
    powers = 2.0 ** np.arange(-24, 24)
    values = np.concatenate([powers, np.nextafter(powers, 0), np.nextafter(powers, np.inf),
                             rng.uniform(1e-7, 1e5, 50000), [1e-30, 2.0**-100, 2.0**100]]).astype(f32)
    model = ir.from_proto(make_model([helper.make_node("Identity", ["v"], ["id"])], [tensor("v", ["n"])],
                                     [tensor("id", ["n"])]))
    b = Builder(model)
    out = b.stop_gradient(model.graph.inputs[0], "sg")
    out.type, out.shape = model.graph.inputs[0].type, model.graph.inputs[0].shape
    model.graph.outputs.append(out)
    (got,) = ort.InferenceSession(ir.to_proto(model).SerializeToString()).run([out.name], {"v": values})
    np.testing.assert_array_equal(got, values)


def test_magic_number_rounding_survives_onnxruntime_optimizations():
    model = ir.from_proto(make_model([helper.make_node("Identity", ["v"], ["id"])], [tensor("v", ["n"])],
                                     [tensor("id", ["n"])]))
    b = Builder(model)
    out = b.ste_round(model.graph.inputs[0], "r", bounded=True)
    out.type, out.shape = model.graph.inputs[0].type, model.graph.inputs[0].shape
    model.graph.outputs.append(out)
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 3.49, -7.51, 100.5], f32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    (got,) = ort.InferenceSession(ir.to_proto(model).SerializeToString(), so).run([out.name], {"v": v})
    np.testing.assert_array_equal(got, np.rint(v))


def test_loss_on_logits_feeding_softmax():
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["logits"], name="fc"),
             helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1)]
    model = make_model(nodes, [tensor("x", ["N", 5])], [tensor("probs", ["N", 3])],
                       {"w": rng.normal(size=(5, 3)).astype(f32)})
    x = rng.normal(size=(8, 5)).astype(f32)
    sim = QuantizationSimModel(model)
    sim.compute_encodings([{"x": x}], progress=False)
    trainer = sim.trainer()
    sce = next(n for n in trainer.graph.model.graph if n.op_type == "SoftmaxCrossEntropyLoss")
    assert "Softmax" not in [n.op_type for n in trainer.graph.model.graph]
    assert sce.inputs[0].producer().op_type == "FakeQuant"  # the quantized logits
    assert sce.inputs[0].producer().inputs[0].name == "logits"
    labels = rng.integers(0, 3, 8)
    loss, _ = trainer.compute_gradients({"x": x, "label": labels})
    assert sim.run({"x": x})[0].shape == (8, 3)

    def np_fake_quantize(v, enc):  # numpy reference of the simulated grid
        lo, hi = ((-(2 ** (enc.bitwidth - 1)) + enc.strict_symmetric, 2 ** (enc.bitwidth - 1) - 1) if enc.signed
                  else (0, 2 ** enc.bitwidth - 1))
        shape = [1] * v.ndim
        if enc.axis is not None:
            shape[enc.axis] = -1
        scale, zero = enc.scale.reshape(shape).astype(np.float64), enc.zero_point.reshape(shape)
        return (np.clip(np.rint(v / scale) + zero, lo, hi) - zero) * scale

    enc = sim.encodings
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    logits = np_fake_quantize(np_fake_quantize(x.astype(np.float64), enc["x"]) @ np_fake_quantize(w, enc["w"]),
                              enc["logits"])
    shifted = logits - logits.max(axis=1, keepdims=True)
    reference = np.mean(np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(8), labels])
    # cross-entropy of the quantized logits (not of the softmax output), up to float32 arithmetic
    assert loss == pytest.approx(reference, rel=1e-5), (loss, reference)


def test_training_graph_is_a_valid_onnx_model():
    model, _ = one_layer()
    sim = calibrated_sim(model, np.ones((2, 6), f32), per_channel=True)
    trainer = sim.trainer(loss="mse", target_key="t", range_learning=True)
    proto = ir.to_proto(trainer.graph.model)
    onnx.checker.check_model(proto)
    assert [o.name for o in proto.graph.output][0].startswith("loss")


@pytest.mark.parametrize("config", ["onnxruntime", "aimet"])
def test_training_weight_grids_follow_the_presets_scale_convention(config):
    """The training graph re-derives weight scales every step with the preset's convention (the
    aimet preset's max(-min/128, max/127)), so its forward equals the simulation's at the start."""
    rng = np.random.default_rng(7)
    w = rng.normal(size=(3, 2, 3, 3)).astype(f32)
    w[:, 0, 0, 0] = -2.0 * np.abs(w).reshape(3, -1).max(axis=1)  # the negative end dominates each channel
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                       [tensor("x", ["N", 2, 5, 5])], [tensor("y", ["N", 3, 5, 5])], {"w": w})
    x = rng.normal(size=(4, 2, 5, 5)).astype(f32)
    sim = QuantizationSimModel(model, per_channel=True, config=config, target="htp", quant_scheme="minmax")
    sim.compute_encodings([{"x": x}], progress=False)
    steps = np.asarray(sim.encodings["w"].scale) * (128 if config == "aimet" else 127)
    np.testing.assert_allclose(steps, -w[:, 0, 0, 0], rtol=1e-6)  # the grid's end is the dominant negative value
    trainer = sim.trainer(loss="mse", target_key="t")
    prediction = trainer.predict({"x": x, "t": np.zeros((4, 3, 5, 5), f32)})
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    (plain,) = ort.InferenceSession(sim.model.SerializeToString(), so).run(None, {"x": x})
    np.testing.assert_allclose(prediction, plain, atol=1e-5)
