"""Elementwise rewrites that let more of the graph run on integer kernels, values unchanged."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from onnxqat.graph import NameScope, const_array, is_constant, make_initializer, name_of
from onnxqat.passes import TypedInPlacePass

__all__ = ["SubtractConstantAsAddPass", "SubtractConstantResult"]


@dataclasses.dataclass
class SubtractConstantResult(ir.passes.PassResult):
    """Attributes: rewritten: names of the Sub nodes now Add nodes."""

    rewritten: tuple[str, ...] = ()


class SubtractConstantAsAddPass(TypedInPlacePass[SubtractConstantResult]):
    """``Sub(x, c)`` with a float constant ``c`` becomes ``Add(x, -c)``.

    onnxruntime has an integer kernel for Add (QLinearAdd) and none for Sub; negating a float
    constant is exact, so outputs are unchanged. The node keeps its name and output.
    """

    def call(self, model: ir.Model) -> SubtractConstantResult:
        graph = model.graph
        names = NameScope(model)
        rewritten = []
        for node in list(graph):
            if node.op_type != "Sub" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
                continue
            x, c = node.inputs
            if x is None or is_constant(x) or not is_constant(c):
                continue
            value = const_array(c)
            assert value is not None and c is not None
            if value.dtype.kind != "f":
                continue
            negated = make_initializer(graph, names.fresh(f"{c.name}_negated"), (-value).astype(value.dtype))
            add = ir.Node("", "Add", [x, negated], name=node.name, num_outputs=1)
            out = node.outputs[0]
            new = add.outputs[0]
            new.type, new.shape = out.type, out.shape
            graph.insert_before(node, add)
            out.replace_all_uses_with(new, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            new.name = out.name
            rewritten.append(add.name or "")
            if not c.uses() and not c.is_graph_output() and c.name in graph.initializers:
                graph.initializers.pop(name_of(c))
        return SubtractConstantResult(model, modified=bool(rewritten), rewritten=tuple(rewritten))
