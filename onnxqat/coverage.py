"""How much of a model's weighted compute a plan quantizes, and where the rest is.

A plan can be legal and still leave most of the work in float: weights inside ``If``/``Loop``
branches (silero-vad keeps every weight in a branch chosen by its sample-rate input), ops onnxqat
does not quantize (LSTM), exclusions. The weight of a node is its weight count times the output
positions it is applied at (a multiply-accumulate estimate; the weight count alone where shapes
are unknown). :func:`coverage` returns the share and the largest float places, so the sim can warn.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import onnx_ir as ir

from onnxqat.graph import is_constant
from onnxqat.plan import QuantPlan

__all__ = ["Coverage", "coverage"]

_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN")


@dataclasses.dataclass(frozen=True)
class Coverage:
    """Attributes: quantized_share: fraction of weighted compute with quantized weights;
    float_places: place (node, or the control-flow node holding it) -> its share, largest first."""

    quantized_share: float
    float_places: Mapping[str, float]

    def summary(self, limit: int = 3) -> str:
        places = ", ".join(f"{name} ({share:.0%})" for name, share in list(self.float_places.items())[:limit])
        return f"{self.quantized_share:.0%} of the weighted compute is quantized; float: {places}"


def _cost(node: ir.Node) -> float:
    weights = [v for v in node.inputs if v is not None and is_constant(v) and v.const_value is not None]
    if not weights:
        return 0.0
    size = float(max(v.const_value.size for v in weights if v.const_value is not None))
    out = node.outputs[0].shape if node.outputs else None
    if out is not None and node.op_type in ("Conv", "ConvTranspose") and len(out) > 2:
        spatial = [d for d in list(out)[2:] if isinstance(d, int)]
        return size * (math.prod(spatial) if spatial else 1)
    if out is not None and node.op_type in ("MatMul", "Gemm") and len(out) >= 2:
        rows = [d for d in list(out)[:-1] if isinstance(d, int)]
        return size * (math.prod(rows) if rows else 1)
    return size


def coverage(model: ir.Model, plan: QuantPlan) -> Coverage:
    quantized_nodes = {c for p in plan.params for c in p.consumers}
    total = quantized = 0.0
    places: dict[str, float] = {}
    for node in model.graph:
        subgraphs = [a for a in node.attributes.values() if a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)]
        if subgraphs:
            inner = 0.0
            for attr in subgraphs:
                graphs = [attr.as_graph()] if attr.type == ir.AttributeType.GRAPH else list(attr.as_graphs())
                branch = [sum(_cost(n) for n in ir.traversal.RecursiveGraphIterator(g) if n.op_type in _WEIGHTED)
                          for g in graphs]
                inner += max(branch, default=0.0)  # one branch runs
            if inner:
                total += inner
                places[f"{node.op_type} '{node.name}' (control flow)"] = inner
            continue
        if node.op_type not in _WEIGHTED:
            continue
        cost = _cost(node)
        total += cost
        if node.name in quantized_nodes:
            quantized += cost
        elif cost:
            places[f"{node.op_type} '{node.name}'"] = cost
    if total == 0:
        return Coverage(1.0, {})
    ordered = dict(sorted(((k, v / total) for k, v in places.items()), key=lambda kv: -kv[1]))
    return Coverage(quantized / total, ordered)
