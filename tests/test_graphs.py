"""Graphs as exporters write them: odd weight storage, unquantized ops, control flow, transformers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_model, run_onnx, tensor
from onnxqat import QuantizationSimModel

f32 = np.float32
rng = np.random.default_rng(0)


def sim_for(model, feeds, **options):
    sim = QuantizationSimModel(model, **options)
    sim.compute_encodings(feeds, progress=False)
    return sim


def assert_close_to_float(model, sim, feed, lsb_tolerance=8):
    ref = run_onnx(model, feed)
    got = sim.run(feed)
    for name, r, g in zip(sim.output_names, ref, got):
        assert r.shape == g.shape and r.dtype == g.dtype, name
        enc = sim.plan.activation_of(name)
        scale = float(sim.encodings[enc.name].scale) if enc else 0.05 * float(np.abs(r).max() + 1e-6)
        assert np.abs(r - g).max() <= lsb_tolerance * scale, (name, np.abs(r - g).max(), scale)


def test_weights_behind_transpose_and_cast_are_weights():
    w = rng.normal(size=(4, 3)).astype(f32)
    nodes = [
        helper.make_node("Cast", ["w16"], ["w_cast"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["w_cast"], ["w_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w_t"], ["y"], name="mm"),
    ]
    model = make_model(nodes, [tensor("x", ["N", 3])], [tensor("y", ["N", 4])], {"w16": w.T.astype(np.float16).T.copy()})
    x = rng.normal(size=(8, 3)).astype(f32)
    sim = sim_for(model, [{"x": x}], per_channel=True)
    assert [p.spec.axis for p in sim.plan.params] == [1]
    assert_close_to_float(model, sim, {"x": x})


def test_shared_weight_and_initializer_listed_as_input():
    w = rng.normal(size=(3, 3)).astype(f32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["a", "w"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "g", [tensor("x", ["N", 3]), tensor("w", [3, 3])], [tensor("y", ["N", 3])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    x = rng.normal(size=(8, 3)).astype(f32)
    sim = sim_for(model, [{"x": x}])
    assert sim.input_names == ["x"]
    assert [(p.name, len(p.consumers)) for p in sim.plan.params] == [("w", 2)]
    assert_close_to_float(model, sim, {"x": x})


def test_unquantized_ops_and_integer_paths_pass_through():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Shape", ["c"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus1"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["c", "new_shape"], ["flat"]),
        helper.make_node("Erf", ["flat"], ["e"], name="erf"),
        helper.make_node("Tanh", ["e"], ["y"], name="tanh"),
    ]
    model = make_model(nodes, [tensor("x", ["N", 2, 3, 3])], [tensor("y", ["N", "M"])],
                       {"w": rng.normal(size=(2, 2, 1, 1)).astype(f32), "zero": np.array(0, np.int64),
                        "axes": np.array([0], np.int64), "minus1": np.array([-1], np.int64)})
    x = rng.normal(size=(4, 2, 3, 3)).astype(f32)
    sim = sim_for(model, [{"x": x}])
    quantized = {t for q in sim.plan.activations for t in q.tensors}
    assert {"shape", "batch", "new_shape"}.isdisjoint(quantized)  # integer paths untouched
    assert "e" in sim.why_not_quantized()
    assert_close_to_float(model, sim, {"x": x})


def test_custom_domain_and_lstm_pass_through():
    hidden = 3
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R"], ["seq"], hidden_size=hidden, name="lstm"),
        helper.make_node("Squeeze", ["seq", "one"], ["s"]),
        helper.make_node("Gelu", ["s"], ["g"], domain="com.microsoft", name="gelu"),
        helper.make_node("MatMul", ["g", "wo"], ["y"], name="out"),
    ]
    graph = helper.make_graph(
        nodes, "g", [tensor("x", [5, 2, 4])], [tensor("y", [5, 2, 2])],
        [numpy_helper.from_array(rng.normal(size=(1, 4 * hidden, 4)).astype(f32), "W"),
         numpy_helper.from_array(rng.normal(size=(1, 4 * hidden, hidden)).astype(f32), "R"),
         numpy_helper.from_array(np.array([1], np.int64), "one"),
         numpy_helper.from_array(rng.normal(size=(hidden, 2)).astype(f32), "wo")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    x = rng.normal(size=(5, 2, 4)).astype(f32)
    sim = sim_for(model, [{"x": x}])
    assert "LSTM" in [n.op_type for n in onnx.load_from_string(sim.model.SerializeToString()).graph.node]
    assert sim.plan.param("W") is None and sim.plan.param("wo") is not None
    assert "g" in {t for q in sim.plan.activations for t in q.tensors}  # demanded by the MatMul
    assert_close_to_float(model, sim, {"x": x})


def test_if_subgraph_passes_through_unchanged():
    then_g = helper.make_graph([helper.make_node("Relu", ["c"], ["t_out"])], "then", [], [tensor("t_out", ["N", 2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["c"], ["e_out"])], "else", [], [tensor("e_out", ["N", 2])])
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["c"], name="fc"),
        helper.make_node("ReduceSum", ["c"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="branch"),
    ]
    model = make_model(nodes, [tensor("x", ["N", 3])], [tensor("y", ["N", 2])],
                       {"w": rng.normal(size=(3, 2)).astype(f32), "zero": np.array(0.0, f32)})
    x = rng.normal(size=(6, 3)).astype(f32)
    sim = sim_for(model, [{"x": x}])
    if_nodes = [n for n in sim.model.graph.node if n.op_type == "If"]
    assert len(if_nodes) == 1
    branch = onnx.helper.get_attribute_value(if_nodes[0].attribute[0])
    assert [n.op_type for n in branch.node] in (["Relu"], ["Neg"])
    assert_close_to_float(model, sim, {"x": x})


def _transformer_block(d=8, heads=2, seq=5, vocab=11):
    dh = d // heads
    w = lambda *s: (rng.normal(size=s) * 0.3).astype(f32)  # noqa: E731
    inits = {
        "emb": w(vocab, d), "wq": w(d, d), "wk": w(d, d), "wv": w(d, d), "wo": w(d, d),
        "ln_g": np.ones(d, f32), "ln_b": np.zeros(d, f32), "w1": w(d, 2 * d), "w2": w(2 * d, d),
        "shape_h": np.array([0, seq, heads, dh], np.int64), "shape_o": np.array([0, seq, d], np.int64),
        "scale": np.array(1 / np.sqrt(dh), f32), "half": np.array(0.5, f32), "one": np.array(1.0, f32),
        "sqrt2": np.array(np.sqrt(2), f32),
    }
    n = helper.make_node
    nodes = [
        n("Gather", ["emb", "ids"], ["h0"], name="embed"),
        n("LayerNormalization", ["h0", "ln_g", "ln_b"], ["h"], axis=-1, name="ln"),
        n("MatMul", ["h", "wq"], ["q"], name="q_proj"), n("MatMul", ["h", "wk"], ["k"], name="k_proj"),
        n("MatMul", ["h", "wv"], ["v"], name="v_proj"),
        n("Reshape", ["q", "shape_h"], ["q4"]), n("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
        n("Reshape", ["k", "shape_h"], ["k4"]), n("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        n("Reshape", ["v", "shape_h"], ["v4"]), n("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
        n("MatMul", ["qt", "kt"], ["scores"], name="qk"), n("Mul", ["scores", "scale"], ["scaled"], name="scale"),
        n("Softmax", ["scaled"], ["attn"], axis=-1, name="softmax"),
        n("MatMul", ["attn", "vt"], ["ctx"], name="av"), n("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        n("Reshape", ["ctx_t", "shape_o"], ["ctx3"]), n("MatMul", ["ctx3", "wo"], ["o"], name="o_proj"),
        n("Add", ["o", "h0"], ["r1"], name="residual"),
        n("MatMul", ["r1", "w1"], ["f1"], name="ffn1"),
        n("Div", ["f1", "sqrt2"], ["f1s"]), n("Erf", ["f1s"], ["erf"]), n("Add", ["erf", "one"], ["erf1"]),
        n("Mul", ["f1", "erf1"], ["g2"]), n("Mul", ["g2", "half"], ["gelu"]),
        n("MatMul", ["gelu", "w2"], ["y"], name="ffn2"),
    ]
    model = make_model(nodes, [tensor("ids", ["B", seq], TensorProto.INT64)], [tensor("y", ["B", seq, d])], inits,
                       opset=17)
    return model


def test_transformer_block_quantizes_sensibly():
    model = _transformer_block()
    feeds = [{"ids": rng.integers(0, 11, size=(4, 5))} for _ in range(3)]
    sim = sim_for(model, feeds, per_channel=True)
    quantized = {t for q in sim.plan.activations for t in q.tensors}
    assert {"qt", "kt", "vt", "attn"} <= quantized  # both inputs of activation x activation MatMuls
    assert sim.plan.param("emb") is None  # Gather's table is data, quantized as an activation input nowhere
    assert {p.name for p in sim.plan.params} == {"wq", "wk", "wv", "wo", "w1", "w2"}
    assert "erf" in sim.why_not_quantized()  # Gelu internals stay float between quantized boundaries
    assert float(sim.encodings["attn"].scale) == 1 / 256
    ref = run_onnx(model, feeds[0])[0]
    got = sim.run(feeds[0])[0]
    sqnr = 10 * np.log10((ref ** 2).mean() / ((ref - got) ** 2).mean())
    assert sqnr > 20, sqnr


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 17, 21])
def test_opsets_in_range_load_and_simulate(opset):
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["y"])]
    model = make_model(nodes, [tensor("x", [2, 3, 4, 4])], [tensor("y", [2, 2, 4, 4])],
                       {"w": rng.normal(size=(2, 3, 1, 1)).astype(f32), "b": np.ones(2, f32)},
                       opset=opset, ir_version=3 if opset < 9 else (8 if opset < 21 else 10))
    x = rng.normal(size=(2, 3, 4, 4)).astype(f32)
    sim = sim_for(model, [{"x": x}], per_channel=True)
    assert sim.model.opset_import[0].version == max(opset, 13)
    assert_close_to_float(model, sim, {"x": x})


def test_name_collisions_with_generated_names():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["x_scale"], name=""),
             helper.make_node("Relu", ["x_scale"], ["x_zero_point"], name=""),
             helper.make_node("MatMul", ["x_zero_point", "w_scale"], ["y"], name="")]
    model = make_model(nodes, [tensor("x", ["N", 2])], [tensor("y", ["N", 2])],
                       {"w": np.eye(2, dtype=f32), "w_scale": np.eye(2, dtype=f32) * 2})
    x = rng.normal(size=(4, 2)).astype(f32)
    sim = sim_for(model, [{"x": x}])
    onnx.checker.check_model(sim.model)
    assert_close_to_float(model, sim, {"x": x})


def test_float16_model_simulates_in_float32_and_exports_in_float16(tmp_path):
    from conftest import tiny_cnn

    model = tiny_cnn()
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for v in [*model.graph.input, *model.graph.output]:
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(model)
    x = rng.normal(size=(8, 3, 8, 8)).astype(np.float16)
    sim = sim_for(model, [{"x": x}], per_channel=True)
    (got,) = sim.run({"x": x})
    (ref,) = run_onnx(model, {"x": x})
    assert got.dtype == np.float16 and ref.dtype == np.float16
    assert np.abs(got.astype(f32) - ref.astype(f32)).max() < 8 * float(sim.encodings["y"].scale)
    paths = sim.export(tmp_path)
    exported = onnx.load(paths["float"])
    assert {t.data_type for t in exported.graph.initializer} == {TensorProto.FLOAT16}
    assert exported.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    np.testing.assert_allclose(run_onnx(exported, {"x": x})[0].astype(f32), ref.astype(f32), atol=2e-2)
    qdq = onnx.load(paths["qdq"])
    assert qdq.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert qdq.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    (deployed,) = run_onnx(qdq, {"x": x})
    assert deployed.dtype == np.float16
    np.testing.assert_allclose(deployed.astype(f32), got.astype(f32), atol=float(sim.encodings["y"].scale) * 1.01)
    with pytest.raises(Exception, match="dtype float64"):
        sim.run({"x": x.astype(np.float64)})
