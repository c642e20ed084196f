"""Fold inference BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it.

``y = gamma * (W x + b - mean) / sqrt(var + eps) + beta`` becomes ``W' x + b'`` with
``W' = W * s`` on the output-channel axis and ``b' = s * (b - mean) + beta``, ``s = gamma /
sqrt(var + eps)``. Weights must be folded before they are quantized: quantizing ``W`` and then
scaling by ``s`` is not what a deployed integer kernel computes.

The folded op's output takes the BatchNormalization's output name, so graph outputs and
downstream names are unchanged. A weight shared with other nodes is copied, never mutated.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxqat.graph import NameScope, const_array, is_constant, make_initializer

__all__ = ["FoldBatchNormPass"]


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold every foldable BatchNormalization; others are left as they are."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        names = NameScope(model)
        graph = model.graph
        modified = False
        for bn in list(graph):
            if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
                continue
            producer = _foldable_producer(bn)
            if producer is None:
                continue
            _fold(graph, names, producer, bn)
            modified = True
        return ir.passes.PassResult(model, modified)


def _attr(node: ir.Node, name: str, default: float | int) -> float | int:
    attr = node.attributes.get(name)
    if attr is None:
        return default
    return attr.as_float() if isinstance(default, float) else attr.as_int()


def _foldable_producer(bn: ir.Node) -> ir.Node | None:
    if int(_attr(bn, "training_mode", 0)) != 0:
        return None
    if any(out.uses() or out.is_graph_output() for out in bn.outputs[1:]):
        return None
    if not all(is_constant(v) for v in bn.inputs[1:5]):
        return None
    data = bn.inputs[0]
    producer = data.producer() if data is not None else None
    if producer is None or producer.op_type not in ("Conv", "ConvTranspose", "Gemm"):
        return None
    if producer.domain not in ("", "ai.onnx"):
        return None
    assert data is not None
    if data.is_graph_output() or len(data.uses()) != 1:
        return None
    if not is_constant(producer.inputs[1]):
        return None
    if len(producer.inputs) > 2 and producer.inputs[2] is not None and not is_constant(producer.inputs[2]):
        return None
    if producer.op_type == "ConvTranspose" and int(_attr(producer, "group", 1)) != 1:
        return None
    if producer.op_type == "Gemm":
        if producer.inputs[0] is None or is_constant(producer.inputs[0]):
            return None
        shape = data.shape
        if shape is not None and len(shape) != 2:
            return None
    return producer


def _fold(graph: ir.Graph, names: NameScope, op: ir.Node, bn: ir.Node) -> None:
    gamma, beta, mean, var = (const_array(v).astype(np.float64) for v in bn.inputs[1:5])  # type: ignore[union-attr]
    eps = float(_attr(bn, "epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)

    weight_value = op.inputs[1]
    assert weight_value is not None
    weight = const_array(weight_value)
    assert weight is not None
    if op.op_type == "Conv":
        axis = 0
    elif op.op_type == "ConvTranspose":
        axis = 1
    else:
        axis = 0 if int(_attr(op, "transB", 0)) else 1
    shape = [1] * weight.ndim
    shape[axis] = -1
    new_weight = (weight.astype(np.float64) * scale.reshape(shape)).astype(weight.dtype)

    bias_value = op.inputs[2] if len(op.inputs) > 2 else None
    bias = const_array(bias_value)
    if op.op_type == "Gemm":
        gemm_beta = float(_attr(op, "beta", 1.0))
        c = np.zeros_like(mean) if bias is None else np.broadcast_to(bias.astype(np.float64) * gemm_beta, mean.shape)
        new_bias = scale * (c - mean) + beta
        op.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    else:
        b = np.zeros_like(mean) if bias is None else bias.astype(np.float64)
        new_bias = scale * (b - mean) + beta
    new_bias = new_bias.astype(weight.dtype)

    _set_const_input(graph, names, op, 1, new_weight)
    if bias_value is not None:
        _set_const_input(graph, names, op, 2, new_bias)
    else:
        op.resize_inputs(3)
        op.replace_input_with(2, make_initializer(graph, names.fresh(f"{op.name or op.op_type}_bias"), new_bias))

    out = op.outputs[0]
    bn_out = bn.outputs[0]
    bn_name = bn_out.name
    bn_params = [v for v in bn.inputs[1:] if v is not None]
    bn_out.replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(bn, safe=True)
    for value in bn_params:
        if not value.uses() and not value.is_graph_output() and value.name in graph.initializers:
            graph.initializers.pop(value.name)
    out.name = bn_name


def _set_const_input(graph: ir.Graph, names: NameScope, node: ir.Node, index: int, array: np.ndarray) -> None:
    """Give ``node`` a new constant at ``index``; in place unless the old one has other users."""
    value = node.inputs[index]
    assert value is not None
    if len(value.uses()) == 1 and not value.is_graph_input() and not value.is_graph_output():
        value.const_value = ir.tensor(array, name=value.name)
        return
    node.replace_input_with(index, make_initializer(graph, names.fresh(f"{value.name}_folded"), array))
