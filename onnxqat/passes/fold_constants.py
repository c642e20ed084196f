"""Fold constant subgraphs that compute weights (e.g. ``Cast -> Transpose`` of an initializer).

Exporters sometimes store a weight in another dtype or layout and convert it in the graph. A
weight quantizer needs the weight as a constant, so every constant-only chain that ends in the
weight or bias input of Conv, ConvTranspose, Gemm or MatMul is evaluated once (with onnx's
reference evaluator) and replaced by an initializer named like the chain's output. Other constant
subgraphs are left as the exporter wrote them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from onnxqat.graph import const_array, is_constant, make_initializer, name_of
from onnxqat.passes import TypedInPlacePass

__all__ = ["FoldWeightChainsPass", "FoldWeightChainsResult"]

_WEIGHT_SLOTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1)}


@dataclasses.dataclass
class FoldWeightChainsResult(ir.passes.PassResult):
    """Attributes: folded: The initializers that now hold a folded chain's value (named like the chain's output)."""

    folded: tuple[str, ...] = ()


class FoldWeightChainsPass(TypedInPlacePass[FoldWeightChainsResult]):
    """Evaluate every constant-only chain that ends in a weight or bias input (see the module)."""

    def call(self, model: ir.Model) -> FoldWeightChainsResult:
        graph = model.graph
        wanted: set[int] = set()
        for node in graph:
            for i in _WEIGHT_SLOTS.get(node.op_type, ()):
                if i < len(node.inputs) and node.inputs[i] is not None:
                    wanted.add(id(node.inputs[i]))
        chain: list[ir.Node] = []
        for node in reversed(list(graph)):
            if any(id(v) in wanted for v in node.outputs) and _pure(node):
                chain.append(node)
                wanted.update(id(v) for v in node.inputs if v is not None)
        modified = False
        folded: list[str] = []
        opset = model.opset_imports.get("", 13)
        for node in reversed(chain):
            if not all(v is None or is_constant(v) for v in node.inputs):
                continue
            values = _evaluate(node, opset)
            if values is None:
                continue
            for out, array in zip(node.outputs, values):
                name = name_of(out)
                graph_output = out.is_graph_output()
                if graph_output:
                    continue
                out.name = None
                const = make_initializer(graph, name, np.asarray(array))
                folded.append(name)
                out.replace_all_uses_with(const)
            if all(not o.uses() and not o.is_graph_output() for o in node.outputs):
                inputs = [v for v in node.inputs if v is not None]
                graph.remove(node, safe=True)
                for v in inputs:
                    if not v.uses() and not v.is_graph_input() and v.name in graph.initializers:
                        graph.initializers.pop(name_of(v))
            modified = True
        return FoldWeightChainsResult(model, modified, tuple(folded))


def _pure(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx") and not any(
        a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()
    ) and node.op_type not in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial")


def _evaluate(node: ir.Node, opset: int) -> list[np.ndarray] | None:
    inputs = [f"in{i}" if v is not None else "" for i, v in enumerate(node.inputs)]
    outputs = [f"out{i}" for i in range(len(node.outputs))]
    proto = onnx.helper.make_node(node.op_type, inputs, outputs, domain=node.domain)
    for attr in node.attributes.values():
        proto.attribute.append(ir.serde.serialize_attribute(attr))
    feeds = {name: a for name, v in zip(inputs, node.inputs) if v is not None and (a := const_array(v)) is not None}
    try:
        model = onnx.helper.make_model(
            onnx.helper.make_graph([proto], "fold", [], [onnx.helper.make_empty_tensor_value_info(o) for o in outputs]),
            opset_imports=[onnx.helper.make_opsetid("", opset)],
        )
        graph_inputs = [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                        for n, a in feeds.items()]
        model.graph.input.extend(graph_inputs)
        return list(ReferenceEvaluator(model).run(None, feeds))
    except Exception:  # an op the reference evaluator cannot run: leave the chain alone
        return None
