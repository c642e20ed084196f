"""Strip quantization from a QDQ model: the float model it simulates.

* ``[clamp] -> QuantizeLinear -> DequantizeLinear`` pairs become the tensor they quantize. The
  clamp is the one a narrow grid needs (a Clip, or Max/Min for per-channel weights, whose bounds
  lie on the quantization grid and whose only consumer is the QuantizeLinear).
* ``DequantizeLinear`` of an integer constant (a deployed weight or bias) becomes the float
  constant it dequantizes to.

Graph outputs keep their names. Works on any QDQ model, not only on onnxqat's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxqat.graph import NameScope, const_array, make_initializer, remove_dead_nodes
from onnxqat.passes import TypedFunctionalPass

__all__ = ["StripQDQPass", "StripQDQResult"]

_QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")


@dataclasses.dataclass
class StripQDQResult(ir.passes.PassResult):
    """Attributes:
        stripped: The DequantizeLinear nodes replaced by the float tensor (or constant) they give.
        kept: DequantizeLinear nodes left as they are: neither after a matching QuantizeLinear
            nor of a constant.
    """

    stripped: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()


class StripQDQPass(TypedFunctionalPass[StripQDQResult]):
    """The float model of a QDQ model, as a new model (see the module)."""

    def call(self, model: ir.Model) -> StripQDQResult:
        model = model.clone()
        graph = model.graph
        names = NameScope(model)
        modified = False
        stripped: list[str] = []
        kept: list[str] = []
        for dq in [n for n in graph if n.op_type == "DequantizeLinear" and n.domain in _QDQ_DOMAINS]:
            out = dq.outputs[0]
            source = _quantized_source(dq)
            if source is None:
                values = _dequantize_constant(dq)
                if values is None:
                    kept.append(dq.name or "")
                    continue
                source = make_initializer(graph, names.fresh(f"{out.name}_value"), values)
            name = out.name
            was_output = out.is_graph_output()
            out.replace_all_uses_with(source, replace_graph_outputs=True)
            if was_output:
                out.name = None
                source.name = name
            modified = True
            stripped.append(dq.name or "")
        remove_dead_nodes(graph)
        return StripQDQResult(model, modified, tuple(stripped), tuple(kept))


def _single_use(value: ir.Value, node: ir.Node) -> bool:
    return not value.is_graph_output() and all(u.node is node for u in value.uses())


def _quantized_source(dq: ir.Node) -> ir.Value | None:
    """The float tensor a Q->DQ pair quantizes (past its grid clamp), or None."""
    q_out = dq.inputs[0]
    q = q_out.producer() if q_out is not None else None
    if q is None or q_out is None or q.op_type != "QuantizeLinear" or q.domain not in _QDQ_DOMAINS:
        return None
    # several DequantizeLinear may read one QuantizeLinear (a per-tensor one, and a per-channel
    # read of the same grid before a float-weight Conv): each gives back the float tensor
    if q_out.is_graph_output() or any(u.node.op_type != "DequantizeLinear" for u in q_out.uses()):
        return None
    if not _same_params(q, dq):
        return None
    source = q.inputs[0]
    assert source is not None
    clamp = source.producer()
    if clamp is not None and _single_use(source, q):
        if clamp.op_type == "Clip" and all(const_array(v) is not None for v in clamp.inputs[1:3] if v is not None):
            if _on_grid(clamp.inputs[1:3], q):
                return clamp.inputs[0]
        if clamp.op_type == "Min" and clamp.inputs[0] is not None:
            inner = clamp.inputs[0].producer()
            if (inner is not None and inner.op_type == "Max" and _single_use(clamp.inputs[0], clamp)
                    and _on_grid([clamp.inputs[1], inner.inputs[1]], q)):
                return inner.inputs[0]
    return source


def _same_params(q: ir.Node, dq: ir.Node) -> bool:
    """The same grid: equal scale and zero point, or q's per-tensor ones repeated per channel."""
    repeated = False
    for a, b in zip(q.inputs[1:3], dq.inputs[1:3]):
        if a is b:
            continue
        va, vb = const_array(a), const_array(b)
        if va is None or vb is None:
            return False
        if np.array_equal(va, vb):
            continue
        if np.ndim(va) == 0 and np.ndim(vb) == 1 and va.dtype == vb.dtype and bool(np.all(vb == va)):
            repeated = True
            continue
        return False
    return repeated or _axis(q) == _axis(dq)


def _axis(node: ir.Node) -> int:
    attr = node.attributes.get("axis")
    return 1 if attr is None else attr.as_int()


def _on_grid(bounds: Sequence[ir.Value | None], q: ir.Node) -> bool:
    """Clamp bounds that are points of q's grid (what a narrow-grid clamp has)."""
    scale = const_array(q.inputs[1])
    zp = const_array(q.inputs[2]) if len(q.inputs) > 2 and q.inputs[2] is not None else np.zeros(1)
    if scale is None or zp is None:
        return False
    for bound in bounds:
        value = const_array(bound)
        if value is None:
            return False
        steps = np.asarray(value, np.float64).reshape(-1) / np.asarray(scale, np.float64).reshape(-1)
        if not np.allclose(steps, np.rint(steps), atol=1e-3):
            return False
    return True


def _dequantize_constant(dq: ir.Node) -> np.ndarray | None:
    q = const_array(dq.inputs[0])
    scale = const_array(dq.inputs[1])
    if q is None or scale is None or q.dtype.kind not in "iu":
        return None
    zp = const_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else np.zeros_like(scale)
    if zp is None:
        return None
    shape = [1] * q.ndim
    if scale.ndim == 1 and q.ndim:
        shape[_axis(dq) % q.ndim] = -1
    diff = q.astype(np.int64) - np.asarray(zp, np.int64).reshape(shape if scale.ndim else ())
    return (diff.astype(np.float32) * scale.astype(np.float32).reshape(shape if scale.ndim else ())).astype(np.float32)
