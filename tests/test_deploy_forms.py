"""Integer forms for ops without integer kernels, checked against the float ops, onnxruntime's own
kernels in the deploy runtime, and the training graph.

* Mul/Div by a positive scalar: derived quantizers, the node dropped from the deployed graph.
* Add/Sub with a constant: QLinearAdd with the constant quantized.
* HardSigmoid/HardSwish: QLinearAdd onto a grid whose saturation is the clip (+ QLinearMul).
* Resize in cubic mode: no uint8 kernel, so it stays float and the export runs.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from conftest import make_model, tensor
from deployrt import DeployedSession, optimized_op_counts
from onnxqat import QuantizationSimModel
from onnxqat.passes.insert_qdq import InsertQDQPass
from onnxqat.qparams import integer_form_constants, prelu_form_constants
from onnxqat.runtime import Session
from onnxqat.target import detect_target

f32 = np.float32
rng = np.random.default_rng(0)


def conv(name, x, w, out, **attrs):
    return helper.make_node("Conv", [x, w], [out], name=name, **attrs)


def weights(*shape, scale=0.4):
    return (rng.normal(size=shape) * scale).astype(f32)


def calibrated(model, x, **options):
    sim = QuantizationSimModel(model, per_channel=True, **options)
    sim.compute_encodings([{"x": x[i:i + 4]} for i in range(0, len(x), 4)], progress=False)
    return sim


def output_lsb(sim, name="y"):
    q = sim.plan.activation_of(name)
    return float(sim.encodings[q.name].scale)


def float_run(model, x):
    from conftest import run_onnx

    return run_onnx(model, {"x": x})[0]


def hard_model(op, **attrs):
    nodes = [conv("conv1", "x", "w1", "c1", pads=[1, 1, 1, 1]), helper.make_node(op, ["c1"], ["h"], name="act", **attrs),
             conv("conv2", "h", "w2", "y")]
    return make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 4, 8, 8])],
                      {"w1": weights(6, 3, 3, 3), "w2": weights(4, 6, 1, 1)}, opset=14)


@pytest.mark.parametrize("op, attrs", [("HardSwish", {}), ("HardSigmoid", {}), ("HardSigmoid", {"alpha": 1 / 6, "beta": 0.5}),
                                        ("HardSigmoid", {"alpha": 0.3, "beta": -0.2})])
def test_hard_activations_are_integer_forms_within_one_lsb_of_the_float_op(op, attrs):
    model = hard_model(op, **attrs)
    x = rng.normal(size=(16, 3, 8, 8)).astype(f32) * 2
    sim = calibrated(model, x)
    (form,) = sim.plan.integer_forms
    assert form.op_type == op and form.node == "act"
    if op == "HardSigmoid":
        assert float(sim.encodings["h"].scale) == np.float32(1 / 255)  # the gate grid read as [0, 1]
    # the sim's activation 'h' against the float op applied to the sim's own (quantized) input
    inserted = InsertQDQPass(sim.effective_plan, sim.encodings, fold_weights=False)(sim.float_model)
    sim_model = inserted.model
    values = {v.name: v for n in sim_model.graph for v in n.outputs}
    sim_model.graph.outputs.extend([values[inserted.sites["c1"]], values[inserted.sites["h"]]])
    session = Session(sim_model)
    c1, h = session.run({"x": x})[1:]
    alpha, beta = (1 / 6, 0.5) if op == "HardSwish" else (attrs.get("alpha", 0.2), attrs.get("beta", 0.5))
    gate = np.clip(alpha * c1.astype(np.float64) + beta, 0, 1)
    reference = c1 * gate if op == "HardSwish" else gate
    lsb = float(sim.encodings["h"].scale)
    assert np.abs(h - reference).max() <= 1.0 * lsb + 1e-6
    assert np.mean(np.abs(h - reference) <= 0.5 * lsb + 1e-6) > 0.95


@pytest.mark.deploy
def test_hard_swish_deploys_on_integer_kernels_and_matches_the_sim(deploy_python, tmp_path):
    model = hard_model("HardSwish")
    x = rng.normal(size=(16, 3, 8, 8)).astype(f32) * 2
    sim = calibrated(model, x)
    qdq = sim.export(tmp_path)["qdq"]
    ops = optimized_op_counts(deploy_python, qdq)
    assert "HardSwish" not in ops and "HardSigmoid" not in ops
    assert ops.get("QLinearAdd", 0) == 1 and ops.get("QLinearMul", 0) == 1 and ops.get("QLinearConv", 0) == 2
    with DeployedSession(deploy_python, qdq) as deployed:
        (got,) = deployed.run({"x": x})
    (simulated,) = sim.run({"x": x})
    np.testing.assert_array_equal(got, simulated)


def written_out_hard_swish():
    """paddle2onnx's HardSwish: x * clip(x + 3, 0, 6) / 6, and a BN-like scalar Mul."""
    inits = {"w1": weights(6, 3, 3, 3), "w2": weights(4, 6, 1, 1), "three": np.array(3.0, f32),
             "lo": np.array(0.0, f32), "hi": np.array(6.0, f32), "six": np.array(6.0, f32), "two": np.array(2.0, f32),
             "shift": np.array(0.25, f32)}
    nodes = [conv("conv1", "x", "w1", "c1", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c1", "three"], ["a"], name="add3"),
             helper.make_node("Clip", ["a", "lo", "hi"], ["r6"], name="relu6"),
             helper.make_node("Mul", ["c1", "r6"], ["m"], name="mul"),
             helper.make_node("Div", ["m", "six"], ["hs"], name="div6"),
             helper.make_node("Mul", ["hs", "two"], ["hs2"], name="double"),
             helper.make_node("Sub", ["hs2", "shift"], ["s"], name="shift"),
             conv("conv2", "s", "w2", "y")]
    return make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 4, 8, 8])], inits, opset=13)


def test_written_out_hard_swish_plan():
    model = written_out_hard_swish()
    x = rng.normal(size=(16, 3, 8, 8)).astype(f32) * 2
    sim = calibrated(model, x)
    derived = {q.name: q.derived_from for q in sim.plan.activations if q.derived_from}
    assert derived == {"hs": ("m", pytest.approx(1 / 6)), "hs2": ("hs", 2.0)}
    assert np.isclose(float(sim.encodings["hs2"].scale), float(sim.encodings["m"].scale) / 3, rtol=1e-6)
    quantized = {t for q in sim.plan.activations for t in q.tensors}
    assert {"three", "c1", "r6", "m", "s"} <= quantized and "a" not in quantized  # Add+Clip: one quantizer
    assert [n.op_type for n in sim.float_model.graph if n.name == "shift"] == ["Add"]  # Sub(x, c) -> Add(x, -c)
    sim_ops = [n.op_type for n in sim.sim_ir().graph]
    assert "Div" not in sim_ops and sim_ops.count("Mul") == 1  # derived: dropped; x * r6 stays
    ref = float_run(model, x)
    (got,) = sim.run({"x": x})
    lsb = output_lsb(sim)
    assert np.abs(got - ref).max() < 12 * lsb  # every step on 8-bit grids, errors accumulated over 3 convs


@pytest.mark.deploy
def test_written_out_hard_swish_deploys_without_float_ops(deploy_python, tmp_path):
    sim = calibrated(written_out_hard_swish(), rng.normal(size=(16, 3, 8, 8)).astype(f32) * 2)
    qdq = sim.export(tmp_path)["qdq"]
    ops = optimized_op_counts(deploy_python, qdq)
    assert set(ops) <= {"QLinearConv", "QLinearAdd", "QLinearMul", "QuantizeLinear", "DequantizeLinear", "Transpose"}, ops
    assert ops.get("DequantizeLinear", 0) == 1 and ops.get("QuantizeLinear", 0) == 1  # the model's boundaries only
    x = rng.normal(size=(8, 3, 8, 8)).astype(f32) * 2
    with DeployedSession(deploy_python, qdq) as deployed:
        (got,) = deployed.run({"x": x})
    np.testing.assert_array_equal(got, sim.run({"x": x})[0])


def test_training_graph_lowers_integer_forms_as_deployed():
    model = hard_model("HardSwish")
    x = rng.normal(size=(8, 3, 8, 8)).astype(f32) * 2
    sim = calibrated(model, x)
    trainer = sim.trainer(loss="mse", target_key="t", lr=1e-3)
    assert not trainer.graph.decomposed  # the integer form is differentiable as it is
    batch = {"x": x, "t": np.zeros((8, 4, 8, 8), f32)}
    prediction = trainer.predict(batch)
    (simulated,) = sim.run({"x": x})
    lsb = output_lsb(sim)
    assert np.abs(prediction - simulated).max() <= 1.0 * lsb + 1e-6  # QLinearAdd vs float rounding: <= 1 LSB
    first = trainer.step(batch).loss
    for _ in range(15):
        last = trainer.step(batch).loss
    assert last < first


def test_integer_form_constants_are_exact():
    for alpha, beta in ((1 / 6, 0.5), (0.2, 0.5), (0.3, -0.2), (0.5, 0.0)):
        c = integer_form_constants(alpha, beta)
        assert float(c.offset) == pytest.approx(beta / alpha, rel=1e-6, abs=1e-12)
        assert float(c.grid_scale) * 255 == pytest.approx(1 / alpha, rel=1e-6)


@pytest.mark.deploy
def test_cubic_resize_stays_float_and_the_export_runs(deploy_python, tmp_path):
    scales = np.array([1, 1, 2, 2], f32)
    nodes = [conv("conv1", "x", "w1", "c1", pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["c1", "", "scales"], ["up"], name="up", mode="cubic"),
             conv("conv2", "up", "w2", "y")]
    model = make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 4, 16, 16])],
                       {"w1": weights(6, 3, 3, 3), "w2": weights(4, 6, 1, 1), "scales": scales}, opset=13)
    x = rng.normal(size=(8, 3, 8, 8)).astype(f32)
    sim = calibrated(model, x)
    assert "cubic mode has no integer kernel" in sim.why_not_quantized()["up"]
    qdq = sim.export(tmp_path)["qdq"]
    ops = optimized_op_counts(deploy_python, qdq)
    assert ops.get("Resize") == 1 and ops.get("QLinearConv") == 1 and ops.get("Conv") == 1  # conv2 reads float
    with DeployedSession(deploy_python, qdq) as deployed:
        (got,) = deployed.run({"x": x})
    np.testing.assert_array_equal(got, sim.run({"x": x})[0])


def test_export_refuses_a_model_that_does_not_run_and_writes_nothing(tmp_path, monkeypatch):
    """Before cubic Resize was known to have no uint8 kernel, its QDQ export failed at the first
    inference: the check run turns such a model into an error before anything is published."""
    import onnxqat.ops as ops_module
    from onnxqat.backend import has_training
    from onnxqat.errors import ModelError

    if not has_training():
        pytest.skip("current plain onnxruntime releases run uint8 cubic Resize: the model runs")

    monkeypatch.setattr(ops_module, "kernel_problem", lambda node: None)
    nodes = [conv("conv1", "x", "w1", "c1", pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["c1", "", "scales"], ["up"], name="up", mode="cubic"),
             conv("conv2", "up", "w2", "y")]
    model = make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 4, 16, 16])],
                       {"w1": weights(6, 3, 3, 3), "w2": weights(4, 6, 1, 1), "scales": np.array([1, 1, 2, 2], f32)},
                       opset=13)
    sim = calibrated(model, rng.normal(size=(8, 3, 8, 8)).astype(f32))
    assert sim.plan.activation_of("up") is not None  # the rule is gone: DQ -> Resize(cubic) -> Q
    out = tmp_path / "out"
    with pytest.raises(ModelError) as e:
        sim.export(out)
    message = str(e.value)
    assert "does not run" in message and "at node 'up' (Resize)" in message and "Cubic" in message
    assert "\n" not in message and ".h:" not in message
    assert not out.exists()


@pytest.mark.skipif(detect_target().name != "x86-avx2", reason="needs a CPU whose U8S8 kernels saturate (no VNNI)")
def test_export_warns_where_fused_kernels_part_from_the_reference(tmp_path):
    """Weights made for a VNNI target saturate in this CPU's fused kernels: the check run says so
    and names the first layer where fused and reference outputs part."""
    w = (2.0 + weights(8, 16, 3, 3, scale=0.05)).astype(f32)  # near the top of the grid in any pairing
    nodes = [conv("first", "x", "w1", "c1", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r"], name="relu"),
             conv("second", "r", "w2", "y")]
    model = make_model(nodes, [tensor("x", ["N", 16, 6, 6])], [tensor("y", ["N", 4, 6, 6])],
                       {"w1": w, "w2": weights(4, 8, 1, 1)})
    x = np.abs(rng.normal(size=(8, 16, 6, 6)).astype(f32)) * 3
    sim = calibrated(model, x, target="x86-vnni")
    with pytest.warns(RuntimeWarning, match="differ from the reference graph .* first part at 'first'"):
        sim.export(tmp_path / "vnni")
    safe = calibrated(model, x, target="x86-avx2")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        safe.export(tmp_path / "avx2")


# -- Linear: MatMul + Add(bias) as one Gemm with an int32 bias -------------------------------------

def mlp_model(shape, d=16, h=32, bias_scale=1.0):
    """A transformer MLP as PyTorch exports it: MatMul + Add(bias) twice, an Erf between, a
    residual Add; ``shape`` is the activations' shape (symbolic or not)."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"), helper.make_node("Add", ["m1", "b1"], ["a1"], name="fc1_bias"),
             helper.make_node("Erf", ["a1"], ["e"], name="erf"),
             helper.make_node("MatMul", ["e", "w2"], ["m2"], name="fc2"), helper.make_node("Add", ["b2", "m2"], ["a2"], name="fc2_bias"),
             helper.make_node("Add", ["a2", "x"], ["y"], name="residual")]
    inits = {"w1": weights(d, h, scale=0.3), "b1": (rng.normal(size=h) * bias_scale).astype(f32),
             "w2": weights(h, d, scale=0.3), "b2": (rng.normal(size=d) * bias_scale).astype(f32)}
    return make_model(nodes, [tensor("x", shape)], [tensor("y", shape)], inits, opset=13)


def concrete(shape, fill=5):
    return [d if isinstance(d, int) else fill for d in shape]


def test_linear_plan_has_int32_biases_and_no_rounding_before_them():
    sim = calibrated(mlp_model(["B", "S", 16]), rng.normal(size=(8, 5, 16)).astype(f32))
    plan = sim.plan
    assert [(f.matmul, f.add, f.bias) for f in plan.linear_forms] == [("fc1", "fc1_bias", "b1"), ("fc2", "fc2_bias", "b2")]
    assert {(b.name, b.node, b.input_quantizer, b.weight_quantizer) for b in plan.biases} == {
        ("b1", "fc1_bias", "x", "w1"), ("b2", "fc2_bias", "e", "w2")}
    assert plan.activation_of("m1") is None and plan.activation_of("m2") is None  # no rounding before the bias
    assert plan.activation_of("b1") is None and plan.activation_of("b2") is None  # not on 8-bit grids
    assert plan.activation_of("a1") is not None and plan.activation_of("a2") is not None
    reasons = sim.why_not_quantized()
    assert "inside Linear 'fc1' + 'fc1_bias'" in reasons["m1"] and "int32 bias" in reasons["m1"]
    assert "b1" not in reasons
    sim_ops = [n.op_type for n in sim.sim_ir().graph]
    assert sim_ops.count("Gemm") == 2 and "MatMul" not in sim_ops and sim_ops.count("Add") == 1  # the residual


def test_linear_is_left_to_aimets_graph_pass_on_htp():
    sim = QuantizationSimModel(mlp_model(["B", "S", 16]), target="htp")
    assert sim.plan.linear_forms == ()


def test_linear_output_within_one_lsb_of_integer_arithmetic():
    """The sim's Linear against numpy: int64 accumulation of the quantized input and weights plus
    the int32 bias, requantized once to the output grid."""
    from onnxqat.passes.insert_qdq import bias_encoding, quantize_bias
    from onnxqat.qparams import quantize

    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"), helper.make_node("Add", ["m", "b"], ["y"], name="fc_bias")]
    w, b = weights(24, 12, scale=0.3), rng.normal(size=12).astype(f32)
    model = make_model(nodes, [tensor("x", ["B", "S", 24])], [tensor("y", ["B", "S", 12])], {"w": w, "b": b})
    x = rng.normal(size=(8, 7, 24)).astype(f32)
    sim = calibrated(model, x)
    assert len(sim.plan.linear_forms) == 1
    ex, ew, ey = sim.encodings["x"], sim.encodings["w"], sim.encodings[sim.plan.activation_of("y").name]
    xq = quantize(x, ex).astype(np.int64) - int(ex.zero_point)
    wq = quantize(w, ew).astype(np.int64)
    scale, _ = bias_encoding(ex, ew)
    acc = xq @ wq + quantize_bias(b, scale).astype(np.int64)
    yq = np.clip(np.rint(acc * scale.astype(np.float64) / float(ey.scale)) + int(ey.zero_point), 0, 255)
    reference = (yq - int(ey.zero_point)) * float(ey.scale)
    (got,) = sim.run({"x": x})
    lsb = float(ey.scale)
    assert np.abs(got - reference).max() <= lsb * (1 + 1e-5)
    assert np.mean(np.abs(got - reference) <= 1e-6 + lsb * 1e-3) > 0.99


@pytest.mark.deploy
@pytest.mark.parametrize("shape", [["B", "S", 16], [4, "S", 16], ["B", 16], ["B", 2, 3, 16]])
def test_linear_deploys_as_qgemm_and_matches_the_sim(deploy_python, tmp_path, shape):
    sim = calibrated(mlp_model(shape), rng.normal(size=concrete(shape, 8)).astype(f32))
    qdq = sim.export(tmp_path)["qdq"]
    ops = optimized_op_counts(deploy_python, qdq)
    assert ops.get("QGemm") == 2 and "QLinearMatMul" not in ops and "MatMul" not in ops and "Gemm" not in ops, ops
    assert ops.get("QLinearAdd") == 1 and ops.get("Add", 0) == 0  # the residual; the biases are in the QGemms
    assert ops.get("DequantizeLinear") == 2 and ops.get("QuantizeLinear") == 2, ops  # around the float Erf
    assert ("Reshape" in ops) == (len(shape) != 2)
    x = rng.normal(size=concrete(shape, 3)).astype(f32)
    with DeployedSession(deploy_python, qdq) as deployed:
        (got,) = deployed.run({"x": x})
    (simulated,) = sim.run({"x": x})
    assert np.abs(got - simulated).max() <= 1.0 * output_lsb(sim) * (1 + 1e-5)


@pytest.mark.deploy
def test_linear_bias_that_overflows_int32_stays_matmul_and_float_add(deploy_python, tmp_path):
    model = mlp_model(["B", "S", 16])
    x = rng.normal(size=(8, 5, 16)).astype(f32)
    sim = QuantizationSimModel(model, activation_bw=16, param_bw=16, per_channel=True)
    sim.compute_encodings([{"x": x}], progress=False)
    sim.set_weights({"b1": np.full(32, 1e4, f32),  # 1e4 / (s_in * s_w) is far beyond int32
                     "b2": np.full(16, 1e-3, f32)})  # fits
    assert "overflows int32" in sim.why_not_quantized()["b1"]
    assert [b.name for b in sim.effective_plan.biases] == ["b2"]
    sim_ops = [n.op_type for n in sim.sim_ir().graph]
    assert sim_ops.count("Gemm") == 1 and sim_ops.count("MatMul") == 1 and sim_ops.count("Add") == 2
    assert sim.plan.activation_of("m1") is None  # still no rounding between product and bias
    (simulated,) = sim.run({"x": x})
    assert np.isfinite(simulated).all()
    with DeployedSession(deploy_python, sim.export(tmp_path)["qdq"]) as deployed:
        (got,) = deployed.run({"x": x})
    assert np.abs(got - simulated).max() <= 1.0 * output_lsb(sim) * (1 + 1e-5)


def test_training_graph_lowers_linear_as_deployed():
    sim = calibrated(mlp_model(["B", "S", 16]), rng.normal(size=(8, 5, 16)).astype(f32))
    x = rng.normal(size=(8, 5, 16)).astype(f32)
    trainer = sim.trainer(loss="mse", target_key="t", lr=1e-3)
    batch = {"x": x, "t": np.zeros_like(x)}
    prediction = trainer.predict(batch)
    (simulated,) = sim.run({"x": x})
    # float MatMul + Add against the integer Gemm: at most one step of a1 moves, a step of y
    assert np.abs(prediction - simulated).max() <= 1.0 * output_lsb(sim) * (1 + 1e-5) + 1e-6
    first = trainer.step(batch).loss
    for _ in range(10):
        last = trainer.step(batch).loss
    assert last < first


@pytest.mark.deploy
def test_shape_of_a_quantized_tensor_reads_its_integers(deploy_python, tmp_path):
    """A Shape consumer of a quantized tensor reads the QuantizeLinear output: onnxruntime gives
    every consumer of a DequantizeLinear its own copy, which converted the whole tensor to float
    for its shape (24 of MiniLM's 39 DequantizeLinear nodes)."""
    shape_nodes = [helper.make_node("Shape", ["a1"], ["sh"], name="shape"),
                   helper.make_node("Reshape", ["e", "sh"], ["e2"], name="reshape_like")]
    model = mlp_model(["B", "S", 16])
    graph = model.graph
    erf = next(i for i, n in enumerate(graph.node) if n.name == "erf")
    graph.node.insert(erf + 1, shape_nodes[1])
    graph.node.insert(erf + 1, shape_nodes[0])
    next(n for n in graph.node if n.name == "fc2").input[0] = "e2"
    x = rng.normal(size=(8, 5, 16)).astype(f32)
    sim = calibrated(model, x)
    qdq = sim.export(tmp_path)["qdq"]
    import onnx

    deployed_model = onnx.load(qdq)
    producers = {o: n for n in deployed_model.graph.node for o in n.output}
    shape_node = next(n for n in deployed_model.graph.node if n.name == "shape")
    assert producers[shape_node.input[0]].op_type == "QuantizeLinear"
    ops = optimized_op_counts(deploy_python, qdq)
    assert ops.get("DequantizeLinear") == 2 and ops.get("QGemm") == 2, ops
    with DeployedSession(deploy_python, qdq) as deployed:
        (got,) = deployed.run({"x": x})
    np.testing.assert_allclose(got, sim.run({"x": x})[0], atol=output_lsb(sim) * (1 + 1e-5))


# -- PRelu: x + depthwise 1x1 QLinearConv of (slope - 1) onto grids saturating at 0 -----------------

def prelu_model(slope):
    nodes = [conv("conv1", "x", "w1", "c1", pads=[1, 1, 1, 1]), helper.make_node("PRelu", ["c1", "slope"], ["p"], name="prelu"),
             conv("conv2", "p", "w2", "y")]
    return make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 4, 8, 8])],
                      {"w1": weights(6, 3, 3, 3), "w2": weights(4, 6, 1, 1), "slope": np.asarray(slope, f32).reshape(1, 6, 1, 1)})


SLOPES = {"below_one": [0.25, -0.5, 0.0, 0.9, 0.1, 1.0], "mixed": [0.25, 1.3, -0.65, 0.5, 2.0, 1.0]}


@pytest.mark.parametrize("slopes", sorted(SLOPES))
def test_prelu_is_an_integer_form_within_one_lsb_of_the_float_op(slopes):
    slope = np.asarray(SLOPES[slopes], f32)
    model = prelu_model(slope)
    x = rng.normal(size=(16, 3, 8, 8)).astype(f32) * 2
    sim = calibrated(model, x)
    (form,) = sim.plan.integer_forms
    assert (form.op_type, form.node, form.input, form.output) == ("PRelu", "prelu", "c1", "p")
    sim_ops = [n.op_type for n in sim.sim_ir().graph]
    assert "PRelu" not in sim_ops and sim_ops.count("Conv") == 2 + (2 if slopes == "mixed" else 1)
    inserted = InsertQDQPass(sim.effective_plan, sim.encodings, fold_weights=False)(sim.float_model)
    sim_model = inserted.model
    values = {v.name: v for n in sim_model.graph for v in n.outputs}
    sim_model.graph.outputs.extend([values[inserted.sites["c1"]], values[inserted.sites["p"]]])
    c1, p = Session(sim_model).run({"x": x})[1:]
    a = slope.reshape(1, 6, 1, 1).astype(np.float64)
    enc = sim.encodings["p"]
    # the float op on the sim's own (quantized) input, within the output grid's range
    reference = np.clip(np.where(c1 > 0, c1, a * c1), float(enc.min), float(enc.max))
    lsb = float(enc.scale)
    parts = prelu_form_constants(slope, sim.encodings["c1"])
    assert len(parts) == (2 if slopes == "mixed" else 1)
    # half a step of the output grid per rounding onto it (two with two parts), half a step of each part's grid
    bound = 0.5 * lsb * len(parts) + 0.5 * sum(float(part.grid_scale) for part in parts)
    assert np.abs(p - reference).max() <= bound + 1e-6
    assert np.mean(np.abs(p - reference) <= 0.5 * lsb + 1e-6) > 0.9


@pytest.mark.deploy
@pytest.mark.parametrize("slopes", sorted(SLOPES))
def test_prelu_deploys_on_integer_kernels_and_matches_the_sim(deploy_python, tmp_path, slopes):
    sim = calibrated(prelu_model(SLOPES[slopes]), rng.normal(size=(16, 3, 8, 8)).astype(f32) * 2)
    qdq = sim.export(tmp_path)["qdq"]
    ops = optimized_op_counts(deploy_python, qdq)
    parts = 2 if slopes == "mixed" else 1
    assert "PRelu" not in ops and ops.get("QLinearConv") == 2 + parts and ops.get("QLinearAdd") == parts, ops
    assert ops.get("DequantizeLinear") == 1 and ops.get("QuantizeLinear") == 1, ops  # the model's boundaries only
    x = rng.normal(size=(8, 3, 8, 8)).astype(f32) * 2
    with DeployedSession(deploy_python, qdq) as deployed:
        (got,) = deployed.run({"x": x})
    np.testing.assert_array_equal(got, sim.run({"x": x})[0])


def test_training_graph_lowers_prelu_as_deployed():
    sim = calibrated(prelu_model(SLOPES["below_one"]), rng.normal(size=(16, 3, 8, 8)).astype(f32) * 2)
    x = rng.normal(size=(8, 3, 8, 8)).astype(f32) * 2
    trainer = sim.trainer(loss="mse", target_key="t", lr=1e-3)
    batch = {"x": x, "t": np.zeros((8, 4, 8, 8), f32)}
    prediction = trainer.predict(batch)
    (simulated,) = sim.run({"x": x})
    # float products against integer kernels: a step of the PRelu output at a near-tie moves y by a
    # step or two at single elements
    gap = np.abs(prediction - simulated) / output_lsb(sim)
    assert gap.max() <= 2 + 1e-5 and np.mean(gap <= 1 + 1e-5) > 0.99
    first = trainer.step(batch).loss
    for _ in range(10):
        last = trainer.step(batch).loss
    assert last < first


def test_prelu_without_channels_on_axis_1_stays_float():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"), helper.make_node("PRelu", ["m", "slope"], ["y"], name="prelu")]
    model = make_model(nodes, [tensor("x", ["N", 5, 8])], [tensor("y", ["N", 5, 6])],
                       {"w": weights(8, 6), "slope": np.full(6, 0.25, f32)})
    sim = calibrated(model, rng.normal(size=(16, 5, 8)).astype(f32))
    assert sim.plan.integer_forms == ()
    assert "PRelu" in [n.op_type for n in sim.sim_ir().graph]


def prelu_2d_model(slope):
    """[N, C] PRelu between two Gemms (mtcnn's fully connected layers)."""
    c = len(slope)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["m"], name="fc1"),
             helper.make_node("PRelu", ["m", "slope"], ["p"], name="prelu"), helper.make_node("Gemm", ["p", "w2"], ["y"], name="fc2")]
    return make_model(nodes, [tensor("x", ["N", 8])], [tensor("y", ["N", 4])],
                      {"w1": weights(8, c), "b1": weights(c), "w2": weights(c, 4), "slope": np.asarray(slope, f32)})


@pytest.mark.parametrize("slopes", sorted(SLOPES))
def test_prelu_on_n_c_is_an_integer_form_within_one_lsb_of_the_float_op(slopes):
    slope = np.asarray(SLOPES[slopes], f32)
    x = rng.normal(size=(64, 8)).astype(f32) * 2
    sim = calibrated(prelu_2d_model(slope), x)
    (form,) = sim.plan.integer_forms
    assert (form.op_type, form.input, form.output) == ("PRelu", "m", "p")
    inserted = InsertQDQPass(sim.effective_plan, sim.encodings, fold_weights=False)(sim.float_model)
    sim_model = inserted.model
    assert "PRelu" not in [n.op_type for n in sim_model.graph]
    values = {v.name: v for n in sim_model.graph for v in n.outputs}
    sim_model.graph.outputs.extend([values[inserted.sites["m"]], values[inserted.sites["p"]]])
    m, p = Session(sim_model).run({"x": x})[1:]
    enc = sim.encodings["p"]
    reference = np.clip(np.where(m > 0, m, slope.astype(np.float64) * m), float(enc.min), float(enc.max))
    parts = prelu_form_constants(slope, sim.encodings["m"])
    bound = 0.5 * float(enc.scale) * len(parts) + 0.5 * sum(float(part.grid_scale) for part in parts)
    assert np.abs(p - reference).max() <= bound + 1e-6
    # two parts round every element onto the output grid twice (x + t0 is requantized)
    assert np.mean(np.abs(p - reference) <= 0.5 * float(enc.scale) + 1e-6) > (0.9 if len(parts) == 1 else 0.8)


@pytest.mark.deploy
@pytest.mark.parametrize("slopes", sorted(SLOPES))
def test_prelu_on_n_c_deploys_on_integer_kernels_and_matches_the_sim(deploy_python, tmp_path, slopes):
    x = rng.normal(size=(64, 8)).astype(f32) * 2
    sim = calibrated(prelu_2d_model(SLOPES[slopes]), x)
    qdq = sim.export(tmp_path)["qdq"]
    ops = optimized_op_counts(deploy_python, qdq)
    parts = 2 if slopes == "mixed" else 1
    assert "PRelu" not in ops and ops.get("QLinearConv") == parts and ops.get("QLinearAdd") == parts, ops
    assert ops.get("DequantizeLinear") == 1 and ops.get("QuantizeLinear") == 1, ops  # the model's boundaries only
    with DeployedSession(deploy_python, qdq) as deployed:
        (got,) = deployed.run({"x": x})
    np.testing.assert_array_equal(got, sim.run({"x": x})[0])


def test_training_graph_lowers_prelu_on_n_c_as_deployed():
    x = rng.normal(size=(64, 8)).astype(f32) * 2
    sim = calibrated(prelu_2d_model(SLOPES["mixed"]), x)
    prediction = sim.trainer(loss="mse", target_key="t", lr=1e-3).predict({"x": x, "t": np.zeros((64, 4), f32)})
    gap = np.abs(prediction - sim.run({"x": x})[0]) / output_lsb(sim)
    assert gap.max() <= 2 + 1e-5 and np.mean(gap <= 1 + 1e-5) > 0.99


def depthwise_model(channels, paddable=False):
    """1x1 conv to ``channels``, a 3x3 depthwise conv, 1x1 conv back (MobileNet's block). Unless
    ``paddable``, the depthwise output is also a graph output, so its channels cannot be padded."""
    nodes = [conv("expand", "x", "w1", "e"), conv("dw", "e", "wd", "d", group=channels, pads=[1, 1, 1, 1]),
             conv("project", "d", "w2", "y")]
    outputs = [tensor("y", ["N", 4, 8, 8])] + ([] if paddable else [tensor("d", ["N", channels, 8, 8])])
    return make_model(nodes, [tensor("x", ["N", 4, 8, 8])], outputs,
                      {"w1": weights(channels, 4, 1, 1), "wd": weights(channels, 1, 3, 3), "w2": weights(4, channels, 1, 1)},
                      opset=13)


def se_block(channels):
    """PP-LCNet's block: 1x1 expand, HardSwish, 3x3 depthwise, HardSwish, squeeze-excitation
    (GlobalAveragePool, 1x1, Relu, 1x1, HardSigmoid, Mul), 1x1 project."""
    squeeze = 8
    nodes = [conv("expand", "x", "w1", "e"), helper.make_node("HardSwish", ["e"], ["eh"], name="hs1"),
             helper.make_node("Conv", ["eh", "wd", "bd"], ["d"], name="dw", group=channels, pads=[1, 1, 1, 1]),
             helper.make_node("HardSwish", ["d"], ["dh"], name="hs2"),
             helper.make_node("GlobalAveragePool", ["dh"], ["g"], name="gap"),
             helper.make_node("Conv", ["g", "ws1", "bs1"], ["s1"], name="se1"),
             helper.make_node("Relu", ["s1"], ["s1r"], name="se_relu"),
             helper.make_node("Conv", ["s1r", "ws2", "bs2"], ["s2"], name="se2"),
             helper.make_node("HardSigmoid", ["s2"], ["gate"], name="se_gate", alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["dh", "gate"], ["m"], name="se_mul"),
             conv("project", "m", "w2", "y")]
    inits = {"w1": weights(channels, 4, 1, 1), "wd": weights(channels, 1, 3, 3), "bd": weights(channels),
             "ws1": weights(squeeze, channels, 1, 1), "bs1": weights(squeeze), "ws2": weights(channels, squeeze, 1, 1),
             "bs2": weights(channels), "w2": weights(4, channels, 1, 1)}
    return make_model(nodes, [tensor("x", ["N", 4, 8, 8])], [tensor("y", ["N", 4, 8, 8])], inits, opset=14)


@pytest.mark.parametrize("channels, unaligned", [(24, True), (40, True), (32, False), (48, False)])
@pytest.mark.parametrize("target", ["x86-avx2", "x86-vnni"])
def test_unaligned_depthwise_conv_keeps_its_weight_float_on_x86(channels, unaligned, target):
    x = rng.normal(size=(8, 4, 8, 8)).astype(f32)
    sim = calibrated(depthwise_model(channels), x, target=target)
    assert (sim.plan.param("wd") is None) is unaligned
    assert sim.plan.param("w1") is not None and sim.plan.param("w2") is not None
    reason = sim.plan.skipped.get("wd")
    assert (reason is not None and reason.rule_id == "kernel.depthwise_unaligned") is unaligned
    # the depthwise conv's input and output stay quantized either way
    assert sim.plan.activation_of("e") is not None and sim.plan.activation_of("d") is not None


@pytest.mark.parametrize("target", ["arm64", "htp"])
def test_unaligned_depthwise_conv_is_integer_off_x86(target):
    x = rng.normal(size=(8, 4, 8, 8)).astype(f32)
    sim = calibrated(depthwise_model(24), x, target=target)
    assert sim.plan.param("wd") is not None


@pytest.mark.parametrize("channels, unaligned", [(24, True), (32, False)])
def test_unaligned_depthwise_conv_deploys_as_a_float_conv_and_matches_the_sim(deploy_python, tmp_path, channels,
                                                                             unaligned):
    """A region that cannot be padded (the depthwise output is a graph output) runs the float rule."""
    x = rng.normal(size=(8, 4, 8, 8)).astype(f32)
    sim = calibrated(depthwise_model(channels), x, target="x86-avx2")
    qdq = sim.export(tmp_path)["qdq"]
    ops = optimized_op_counts(deploy_python, qdq)
    float_convs = ops.get("Conv", 0) + ops.get("FusedConv", 0)
    # onnxruntime >= 1.21 would quantize a float weight between Q/DQ itself (int8 per tensor):
    # the float conv must survive its optimizations
    assert ops.get("QLinearConv", 0) == (2 if unaligned else 3)
    assert float_convs == (1 if unaligned else 0)
    with DeployedSession(deploy_python, qdq) as deployed:
        got = deployed.run({"x": x})
    for a, b in zip(got, sim.run({"x": x})):
        np.testing.assert_array_equal(a, b)


def _initializer(sim, name):
    return sim.float_model.graph.initializers[name].const_value.numpy()


@pytest.mark.parametrize("channels, padded", [(24, 32), (40, 48), (8, 16)])
@pytest.mark.parametrize("target", ["x86-avx2", "x86-vnni"])
def test_unaligned_depthwise_conv_is_padded_at_its_producers_on_x86(channels, padded, target):
    x = rng.normal(size=(8, 4, 8, 8)).astype(f32)
    model = depthwise_model(channels, paddable=True)
    sim = calibrated(model, x, target=target)
    # zero filters in the producer, zero weights in the reader, the depthwise conv on 16k channels
    w1, wd, w2 = (_initializer(sim, n) for n in ("w1", "wd", "w2"))
    assert w1.shape == (padded, 4, 1, 1) and wd.shape == (padded, 1, 3, 3) and w2.shape == (4, padded, 1, 1)
    assert not w1[channels:].any() and not wd[channels:].any() and not w2[:, channels:].any()
    dw = next(n for n in sim.float_model.graph if n.name == "dw")
    assert dw.attributes["group"].as_int() == padded
    # every weight integer, the float rule not needed
    assert all(sim.plan.param(n) is not None for n in ("w1", "wd", "w2")) and "wd" not in sim.plan.skipped
    # the padded float model computes the original one (float32 sums in another order)
    np.testing.assert_allclose(Session(sim.float_model).run({"x": x})[0], float_run(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["arm64", "htp"])
def test_depthwise_conv_is_not_padded_off_x86(target):
    x = rng.normal(size=(8, 4, 8, 8)).astype(f32)
    sim = calibrated(depthwise_model(24, paddable=True), x, target=target)
    assert _initializer(sim, "wd").shape == (24, 1, 3, 3) and sim.plan.param("wd") is not None


def test_depthwise_conv_is_not_padded_with_the_aimet_preset():
    x = rng.normal(size=(8, 4, 8, 8)).astype(f32)
    sim = calibrated(depthwise_model(24, paddable=True), x, target="x86-avx2", config="aimet")
    assert _initializer(sim, "wd").shape == (24, 1, 3, 3)


def test_squeeze_excitation_block_is_padded_and_computes_the_float_block():
    x = rng.normal(size=(8, 4, 8, 8)).astype(f32)
    model = se_block(40)
    sim = calibrated(model, x, target="x86-avx2")
    shapes = {n: _initializer(sim, n).shape for n in ("w1", "wd", "bd", "ws1", "ws2", "bs2", "w2")}
    assert shapes == {"w1": (48, 4, 1, 1), "wd": (48, 1, 3, 3), "bd": (48,), "ws1": (8, 48, 1, 1), "ws2": (48, 8, 1, 1),
                      "bs2": (48,), "w2": (4, 48, 1, 1)}
    np.testing.assert_allclose(Session(sim.float_model).run({"x": x})[0], float_run(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", ["depthwise", "se_block"])
def test_padded_depthwise_block_deploys_on_integer_kernels_and_matches_the_sim(deploy_python, tmp_path, build):
    x = rng.normal(size=(8, 4, 8, 8)).astype(f32)
    model = depthwise_model(24, paddable=True) if build == "depthwise" else se_block(40)
    sim = calibrated(model, x, target="x86-avx2")
    qdq = sim.export(tmp_path)["qdq"]
    ops = optimized_op_counts(deploy_python, qdq)
    assert ops.get("QLinearConv", 0) == (3 if build == "depthwise" else 5), ops
    assert ops.get("Conv", 0) + ops.get("FusedConv", 0) == 0, ops
    with DeployedSession(deploy_python, qdq) as deployed:
        (got,) = deployed.run({"x": x})
    np.testing.assert_array_equal(got, sim.run({"x": x})[0])


def _blocked(kind):
    """depthwise_model(24) with its region closed off by ``kind``."""
    c = 24
    nodes = [conv("expand", "x", "w1", "e"), conv("dw", "e", "wd", "d", group=c, pads=[1, 1, 1, 1])]
    inits = {"w1": weights(c, 4, 1, 1), "wd": weights(c, 1, 3, 3), "w2": weights(4, c, 1, 1)}
    if kind == "concat":
        nodes += [helper.make_node("Concat", ["d", "e"], ["cat"], name="cat", axis=1), conv("project", "cat", "w2", "y")]
        inits["w2"] = weights(4, 2 * c, 1, 1)
    elif kind == "channel_constant":
        nodes += [helper.make_node("Relu", ["d"], ["dr"], name="relu"), helper.make_node("Mul", ["dr", "k"], ["dk"], name="scale"),
                  conv("project", "dk", "w2", "y")]
        inits["k"] = weights(1, c, 1, 1)
    elif kind == "divisor":
        nodes += [helper.make_node("Sigmoid", ["d"], ["dr"], name="gate"), helper.make_node("Div", ["e", "dr"], ["dk"], name="ratio"),
                  conv("project", "dk", "w2", "y")]
    elif kind == "shared_weight":
        nodes += [conv("project", "d", "w2", "y"), conv("expand2", "x", "w1", "e2")]
    model = make_model(nodes, [tensor("x", ["N", 4, 8, 8])],
                       [tensor("y", ["N", 4, 8, 8])] + ([tensor("e2", ["N", c, 8, 8])] if kind == "shared_weight" else []),
                       inits, opset=13)
    return model


@pytest.mark.parametrize("kind, rule_id", [("concat", "pad.op"), ("channel_constant", "pad.constant"), ("divisor", "pad.op"),
                                           ("shared_weight", "pad.weight_shared")])
def test_depthwise_region_that_cannot_be_padded_keeps_its_reason_and_the_float_rule(kind, rule_id):
    from onnxqat import pipeline
    from onnxqat.ops import PAD_DEPTHWISE

    prepared = pipeline.prepare(_blocked(kind), pad_depthwise=PAD_DEPTHWISE)
    assert prepared.unpadded_depthwise["dw"].rule_id == rule_id, prepared.unpadded_depthwise
    assert prepared.model.graph.initializers["wd"].const_value.shape[0] == 24
    x = rng.normal(size=(8, 4, 8, 8)).astype(f32)
    sim = calibrated(_blocked(kind), x, target="x86-avx2")
    assert sim.plan.skipped["wd"].rule_id == "kernel.depthwise_unaligned"


def pooled_head(flatten="shape", linear="matmul", k=5):
    """conv -> HardSwish -> MaxPool 2x2 -> GlobalAveragePool -> [N, 16] -> Linear -> Softmax, the
    classifier head of PP-OCR's direction classifier; the reshape is computed from the pooled
    tensor's shape (``Concat(Shape(g)[:1], [16])``) or a Flatten."""
    nodes = [conv("conv1", "x", "w1", "c1", pads=[1, 1, 1, 1]), conv("conv2", "c1", "w2", "c2"),
             helper.make_node("HardSwish", ["c2"], ["h"], name="hs"),
             helper.make_node("MaxPool", ["h"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap")]
    inits = {"w1": weights(16, 3, 3, 3), "w2": weights(16, 16, 1, 1), "fw": weights(16, k), "fb": weights(k)}
    if flatten == "shape":
        inits.update(start=np.array([0], np.int64), end=np.array([1], np.int64), cols=np.array([16], np.int64))
        nodes += [helper.make_node("Shape", ["g"], ["gs"], name="shape"),
                  helper.make_node("Slice", ["gs", "start", "end"], ["n"], name="batch"),
                  helper.make_node("Concat", ["n", "cols"], ["rows"], name="rows", axis=0),
                  helper.make_node("Reshape", ["g", "rows"], ["f"], name="flat")]
    elif flatten == "rank3":
        inits["rows"] = np.array([1, -1, 16], np.int64)
        nodes.append(helper.make_node("Reshape", ["g", "rows"], ["f"], name="flat"))
    else:
        nodes.append(helper.make_node("Flatten", ["g"], ["f"], name="flat"))
    if linear == "matmul":
        nodes += [helper.make_node("MatMul", ["f", "fw"], ["l"], name="fc"), helper.make_node("Add", ["l", "fb"], ["lb"], name="fc_bias")]
    else:
        inits["fw"] = np.ascontiguousarray(inits["fw"].T)
        nodes.append(helper.make_node("Gemm", ["f", "fw", "fb"], ["lb"], name="fc", transB=1))
    nodes.append(helper.make_node("Softmax", ["lb"], ["y"], name="softmax", axis=-1))
    out = tensor("y", [1, "N", k]) if flatten == "rank3" else tensor("y", ["N", k])
    return make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [out], inits, opset=14)


@pytest.mark.parametrize("flatten, linear", [("shape", "matmul"), ("flatten", "gemm"), ("flatten", "matmul")])
def test_linear_on_a_pooled_tensor_becomes_a_1x1_conv_on_x86(flatten, linear):
    x = rng.normal(size=(8, 3, 8, 8)).astype(f32)
    model = pooled_head(flatten, linear)
    sim = calibrated(model, x, target="x86-avx2")
    ops = [n.op_type for n in sim.float_model.graph]
    assert "MatMul" not in ops and "Gemm" not in ops and ops.count("Conv") == 3 and "Shape" not in ops, ops
    # the Conv keeps the Linear's node name: configs and mixed-precision files name the user's nodes
    assert [n.name for n in sim.float_model.graph if n.op_type == "Conv"][-1] == "fc"
    np.testing.assert_allclose(Session(sim.float_model).run({"x": x})[0], float_run(model, x), rtol=1e-5, atol=1e-6)
    arm = calibrated(model, x, target="arm64")
    assert [n.op_type for n in arm.float_model.graph].count("Conv") == 2


def test_linear_on_a_pooled_tensor_reshaped_to_rank_3_is_left_as_it_is():
    x = rng.normal(size=(8, 3, 8, 8)).astype(f32)
    sim = calibrated(pooled_head("rank3"), x, target="x86-avx2")
    assert "MatMul" in [n.op_type for n in sim.float_model.graph]


@pytest.mark.parametrize("target, max_pool", [("x86-avx2", "NhwcMaxPool"), ("arm64", "MaxPool")])
def test_pooled_linear_as_conv_keeps_the_head_channels_last_and_matches_the_sim(deploy_python, tmp_path, target,
                                                                                 max_pool):
    x = rng.normal(size=(8, 3, 8, 8)).astype(f32)
    sim = calibrated(pooled_head(), x, target=target)
    qdq = sim.export(tmp_path)["qdq"]
    ops = optimized_op_counts(deploy_python, qdq)
    # onnxruntime runs the uint8 MaxPool channels-last only when the chain after it is channels-last too
    assert ops.get(max_pool) == 1, ops
    with DeployedSession(deploy_python, qdq) as deployed:
        (got,) = deployed.run({"x": x})
    np.testing.assert_array_equal(got, sim.run({"x": x})[0])


@pytest.mark.parametrize("build", ["se_block", "pooled_head"])
def test_sim_rebuilt_from_a_padded_or_rewritten_export_equals_the_sim(tmp_path, build):
    """The exported model.onnx is the prepared graph: preparing it again changes nothing, so its
    encodings load onto the same quantizers and the rebuilt sim computes the same integers."""
    model, x = (se_block(40), rng.normal(size=(8, 4, 8, 8))) if build == "se_block" else \
        (pooled_head(), rng.normal(size=(8, 3, 8, 8)))
    x = x.astype(f32)
    sim = calibrated(model, x, target="x86-avx2")
    paths = sim.export(tmp_path)
    rebuilt = QuantizationSimModel(paths["float"], per_channel=True, target="x86-avx2").load_encodings(paths["encodings"])
    np.testing.assert_array_equal(rebuilt.run({"x": x})[0], sim.run({"x": x})[0])


def test_exported_encodings_of_derived_quantizers_load_without_a_warning(tmp_path):
    """export writes an entry for every quantized tensor, derived ones (hs = m / 6, hs2 = hs * 2)
    included; a sim of the exported model takes those entries (they are its derived grids) and
    reports only an entry that is not."""
    import json
    import warnings

    x = np.random.default_rng(5).normal(size=(16, 3, 8, 8)).astype(f32) * 2
    sim = calibrated(written_out_hard_swish(), x)  # last in this file: the module's rng draws of the other tests stay
    paths = sim.export(tmp_path)
    doc = json.load(open(paths["encodings"]))
    assert {"hs", "hs2"} <= {e["name"] for e in doc["activation_encodings"]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = QuantizationSimModel(paths["float"], per_channel=True).load_encodings(paths["encodings"])
    for name in ("m", "hs", "hs2"):
        assert again.encodings[name].equals(sim.encodings[name]), name
    for e in doc["activation_encodings"]:
        if e["name"] == "hs2":
            e["scale"] = [2 * s for s in e["scale"]]  # not hs's grid times 2
    with pytest.warns(UserWarning, match=r"1 entr\(y/ies\).*not applied: \['hs2'\]"):
        other = QuantizationSimModel(paths["float"], per_channel=True).load_encodings(doc)
    assert other.encodings["hs2"].equals(sim.encodings["hs2"])  # the derived grid, not the file's
