"""The op-rule table: what every op type *is*, for every stage.

One entry per ONNX op type says how annotation treats it (a weighted op with a weight slot and a
channel axis, a data-movement op whose output reuses its input's encoding, an op whose inputs and
output share one encoding, an elementwise op), how the training lowering treats it (inputs that
carry no gradient; ops that carry none at all) and how deployment runs it (which integer kernel
onnxruntime's CPU provider fuses ``DQ -> op -> Q`` into, and whether that kernel accumulates in a
saturating 16-bit lane on x86 without VNNI). No stage keeps an op list of its own: they ask
:func:`rule`.

>>> rule("Reshape").kind is OpKind.DATA_MOVEMENT
True
>>> rule("Conv").weight.index, rule("Conv").weight.bias
(1, 2)
>>> rule("NoSuchOp").kind is OpKind.OTHER
True
>>> rule("MatMul").linear.kernel
'QGemm'
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

__all__ = [
    "INTEGER_FORMS",
    "OP_RULES",
    "IntegerFormRule",
    "LinearRule",
    "OpKind",
    "OpRule",
    "Reason",
    "WeightSlot",
    "channel_axis",
    "PAD_DEPTHWISE",
    "POOLED_LINEAR",
    "LayoutRule",
    "UNALIGNED_DEPTHWISE",
    "ChannelPadRule",
    "FloatKernelRule",
    "constant_operand",
    "float_kernel",
    "integer_form",
    "is_depthwise",
    "kernel_problem",
    "linear_bias",
    "prelu_slope",
    "rescale_factor",
    "rule",
    "saturates_u8s8",
    "weight_index",
]


@dataclasses.dataclass(frozen=True)
class Reason:
    """Why a rule did not apply (a tensor left float, a BatchNorm not folded).

    Attributes:
        rule_id: Stable identifier of the rule (``"placement.excluded"``, ``"fold.training_mode"``):
            what tests and tools match on; it does not change when the wording does.
        detail: The readable sentence, with the node and tensor names; ``str(reason)``.

    >>> str(Reason("fold.training_mode", "BatchNormalization 'bn' is in training mode"))
    "BatchNormalization 'bn' is in training mode"
    """

    rule_id: str
    detail: str

    def __post_init__(self) -> None:
        if not self.rule_id or not self.detail:
            raise ValueError("a Reason needs a rule id and a detail")

    def __str__(self) -> str:
        return self.detail


class OpKind(enum.Enum):
    """What an op does to the values flowing through it, as far as quantization cares."""

    WEIGHTED = "weighted"            # Conv, Gemm, MatMul: a constant weight input, integer kernels
    DATA_MOVEMENT = "data_movement"  # output holds a subset/rearrangement of input 0's values
    SHARED = "shared"                # Concat: inputs and output on one grid
    ELEMENTWISE = "elementwise"      # binary arithmetic: integer kernels only with every operand quantized
    CLAMP = "clamp"                  # Relu, Clip: can be absorbed by the following quantizer's clamp
    OTHER = "other"


@dataclasses.dataclass(frozen=True)
class WeightSlot:
    """Where a weighted op keeps its constant weight and bias.

    Attributes:
        index: Input index of the weight (Gemm/MatMul may hold it in input 0 instead).
        bias: Input index of an additive bias, or None.
        channel_axis: Output-channel axis of the weight for a rank, or None (see :func:`channel_axis`).
    """

    index: int
    bias: int | None
    channel_axis: Callable[[ir.Node, int, int], int | None]


@dataclasses.dataclass(frozen=True)
class LinearRule:
    """A weighted op whose bias the exporter wrote as a separate op after it.

    PyTorch exports ``Linear`` as ``MatMul(x, W) + b``: onnxruntime fuses ``DQ -> MatMul -> Q``
    into QLinearMatMul, which has no bias, so the Add is a second kernel (QLinearAdd with the
    bias on an 8-bit grid of its own, after the product was already rounded once). Deployed as
    ``deploy_op`` with the bias as its third input, int32 with scale ``s_x * s_w``, the pair is one
    ``kernel`` that adds the bias to the 32-bit accumulator and rounds once. Gemm takes 2-D
    operands only: ``[..., K]`` activations are reshaped to ``[-1, K]`` before it and back to
    ``[..., N]`` after it (onnxruntime moves the Q/DQ pairs across the reshapes).

    Attributes:
        bias_op: Op type of the node adding the bias (its other operand a constant ``[N]``).
        deploy_op: What the pair is deployed as.
        kernel: The fused kernel onnxruntime's CPU provider runs it as.
        reason: Shown for the product's output, which is left float inside the pair.
    """

    bias_op: str
    deploy_op: str
    kernel: str
    reason: str


@dataclasses.dataclass(frozen=True)
class OpRule:
    """Everything the stages need to know about one op type.

    Attributes:
        op_type: ONNX op type (standard domain).
        kind: See :class:`OpKind`.
        reason: Why the op is classified so (shown in placement reasons).
        weight: Weight and bias slots of a weighted op.
        integer_kernel: The kernel onnxruntime's CPU provider fuses ``DQ -> op -> Q`` into, or None
            when the op runs in float between Q/DQ pairs.
        u8s8_gemm: The integer kernel multiplies uint8 activations by int8 weights through the
            GEMM path (see :func:`saturates_u8s8`).
        stop_inputs: Inputs through which no gradient flows (shapes, indices, bounds).
        no_gradient: The op's outputs carry no gradient at all (comparisons, arg-reductions,
            rounding): the training lowering does not look through it.
        kernel_check: For ops whose integer kernel exists only for some attributes: returns why
            a node cannot use it (a :class:`Reason` with a ``kernel.*`` id, e.g. Resize in cubic
            mode), or None.
        constant_kernel: A constant operand can be quantized so the node runs on the integer
            kernel (``Add(x, c)`` as QLinearAdd; ``Sub(x, c)`` is deployed as ``Add(x, -c)``).
        linear: The op's bias comes as a separate node (see :class:`LinearRule`, :func:`linear_bias`).
        shape_only: The op reads only its input's shape: in the deployed graph it reads a quantized
            tensor's integers, not a DequantizeLinear output (onnxruntime gives every consumer of
            a DQ its own copy and would convert the whole tensor to float for its shape).
    """

    op_type: str
    kind: OpKind
    reason: str
    weight: WeightSlot | None = None
    integer_kernel: str | None = None
    u8s8_gemm: bool = False
    stop_inputs: frozenset[int] = frozenset()
    no_gradient: bool = False
    kernel_check: Callable[[ir.Node], Reason | None] | None = None
    constant_kernel: bool = False
    linear: LinearRule | None = None
    shape_only: bool = False


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def _conv_axis(node: ir.Node, index: int, rank: int) -> int | None:
    return 0


def _conv_transpose_axis(node: ir.Node, index: int, rank: int) -> int | None:
    return 1


def _gemm_axis(node: ir.Node, index: int, rank: int) -> int | None:
    if index != 1:
        return None
    return 0 if _int_attr(node, "transB", 0) else 1


def _matmul_axis(node: ir.Node, index: int, rank: int) -> int | None:
    return rank - 1 if index == 1 and rank >= 2 else None


def _movement(op_type: str, reason: str, stops: frozenset[int] = frozenset()) -> OpRule:
    return OpRule(op_type, OpKind.DATA_MOVEMENT, reason, stop_inputs=stops)


def _elementwise(op_type: str, kernel: str | None = None, constant_kernel: bool = False) -> OpRule:
    return OpRule(op_type, OpKind.ELEMENTWISE,
                  "elementwise arithmetic: integer kernels only when every operand is quantized",
                  integer_kernel=kernel, constant_kernel=constant_kernel)


def _resize_check(node: ir.Node) -> Reason | None:
    mode = node.attributes.get("mode")
    value = mode.as_string() if mode is not None else "nearest"
    if value not in ("nearest", "linear"):
        return Reason("kernel.resize_mode",
                      f"Resize in {value} mode has no integer kernel in onnxruntime (nearest and linear only)")
    return None


def _no_grad(op_type: str, reason: str) -> OpRule:
    return OpRule(op_type, OpKind.OTHER, reason, no_gradient=True)


_MOVES = "output holds a rearrangement or subset of input 0's values"
_STOP_SHAPE = frozenset({1})

_RULES: tuple[OpRule, ...] = (
    OpRule("Conv", OpKind.WEIGHTED, "convolution with a constant weight",
           WeightSlot(1, 2, _conv_axis), "QLinearConv", u8s8_gemm=True),
    OpRule("ConvTranspose", OpKind.WEIGHTED, "transposed convolution with a constant weight",
           WeightSlot(1, 2, _conv_transpose_axis), None),
    OpRule("Gemm", OpKind.WEIGHTED, "matrix product with a constant weight",
           WeightSlot(1, 2, _gemm_axis), "QGemm", u8s8_gemm=True),
    OpRule("MatMul", OpKind.WEIGHTED, "matrix product (weighted when one operand is constant)",
           WeightSlot(1, None, _matmul_axis), "QLinearMatMul", u8s8_gemm=True,
           linear=LinearRule("Add", "Gemm", "QGemm",
                             "MatMul + Add(constant) is one Linear: deployed as Gemm (QGemm) with an int32 bias, "
                             "the product is not rounded before the bias is added")),
    _movement("Reshape", _MOVES, _STOP_SHAPE),
    _movement("Flatten", _MOVES),
    _movement("Transpose", _MOVES),
    _movement("Squeeze", _MOVES, _STOP_SHAPE),
    _movement("Unsqueeze", _MOVES, _STOP_SHAPE),
    _movement("Identity", _MOVES),
    OpRule("MaxPool", OpKind.DATA_MOVEMENT, "a maximum is one of its inputs' values", integer_kernel="MaxPool"),
    OpRule("GlobalMaxPool", OpKind.DATA_MOVEMENT, "a maximum is one of its inputs' values"),
    _movement("Slice", _MOVES, frozenset({1, 2, 3, 4})),
    _movement("Split", _MOVES, _STOP_SHAPE),
    _movement("Expand", _MOVES, _STOP_SHAPE),
    _movement("Tile", _MOVES, _STOP_SHAPE),
    _movement("DepthToSpace", _MOVES),
    _movement("SpaceToDepth", _MOVES),
    _movement("Gather", _MOVES, _STOP_SHAPE),
    OpRule("Concat", OpKind.SHARED, "inputs and output share one grid", integer_kernel="QLinearConcat"),
    _elementwise("Add", "QLinearAdd", constant_kernel=True),
    _elementwise("Mul", "QLinearMul", constant_kernel=True),
    _elementwise("Sub", "QLinearAdd", constant_kernel=True),
    _elementwise("Div"),
    OpRule("Pow", OpKind.ELEMENTWISE, "elementwise power", stop_inputs=frozenset({1})),
    _elementwise("Max"),
    _elementwise("Min"),
    _elementwise("Sum"),
    _elementwise("Mean"),
    OpRule("Relu", OpKind.CLAMP, "clamp at 0: absorbed by a quantizer whose grid starts at 0"),
    OpRule("Clip", OpKind.CLAMP, "clamp: absorbed by a quantizer whose grid lies inside its bounds",
           stop_inputs=frozenset({1, 2})),
    OpRule("Sigmoid", OpKind.OTHER, "unary with an integer lookup kernel", integer_kernel="QLinearSigmoid"),
    OpRule("LeakyRelu", OpKind.OTHER, "unary with an integer lookup kernel", integer_kernel="QLinearLeakyRelu"),
    OpRule("AveragePool", OpKind.OTHER, "pooling", integer_kernel="QLinearAveragePool"),
    OpRule("GlobalAveragePool", OpKind.OTHER, "pooling", integer_kernel="QLinearGlobalAveragePool"),
    OpRule("Softmax", OpKind.OTHER, "softmax", integer_kernel="QLinearSoftmax"),
    OpRule("Resize", OpKind.OTHER, "resampling", integer_kernel="Resize", stop_inputs=frozenset({1, 2, 3}),
           kernel_check=_resize_check),
    OpRule("HardSigmoid", OpKind.OTHER, "clip(alpha x + beta, 0, 1): an integer form (QLinearAdd onto a "
           "grid whose saturation is the clip)", integer_kernel="QLinearAdd"),
    OpRule("PRelu", OpKind.OTHER, "x + (slope - 1) min(x, 0): an integer form (depthwise 1x1 QLinearConv onto a "
           "grid whose saturation is the min, QLinearAdd); float PRelu on onnxruntime's NHWC layout is slow",
           integer_kernel="QLinearConv+QLinearAdd"),
    OpRule("HardSwish", OpKind.OTHER, "x hardsigmoid(x): an integer form (QLinearAdd, QLinearMul)",
           integer_kernel="QLinearAdd+QLinearMul"),
    OpRule("BatchNormalization", OpKind.OTHER, "normalization with frozen statistics",
           stop_inputs=frozenset({3, 4})),
    OpRule("Where", OpKind.OTHER, "select", integer_kernel="Where", stop_inputs=frozenset({0})),
    OpRule("Dropout", OpKind.OTHER, "identity at inference", stop_inputs=frozenset({1, 2})),
    OpRule("GatherElements", OpKind.OTHER, "indexed gather", stop_inputs=_STOP_SHAPE),
    OpRule("GatherND", OpKind.OTHER, "indexed gather", stop_inputs=_STOP_SHAPE),
    OpRule("ReduceSum", OpKind.OTHER, "reduction", stop_inputs=_STOP_SHAPE),
    OpRule("TopK", OpKind.OTHER, "top-k values", stop_inputs=_STOP_SHAPE),
    OpRule("Range", OpKind.OTHER, "index range", stop_inputs=frozenset({0, 1, 2})),
    OpRule("ConstantOfShape", OpKind.OTHER, "filled tensor", stop_inputs=frozenset({0})),
    OpRule("OneHot", OpKind.OTHER, "one-hot encoding", stop_inputs=frozenset({0, 1, 2})),
    OpRule("SoftmaxCrossEntropyLoss", OpKind.OTHER, "loss", stop_inputs=frozenset({1, 2})),
    OpRule("FakeQuant", OpKind.OTHER, "fake quantization (com.microsoft)", stop_inputs=frozenset({1, 2})),
    OpRule("Shape", OpKind.OTHER, "shape of a tensor", no_gradient=True, shape_only=True),
    OpRule("Size", OpKind.OTHER, "size of a tensor", no_gradient=True, shape_only=True),
    *(_no_grad(op, "boolean or index output: no gradient")
      for op in ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Not",
                 "IsNaN", "IsInf", "NonZero", "ArgMax", "ArgMin")),
    *(_no_grad(op, "piecewise constant: zero gradient") for op in ("Floor", "Ceil", "Round", "Sign")),
    *(_no_grad(op, "used only behind a stop-gradient (no gradient builder)") for op in ("ReduceMax", "ReduceMin")),
)

OP_RULES: Mapping[str, OpRule] = types.MappingProxyType({r.op_type: r for r in _RULES})

_DEFAULT = OpRule("", OpKind.OTHER, "no integer kernel; runs in float")


def rule(op_type: str, domain: str = "") -> OpRule:
    """The rule of an op type; ops outside the standard domain get the default (float) rule."""
    if domain not in ("", "ai.onnx") and op_type != "FakeQuant":
        return dataclasses.replace(_DEFAULT, op_type=op_type)
    found = OP_RULES.get(op_type)
    return found if found is not None else dataclasses.replace(_DEFAULT, op_type=op_type)


def _is_constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.producer() is None


def weight_index(node: ir.Node) -> int | None:
    """Index of the constant weight input of a weighted op, or None."""
    slot = rule(node.op_type, node.domain).weight
    if slot is None or len(node.inputs) <= slot.index:
        return None
    if _is_constant(node.inputs[slot.index]):
        return slot.index
    if node.op_type in ("Gemm", "MatMul") and _is_constant(node.inputs[0]) and not _is_constant(node.inputs[1]):
        return 0
    return None


def channel_axis(node: ir.Node, index: int, rank: int) -> int | None:
    """Output-channel axis of the weight in input ``index`` (of rank ``rank``), or None."""
    slot = rule(node.op_type, node.domain).weight
    return None if slot is None else slot.channel_axis(node, index, rank)


def is_depthwise(node: ir.Node) -> bool:
    """A Conv with one input and one output channel per group (onnxruntime's depthwise kernel)."""
    if node.op_type != "Conv":
        return False
    group = _int_attr(node, "group", 1)
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    shape = weight.shape if weight is not None else None
    if group == 1 or shape is None or len(shape) < 2 or not all(isinstance(d, int) for d in shape[:2]):
        return False
    return shape[1] == 1 and shape[0] == group


def saturates_u8s8(node: ir.Node) -> bool:
    """True when the node's fused integer kernel is the U8S8 GEMM path.

    On x86 without VNNI that path adds pairs of uint8 x int8 products in a saturating 16-bit lane
    (``vpmaddubsw``), so two large weights of one sign overflow it. onnxruntime's depthwise
    convolution kernel widens to 32 bits first and is exact.
    """
    r = rule(node.op_type, node.domain)
    return r.u8s8_gemm and not is_depthwise(node)


@dataclasses.dataclass(frozen=True)
class FloatKernelRule:
    """A node whose integer kernel is slower than float on a target (:attr:`onnxqat.target.Target.float_kernels`).

    Its weight stays float, so onnxruntime does not fuse ``DQ -> op -> Q`` and runs the float
    kernel between the Q/DQ pairs; its input and output activations stay quantized (the sim
    runs that same graph: float op on the dequantized input, quantized output).

    Attributes:
        rule_id: The ``kernel.*`` id of the :class:`Reason` given to the float weight and bias.
        op_type: The op type it applies to.
        applies: Whether a node of that type takes the slow kernel.
        reason: Why (the measurement behind the rule), shown in the placement reasons.
    """

    rule_id: str
    op_type: str
    applies: Callable[[ir.Node], bool]
    reason: str


def _unaligned_depthwise(node: ir.Node) -> bool:
    return is_depthwise(node) and _int_attr(node, "group", 1) % 16 != 0


UNALIGNED_DEPTHWISE = FloatKernelRule(
    "kernel.depthwise_unaligned", "Conv", _unaligned_depthwise,
    "onnxruntime's x86 QLinearConv takes its symmetric depthwise kernel only for channel counts that are "
    "multiples of 16, else a generic kernel (measured 5.8x its float Conv on PP-LCNet's depthwise layers): "
    "weight kept float, the Conv runs in float between its input's DQ and its output's Q")


@dataclasses.dataclass(frozen=True)
class ChannelPadRule:
    """Depthwise convolutions padded to a channel multiple at their producers on a target
    (:attr:`onnxqat.target.Target.pad_depthwise`, :mod:`onnxqat.passes.pad_channels`).

    Attributes:
        rule_id: Stable id (the prefix of the ``pad.*`` reasons of the convolutions left unpadded).
        multiple: The channel multiple the target's integer depthwise kernel needs.
        reason: Why (the measurement behind the rule).
    """

    rule_id: str
    multiple: int
    reason: str


PAD_DEPTHWISE = ChannelPadRule(
    "pad.depthwise", 16,
    "onnxruntime's x86 QLinearConv takes its symmetric depthwise kernel only for channel counts that are "
    "multiples of 16: zero filters in the producing convolutions and zero weights in the reading ones give "
    "the depthwise convolution 16k channels, every real channel unchanged, no Pad or Slice")


@dataclasses.dataclass(frozen=True)
class LayoutRule:
    """A rewrite of the prepared graph into an equivalent one that a target's runtime lays out
    better (:attr:`onnxqat.target.Target.layout_rules`).

    Attributes:
        rule_id: Stable id.
        reason: Why (the measurement behind the rule).
    """

    rule_id: str
    reason: str


POOLED_LINEAR = LayoutRule(
    "layout.pooled_linear",
    "a Linear on a global pooling's [N, C, 1, 1] output reshaped to [N, C] runs as a 1x1 Conv and a Flatten "
    "(:mod:`onnxqat.passes.pooled_linear`): onnxruntime's channels-last integer chain then reaches the "
    "pooled result, where a 2-D Linear left a transpose and channels-first ops (PaddleOCR's classifier: "
    "its uint8 MaxPool 10x slower) in the last block")


def float_kernel(node: ir.Node, rules: tuple[FloatKernelRule, ...]) -> Reason | None:
    """Why ``node`` runs its float kernel on a target with these rules (its weight left float), or None."""
    for found in rules:
        if node.op_type == found.op_type and node.domain in ("", "ai.onnx") and found.applies(node):
            channels = f" ({_int_attr(node, 'group', 1)} channels)" if node.op_type == "Conv" else ""
            return Reason(found.rule_id, f"{node.op_type} '{node.name}'{channels}: {found.reason}")
    return None


def kernel_problem(node: ir.Node) -> Reason | None:
    """Why this node cannot run on its op type's integer kernel (attribute conditions), or None."""
    check = rule(node.op_type, node.domain).kernel_check
    return check(node) if check is not None else None


def linear_bias(node: ir.Node) -> tuple[ir.Node, int] | Reason:
    """``(bias node, index of the bias in it)`` when ``node`` and the node after it form a Linear
    (:class:`LinearRule`), else why not (a :class:`Reason` with a ``linear.*`` id).

    Needs a constant 2-D weight ``[K, N]`` in input 1 read by this node only, the output's only
    consumer an Add whose other operand is a float constant of shape ``[N]`` used by nothing
    else, and the output not a graph output.
    """
    found = rule(node.op_type, node.domain).linear
    if found is None:
        return Reason("linear.op_type", f"{node.op_type} has no separate bias op")
    if weight_index(node) != 1 or len(node.inputs) != 2:
        return Reason("linear.weight_not_constant", f"{node.op_type} '{node.name}': input 1 is not a constant weight")
    weight = node.inputs[1]
    assert weight is not None
    shape = weight.shape
    if shape is None or len(shape) != 2 or not all(isinstance(d, int) for d in shape):
        return Reason("linear.weight_rank", f"{node.op_type} '{node.name}': the weight is not a 2-D [K, N] matrix")
    if len(weight.uses()) != 1:
        return Reason("linear.weight_shared", f"{node.op_type} '{node.name}': its weight feeds several nodes")
    out = node.outputs[0]
    users = [u.node for u in out.uses()]
    if out.is_graph_output() or len(users) != 1 or users[0].op_type != found.bias_op or \
            users[0].domain not in ("", "ai.onnx") or len(users[0].inputs) != 2:
        return Reason("linear.no_bias_op", f"{node.op_type} '{node.name}': its output is not read by one {found.bias_op} only")
    add = users[0]
    index = 1 if add.inputs[0] is out else 0
    bias = add.inputs[index]
    if add.inputs[1 - index] is not out or not _is_constant(bias):
        return Reason("linear.bias_not_constant", f"{found.bias_op} '{add.name}' after '{node.name}' adds no constant")
    assert bias is not None and bias.const_value is not None
    n = shape[1]
    assert isinstance(n, int)
    if bias.const_value.dtype.numpy().kind != "f" or tuple(bias.const_value.shape.numpy()) != (n,):
        return Reason("linear.bias_shape", f"{found.bias_op} '{add.name}': the constant is not a 1-D bias of {n} values")
    if len(bias.uses()) != 1:
        return Reason("linear.bias_shared", f"{found.bias_op} '{add.name}': its constant feeds several nodes")
    return add, index


def _scalar_constant(value: ir.Value | None) -> float | None:
    if not _is_constant(value):
        return None
    assert value is not None and value.const_value is not None
    array = value.const_value.numpy()
    if array.size != 1 or array.dtype.kind != "f":
        return None
    x = float(array.reshape(()))
    return x if math.isfinite(x) else None


def rescale_factor(node: ir.Node) -> float | None:
    """``k`` when the node computes ``x * k`` with a positive scalar constant ``k`` (``Mul`` by
    ``k``, ``Div`` by ``1/k``): its output is its input's integers read with scale x ``k``."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if node.op_type == "Div":
        k = _scalar_constant(b)
        return 1.0 / k if k is not None and k > 0 and not _is_constant(a) else None
    for data, const in ((a, b), (b, a)):
        k = _scalar_constant(const)
        if k is not None and k > 0 and not _is_constant(data):
            return k
    return None


def constant_operand(node: ir.Node) -> int | None:
    """Index of the constant operand a node can run with on its integer kernel once the constant is
    quantized (``Add(x, c)``, ``Mul(x, c)``, ``Sub(x, c)``), or None."""
    if not rule(node.op_type, node.domain).constant_kernel or len(node.inputs) != 2:
        return None
    constant = [i for i, v in enumerate(node.inputs) if _is_constant(v)]
    if len(constant) != 1:
        return None
    index = constant[0]
    if node.op_type == "Sub" and index != 1:
        return None  # c - x would need a negated input
    value = node.inputs[index]
    assert value is not None and value.const_value is not None
    if value.const_value.dtype.numpy().kind != "f":
        return None
    return index


@dataclasses.dataclass(frozen=True)
class IntegerFormRule:
    """An op without an integer kernel of its own that deploys as integer kernels.

    ``HardSigmoid(x) = clip(alpha x + beta, 0, 1)``: quantize ``x + beta/alpha`` (QLinearAdd with a
    quantized constant) onto the grid ``[0, 1/alpha]``, so the saturation is the clip, and read the
    same integers as ``[0, 1]`` (scale x alpha). ``HardSwish(x) = x HardSigmoid_{1/6, 1/2}(x)`` adds
    a QLinearMul with ``x``.
    """

    op_type: str
    default_alpha: float
    default_beta: float
    multiplies_input: bool


INTEGER_FORMS: Mapping[str, IntegerFormRule] = types.MappingProxyType({
    "HardSigmoid": IntegerFormRule("HardSigmoid", 0.2, 0.5, multiplies_input=False),
    "HardSwish": IntegerFormRule("HardSwish", 1.0 / 6.0, 0.5, multiplies_input=True),
})


def integer_form(node: ir.Node) -> tuple[IntegerFormRule, float, float] | None:
    """The integer form of a node with its ``(alpha, beta)``, or None."""
    if node.domain not in ("", "ai.onnx"):
        return None
    form = INTEGER_FORMS.get(node.op_type)
    if form is None:
        return None
    alpha, beta = form.default_alpha, form.default_beta
    if node.op_type == "HardSigmoid":
        a, b = node.attributes.get("alpha"), node.attributes.get("beta")
        alpha = a.as_float() if a is not None else alpha
        beta = b.as_float() if b is not None else beta
    if not alpha > 0:
        return None
    return form, float(alpha), float(beta)


def prelu_slope(node: ir.Node) -> np.ndarray | Reason:
    """The per-channel slope (``[C]`` float64) of a PRelu that deploys as its integer form
    (:func:`onnxqat.qparams.prelu_form_constants`), or why not (``form.prelu_*``).

    Needs an input of known rank >= 2 with channels on axis 1 and a constant float slope of one
    value per channel (``[C, 1, ...]`` or ``[1, C, 1, ...]``; ``[C]`` for ``[N, C]``) or one value
    for all.
    """
    if node.op_type != "PRelu" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return Reason("form.prelu_op", f"{node.op_type} '{node.name}' is not a PRelu")
    x, slope = node.inputs
    shape = x.shape if x is not None else None
    if shape is None or len(shape) < 2 or not isinstance(shape[1], int):
        return Reason("form.prelu_rank", f"PRelu '{node.name}': the input is not [N, C, ...] with C known")
    if not _is_constant(slope):
        return Reason("form.prelu_slope_not_constant", f"PRelu '{node.name}': the slope is not a constant")
    assert slope is not None and slope.const_value is not None
    a = slope.const_value.numpy()
    channels = shape[1]
    dims = [d for d in a.shape]
    per_channel = (len(dims) in (len(shape) - 1, len(shape)) and dims[-(len(shape) - 1)] == channels
                   and all(d == 1 for i, d in enumerate(dims) if i != len(dims) - (len(shape) - 1)))
    if a.dtype.kind != "f" or not (a.size == 1 or per_channel) or not np.all(np.isfinite(a)):
        return Reason("form.prelu_slope_shape", f"PRelu '{node.name}': the slope is not one value per channel")
    per_channel_slope: np.ndarray = np.broadcast_to(a.astype(np.float64).reshape(-1), (channels,)).copy()
    return per_channel_slope
