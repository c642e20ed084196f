"""Fold inference BatchNormalization, and BatchNorm written as Mul/Add, into the op before it.

:class:`FoldBatchNormPass` folds BatchNormalization into the Conv, ConvTranspose or Gemm that
feeds it; :class:`FoldAffinePass` folds ``Mul(c)`` and/or ``Add(d)`` with constants that are per
output channel (or scalar) after such an op, as exporters write BatchNorm (CRNNs exported from
PyTorch with folded BN statistics) or a separate bias.

``y = gamma * (W x + b - mean) / sqrt(var + eps) + beta`` becomes ``W' x + b'`` with
``W' = W * s`` on the output-channel axis and ``b' = s * (b - mean) + beta``, ``s = gamma /
sqrt(var + eps)``. Weights must be folded before they are quantized: quantizing ``W`` and then
scaling by ``s`` is not what a deployed integer kernel computes.

The folded op's output takes the BatchNormalization's output name, so graph outputs and
downstream names are unchanged. A weight shared with other nodes is copied, never mutated.
:class:`FoldBatchNormResult` names the folded nodes and gives every BatchNormalization left as it
is a :class:`~onnxqat.ops.Reason` (rule ids ``fold.*``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxqat.graph import NameScope, const_array, is_constant, make_initializer, name_of, require_const
from onnxqat.ops import Reason
from onnxqat.passes import TypedInPlacePass

__all__ = ["FoldAffinePass", "FoldAffineResult", "FoldBatchNormPass", "FoldBatchNormResult", "RescaleBatchNormPass"]


@dataclasses.dataclass
class FoldBatchNormResult(ir.passes.PassResult):
    """Attributes:
        folded: BatchNormalization node -> the node it was folded into.
        unfolded: BatchNormalization node left in the graph -> why.
    """

    folded: dict[str, str] = dataclasses.field(default_factory=dict)
    unfolded: dict[str, Reason] = dataclasses.field(default_factory=dict)


class FoldBatchNormPass(TypedInPlacePass[FoldBatchNormResult]):
    """Fold every foldable BatchNormalization; others are left as they are, each with its reason."""

    def call(self, model: ir.Model) -> FoldBatchNormResult:
        names = NameScope(model)
        graph = model.graph
        result = FoldBatchNormResult(model, False)
        for bn in list(graph):
            if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
                continue
            producer = _foldable_producer(bn)
            key = bn.name or bn.outputs[0].name or ""
            if isinstance(producer, Reason):
                result.unfolded[key] = producer
                continue
            result.folded[key] = producer.name or producer.op_type
            _fold(graph, names, producer, bn)
            result.modified = True
        return result


class RescaleBatchNormPass(ir.passes.InPlacePass):
    """Every BatchNormalization left (inference mode, constant parameters) computes
    ``x * s + (beta - mean * s)`` with ``s = gamma / sqrt(var + eps)``: its scale and bias become
    those (float32, in aimet-onnx 2.42's order of operations), mean 0, variance 1, epsilon 0, so
    the scale is the multiplier a quantizer can hold (the ``aimet`` preset quantizes it). A
    parameter read elsewhere too is copied, never changed."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        names = NameScope(model)
        modified = False
        for bn in list(model.graph):
            if (bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx")
                    or int(_attr(bn, "training_mode", 0)) != 0 or len(bn.inputs) < 5
                    or not all(is_constant(v) for v in bn.inputs[1:5])):
                continue
            gamma, beta, mean, var = (require_const(v) for v in bn.inputs[1:5])
            eps = float(_attr(bn, "epsilon", 1e-5))
            scale = gamma * np.reciprocal(np.sqrt(var + eps))
            new = (scale, beta - mean * scale, np.zeros_like(scale), np.ones_like(scale))
            for index, array in enumerate(new, start=1):
                value = bn.inputs[index]
                assert value is not None
                if len(value.uses()) == 1 and not value.is_graph_output() and value.name in model.graph.initializers:
                    value.const_value = ir.Tensor(array.astype(gamma.dtype), name=value.name)
                else:
                    fresh = make_initializer(model.graph, names.fresh(value.name or "bn"), array.astype(gamma.dtype))
                    bn.replace_input_with(index, fresh)
            bn.attributes["epsilon"] = ir.AttrFloat32("epsilon", 0.0)
            modified = True
        return ir.passes.PassResult(model, modified)


def _attr(node: ir.Node, name: str, default: float | int) -> float | int:
    attr = node.attributes.get(name)
    if attr is None:
        return default
    return attr.as_float() if isinstance(default, float) else attr.as_int()


def _foldable_producer(bn: ir.Node) -> ir.Node | Reason:
    """The op ``bn`` folds into, or why it cannot be folded."""
    where = f"BatchNormalization '{bn.name}'"
    if int(_attr(bn, "training_mode", 0)) != 0:
        return Reason("fold.training_mode", f"{where} is in training mode")
    if any(out.uses() or out.is_graph_output() for out in bn.outputs[1:]):
        return Reason("fold.statistics_used", f"{where}: its running mean or variance output is used")
    if not all(is_constant(v) for v in bn.inputs[1:5]):
        return Reason("fold.parameters_not_constant", f"{where}: scale, bias, mean or variance is not a constant")
    data = bn.inputs[0]
    producer = data.producer() if data is not None else None
    if producer is None:
        return Reason("fold.no_producer", f"{where}: its input is a graph input, not a node's output")
    kind = f"{producer.op_type} '{producer.name}'"
    if producer.op_type not in ("Conv", "ConvTranspose", "Gemm"):
        return Reason("fold.producer_op", f"{where}: its input comes from {kind}, not Conv, ConvTranspose or Gemm")
    if producer.domain not in ("", "ai.onnx"):
        return Reason("fold.producer_domain", f"{where}: {kind} is in domain '{producer.domain}'")
    assert data is not None
    if data.is_graph_output() or len(data.uses()) != 1:
        return Reason("fold.shared_input", f"{where}: the output of {kind} is used elsewhere too")
    if not is_constant(producer.inputs[1]):
        return Reason("fold.weight_not_constant", f"{where}: the weight of {kind} is not a constant")
    if len(producer.inputs) > 2 and producer.inputs[2] is not None and not is_constant(producer.inputs[2]):
        return Reason("fold.bias_not_constant", f"{where}: the bias of {kind} is not a constant")
    if producer.op_type == "ConvTranspose" and int(_attr(producer, "group", 1)) != 1:
        return Reason("fold.grouped_conv_transpose", f"{where}: {kind} is grouped")
    if producer.op_type == "Gemm":
        if producer.inputs[0] is None or is_constant(producer.inputs[0]):
            return Reason("fold.gemm_constant_input", f"{where}: input A of {kind} is missing or constant")
        shape = data.shape
        if shape is not None and len(shape) != 2:
            return Reason("fold.gemm_rank", f"{where}: the output of {kind} has rank {len(shape)}, not 2")
    return producer


def _float64(value: ir.Value | None) -> np.ndarray:
    array = const_array(value)
    assert array is not None  # BatchNorm's parameters were checked constant
    return array.astype(np.float64)


def _fold(graph: ir.Graph, names: NameScope, op: ir.Node, bn: ir.Node) -> None:
    gamma, beta, mean, var = (_float64(v) for v in bn.inputs[1:5])
    eps = float(_attr(bn, "epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    _fold_affine(graph, names, op, scale, beta - scale * mean, [bn])


def _channel_axis(op: ir.Node) -> int:
    if op.op_type == "Conv":
        return 0
    if op.op_type == "ConvTranspose":
        return 1
    return 0 if int(_attr(op, "transB", 0)) else 1


def _fold_affine(graph: ir.Graph, names: NameScope, op: ir.Node, scale: np.ndarray, shift: np.ndarray,
                 consumed: list[ir.Node]) -> None:
    """``op``'s output times ``scale`` plus ``shift`` per output channel, folded into its weight
    and bias; the nodes in ``consumed`` (a chain after ``op``) are removed and ``op``'s output
    takes the last one's name."""
    weight_value = op.inputs[1]
    assert weight_value is not None
    weight = const_array(weight_value)
    assert weight is not None
    shape = [1] * weight.ndim
    shape[_channel_axis(op)] = -1
    new_weight = (weight.astype(np.float64) * scale.reshape(shape)).astype(weight.dtype)

    bias_value = op.inputs[2] if len(op.inputs) > 2 else None
    bias = const_array(bias_value)
    if op.op_type == "Gemm":
        gemm_beta = float(_attr(op, "beta", 1.0))
        c = np.zeros_like(shift) if bias is None else np.broadcast_to(bias.astype(np.float64) * gemm_beta, shift.shape)
        op.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    else:
        c = np.zeros_like(shift) if bias is None else bias.astype(np.float64)
    new_bias = (scale * c + shift).astype(weight.dtype)

    _set_const_input(graph, names, op, 1, new_weight)
    if bias_value is not None:
        _set_const_input(graph, names, op, 2, new_bias)
    else:
        op.resize_inputs(3)
        op.replace_input_with(2, make_initializer(graph, names.fresh(f"{op.name or op.op_type}_bias"), new_bias))

    out = op.outputs[0]
    last = consumed[-1].outputs[0]
    name = last.name
    params = [v for node in consumed for v in node.inputs if v is not None and is_constant(v)]
    last.replace_all_uses_with(out, replace_graph_outputs=True)
    for node in reversed(consumed):
        graph.remove(node, safe=True)
    for value in params:
        if not value.uses() and not value.is_graph_output() and value.name in graph.initializers:
            graph.initializers.pop(name_of(value))
    out.name = name


@dataclasses.dataclass
class FoldAffineResult(ir.passes.PassResult):
    """Attributes: folded: each Conv/ConvTranspose/Gemm that absorbed a chain -> the Mul/Add nodes removed."""

    folded: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


class FoldAffinePass(TypedInPlacePass[FoldAffineResult]):
    """Fold ``Mul(c)`` and/or ``Add(d)`` per output channel after Conv/ConvTranspose/Gemm.

    ``c`` and ``d`` must be float constants that broadcast along the output-channel axis only
    (shapes like ``[C, 1, 1]``, ``[1, C, 1, 1]``) or be scalars; each node in the chain must be
    the only user of its input. ``Sub(x, d)`` is already ``Add(x, -d)`` here (preparation).
    """

    def call(self, model: ir.Model) -> FoldAffineResult:
        names = NameScope(model)
        graph = model.graph
        result = FoldAffineResult(model, False)
        for op in list(graph):
            if op.op_type not in ("Conv", "ConvTranspose", "Gemm") or op.domain not in ("", "ai.onnx"):
                continue
            if not _foldable_op(op):
                continue
            weight = const_array(op.inputs[1])
            assert weight is not None
            channels = weight.shape[_channel_axis(op)]
            out = op.outputs[0]
            rank = len(out.shape) if out.shape is not None else (2 if op.op_type == "Gemm" else weight.ndim)
            scale, shift = np.ones(channels), np.zeros(channels)
            chain: list[ir.Node] = []
            value = out
            for kind in ("Mul", "Add"):
                user = _only_user(value)
                if user is None or user.op_type != kind or user.domain not in ("", "ai.onnx"):
                    continue
                other = next((v for v in user.inputs if v is not value), None)
                vector = _channel_vector(other, channels, rank)
                if vector is None:
                    break
                if kind == "Mul":
                    scale, shift = scale * vector, shift * vector
                else:
                    shift = shift + vector
                chain.append(user)
                value = user.outputs[0]
            if chain:
                result.folded[op.name or op.op_type] = tuple(node.name or node.op_type for node in chain)
                _fold_affine(graph, names, op, scale, shift, chain)
                result.modified = True
        return result


def _foldable_op(op: ir.Node) -> bool:
    if not is_constant(op.inputs[1]):
        return False
    if len(op.inputs) > 2 and op.inputs[2] is not None and not is_constant(op.inputs[2]):
        return False
    if op.op_type == "ConvTranspose" and int(_attr(op, "group", 1)) != 1:
        return False
    if op.op_type == "Gemm" and (op.inputs[0] is None or is_constant(op.inputs[0])):
        return False
    return True


def _only_user(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    if value.is_graph_output() or len(uses) != 1:
        return None
    return next(iter(uses)).node


def _channel_vector(value: ir.Value | None, channels: int, rank: int) -> np.ndarray | None:
    """A float constant that broadcasts along axis 1 only (or a scalar), as a ``[channels]`` vector."""
    array = const_array(value)
    if array is None or array.dtype.kind != "f" or array.ndim > rank:
        return None
    if array.size == 1:
        return np.full(channels, float(array.reshape(())))
    shape = (1,) * (rank - array.ndim) + tuple(array.shape)
    if rank < 2 or shape[1] != channels or any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    return array.astype(np.float64).reshape(-1)


def _set_const_input(graph: ir.Graph, names: NameScope, node: ir.Node, index: int, array: np.ndarray) -> None:
    """Give ``node`` a new constant at ``index``; in place unless the old one has other users."""
    value = node.inputs[index]
    assert value is not None
    if len(value.uses()) == 1 and not value.is_graph_input() and not value.is_graph_output():
        value.const_value = ir.tensor(array, name=value.name)
        return
    node.replace_input_with(index, make_initializer(graph, names.fresh(f"{value.name}_folded"), array))
