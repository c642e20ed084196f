"""Passes report what they did in their result, not on the pass instance."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from conftest import make_model, tensor
from onnxqat.passes.fold_constants import FoldWeightChainsPass
from onnxqat.passes.infer_types import InferShapesPass
from onnxqat.passes.strip_qdq import StripQDQPass

f32 = np.float32


def test_fold_weight_chains_names_the_folded_weights():
    w = np.arange(24, dtype=f32).reshape(3, 2, 2, 2)  # stored as [I, O, kH, kW], transposed in the graph
    nodes = [helper.make_node("Transpose", ["w_io"], ["w"], perm=[1, 0, 2, 3], name="t"),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    model = ir.from_proto(make_model(nodes, [tensor("x", [1, 3, 4, 4])], [tensor("y", [1, 2, 3, 3])], {"w_io": w}))
    result = FoldWeightChainsPass()(model)
    assert result.folded == ("w",)
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), w.transpose(1, 0, 2, 3))
    again = FoldWeightChainsPass()(model)
    assert again.folded == () and not again.modified


def test_strip_qdq_names_stripped_and_kept_dequantize_nodes():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dq"),
             helper.make_node("DequantizeLinear", ["i", "s", "z"], ["e"], name="dq_of_input")]
    inits = {"s": np.array(0.1, f32), "z": np.array(0, np.uint8)}
    proto = make_model(nodes, [tensor("x", [4]), tensor("i", [4], TensorProto.UINT8)],
                       [tensor("d", [4]), tensor("e", [4])], inits)
    result = StripQDQPass()(ir.from_proto(proto))
    assert result.stripped == ("dq",) and result.kept == ("dq_of_input",)
    assert [n.name for n in result.model.graph] == ["dq_of_input"]


def test_infer_shapes_reports_why_inference_failed():
    nodes = [helper.make_node("Add", ["x", "n"], ["y"], name="add")]  # float + int64: a type error
    graph = helper.make_graph(nodes, "g", [tensor("x", [2]), tensor("n", [2], TensorProto.INT64)], [tensor("y", [2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)  # unchecked on purpose
    result = InferShapesPass(check_type=True, strict_mode=True)(ir.from_proto(proto))
    assert not result.modified and result.error and "Add" in result.error
    relu = helper.make_graph([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["y"])], "g",
                             [tensor("x", [2])], [tensor("y", [2])])
    model = ir.from_proto(helper.make_model(relu, opset_imports=[helper.make_opsetid("", 13)], ir_version=8))
    ok = InferShapesPass()(model)
    assert ok.error is None and ok.modified and model.graph.node(0).outputs[0].shape == ir.Shape([2])
