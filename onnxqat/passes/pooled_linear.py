"""A Linear on a globally pooled tensor as a 1x1 Conv (:data:`onnxqat.ops.POOLED_LINEAR`).

``GlobalAveragePool -> Reshape/Flatten to [N, C] -> MatMul(W) [+ Add(b)]`` (or ``Gemm``) becomes
``GlobalAveragePool -> Conv(W^T as [K, C, 1, 1], b) -> Flatten``: the same products and
sums per output (the Conv of a 1x1 image is the matrix product), on a 4-D tensor. onnxruntime's
CPU provider runs its integer convolutions channels-last and moves the layout transposes along
the per-channel ops between them until they cancel; a chain that ends in a 2-D Linear keeps a
transpose in the middle of the last block, and the ops after it run channels-first (a uint8
MaxPool there takes a generic loop, ten times its channels-last kernel). With the Conv the chain
stays channels-last up to the pooled ``[N, 1, 1, K]`` result.

A node is rewritten only when the pooled tensor is a global pooling's ``[N, C, 1, 1]`` output and read by the reshape alone
(and Shape nodes), the reshape's output of rank 2 (so ``[N, C]``: the product reads ``C`` values a
row) by the product alone, the weight a constant ``[C, K]`` (``[K, C]``
for ``Gemm`` with ``transB``) of its own and the bias a constant ``[K]`` of its own.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxqat.graph import NameScope, const_array, make_initializer, name_of, remove_dead_nodes
from onnxqat.passes import TypedInPlacePass

__all__ = ["PooledLinearAsConvPass", "PooledLinearAsConvResult"]

# The pooled tensor's producer. A Linear after other [N, C, 1, 1] tensors (PP-LCNet's head:
# GlobalAveragePool -> Conv -> HardSwish -> Linear) was measured as such a Conv too: no gain
# (0.94-1.04x, within the noise), as its chain was channels-last up to there already.
_POOLS = ("GlobalAveragePool", "GlobalMaxPool")

@dataclasses.dataclass
class PooledLinearAsConvResult(ir.passes.PassResult):
    """Attributes:
        rewritten: The node computing the Linear's output (MatMul, its bias Add, or Gemm) -> the new Conv.
    """

    rewritten: dict[str, str] = dataclasses.field(default_factory=dict)


def _sole_user(value: ir.Value) -> ir.Node | None:
    users = list(value.uses())
    if len(users) != 1 or value.is_graph_output():
        return None
    return users[0].node


def _own(value: ir.Value | None, node: ir.Node) -> np.ndarray | None:
    array = const_array(value)
    if array is None or value is None or any(use.node is not node for use in value.uses()):
        return None
    return array


def _attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    if attr is None:
        return default
    return float(attr.as_float()) if attr.type == ir.AttributeType.FLOAT else float(attr.as_int())


def _linear(node: ir.Node, channels: int) -> tuple[np.ndarray, np.ndarray | None, list[ir.Node], list[ir.Value]] | None:
    """``(weight [C, K], bias [K] or None, nodes of the Linear, their weight and bias values)`` of a
    Linear reading input 0, or None."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
            return None
        weight = _own(node.inputs[1], node) if len(node.inputs) > 1 else None
        if weight is None or weight.ndim != 2:
            return None
        weight = weight.T if _attr(node, "transB", 0) else weight
        bias = _own(node.inputs[2], node) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if len(node.inputs) > 2 and node.inputs[2] is not None and (bias is None or bias.shape != (weight.shape[1],)):
            return None
        kept = [v for v in node.inputs[1:3] if v is not None]
        return (weight, bias, [node], kept) if weight.shape[0] == channels else None
    if node.op_type != "MatMul" or len(node.inputs) != 2:
        return None
    weight = _own(node.inputs[1], node)
    if weight is None or weight.ndim != 2 or weight.shape[0] != channels:
        return None
    add = _sole_user(node.outputs[0])
    if add is not None and add.op_type == "Add" and add.domain in ("", "ai.onnx") and len(add.inputs) == 2:
        other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
        bias = _own(other, add)
        if bias is not None and bias.shape == (weight.shape[1],) and bias.dtype == weight.dtype:
            return weight, bias, [node, add], [v for v in (node.inputs[1], other) if v is not None]
    return weight, None, [node], [v for v in node.inputs[1:2] if v is not None]


def _rank(flat: ir.Node) -> int | None:
    """The output rank of a Flatten (2) or Reshape: from its output shape, else from the length of
    its shape input (known when that is computed at run time, e.g. ``Concat(Shape(x)[:1], [C])``)."""
    if flat.op_type == "Flatten":
        return 2
    if flat.outputs[0].shape is not None:
        return len(flat.outputs[0].shape)
    target = flat.inputs[1] if len(flat.inputs) > 1 else None
    dims = target.shape if target is not None else None
    return dims[0] if dims is not None and len(dims) == 1 and isinstance(dims[0], int) else None


def _pooled(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or len(shape) != 4 or not isinstance(shape[1], int) or shape[2] != 1 or shape[3] != 1:
        return None
    return shape[1]


class PooledLinearAsConvPass(TypedInPlacePass[PooledLinearAsConvResult]):
    """Rewrite every Linear on a globally pooled tensor as a 1x1 Conv and a reshape (module notes)."""

    def call(self, model: ir.Model) -> PooledLinearAsConvResult:
        graph = model.graph
        names = NameScope(model)
        result = PooledLinearAsConvResult(model, False)
        for pool in list(graph):
            if pool.op_type not in _POOLS or pool.domain not in ("", "ai.onnx"):
                continue
            pooled = pool.outputs[0]
            channels = _pooled(pooled)
            readers = [u.node for u in pooled.uses() if u.node.op_type != "Shape"]  # a Shape reads no values
            flat = readers[0] if len(readers) == 1 and not pooled.is_graph_output() else None
            if channels is None or flat is None or flat.op_type not in ("Reshape", "Flatten") or flat.inputs[0] is not pooled:
                continue
            if flat.op_type == "Flatten" and int(_attr(flat, "axis", 1)) != 1:
                continue
            if _rank(flat) != 2:
                continue
            user = _sole_user(flat.outputs[0])
            found = _linear(user, channels) if user is not None and user.inputs[0] is flat.outputs[0] else None
            if found is None:
                continue
            weight, bias, nodes, kept = found
            last = nodes[-1].outputs[0]
            base = nodes[0].name or "linear"
            k = weight.shape[1]
            inputs = [pooled, make_initializer(graph, names.fresh(f"{base}_conv_weight"),
                                               np.ascontiguousarray(weight.T.reshape(k, channels, 1, 1)))]
            if bias is not None:
                inputs.append(make_initializer(graph, names.fresh(f"{base}_conv_bias"), bias))
            conv = ir.node("Conv", inputs, name=names.fresh(f"{base}_conv"))
            conv.outputs[0].name = names.fresh(f"{base}_conv_out")
            conv.outputs[0].shape = ir.Shape([pooled.shape[0] if pooled.shape is not None else None, k, 1, 1])
            conv.outputs[0].type = last.type
            # Flatten, not Reshape: no constant input, so the Conv stays the model's last weighted node
            flatten = ir.node("Flatten", [conv.outputs[0]], attributes={"axis": 1}, name=names.fresh(f"{base}_flatten"))
            graph.insert_after(nodes[-1], [conv, flatten])
            out = flatten.outputs[0]
            out.type, out.shape = last.type, last.shape
            name = last.name
            key = nodes[-1].name or nodes[-1].op_type
            last.replace_all_uses_with(out, replace_graph_outputs=True)
            graph.remove([*reversed(nodes), flat], safe=True)
            out.name = name
            # the Conv's weight and bias take the Linear's names (configs, freeze lists and weights() name them)
            for old, new in zip(kept, conv.inputs[1:]):
                assert new is not None
                old_name = old.name
                graph.initializers.pop(name_of(old))
                new.name = old_name
            if nodes[0].name:  # the Conv takes the Linear's node name too (configs name nodes of the user's model)
                conv.name = nodes[0].name
            result.rewritten[key] = conv.name or ""
            result.modified = True
        if result.modified:
            remove_dead_nodes(graph)
            graph.sort()
        return result

