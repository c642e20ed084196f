"""Graph passes: BatchNorm folding, canonicalisation, QDQ insertion (compared with onnxruntime)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from conftest import make_model, random_batches, run_onnx, tensor, tiny_cnn
from onnxqat.calibrate.schemes import weight_encoding
from onnxqat.config import load_config
from onnxqat.passes.annotate import annotate
from onnxqat.passes.insert_qdq import InsertQDQPass
from onnxqat.qparams import compute_encoding, fake_quantize
from onnxqat.sim import prepare_model
from onnxqat.spec import QuantSpec

f32 = np.float32


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def _bn_after(op, weight, extra_inputs=(), **attrs):
    rng = np.random.default_rng(3)
    c = weight.shape[1] if op == "ConvTranspose" else (weight.shape[0] if op == "Conv" else weight.shape[0 if attrs.get("transB") else 1])
    inits = {
        "w": weight, "gamma": rng.uniform(0.5, 2, c).astype(f32), "beta": rng.normal(size=c).astype(f32),
        "mean": rng.normal(size=c).astype(f32), "var": rng.uniform(0.2, 2, c).astype(f32),
    }
    inputs = ["x", "w"]
    if extra_inputs:
        inits["b"] = rng.normal(size=c).astype(f32)
        inputs.append("b")
    nodes = [
        helper.make_node(op, inputs, ["h"], name="op", **attrs),
        helper.make_node("BatchNormalization", ["h", "gamma", "beta", "mean", "var"], ["y"], name="bn", epsilon=1e-3),
    ]
    return nodes, inits


@pytest.mark.parametrize(
    "op, weight, x_shape, attrs, bias",
    [
        ("Conv", (4, 3, 3, 3), [2, 3, 6, 6], {}, True),
        ("Conv", (4, 3, 3, 3), [2, 3, 6, 6], {}, False),
        ("Conv", (4, 1, 3, 3), [2, 4, 6, 6], {"group": 4}, True),
        ("ConvTranspose", (3, 4, 2, 2), [2, 3, 5, 5], {}, True),
        ("Gemm", (6, 4), [2, 6], {}, True),
        ("Gemm", (4, 6), [2, 6], {"transB": 1, "beta": 0.5}, True),
    ],
)
def test_fold_batchnorm_matches_original(op, weight, x_shape, attrs, bias):
    rng = np.random.default_rng(0)
    nodes, inits = _bn_after(op, rng.normal(size=weight).astype(f32), ("b",) if bias else (), **attrs)
    proto = make_model(nodes, [tensor("x", x_shape)], [tensor("y", ["d"] * len(x_shape))], inits)
    model = prepare_model(ir.from_proto(proto))
    assert "BatchNormalization" not in _ops(model)
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert not {"gamma", "beta", "mean", "var"} & set(model.graph.initializers)
    x = rng.normal(size=x_shape).astype(f32)
    (ref,) = run_onnx(proto, {"x": x})
    (got,) = run_onnx(ir.to_proto(model), {"x": x})
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_fold_copies_shared_weight_and_keeps_unfoldable_bn():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(2, 2, 1, 1)).astype(f32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h1"], name="c1"),
        helper.make_node("BatchNormalization", ["h1", "g", "b", "m", "v"], ["y1"], name="bn1"),
        helper.make_node("Conv", ["x", "w"], ["y2"], name="c2"),
        helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y3"], name="bn_on_input"),
    ]
    one = np.ones(2, f32)
    proto = make_model(nodes, [tensor("x", [1, 2, 3, 3])], [tensor(n, ["a", "b", "c", "d"]) for n in ("y1", "y2", "y3")],
                       {"w": w, "g": one * 2, "b": one, "m": one * 0.5, "v": one})
    model = prepare_model(ir.from_proto(proto))
    assert _ops(model).count("BatchNormalization") == 1
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), w)  # shared: not mutated
    x = rng.normal(size=(1, 2, 3, 3)).astype(f32)
    for ref, got in zip(run_onnx(proto, {"x": x}), run_onnx(ir.to_proto(model), {"x": x})):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_constant_node_weights_become_initializers_and_old_opsets_upgrade():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(3, 2, 1, 1)).astype(f32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(w)),
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
    ]
    proto = make_model(nodes, [tensor("x", [1, 2, 2, 2])], [tensor("y", [1, 3, 2, 2])], opset=11, ir_version=6)
    model = prepare_model(ir.from_proto(proto))
    assert "w" in model.graph.initializers and "Constant" not in _ops(model)
    assert model.opset_imports[""] == 13
    plan = annotate(model, load_config("onnxruntime"))
    assert plan.param("w") is not None  # the Constant-node weight is quantized as a weight


def _encodings(model, plan):
    encodings = {}
    for q in plan.activations:
        encodings[q.name] = compute_encoding(-2.0, 3.0, q.spec)
    for p in plan.params:
        encodings[p.name] = weight_encoding(model.graph.initializers[p.name].const_value.numpy(), p.spec)
    return encodings


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bw", [4, 8])
def test_insert_qdq_equals_numpy_reference(per_channel, bw):
    """Every QDQ site of the simulation computes qparams.fake_quantize, to float rounding."""
    cfg = load_config("onnxruntime").with_overrides(per_channel_quantization=per_channel)
    cfg = cfg.with_overrides(params={})  # keep biases float: the reference below has no bias step
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
        helper.make_node("Relu", ["m"], ["y"], name="relu"),
    ]
    rng = np.random.default_rng(4)
    w = rng.normal(size=(6, 5)).astype(f32)
    proto = make_model(nodes, [tensor("x", ["N", 6])], [tensor("y", ["N", 5])], {"w": w})
    model = prepare_model(ir.from_proto(proto))
    plan = annotate(model, cfg, param_bw=bw, activation_bw=bw)
    encodings = _encodings(model, plan)
    sim = InsertQDQPass(plan, encodings, fold_weights=False)(model).model
    x = rng.normal(size=(7, 6)).astype(f32)
    (got,) = run_onnx(ir.to_proto(sim), {"x": x})
    xq = fake_quantize(x, encodings["x"])
    wq = fake_quantize(w, encodings["w"])
    ref = fake_quantize(np.maximum(xq @ wq, 0), encodings["y"])
    lsb = encodings["y"].scale
    assert np.abs(got - ref).max() <= lsb * 1.001  # a rounding flip at most, from float matmul order
    assert np.mean(np.abs(got - ref) < 1e-6) > 0.99


def test_deploy_flavour_stores_integer_weights():
    model = prepare_model(ir.from_proto(tiny_cnn()))
    cfg = load_config("onnxruntime").with_overrides(per_channel_quantization=True)
    plan = annotate(model, cfg, target="arm64")  # x86 keeps the 4-channel depthwise weight float
    encodings = _encodings(model, plan)
    deploy = InsertQDQPass(plan, encodings, fold_weights=True)(model).model
    float_weights = [n for n, v in deploy.graph.initializers.items()
                     if v.const_value.dtype == ir.DataType.FLOAT and v.const_value.size > 5]
    assert float_weights == []  # only scales (one per channel) and the int32-bias scales stay float
    weight_dqs = [n for n in deploy.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None]
    int_weights = {n.inputs[0].const_value.dtype for n in weight_dqs}
    assert int_weights == {ir.DataType.INT8, ir.DataType.INT32}  # weights and biases
    assert len(weight_dqs) == len(plan.params) + len(plan.biases)
    for p in plan.params:
        assert p.name not in deploy.graph.initializers
    assert _ops(deploy).count("QuantizeLinear") == sum(len(q.tensors) for q in plan.activations)
    sim = InsertQDQPass(plan, encodings, fold_weights=False)(model).model
    x = random_batches(1)[0]
    for a, b in zip(run_onnx(ir.to_proto(sim), x), run_onnx(ir.to_proto(deploy), x)):
        np.testing.assert_array_equal(a, b)
    # the input model is untouched by both flavours
    assert "QuantizeLinear" not in _ops(model)


def test_graph_output_keeps_its_name():
    model = prepare_model(ir.from_proto(tiny_cnn()))
    plan = annotate(model, load_config("onnxruntime"))
    sim = InsertQDQPass(plan, _encodings(model, plan), fold_weights=False)(model).model
    assert [v.name for v in sim.graph.outputs] == ["y"]
    assert sim.graph.outputs[0].producer().op_type == "DequantizeLinear"
    assert [v.name for v in sim.graph.inputs] == ["x"]


def test_sixteen_bit_uses_contrib_ops_below_opset_21():
    model = prepare_model(ir.from_proto(tiny_cnn()))
    plan = annotate(model, load_config("onnxruntime"), activation_bw=16)
    sim = InsertQDQPass(plan, _encodings(model, plan), fold_weights=False)(model).model
    domains = {n.domain for n in sim.graph if n.op_type == "QuantizeLinear"}
    assert domains == {"com.microsoft", ""}  # 16-bit activations, 8-bit weights
    x = random_batches(1)[0]
    (out,) = run_onnx(ir.to_proto(sim), x)
    assert np.isfinite(out).all()


def test_strict_and_narrow_grids_insert_a_clip():
    cfg = load_config("onnxruntime").with_overrides(activation_symmetric=True, strict_symmetric=True)
    model = prepare_model(ir.from_proto(tiny_cnn()))
    plan = annotate(model, cfg)
    assert all(q.spec.strict_symmetric for q in plan.activations)
    enc = {**_encodings(model, plan)}
    enc["x"] = compute_encoding(-2.0, 3.0, QuantSpec(symmetric=True, strict_symmetric=True))
    sim = InsertQDQPass(plan, enc, fold_weights=False)(model).model
    clip = next(n for n in sim.graph if n.op_type == "Clip" and n.inputs[0].name == "x")
    lo = clip.inputs[1].const_value.numpy()
    assert lo == pytest.approx(-127 * enc["x"].scale)


def test_batchnorm_written_as_mul_add_folds_into_the_conv():
    from onnxqat.passes.fold_batchnorm import FoldAffinePass

    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Mul", ["c", "scale"], ["m"], name="bn_mul"),
             helper.make_node("Add", ["m", "shift"], ["y"], name="bn_add"),
             helper.make_node("Conv", ["y", "w2"], ["c2"], name="conv2"),
             helper.make_node("Mul", ["c2", "spatial"], ["z"], name="not_per_channel")]
    inits = {"w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "scale": rng.uniform(0.5, 2, (4, 1, 1)).astype(np.float32),
             "shift": rng.normal(size=(1, 4, 1, 1)).astype(np.float32), "w2": rng.normal(size=(2, 4, 1, 1)).astype(np.float32),
             "spatial": rng.normal(size=(1, 1, 4, 4)).astype(np.float32)}
    model = make_model(nodes, [tensor("x", ["N", 3, 6, 6])], [tensor("z", ["N", 2, 4, 4])], inits)
    x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
    ref = run_onnx(model, {"x": x})[0]
    ir_model = ir.from_proto(model)
    result = FoldAffinePass()(ir_model)
    assert result.modified and result.folded == {"conv": ("bn_mul", "bn_add")}
    ops = [n.op_type for n in ir_model.graph]
    assert ops == ["Conv", "Conv", "Mul"]  # the per-channel Mul/Add folded, the spatial Mul kept
    assert [v.name for n in ir_model.graph for v in n.outputs][0] == "y"  # the folded conv takes the chain's name
    got = run_onnx(ir.to_proto(ir_model), {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def _bn_case(case):
    """A model with one BatchNormalization 'bn' that must not fold, for each ``fold.*`` rule."""
    rng = np.random.default_rng(5)
    c = 2
    params = {"g": np.full(c, 2, f32), "b": np.ones(c, f32), "m": np.full(c, 0.5, f32), "v": np.ones(c, f32)}
    w = {"w": rng.normal(size=(c, c, 1, 1)).astype(f32)}
    bn_in, outputs, attrs, opset = "h", ["y"], {}, 13
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv")]
    if case == "fold.no_producer":
        nodes, w, bn_in = [], {}, "x"
    elif case == "fold.producer_op":
        nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu")]
    elif case == "fold.shared_input":
        outputs = ["y", "h"]
    elif case == "fold.weight_not_constant":
        nodes = [helper.make_node("Conv", ["x", "x2"], ["h"], name="conv")]
    elif case == "fold.grouped_conv_transpose":
        w = {"w": rng.normal(size=(c, 1, 1, 1)).astype(f32)}
        nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["h"], name="convt", group=2)]
    elif case == "fold.training_mode":
        attrs, opset = {"training_mode": 1}, 15
        outputs = ["y", "rm", "rv"]
    bn_outputs = ["y", "rm", "rv"] if case == "fold.training_mode" else ["y"]
    nodes.append(helper.make_node("BatchNormalization", [bn_in, "g", "b", "m", "v"], bn_outputs, name="bn", **attrs))
    inputs = [tensor("x", [1, c, 3, 3])] + ([tensor("x2", [c, c, 1, 1])] if case == "fold.weight_not_constant" else [])
    shapes = {"y": [1, c, 3, 3], "h": [1, c, 3, 3], "rm": [c], "rv": [c]}
    return make_model(nodes, inputs, [tensor(n, shapes[n]) for n in outputs], {**params, **w}, opset=opset)


@pytest.mark.parametrize("rule_id", ["fold.no_producer", "fold.producer_op", "fold.shared_input",
                                     "fold.weight_not_constant", "fold.grouped_conv_transpose",
                                     "fold.training_mode"])
def test_batchnorm_left_unfolded_says_which_rule(rule_id):
    from onnxqat.passes.fold_batchnorm import FoldBatchNormPass
    from onnxqat.pipeline import prepare

    model = ir.from_proto(_bn_case(rule_id))
    result = FoldBatchNormPass()(model)
    assert not result.modified and result.folded == {}
    assert list(result.unfolded) == ["bn"]
    assert result.unfolded["bn"].rule_id == rule_id
    assert "'bn'" in str(result.unfolded["bn"])  # readable, names the node
    assert "BatchNormalization" in _ops(model)
    assert prepare(_bn_case(rule_id)).unfolded_batchnorm["bn"].rule_id == rule_id


def test_batchnorm_fold_result_names_what_it_folded():
    from onnxqat.passes.fold_batchnorm import FoldBatchNormPass
    from onnxqat.pipeline import prepare

    proto = tiny_cnn()
    result = FoldBatchNormPass()(ir.from_proto(proto))
    assert result.modified and result.folded == {"bn1": "conv1"} and result.unfolded == {}
    assert prepare(proto).unfolded_batchnorm == {}


def test_float16_pass_returns_its_record_and_keeps_no_state():
    from onnxqat.passes.float16 import Float16ToFloat32Pass

    half = np.float16
    nodes = [helper.make_node("Add", ["x", "c"], ["a"], name="add"),
             helper.make_node("Cast", ["a"], ["y"], name="cast", to=onnx.TensorProto.FLOAT16)]
    proto = make_model(nodes, [tensor("x", [2], onnx.TensorProto.FLOAT16)], [tensor("y", [2], onnx.TensorProto.FLOAT16)],
                       {"c": np.ones(2, half)})
    to_float32 = Float16ToFloat32Pass()
    result = to_float32(ir.from_proto(proto))
    assert result.modified
    assert (result.record.inputs, result.record.outputs, result.record.initializers, result.record.casts) == (
        {"x"}, {"y"}, {"c"}, {"cast"})
    again = to_float32(result.model)  # already float32: nothing to record, nothing carried over
    assert not again.modified and not again.record
    assert not hasattr(to_float32, "record")


def test_expose_values_pass_returns_intermediate_tensors():
    from onnxqat.passes.expose import ExposeValuesPass

    proto = tiny_cnn()
    model = ir.from_proto(proto)
    result = ExposeValuesPass(["a", "y", "nope", "r2", "a"])(model)
    assert result.exposed == ("a", "r2") and result.missing == ("nope",)
    assert [v.name for v in model.graph.outputs] == ["y", "a", "r2"]
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(f32)
    y, a, r2 = run_onnx(ir.to_proto(model), {"x": x})
    np.testing.assert_array_equal(y, run_onnx(proto, {"x": x})[0])
    assert a.shape == (2, 4, 8, 8) and (a < 0).any()
    np.testing.assert_array_equal(r2, np.maximum(a, 0))  # r2 = Relu(a)
    assert not ExposeValuesPass(["y"])(model).modified  # already an output: nothing to do


def test_expose_values_pass_gives_types():
    from onnxqat.passes.expose import ExposeValuesPass

    model = ir.from_proto(tiny_cnn())
    copy = model.clone()
    value = next(v for n in copy.graph for v in n.outputs if v.name == "flat")
    value.type, value.shape = None, None
    result = ExposeValuesPass(["flat"], {"flat": (ir.DataType.FLOAT, ir.Shape([]))})(copy)
    assert result.modified and value.dtype == ir.DataType.FLOAT and value.shape == ir.Shape([])
    original = next(v for n in model.graph for v in n.outputs if v.name == "flat")
    assert original.shape != ir.Shape([])  # the clone's change did not reach the model it came from


@pytest.mark.parametrize("scheme", ["minmax", "percentile"])
def test_calibration_statistics_model_is_the_same_through_ir_and_protobuf(scheme):
    from onnxqat.calibrate.observers import HistogramObserver, MinMaxObserver
    from onnxqat.calibrate.runner import _statistics_model, _with_additions_ir, _with_additions_proto
    from onnxqat.calibrate.schemes import Scheme

    model = prepare_model(ir.from_proto(tiny_cnn()))
    plan = annotate(model, load_config(None))
    scheme = Scheme(scheme)
    observers = {q.name: HistogramObserver() if scheme.needs_histogram else MinMaxObserver() for q in plan.activations}
    stats = _statistics_model(model, plan, scheme, observers)
    via_proto = _with_additions_proto(ir.to_proto(model), stats)
    via_ir = ir.to_proto(_with_additions_ir(model.clone(), stats))
    assert len(via_ir.graph.output) > 1
    assert [(o.name, o.type.tensor_type.elem_type) for o in via_ir.graph.output] == [
        (o.name, o.type.tensor_type.elem_type) for o in via_proto.graph.output]
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(f32)
    for got, ref in zip(run_onnx(via_ir, {"x": x}), run_onnx(via_proto, {"x": x})):
        np.testing.assert_array_equal(got, ref)


def test_opset_upgrade_result_says_from_which_opset():
    from onnxqat.passes.canonicalize import UpgradeOpsetPass

    proto = tiny_cnn(opset=11)
    result = UpgradeOpsetPass(13)(ir.from_proto(proto))
    assert result.modified and (result.previous, result.opset) == (11, 13)
    again = UpgradeOpsetPass(13)(result.model)
    assert not again.modified and (again.previous, again.opset) == (13, 13)


def test_onnxruntime_type_inference_result_lists_the_values_it_typed():
    from onnxqat.passes.infer_types import InferTypesWithOnnxruntimePass

    nodes = [helper.make_node("Gelu", ["x"], ["g"], name="gelu", domain="com.microsoft"),
             helper.make_node("Relu", ["g"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [tensor("x", [2, 3])], [tensor("y", [2, 3])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    model = ir.from_proto(proto)
    g = next(v for n in model.graph for v in n.outputs if v.name == "g")
    assert g.dtype is None  # onnx knows no schema for the contrib op
    result = InferTypesWithOnnxruntimePass()(model)
    assert result.modified and result.typed == {"g": ir.DataType.FLOAT} and g.dtype == ir.DataType.FLOAT
    assert [v.name for v in model.graph.outputs] == ["y"]  # the probe's extra output stayed on the copy
    assert InferTypesWithOnnxruntimePass()(model).typed == {}
