"""Weight scales raised against integer overflow, as aimet-onnx 2.42 does after calibration.

An accelerator such as Qualcomm's HTP computes a Conv/Gemm/MatMul layer on integers as
``y = round((x_q W_q + b_q) * s' - z_y)`` with the bias ``b_q = round(b / (s_x s_w))`` in int32
and the requantization scale ``s' = s_x s_w / s_y``. A channel of near-zero weights gets a tiny
weight scale ``s_w``, and then the bias overflows int32 and ``s'`` underflows. aimet-onnx's
``QuantizationSimModel`` therefore raises such weight scales at the end of ``compute_encodings``
(it logs "Adjusted weight scale for ... to prevent bias/scale overflow-underflow"), even when
its config leaves biases float. :func:`raise_weight_scales` applies the same three rules, per
output channel, each giving a lower bound of ``s_w`` (``N = 2^31 - 2^15``, aimet's limit slightly
below 2^31 for float error):

1. bias: ``s_w >= |b| / (N s_x)``;
2. requantization scale (only where the layer's output is quantized): ``s_w >= 2^-23.5 s_y / s_x``;
3. accumulator bias (same): ``s_w >= |b'| s_bias / (N s_x)`` with ``s_bias = s_x s_w`` and
   ``b' = round(b / s_bias) + round(o_y s_y / s_bias)`` (``o_y``: the output's AIMET offset, the
   zero point folded into the bias).

The arithmetic follows aimet-onnx's precision: rules 1 and 3 take the maximum in float64 and round
it to float32, rule 2 and the accumulator bias are float32 (rule 2 as ``(2^-23.5 s_y) x (1 / s_x)``,
which is how torch divides a scalar by a tensor). The layer's input is the quantizer in
effect on its data input (through data-movement ops); its output is the quantizer on its own
output, where a MatMul of a rank-2 constant followed by an Add of a rank-1 constant counts as one
layer whose output is the Add's (aimet-onnx fuses them into a Gemm). A layer without a weight
quantizer or without a quantized input is left alone. aimet-onnx's fourth rule (a float16 bias
scale's underflow) applies to float16 exports only, which onnxqat does not make.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxqat import ops
from onnxqat.graph import const_array, name_of
from onnxqat.plan import QuantPlan
from onnxqat.qparams import Encoding

__all__ = ["ACCUMULATOR_LIMIT", "MIN_REQUANT_SCALE", "Layer", "layers", "raise_weight_scales"]

# aimet-onnx's limits: int32 minus a margin for float error, and HexNN's smallest requantization scale
ACCUMULATOR_LIMIT = 2**31 - 2**15
MIN_REQUANT_SCALE = 2**-23.5

_LAYER_TYPES = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer the rules look at: its node, weight quantizer, bias tensor (None: no bias),
    input quantizer and output quantizer (None: the output is not quantized)."""

    node: str
    weight: str
    bias: str | None
    input_quantizer: str
    output_quantizer: str | None


def _fused_add(node: ir.Node) -> tuple[ir.Node, ir.Value] | None:
    """The Add after a MatMul that aimet-onnx fuses with it into a Gemm, and the Add's bias."""
    weight = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    out = node.outputs[0]
    users = list(out.uses())
    if weight is None or weight.ndim != 2 or len(users) != 1:
        return None
    add = users[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    bias = const_array(other)
    if other is None or bias is None or bias.ndim != 1:
        return None
    return add, other


def layers(model: ir.Model, plan: QuantPlan) -> list[Layer]:
    """The layers of ``model`` the rules apply to, in graph order."""
    producer = {name_of(o): n for n in model.graph for o in n.outputs}

    def input_quantizer(value: ir.Value | None) -> str | None:
        while value is not None:
            q = plan.activation_of(name_of(value))
            if q is not None:
                return q.name
            node = producer.get(name_of(value))
            if node is None or not node.inputs or ops.rule(node.op_type, node.domain).kind is not ops.OpKind.DATA_MOVEMENT:
                return None
            value = node.inputs[0]
        return None

    found = []
    for node in model.graph:
        if node.op_type not in _LAYER_TYPES or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if weight is None or plan.param(name_of(weight)) is None:
            continue
        source = input_quantizer(node.inputs[0])
        if source is None:
            continue
        out: ir.Value = node.outputs[0]
        bias: ir.Value | None = node.inputs[2] if len(node.inputs) > 2 else None
        if node.op_type == "MatMul":
            fused = _fused_add(node)
            if fused is not None:
                out, bias = fused[0].outputs[0], fused[1]
        target = plan.activation_of(name_of(out))
        found.append(Layer(name_of(node), name_of(weight), None if bias is None else name_of(bias), source,
                           None if target is None else target.name))
    return found


def _bias_bound(bias: np.ndarray, input_scale: np.float32, weight_scale: np.ndarray) -> np.ndarray:
    """max(s_w, |b| / (N s_x)) in float64, rounded to float32 (rules 1 and 3)."""
    b = np.abs(bias.astype(np.float64))
    if weight_scale.ndim == 0:
        b = np.max(b, initial=0.0)
    bound = b / (ACCUMULATOR_LIMIT * np.float64(input_scale))
    return np.maximum(weight_scale.astype(np.float64), bound).astype(np.float32)


def raise_weight_scales(model: ir.Model, plan: QuantPlan, encodings: Mapping[str, Encoding]) -> dict[str, Encoding]:
    """The weight encodings of ``plan`` whose scales the three rules raise (see the module), by
    weight name; the others are left out. Layers are taken in graph order, so a weight two layers
    read gets both layers' bounds."""
    current = dict(encodings)
    changed: dict[str, Encoding] = {}
    for layer in layers(model, plan):
        w_enc, x_enc = current.get(layer.weight), current.get(layer.input_quantizer)
        if w_enc is None or x_enc is None:
            continue
        sw = w_enc.scale
        sx = np.float32(np.max(x_enc.scale))
        bias = None
        if layer.bias is not None:
            bias = const_array(model.graph.initializers[layer.bias]) if layer.bias in model.graph.initializers else None
        b = np.zeros_like(sw) if bias is None else np.asarray(bias, dtype=np.float32).reshape(-1)
        if sw.ndim == 1 and b.shape != sw.shape:
            continue  # a bias that is not one value per weight channel: aimet-onnx refuses such layers
        adjusted = _bias_bound(b, sx, sw)
        y_enc = current.get(layer.output_quantizer) if layer.output_quantizer is not None else None
        if y_enc is not None:
            sy = np.float32(np.max(y_enc.scale))
            oy = np.float32(np.max(y_enc.aimet_offset))
            # as aimet-onnx's torch computes it: a scalar divided by a tensor is the scalar times
            # the tensor's float32 reciprocal (1 ulp above a true division in some cases)
            floor = np.float32(np.float32(MIN_REQUANT_SCALE) * sy) * (np.float32(1.0) / sx)
            adjusted = np.maximum(adjusted, floor).astype(np.float32)
            bias_scale = (sx * adjusted).astype(np.float32)
            accumulator = np.round(b / bias_scale) + np.round(oy * sy / bias_scale)
            adjusted = _bias_bound((accumulator * bias_scale).astype(np.float32), sx, adjusted)
        if not np.array_equal(adjusted, sw):
            new = dataclasses.replace(w_enc, scale=adjusted.reshape(sw.shape))
            current[layer.weight] = changed[layer.weight] = new
    return changed
