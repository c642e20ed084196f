"""Property tests on random small graphs (chains and DAGs of Conv/Gemm/MatMul/Add/Mul/Relu/Concat/
Reshape/pooling, random shapes, random opsets).

For every graph: the checker passes at every stage; stripping the simulation's QDQ gives back the
float model output-for-output; with every quantizer at 16 bits the simulation stays within 16-bit
noise of the float model; the deployable QDQ model agrees with the simulation within 1 LSB.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from conftest import run_onnx
from onnxqat import QuantizationSimModel
from onnxqat.passes.insert_qdq import quantize_bias
from onnxqat.passes.strip_qdq import StripQDQPass

OPSETS = [11, 13, 15, 17, 21]


@st.composite
def random_graphs(draw):
    """A random valid model: (ModelProto, input shape)."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    opset = draw(st.sampled_from(OPSETS))
    channels = draw(st.integers(1, 4))
    size = draw(st.sampled_from([4, 6, 8]))
    nodes, inits = [], []
    pool4 = [("x", channels, size)]  # 4-d tensors: (name, channels, spatial)
    pool2 = []  # 2-d tensors: (name, features)
    counter = iter(range(1000))

    def fresh(base):
        return f"{base}{next(counter)}"

    def weight(shape, scale=0.5):
        name = fresh("w")
        inits.append(numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name))
        return name

    steps = draw(st.integers(2, 7))
    for _ in range(steps):
        choices = ["conv", "relu", "add", "mul", "concat", "pool", "gap", "flatten"] if pool4 else []
        if pool2:
            choices += ["gemm", "matmul", "relu2", "add2"]
        op = draw(st.sampled_from(choices))
        if op in ("conv", "relu", "add", "mul", "concat", "pool", "gap", "flatten"):
            name, c, s = pool4[draw(st.integers(0, len(pool4) - 1))]
        if op == "conv":
            out_c = draw(st.integers(1, 4))
            depthwise = draw(st.booleans()) and out_c == c
            k = draw(st.sampled_from([1, 3]))
            w = weight((out_c, 1 if depthwise else c, k, k))
            inputs = [name, w] + ([weight((out_c,))] if draw(st.booleans()) else [])
            out = fresh("conv")
            nodes.append(helper.make_node("Conv", inputs, [out], pads=[k // 2] * 4, group=c if depthwise else 1))
            pool4.append((out, out_c, s))
        elif op == "relu":
            out = fresh("relu")
            nodes.append(helper.make_node("Relu", [name], [out]))
            pool4.append((out, c, s))
        elif op in ("add", "mul"):
            same = [t for t in pool4 if t[1] == c and t[2] == s]
            other = same[draw(st.integers(0, len(same) - 1))][0]
            out = fresh(op)
            nodes.append(helper.make_node(op.capitalize(), [name, other], [out]))
            pool4.append((out, c, s))
        elif op == "concat":
            same = [t for t in pool4 if t[2] == s]
            other, c2, _ = same[draw(st.integers(0, len(same) - 1))]
            out = fresh("cat")
            nodes.append(helper.make_node("Concat", [name, other], [out], axis=1))
            pool4.append((out, c + c2, s))
        elif op == "pool":
            if s < 4:
                continue
            kind = draw(st.sampled_from(["MaxPool", "AveragePool"]))
            out = fresh("pool")
            nodes.append(helper.make_node(kind, [name], [out], kernel_shape=[2, 2], strides=[2, 2]))
            pool4.append((out, c, s // 2))
        elif op == "gap":
            out = fresh("gap")
            nodes.append(helper.make_node("GlobalAveragePool", [name], [out]))
            pool4.append((out, c, 1))
        elif op == "flatten":
            out = fresh("flat")
            if draw(st.booleans()):
                nodes.append(helper.make_node("Flatten", [name], [out], axis=1))
            else:
                shape = fresh("shape")
                inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), shape))
                nodes.append(helper.make_node("Reshape", [name, shape], [out]))
            pool2.append((out, c * s * s))
        else:
            name, f = pool2[draw(st.integers(0, len(pool2) - 1))]
            out_f = draw(st.integers(1, 6))
            out = fresh(op)
            if op == "gemm":
                trans = draw(st.booleans())
                w = weight((out_f, f) if trans else (f, out_f))
                nodes.append(helper.make_node("Gemm", [name, w, weight((out_f,))], [out], transB=int(trans)))
                pool2.append((out, out_f))
            elif op == "matmul":
                nodes.append(helper.make_node("MatMul", [name, weight((f, out_f))], [out]))
                pool2.append((out, out_f))
            elif op == "relu2":
                nodes.append(helper.make_node("Relu", [name], [out]))
                pool2.append((out, f))
            else:
                nodes.append(helper.make_node("Add", [name, name], [out]))
                pool2.append((out, f))
    if not nodes:
        nodes.append(helper.make_node("Relu", ["x"], ["out0"]))
        pool4.append(("out0", channels, size))
    last = nodes[-1].output[0]
    outputs = [helper.make_tensor_value_info(last, TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "random", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, size, size])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10 if opset >= 21 else 8)
    model = onnx.shape_inference.infer_shapes(model)
    del model.graph.output[:]
    model.graph.output.extend(v for v in model.graph.value_info if v.name == last)
    if not model.graph.output:  # the last tensor was the input's direct Relu: keep it typed
        model.graph.output.append(helper.make_tensor_value_info(last, TensorProto.FLOAT, ["N", channels, size, size]))
    onnx.checker.check_model(model)
    return model, (channels, size, size), seed


def batches(shape, seed, n=3):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(4, *shape)).astype(np.float32)} for _ in range(n)]


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(random_graphs())
def test_insert_then_strip_gives_back_the_float_model(case):
    model, shape, seed = case
    sim = QuantizationSimModel(model, per_channel=bool(seed % 2))
    data = batches(shape, seed)
    sim.compute_encodings(data, progress=False)
    sim_model = sim.sim_ir()
    stripped = StripQDQPass()(sim_model).model
    for m in (sim.float_model, sim_model, stripped):
        onnx.checker.check_model(ir.to_proto(m))
    ops = {n.op_type for n in stripped.graph}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    # Everything comes back exactly except int32 biases, which the simulation stores rounded to
    # their grid (scale = input scale x weight scale): compare with the float model so rounded.
    reference = sim.float_model.clone()
    scales = sim.bias_scales()
    for name, scale in scales.items():
        bias = reference.graph.initializers[name].const_value.numpy()
        reference.graph.initializers[name].const_value = ir.tensor((quantize_bias(bias, scale) * scale).astype(np.float32), name=name)
    (got,) = run_onnx(ir.to_proto(stripped), data[0])
    (ref,) = run_onnx(ir.to_proto(reference), data[0])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    (original,) = run_onnx(model, data[0])
    if not scales:
        np.testing.assert_allclose(got, original, rtol=1e-5, atol=1e-5)
    else:  # rounded biases move the output by a small fraction of one step of its quantizer
        out = sim.plan.activation_of(sim.output_names[0])
        lsb = float(sim.encodings[out.name].scale) if out is not None else 1e-3
        assert np.abs(got - original).max() <= 0.25 * lsb + 1e-5


@SETTINGS
@given(random_graphs())
def test_sixteen_bit_simulation_stays_within_sixteen_bit_noise(case):
    model, shape, seed = case
    sim = QuantizationSimModel(model, param_bw=16, activation_bw=16, per_channel=True)
    data = batches(shape, seed)
    sim.compute_encodings(data, progress=False)
    (ref,) = run_onnx(model, data[0])
    (got,) = sim.run(data[0])
    out_range = float(np.abs(ref).max()) + 1e-3
    # 16-bit steps are range / 65535; a few dozen of them accumulated over the graph
    assert np.abs(got - ref).max() <= 64 * out_range / 65535 + 1e-5


@SETTINGS
@given(random_graphs())
def test_deployable_model_agrees_with_simulation_within_one_lsb(case):
    model, shape, seed = case
    sim = QuantizationSimModel(model, per_channel=bool(seed % 2))
    data = batches(shape, seed)
    sim.compute_encodings(data, progress=False)
    deploy = sim.sim_ir(fold_weights=True)
    onnx.checker.check_model(ir.to_proto(deploy))
    from onnxqat.runtime import Session

    (deployed,) = Session(deploy).run(data[0])
    (simulated,) = sim.run(data[0])
    out = sim.plan.activation_of(sim.output_names[0])
    if out is None:  # the output stays float (e.g. a chain of cheap ops on a float input)
        np.testing.assert_allclose(deployed, simulated, rtol=1e-5, atol=1e-6)
        return
    lsb = float(sim.encodings[out.name].scale)
    assert np.abs(deployed - simulated).max() <= lsb * 1.0001


@pytest.mark.parametrize("per_channel", [False, True])
def test_strip_gives_back_a_float_weight_conv_that_reads_its_input_per_channel(per_channel):
    """The case hypothesis found: x feeds a Relu and a 2-channel depthwise Conv, which on x86 keeps a
    float weight and reads x's integers through its own per-channel DequantizeLinear (the same grid
    repeated); both DequantizeLinear of x's one QuantizeLinear give x back."""
    w = np.array([0.06, -0.07], np.float32).reshape(2, 1, 1, 1)
    shape = ["N", 2, 4, 4]
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["relu0"]), helper.make_node("Conv", ["x", "w1"], ["conv2"], group=2)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("relu0", "conv2")],
        [numpy_helper.from_array(w, "w1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    sim = QuantizationSimModel(model, per_channel=per_channel, target="x86-avx2")
    sim.compute_encodings([{"x": np.random.default_rng(0).normal(size=(4, 2, 4, 4)).astype(np.float32)}], progress=False)
    sim_model = sim.sim_ir()
    reads = [n for n in sim_model.graph if n.op_type == "DequantizeLinear" and n.inputs[0] is not None
             and n.inputs[0].producer() is not None and n.inputs[0].producer().op_type == "QuantizeLinear"
             and n.inputs[0].producer().inputs[0].name == "x"]
    assert len(reads) == 2  # the per-tensor one and the Conv's per-channel one
    result = StripQDQPass()(sim_model)
    assert not {n.op_type for n in result.model.graph} & {"QuantizeLinear", "DequantizeLinear"}
    assert result.kept == ()
