"""Rewrite ops onnxruntime-training 1.19 cannot differentiate into ops it can, forward unchanged.

The probe (:mod:`onnxqat.train.probe`) lists what onnxruntime-training lacks: gradient builders
(``HardSwish``, ``Sum``, ``ReduceMax``, ...), CPU gradient kernels (``ConvTranspose``,
``Resize``), or gradients that are wrong (``Conv`` with ``auto_pad=SAME_*``, ``BatchNormalization``
differentiated with batch statistics). :data:`DECOMPOSITIONS` holds one rule per op type: why it
exists, what it covers, a ``check`` that says why a node cannot be rewritten (a reason, never an
exception) and a ``rewrite`` that emits standard ops with the same forward values.
:class:`DecomposeForTrainingPass` applies them to the nodes on a gradient path whose table row
is broken, and reports what it rewrote and what is left without a gradient.

Stop-gradients. ONNX has no StopGradient op; onnxruntime propagates nothing through casts to
integers, comparisons and ``Where`` conditions. :func:`exact_stop_gradient` returns any float32
tensor bit for bit (zeros, subnormals, infinities and NaN included) with no gradient path; with
it, ``ReduceMax`` becomes ``m + sum(where(x == m, x - m, 0)) / count`` with ``m`` stopped (forward
exactly ``m``, the gradient split evenly among ties as in ``torch.amax``), and any elementwise op
keeps its native forward with a gradient from a formula: ``stop(f(x)) + (x * d - stop(x * d))``
with ``d = stop(f'(x))`` (see :func:`with_derivative`).

Rounding. ``Round``, ``Floor``, ``Ceil`` and ``Sign`` become their native forward behind the exact
stop-gradient: the derivative is 0 almost everywhere, which is what PyTorch and TensorFlow
autodiff give these ops, so fine-tuning sees the gradient the model was trained with. A
straight-through gradient instead (``DecomposeForTrainingPass(straight_through_rounding=True)``)
suits graphs whose ``x + (round(x) - x)`` lost its ``detach()`` in export (there the exact
derivative is 0 where the author meant 1). Rounding on integer/shape paths never reaches the pass.

Forward agreement. Rules marked ``exact`` reproduce onnxruntime's values bit for bit up to the
sign of zero (data movement, the same op with other attributes, stop-gradient forms; a ``-0.0``
selected by onnxruntime's ``Where`` comes out as ``+0.0``). The others re-associate float
arithmetic and agree to a few float32 ulps (each rule's ``forward`` says how close, as pinned by
``tests/test_decompose.py``); ``bit_exact=True`` wraps them as ``stop(native) + (dec - stop(dec))``
for exact values at the cost of about 70 elementwise ops per output.

Shapes. Several gradients are right only with static shapes (the probe runs every op with input
0's dims symbolic too): MaxPool's is all zero and AveragePool's wrong with symbolic spatial dims,
ExpandGrad fails; AveragePool's is wrong as soon as the batch dim is symbolic. A node is judged by
the probe matching its input shape (static, symbolic batch only, other symbolic dims), and those
rules compute every size from ``Shape`` at run time, so the graph stays valid for any input size.
A trainer that pins the graph inputs to its (fixed) batch shape keeps these ops native.

Names. A rewrite's final value takes over the original output's name (``replace_all_uses_with``
then renaming), so every tensor name of the model keeps its value and graph outputs are kept.

Where to run it. After the lowering has inserted fake-quant (weights reach ``ConvTranspose`` as
their fake-quantized values, activation quantizers keep reading the original names) and before it
collects trainable parameters: initializers the rewrites create are listed in
:attr:`DecomposeResult.created_initializers` and must not be trained.
"""

from __future__ import annotations

import dataclasses
import re
import string
import types
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxqat.graph import NameScope, first_unsorted, is_float, opset_version
from onnxqat.passes import TypedInPlacePass
from onnxqat.train.builder import Builder
from onnxqat.train.probe import GradientRow, load_gradient_table, node_facts, row_for

__all__ = [
    "BROKEN_STATUSES",
    "DECOMPOSITIONS",
    "DecomposeForTrainingPass",
    "DecomposeResult",
    "Decomposition",
    "RewriteContext",
    "exact_stop_gradient",
    "with_derivative",
]

BROKEN_STATUSES = frozenset({"no_grad_builder", "build_error", "runtime_error", "wrong_grad"})
_F32 = ir.DataType.FLOAT
_FLT_MAX = float(np.finfo(np.float32).max)

# Float inputs that are parameters of the op rather than data onnxruntime differentiates: they do
# not put a node on a gradient path.
_PARAMETER_INPUTS: dict[str, frozenset[int]] = {
    "Resize": frozenset({1, 2}), "Upsample": frozenset({1}), "Clip": frozenset({1, 2}), "Pad": frozenset({2}),
    "BatchNormalization": frozenset({3, 4}), "Dropout": frozenset({1}), "RoiAlign": frozenset({1}),
    "Pow": frozenset({1}), "DequantizeLinear": frozenset({1}), "CastLike": frozenset({1}),
    "Range": frozenset({0, 1, 2}), "ConstantOfShape": frozenset({0}), "EyeLike": frozenset({0}),
    "FakeQuant": frozenset({1, 2}),
}
# Ops whose outputs are never float, and where an output's type comes from another input than 0.
_NON_FLOAT_OUTPUTS = frozenset({
    "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Not", "IsNaN", "IsInf",
    "Shape", "Size", "NonZero", "ArgMax", "ArgMin", "NonMaxSuppression", "StringNormalizer", "RegexFullMatch",
})
_INDEX_OUTPUTS: dict[str, int] = {"TopK": 1, "MaxPool": 1, "Unique": 1}
_TYPE_SOURCE: dict[str, int] = {"Where": 1, "OneHot": 2, "CastLike": 1}


# ---------------------------------------------------------------------------------------------
# Stop-gradient primitives
# ---------------------------------------------------------------------------------------------
def exact_stop_gradient(b: Builder, x: ir.Value, base: str) -> ir.Value:
    """``x`` (float32, any value) bit for bit, with no gradient path to ``x``.

    Magnitudes are brought into ``[2^-85, 2^64]`` by an exact power-of-two factor chosen with
    comparisons, passed through :meth:`Builder.stop_gradient` (exponent and 24-bit mantissa via
    int64) and scaled back; the sign comes from a comparison. Zeros, infinities and NaN are
    selected by ``Where`` from constants. Every path from ``x`` to the result crosses a comparison
    or an integer cast, where onnxruntime propagates no gradient. The one bit not kept is the sign
    of zero: onnxruntime's ``Where`` returns ``+0.0`` when it selects ``-0.0``.
    """
    f = b.const
    a = b.op("Abs", [x], base)
    tiny = b.op("Less", [a, f(2.0**-60)], base)
    huge = b.op("Greater", [a, f(2.0**60)], base)
    factor = b.op("Where", [tiny, f(2.0**64), b.op("Where", [huge, f(2.0**-64), f(1.0)], base)], base)
    ordinary = b.op("And", [b.op("Greater", [a, f(0.0)], base), b.op("Less", [a, f(np.inf)], base)], base)
    scaled = b.op("Where", [ordinary, b.op("Mul", [a, factor], base), f(1.0)], base)
    magnitude = b.op("Div", [b.stop_gradient(scaled, base), factor], base)
    negative = b.op("Less", [x, f(0.0)], base)
    signed = b.op("Where", [negative, b.op("Neg", [magnitude], base), magnitude], base)
    special = b.op("Where", [b.op("Equal", [x, f(-np.inf)], base), f(-np.inf), f(0.0)], base)
    special = b.op("Where", [b.op("Equal", [x, f(np.inf)], base), f(np.inf), special], base)
    special = b.op("Where", [b.op("IsNaN", [x], base), f(np.nan), special], base)
    return b.op("Where", [ordinary, signed, special], base)


def with_derivative(b: Builder, x: ir.Value, value: ir.Value, derivative: ir.Value, base: str) -> ir.Value:
    """``value`` forward (bit for bit), ``derivative`` as its elementwise derivative in ``x``.

    ``stop(value) + where(finite(t), t - stop(t), 0)`` with ``t = x * stop(derivative)``: the
    second term is exactly 0 forward and has derivative ``derivative``. Where ``t`` is not finite
    (an infinite derivative at a domain edge) the gradient is 0. ``-0.0`` becomes ``+0.0``.
    """
    t = b.op("Mul", [x, exact_stop_gradient(b, derivative, base)], base)
    finite = b.op("Not", [b.op("Or", [b.op("IsInf", [t], base), b.op("IsNaN", [t], base)], base)], base)
    delta = b.op("Where", [finite, b.op("Sub", [t, exact_stop_gradient(b, t, base)], base), b.const(0.0)], base)
    return b.op("Add", [exact_stop_gradient(b, value, base), delta], base)


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------
class RewriteContext:
    """What a rule's ``check`` and ``rewrite`` see: the node, the model opset and a builder.

    Args:
        builder: Appends nodes to the model's graph (the pass sorts the graph afterwards).
        node: The node being rewritten.
        opset: The model's default-domain opset.
    """

    def __init__(self, builder: Builder, node: ir.Node, opset: int) -> None:
        self.b = builder
        self.node = node
        self.opset = opset
        self.base = node.name or node.op_type

    # -- reading the node --------------------------------------------------------------------
    def input(self, i: int) -> ir.Value | None:
        return self.node.inputs[i] if i < len(self.node.inputs) else None

    def attr(self, name: str, default: Any = None) -> Any:
        attr = self.node.attributes.get(name)
        if attr is None:
            return default
        value = attr.value
        return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value

    def const_input(self, i: int) -> np.ndarray | None:
        """The value of input ``i`` if it is a constant (initializer or folded constant)."""
        value = self.input(i)
        if value is None or value.const_value is None:
            return None
        return value.const_value.numpy()

    @staticmethod
    def rank(value: ir.Value | None) -> int | None:
        return None if value is None or value.shape is None else len(value.shape)

    @staticmethod
    def static_dims(value: ir.Value | None) -> list[int | None] | None:
        if value is None or value.shape is None:
            return None
        return [d if isinstance(d, int) else None for d in value.shape]

    # -- emitting ----------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[ir.Value | None], **attrs: Any) -> ir.Value:
        return self.b.op(op_type, inputs, self.base, **attrs)

    def emit(self, op_type: str, inputs: Sequence[ir.Value | None], attributes: Sequence[ir.Attr] = (),
             outputs: int = 1) -> list[ir.Value]:
        """A node with arbitrary attributes (``ir.Attr`` objects) and several outputs."""
        node = ir.Node("", op_type, list(inputs), attributes=list(attributes),
                       name=self.b.names.fresh(f"{self.base}/{op_type}"), num_outputs=outputs)
        for i, out in enumerate(node.outputs):
            out.name = self.b.names.fresh(f"{self.base}/{op_type.lower()}{'' if i == 0 else i}")
        self.b.graph.append(node)
        return list(node.outputs)

    def const(self, value: Any, like: ir.Value | None = None) -> ir.Value:
        dtype = like.dtype.numpy() if like is not None and like.dtype is not None else np.float32
        return self.b.const(value, dtype)

    def ints(self, values: Sequence[int] | int | np.ndarray) -> ir.Value:
        return self.b.const(np.asarray(values, dtype=np.int64), np.int64, "ints")

    def stop(self, x: ir.Value) -> ir.Value:
        return exact_stop_gradient(self.b, x, self.base)

    def where(self, cond: ir.Value, a: ir.Value, b: ir.Value) -> ir.Value:
        return self.op("Where", [cond, a, b])

    def dim(self, x: ir.Value, axis: int) -> ir.Value:
        """``x.shape[axis]`` as a 1-D int64 tensor of length 1 (a constant when static)."""
        dims = self.static_dims(x)
        known = dims[axis] if dims is not None else None
        if known is not None:
            return self.ints([known])
        return self.op("Gather", [self.op("Shape", [x]), self.ints([axis])], axis=0)

    def shape_vector(self, parts: Sequence[ir.Value | int]) -> ir.Value:
        """A 1-D int64 shape from ints and 1-D int64 tensors (a constant when all are ints)."""
        ints = [p for p in parts if isinstance(p, int)]
        if len(ints) == len(parts):
            return self.ints(ints)
        pieces = [self.ints([p]) if isinstance(p, int) else p for p in parts]
        return self.op("Concat", pieces, axis=0)

    def reduce(self, op_type: str, x: ir.Value, axes: Sequence[int] | None, keepdims: int) -> ir.Value:
        """A Reduce* op over constant ``axes`` (None: all), axes as input where the opset wants."""
        as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes is None:
            return self.op(op_type, [x], keepdims=keepdims)
        if as_input:
            return self.op(op_type, [x, self.ints(list(axes))], keepdims=keepdims)
        return self.op(op_type, [x], axes=list(axes), keepdims=keepdims)

    def squeeze(self, x: ir.Value, axes: Sequence[int]) -> ir.Value:
        if self.opset >= 13:
            return self.op("Squeeze", [x, self.ints(list(axes))])
        return self.op("Squeeze", [x], axes=list(axes))

    def unsqueeze(self, x: ir.Value, axes: Sequence[int]) -> ir.Value:
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.ints(list(axes))])
        return self.op("Unsqueeze", [x], axes=list(axes))


Check = Callable[[RewriteContext], "str | None"]
Rewrite = Callable[[RewriteContext], "Sequence[ir.Value | None]"]


@dataclasses.dataclass(frozen=True)
class Decomposition:
    """A rule: rewrite one node of ``op_type`` into differentiable standard ops.

    Attributes:
        op_type: Op type it applies to (standard domain).
        covers: Versions, attributes and inputs handled.
        reason: Why the rule exists (the probe's finding) and how it works.
        forward: How close the forward values are to onnxruntime's native op.
        check: ``None`` if the node can be rewritten, else the reason it cannot.
        rewrite: Emits the new nodes; returns one value per node output (None for an unused one).
        exact: The forward values are bit-identical to the native op's.
        also_when: Rewrite even where the table row is fine (a condition the table cannot see).
    """

    op_type: str
    covers: str
    reason: str
    forward: str
    check: Check
    rewrite: Rewrite
    exact: bool = False
    also_when: Callable[[ir.Node], bool] | None = None


def _always(_: RewriteContext) -> str | None:
    return None


def _float32_data(ctx: RewriteContext) -> str | None:
    x = ctx.input(0)
    if x is not None and x.dtype is not None and x.dtype != _F32:
        return f"input is {x.dtype.name}; only float32 is decomposed"
    return None


def _both(*checks: Check) -> Check:
    def check(ctx: RewriteContext) -> str | None:
        for c in checks:
            reason = c(ctx)
            if reason:
                return reason
        return None

    return check


# -- elementwise activations -------------------------------------------------------------------
def _hard_sigmoid(ctx: RewriteContext, x: ir.Value, alpha: float, beta: float) -> ir.Value:
    u = ctx.op("Add", [ctx.op("Mul", [x, ctx.const(alpha)]), ctx.const(beta)])
    inner = ctx.where(ctx.op("Less", [u, ctx.const(1.0)]), u, ctx.const(1.0))
    return ctx.where(ctx.op("Greater", [u, ctx.const(0.0)]), inner, ctx.const(0.0))


def _rw_hard_sigmoid(ctx: RewriteContext) -> list[ir.Value | None]:
    x = ctx.input(0)
    assert x is not None
    return [_hard_sigmoid(ctx, x, float(ctx.attr("alpha", 0.2)), float(ctx.attr("beta", 0.5)))]


def _rw_hard_swish(ctx: RewriteContext) -> list[ir.Value | None]:
    x = ctx.input(0)
    assert x is not None
    return [ctx.op("Mul", [x, _hard_sigmoid(ctx, x, 1.0 / 6.0, 0.5)])]


def _rw_prelu(ctx: RewriteContext) -> list[ir.Value | None]:
    x, slope = ctx.input(0), ctx.input(1)
    assert x is not None and slope is not None
    return [ctx.where(ctx.op("Less", [x, ctx.const(0.0)]), ctx.op("Mul", [x, slope]), x)]


def _negative_part(ctx: RewriteContext, x: ir.Value, positive: ir.Value) -> ir.Value:
    """``x`` where not ``positive``, else 0: keeps ``exp`` of the unused branch finite, so the
    masked-out gradient stays 0 instead of ``0 * inf``."""
    return ctx.where(positive, ctx.const(0.0), x)


def _rw_elu(ctx: RewriteContext) -> list[ir.Value | None]:
    x = ctx.input(0)
    assert x is not None
    alpha = ctx.const(float(ctx.attr("alpha", 1.0)))
    negative = ctx.op("Less", [x, ctx.const(0.0)])
    xn = ctx.where(negative, x, ctx.const(0.0))
    return [ctx.where(negative, ctx.op("Mul", [alpha, ctx.op("Sub", [ctx.op("Exp", [xn]), ctx.const(1.0)])]), x)]


def _rw_selu(ctx: RewriteContext) -> list[ir.Value | None]:
    x = ctx.input(0)
    assert x is not None
    alpha = ctx.const(float(ctx.attr("alpha", 1.67326319217681884765625)))
    gamma = ctx.const(float(ctx.attr("gamma", 1.05070102214813232421875)))
    positive = ctx.op("Greater", [x, ctx.const(0.0)])
    xn = _negative_part(ctx, x, positive)
    negative = ctx.op("Sub", [ctx.op("Mul", [alpha, ctx.op("Exp", [xn])]), alpha])
    return [ctx.op("Mul", [gamma, ctx.where(positive, x, negative)])]


def _rw_celu(ctx: RewriteContext) -> list[ir.Value | None]:
    x = ctx.input(0)
    assert x is not None
    alpha = ctx.const(float(ctx.attr("alpha", 1.0)))
    positive = ctx.op("Greater", [x, ctx.const(0.0)])
    xn = _negative_part(ctx, x, positive)
    negative = ctx.op("Mul", [alpha, ctx.op("Sub", [ctx.op("Exp", [ctx.op("Div", [xn, alpha])]), ctx.const(1.0)])])
    return [ctx.where(positive, x, negative)]


def _log1p(ctx: RewriteContext, u: ir.Value) -> ir.Value:
    """``log(1 + u)`` accurate for tiny ``u`` (no Log1p in ONNX): ``log(w) * u / (w - 1)`` with
    ``w = 1 + u``, or ``u`` where ``w`` rounds to 1. Its derivative is ``1 / (1 + u)`` up to rounding."""
    w = ctx.op("Add", [u, ctx.const(1.0)])
    wm1 = ctx.op("Sub", [w, ctx.const(1.0)])
    exact = ctx.op("Equal", [wm1, ctx.const(0.0)])
    safe = ctx.where(exact, ctx.const(1.0), wm1)
    ratio = ctx.op("Div", [ctx.op("Mul", [ctx.op("Log", [w]), u]), safe])
    return ctx.where(exact, u, ratio)


def _softplus(ctx: RewriteContext, x: ir.Value) -> ir.Value:
    """``x > 0 ? x + log1p(exp(-x)) : log1p(exp(x))``, each branch fed only its own half."""
    positive = ctx.op("Greater", [x, ctx.const(0.0)])
    xp = ctx.where(positive, x, ctx.const(0.0))
    xn = _negative_part(ctx, x, positive)
    upper = ctx.op("Add", [xp, _log1p(ctx, ctx.op("Exp", [ctx.op("Neg", [xp])]))])
    lower = _log1p(ctx, ctx.op("Exp", [xn]))
    return ctx.where(positive, upper, lower)


def _rw_softplus(ctx: RewriteContext) -> list[ir.Value | None]:
    x = ctx.input(0)
    assert x is not None
    return [_softplus(ctx, x)]


def _rw_softsign(ctx: RewriteContext) -> list[ir.Value | None]:
    x = ctx.input(0)
    assert x is not None
    return [ctx.op("Div", [x, ctx.op("Add", [ctx.op("Abs", [x]), ctx.const(1.0)])])]


def _rw_mish(ctx: RewriteContext) -> list[ir.Value | None]:
    x = ctx.input(0)
    assert x is not None
    return [ctx.op("Mul", [x, ctx.op("Tanh", [_softplus(ctx, x)])])]


def _rw_thresholded_relu(ctx: RewriteContext) -> list[ir.Value | None]:
    x = ctx.input(0)
    assert x is not None
    alpha = ctx.const(float(ctx.attr("alpha", 1.0)))
    return [ctx.where(ctx.op("Greater", [x, alpha]), x, ctx.const(0.0))]


def _rw_shrink(ctx: RewriteContext) -> list[ir.Value | None]:
    x = ctx.input(0)
    assert x is not None
    lambd, bias = float(ctx.attr("lambd", 0.5)), ctx.const(float(ctx.attr("bias", 0.0)))
    upper = ctx.where(ctx.op("Greater", [x, ctx.const(lambd)]), ctx.op("Sub", [x, bias]), ctx.const(0.0))
    return [ctx.where(ctx.op("Less", [x, ctx.const(-lambd)]), ctx.op("Add", [x, bias]), upper)]


def _rw_clip(ctx: RewriteContext) -> list[ir.Value | None]:
    x = ctx.input(0)
    assert x is not None
    if ctx.opset < 11:  # Clip-6: bounds are attributes
        lo = ctx.const(float(ctx.attr("min", -_FLT_MAX)))
        hi = ctx.const(float(ctx.attr("max", _FLT_MAX)))
    else:  # an absent bound is the float range, as onnxruntime has it (it clamps infinities)
        lo = ctx.input(1) or ctx.const(-_FLT_MAX)
        hi = ctx.input(2) or ctx.const(_FLT_MAX)
    y = ctx.where(ctx.op("Less", [x, lo]), lo, x)
    return [ctx.where(ctx.op("Greater", [y, hi]), hi, y)]


def _zero_dim_shape(node: ir.Node) -> bool:
    """A declared output shape with a 0 dimension: the legacy 'unknown' marker of some exporters.

    ``ClipGrad`` builds its mask with that shape and fails at run time ("Can broadcast 0 by 0 or
    1. 16 is invalid." in ``<node>_Grad/Mul``); the ``Where`` form does not read it.
    """
    return any(v.shape is not None and any(d == 0 for d in v.shape) for v in node.outputs)


# -- rounding: native forward, zero or straight-through gradient --------------------------------
def _rw_stopped(ctx: RewriteContext) -> list[ir.Value | None]:
    native = ctx.emit(ctx.node.op_type, list(ctx.node.inputs), list(ctx.node.attributes.values()))[0]
    return [ctx.stop(native)]


def _rw_straight_through(ctx: RewriteContext) -> list[ir.Value | None]:
    x = ctx.input(0)
    assert x is not None
    native = ctx.emit(ctx.node.op_type, [x], list(ctx.node.attributes.values()))[0]
    return [with_derivative(ctx.b, x, native, ctx.const(1.0), ctx.base)]


# -- elementwise ops with a native forward and a derivative formula ----------------------------
def _derivative_rule(formula: Callable[[RewriteContext, ir.Value, ir.Value], ir.Value]) -> Rewrite:
    def rewrite(ctx: RewriteContext) -> list[ir.Value | None]:
        x = ctx.input(0)
        assert x is not None
        native = ctx.emit(ctx.node.op_type, [x], list(ctx.node.attributes.values()))[0]
        return [with_derivative(ctx.b, x, native, formula(ctx, x, native), ctx.base)]

    return rewrite


def _inv_sqrt(ctx: RewriteContext, u: ir.Value) -> ir.Value:
    return ctx.op("Reciprocal", [ctx.op("Sqrt", [u])])


def _sq(ctx: RewriteContext, x: ir.Value) -> ir.Value:
    return ctx.op("Mul", [x, x])


_DERIVATIVES: dict[str, tuple[str, Callable[[RewriteContext, ir.Value, ir.Value], ir.Value]]] = {
    "Tan": ("1 + tan(x)^2", lambda c, x, y: c.op("Add", [c.const(1.0), _sq(c, y)])),
    "Sinh": ("cosh(x)", lambda c, x, y: c.op("Cosh", [x])),
    "Cosh": ("sinh(x)", lambda c, x, y: c.op("Sinh", [x])),
    "Asin": ("1 / sqrt(1 - x^2)", lambda c, x, y: _inv_sqrt(c, c.op("Sub", [c.const(1.0), _sq(c, x)]))),
    "Acos": ("-1 / sqrt(1 - x^2)", lambda c, x, y: c.op("Neg", [_inv_sqrt(c, c.op("Sub", [c.const(1.0), _sq(c, x)]))])),
    "Atan": ("1 / (1 + x^2)", lambda c, x, y: c.op("Reciprocal", [c.op("Add", [c.const(1.0), _sq(c, x)])])),
    "Asinh": ("1 / sqrt(x^2 + 1)", lambda c, x, y: _inv_sqrt(c, c.op("Add", [_sq(c, x), c.const(1.0)]))),
    "Acosh": ("1 / sqrt(x^2 - 1)", lambda c, x, y: _inv_sqrt(c, c.op("Sub", [_sq(c, x), c.const(1.0)]))),
    "Atanh": ("1 / (1 - x^2)", lambda c, x, y: c.op("Reciprocal", [c.op("Sub", [c.const(1.0), _sq(c, x)])])),
}


# -- n-ary elementwise ----------------------------------------------------------------------------
def _rw_sum(ctx: RewriteContext) -> list[ir.Value | None]:
    values = [v for v in ctx.node.inputs if v is not None]
    total = values[0]
    for v in values[1:]:
        total = ctx.op("Add", [total, v])
    if total is values[0]:
        total = ctx.op("Identity", [total])
    if ctx.node.op_type == "Mean" and len(values) > 1:
        total = ctx.op("Div", [total, ctx.const(float(len(values)))])
    return [total]


# -- reductions ----------------------------------------------------------------------------------
def _reduce_axes(ctx: RewriteContext) -> tuple[list[int] | None, str | None]:
    """The node's reduction axes (None: all), or a reason they are not known."""
    if "axes" in ctx.node.attributes:
        return [int(a) for a in ctx.attr("axes")], None
    if ctx.input(1) is not None:
        axes = ctx.const_input(1)
        if axes is None:
            return None, "the axes input is not a constant"
        if axes.size == 0:
            return None, None
        return [int(a) for a in axes.reshape(-1)], None
    return None, None


def _noop(ctx: RewriteContext) -> bool:
    axes, _ = _reduce_axes(ctx)
    return axes is None and int(ctx.attr("noop_with_empty_axes", 0)) == 1 and ctx.input(1) is not None


def _check_reduce(ctx: RewriteContext) -> str | None:
    _, reason = _reduce_axes(ctx)
    return reason or _float32_data(ctx)


def _finish_reduce(ctx: RewriteContext, y_keep: ir.Value, axes: list[int] | None) -> ir.Value:
    if int(ctx.attr("keepdims", 1)):
        return y_keep
    if axes is None:
        return ctx.op("Reshape", [y_keep, ctx.ints(np.zeros(0, np.int64))])
    return ctx.squeeze(y_keep, axes)


def _max_like(ctx: RewriteContext, op_type: str, x: ir.Value, axes: list[int] | None) -> ir.Value:
    """``m + sum(where(x == m, x - m, 0)) / count`` kept-dims, ``m`` the stopped native reduction.

    Forward: every selected ``x - m`` is exactly 0, so the value is ``m``; with an infinite ``m``
    the correction is masked out (``inf - inf`` would be NaN). Gradient: ``1/count`` to each tie.
    ``GlobalMaxPool`` is its own native op (onnxruntime's gives -FLT_MAX for all -inf).
    """
    if op_type == "GlobalMaxPool":
        native = ctx.op("GlobalMaxPool", [x])
    else:
        native = ctx.reduce(op_type, x, axes, keepdims=1)
    m = ctx.stop(native)
    finite = ctx.op("Not", [ctx.op("IsInf", [native])])
    mask = ctx.op("And", [ctx.op("Equal", [x, native]), finite])
    count = ctx.op("Max", [ctx.reduce("ReduceSum", ctx.op("Cast", [mask], to=_F32), axes, keepdims=1), ctx.const(1.0)])
    diff = ctx.where(mask, ctx.op("Sub", [x, m]), ctx.const(0.0))
    correction = ctx.op("Div", [ctx.reduce("ReduceSum", diff, axes, keepdims=1), count])
    return ctx.op("Add", [m, correction])


def _rw_reduce_max(ctx: RewriteContext) -> list[ir.Value | None]:
    x = ctx.input(0)
    assert x is not None
    if _noop(ctx):
        return [ctx.op("Identity", [x])]
    axes, _ = _reduce_axes(ctx)
    return [_finish_reduce(ctx, _max_like(ctx, ctx.node.op_type, x, axes), axes)]


def _rw_global_max_pool(ctx: RewriteContext) -> list[ir.Value | None]:
    x = ctx.input(0)
    assert x is not None
    rank = ctx.rank(x)
    assert rank is not None
    return [_max_like(ctx, "GlobalMaxPool", x, list(range(2, rank)))]


def _check_rank(ctx: RewriteContext) -> str | None:
    return None if ctx.rank(ctx.input(0)) is not None else "the rank of the input is unknown"


def _rw_reduce_via_sum(ctx: RewriteContext) -> list[ir.Value | None]:
    x = ctx.input(0)
    assert x is not None
    op = ctx.node.op_type
    terms = ctx.op("Abs", [x]) if op == "ReduceL1" else ctx.op("Mul", [x, x]) if op == "ReduceSumSquare" else x
    if _noop(ctx):  # no axes and noop_with_empty_axes: the elementwise part only
        total = terms if terms is not x else ctx.op("Identity", [x])
    else:
        axes, _ = _reduce_axes(ctx)
        total = ctx.reduce("ReduceSum", terms, axes, int(ctx.attr("keepdims", 1)))
    return [ctx.op("Log", [total]) if op == "ReduceLogSum" else total]


def _rw_keepdims_then_reshape(ctx: RewriteContext) -> list[ir.Value | None]:
    """The native reduction with ``keepdims=1``, reshaped to a scalar (onnxruntime's gradient
    builder fails on ``keepdims=0`` without axes: 'does not have type information')."""
    x = ctx.input(0)
    assert x is not None
    kept = ctx.emit(ctx.node.op_type, [x], [ir.AttrInt64("keepdims", 1)])[0]
    return [ctx.op("Reshape", [kept, ctx.ints(np.zeros(0, np.int64))])]


# -- normalization ------------------------------------------------------------------------------
def _mean_var(ctx: RewriteContext, x: ir.Value, axes: list[int]) -> tuple[ir.Value, ir.Value]:
    mean = ctx.reduce("ReduceMean", x, axes, keepdims=1)
    centered = ctx.op("Sub", [x, mean])
    var = ctx.reduce("ReduceMean", ctx.op("Mul", [centered, centered]), axes, keepdims=1)
    return centered, var


def _channel_shape(rank: int) -> list[int]:
    return [-1] + [1] * (rank - 2)


def _rw_instance_norm(ctx: RewriteContext) -> list[ir.Value | None]:
    x, scale, bias = ctx.input(0), ctx.input(1), ctx.input(2)
    assert x is not None and scale is not None and bias is not None
    rank = ctx.rank(x)
    assert rank is not None
    centered, var = _mean_var(ctx, x, list(range(2, rank)))
    eps = ctx.const(float(ctx.attr("epsilon", 1e-5)))
    normed = ctx.op("Div", [centered, ctx.op("Sqrt", [ctx.op("Add", [var, eps])])])
    shape = ctx.ints(_channel_shape(rank))
    y = ctx.op("Add", [ctx.op("Mul", [normed, ctx.op("Reshape", [scale, shape])]), ctx.op("Reshape", [bias, shape])])
    return [y]


def _rw_group_norm(ctx: RewriteContext) -> list[ir.Value | None]:
    x, scale, bias = ctx.input(0), ctx.input(1), ctx.input(2)
    assert x is not None and scale is not None and bias is not None
    groups = int(ctx.attr("num_groups"))
    grouped = ctx.op("Reshape", [x, ctx.ints([0, groups, -1])])
    centered, var = _mean_var(ctx, grouped, [2])
    eps = ctx.const(float(ctx.attr("epsilon", 1e-5)))
    normed = ctx.op("Div", [centered, ctx.op("Sqrt", [ctx.op("Add", [var, eps])])])
    if ctx.opset < 21:  # GroupNormalization-18: scale and bias per group
        shape = ctx.ints([1, groups, 1])
        normed = ctx.op("Add", [ctx.op("Mul", [normed, ctx.op("Reshape", [scale, shape])]), ctx.op("Reshape", [bias, shape])])
        return [ctx.op("Reshape", [normed, ctx.op("Shape", [x])])]
    rank = ctx.rank(x)
    assert rank is not None
    restored = ctx.op("Reshape", [normed, ctx.op("Shape", [x])])
    shape = ctx.ints(_channel_shape(rank))
    return [ctx.op("Add", [ctx.op("Mul", [restored, ctx.op("Reshape", [scale, shape])]), ctx.op("Reshape", [bias, shape])])]


def _check_group_norm(ctx: RewriteContext) -> str | None:
    if int(ctx.attr("stash_type", 1)) != 1:
        return "stash_type other than float32"
    if ctx.opset >= 21 and ctx.rank(ctx.input(0)) is None:
        return "the rank of the input is unknown"
    return _float32_data(ctx)


def _rw_mvn(ctx: RewriteContext) -> list[ir.Value | None]:
    """As ONNX's function body: ``(x - E[x]) / (sqrt(E[x^2] - E[x]^2) + 1e-9)``."""
    x = ctx.input(0)
    assert x is not None
    axes = [int(a) for a in ctx.attr("axes", [0, 2, 3])]
    mean = ctx.reduce("ReduceMean", x, axes, keepdims=1)
    mean_sq = ctx.reduce("ReduceMean", ctx.op("Mul", [x, x]), axes, keepdims=1)
    std = ctx.op("Sqrt", [ctx.op("Sub", [mean_sq, ctx.op("Mul", [mean, mean])])])
    return [ctx.op("Div", [ctx.op("Sub", [x, mean]), ctx.op("Add", [std, ctx.const(1e-9)])])]


def _rw_lrn(ctx: RewriteContext) -> list[ir.Value | None]:
    """``x / (bias + alpha / size * sum of squares over the channel window) ^ beta``."""
    x = ctx.input(0)
    assert x is not None
    size = int(ctx.attr("size"))
    alpha, beta, bias = float(ctx.attr("alpha", 1e-4)), float(ctx.attr("beta", 0.75)), float(ctx.attr("bias", 1.0))
    rank = ctx.rank(x)
    assert rank is not None
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    pads = [0, before] + [0] * (rank - 2) + [0, after] + [0] * (rank - 2)
    padded = ctx.op("Pad", [ctx.op("Mul", [x, x]), ctx.ints(pads)])
    total = None
    for k in range(size):
        end = k - (size - 1) if k < size - 1 else np.iinfo(np.int64).max
        part = ctx.op("Slice", [padded, ctx.ints([k]), ctx.ints([int(end)]), ctx.ints([1])])
        total = part if total is None else ctx.op("Add", [total, part])
    assert total is not None
    denom = ctx.op("Pow", [ctx.op("Add", [ctx.const(bias), ctx.op("Mul", [total, ctx.const(alpha / size)])]), ctx.const(beta)])
    return [ctx.op("Div", [x, denom])]


def _check_lrn(ctx: RewriteContext) -> str | None:
    if ctx.opset < 11:
        return "needs opset >= 11 (Pad with a pads input)"
    return _both(_check_rank, _float32_data)(ctx)


def _rw_lp_normalization(ctx: RewriteContext) -> list[ir.Value | None]:
    x = ctx.input(0)
    assert x is not None
    axis, p = int(ctx.attr("axis", -1)), int(ctx.attr("p", 2))
    if p == 1:
        norm = ctx.reduce("ReduceSum", ctx.op("Abs", [x]), [axis], keepdims=1)
    else:
        norm = ctx.op("Sqrt", [ctx.reduce("ReduceSum", ctx.op("Mul", [x, x]), [axis], keepdims=1)])
    return [ctx.op("Div", [x, norm])]


def _rw_global_lp_pool(ctx: RewriteContext) -> list[ir.Value | None]:
    x = ctx.input(0)
    assert x is not None
    rank = ctx.rank(x)
    assert rank is not None
    p = float(ctx.attr("p", 2))
    axes = list(range(2, rank))
    if p == 2.0:
        return [ctx.op("Sqrt", [ctx.reduce("ReduceSum", ctx.op("Mul", [x, x]), axes, keepdims=1)])]
    powered = ctx.op("Pow", [ctx.op("Abs", [x]), ctx.const(p)])
    return [ctx.op("Pow", [ctx.reduce("ReduceSum", powered, axes, keepdims=1), ctx.const(1.0 / p)])]


def _rw_batch_norm(ctx: RewriteContext) -> list[ir.Value | None]:
    """Inference form ``x * a + c``, ``a = scale / sqrt(var + eps)``, ``c = bias - mean * a``, with
    the running statistics behind a stop-gradient (they are statistics, not parameters)."""
    x, scale, bias, mean, var = (ctx.input(i) for i in range(5))
    assert x is not None and scale is not None and bias is not None and mean is not None and var is not None
    rank = ctx.rank(x)
    assert rank is not None
    eps = ctx.const(float(ctx.attr("epsilon", 1e-5)))
    a = ctx.op("Div", [scale, ctx.op("Sqrt", [ctx.op("Add", [ctx.stop(var), eps])])])
    c = ctx.op("Sub", [bias, ctx.op("Mul", [ctx.stop(mean), a])])
    shape = ctx.ints(_channel_shape(rank))
    y = ctx.op("Add", [ctx.op("Mul", [x, ctx.op("Reshape", [a, shape])]), ctx.op("Reshape", [c, shape])])
    return [y] + [None] * (len(ctx.node.outputs) - 1)


def _check_batch_norm(ctx: RewriteContext) -> str | None:
    if int(ctx.attr("training_mode", 0)) != 0:
        return "training_mode=1 (batch statistics)"
    if any(v.uses() or v.is_graph_output() for v in ctx.node.outputs[1:]):
        return "its running-statistics outputs are used"
    return _both(_check_rank, _float32_data)(ctx)


def _rw_add_outputs(count: int) -> Rewrite:
    def rewrite(ctx: RewriteContext) -> list[ir.Value | None]:
        outs = ctx.emit(ctx.node.op_type, list(ctx.node.inputs), list(ctx.node.attributes.values()), outputs=count)
        kept = len(ctx.node.outputs)
        return list(outs[:kept])

    return rewrite


# -- data movement --------------------------------------------------------------------------------
def _rw_depth_to_space(ctx: RewriteContext) -> list[ir.Value | None]:
    x = ctx.input(0)
    assert x is not None
    b = int(ctx.attr("blocksize"))
    n, c, h, w = (ctx.dim(x, i) for i in range(4))
    if ctx.node.op_type == "DepthToSpace":
        groups = ctx.op("Div", [c, ctx.ints([b * b])])
        if ctx.attr("mode", "DCR") == "DCR":
            six = ctx.shape_vector([n, b, b, groups, h, w])
            perm = [0, 3, 4, 1, 5, 2]
        else:
            six = ctx.shape_vector([n, groups, b, b, h, w])
            perm = [0, 1, 4, 2, 5, 3]
        moved = ctx.op("Transpose", [ctx.op("Reshape", [x, six])], perm=perm)
        out = ctx.shape_vector([n, groups, ctx.op("Mul", [h, ctx.ints([b])]), ctx.op("Mul", [w, ctx.ints([b])])])
        return [ctx.op("Reshape", [moved, out])]
    hb, wb = ctx.op("Div", [h, ctx.ints([b])]), ctx.op("Div", [w, ctx.ints([b])])
    six = ctx.shape_vector([n, c, hb, b, wb, b])
    moved = ctx.op("Transpose", [ctx.op("Reshape", [x, six])], perm=[0, 3, 5, 1, 2, 4])
    out = ctx.shape_vector([n, ctx.op("Mul", [c, ctx.ints([b * b])]), hb, wb])
    return [ctx.op("Reshape", [moved, out])]


def _check_rank4(ctx: RewriteContext) -> str | None:
    return None if ctx.rank(ctx.input(0)) == 4 else "the input is not known to be 4-D"


def _iota(ctx: RewriteContext, x: ir.Value, axis: int, dtype: ir.DataType = ir.DataType.INT64) -> ir.Value:
    """``0, 1, ..., x.shape[axis] - 1`` (1-D): a constant for a static dim, else ``Range``."""
    dims = ctx.static_dims(x)
    known = dims[axis] if dims is not None else None
    if known is not None:
        return ctx.b.const(np.arange(known, dtype=dtype.numpy()), dtype.numpy(), "iota")
    n = ctx.op("Squeeze", [ctx.dim(x, axis)]) if ctx.opset >= 13 else ctx.op("Squeeze", [ctx.dim(x, axis)], axes=[0])
    if dtype == ir.DataType.INT64:
        return ctx.op("Range", [ctx.b.const(0, np.int64, "zero_i"), n, ctx.b.const(1, np.int64, "one_i")])
    return ctx.op("Range", [ctx.const(0.0), ctx.op("Cast", [n], to=dtype), ctx.const(1.0)])


def _rw_pad(ctx: RewriteContext) -> list[ir.Value | None]:
    """reflect/edge/wrap as one Gather per padded axis with an index map built from ``Range``."""
    x = ctx.input(0)
    assert x is not None
    rank = ctx.rank(x)
    assert rank is not None
    known = ctx.const_input(1)
    assert known is not None
    pads = [int(p) for p in known.reshape(-1)]
    axes_in = ctx.const_input(3) if ctx.input(3) is not None else None
    axes = [int(a) % rank for a in axes_in.reshape(-1)] if axes_in is not None else list(range(rank))
    mode = ctx.attr("mode", "constant")
    y = x
    for k, axis in enumerate(axes):
        before, after = pads[k], pads[k + len(axes)]
        if before == 0 and after == 0:
            continue
        n = ctx.op("Squeeze", [ctx.dim(x, axis)]) if ctx.opset >= 13 else ctx.op("Squeeze", [ctx.dim(x, axis)], axes=[0])
        i = ctx.op("Range", [ctx.b.const(-before, np.int64, "i"), ctx.op("Add", [n, ctx.b.const(after, np.int64, "i")]),
                             ctx.b.const(1, np.int64, "one_i")])
        last = ctx.op("Sub", [n, ctx.b.const(1, np.int64, "one_i")])
        if mode == "reflect":  # (n-1) - |(n-1) - |i||
            index = ctx.op("Sub", [last, ctx.op("Abs", [ctx.op("Sub", [last, ctx.op("Abs", [i])])])])
        elif mode == "edge":
            index = ctx.op("Min", [ctx.op("Max", [i, ctx.b.const(0, np.int64, "zero_i")]), last])
        else:  # wrap
            index = ctx.op("Mod", [ctx.op("Add", [i, ctx.op("Mul", [n, ctx.b.const(max(before, 0) + 1, np.int64, "i")])]), n])
        y = ctx.op("Gather", [y, index], axis=axis)
    if y is x:
        y = ctx.op("Identity", [x])
    return [y]


def _check_pad(ctx: RewriteContext) -> str | None:
    if ctx.attr("mode", "constant") not in ("reflect", "edge", "wrap"):
        return f"mode={ctx.attr('mode', 'constant')} (only reflect/edge/wrap are rewritten; constant Pad has a gradient)"
    if ctx.opset < 11:
        return "needs opset >= 11 (Pad-2 has its pads as an attribute)"
    if ctx.const_input(1) is None:
        return "the pads input is not a constant"
    if ctx.input(3) is not None and ctx.const_input(3) is None:
        return "the axes input is not a constant"
    return _both(_check_rank, _float32_data)(ctx)


def _rw_slice(ctx: RewriteContext) -> list[ir.Value | None]:
    """Each sliced axis as a Gather whose indices are the native Slice of ``Range(n)``: onnxruntime's
    own clamping of starts/ends, and no SliceGrad (which fails on negative steps)."""
    x = ctx.input(0)
    assert x is not None
    rank = ctx.rank(x)
    assert rank is not None
    starts, ends = ctx.input(1), ctx.input(2)
    assert starts is not None and ends is not None
    given = ctx.const_input(3)  # _check_slice: constant when present
    if given is not None:
        axes = [int(a) for a in given.reshape(-1)]
    else:  # _check_slice: then the starts are constant or of static length
        known = ctx.const_input(1)
        if known is not None:
            count = int(known.size)
        else:
            assert starts.shape is not None
            count = starts.shape.numpy()[0]
        axes = list(range(count))
    steps = ctx.const_input(4)
    y = x
    for k, axis in enumerate(axes):
        pick = [ctx.ints([k]), ctx.ints([k + 1])]
        start = ctx.op("Slice", [starts, *pick])
        end = ctx.op("Slice", [ends, *pick])
        step = ctx.ints([int(steps.reshape(-1)[k])]) if steps is not None else ctx.ints([1])
        index = ctx.op("Slice", [_iota(ctx, x, axis % rank), start, end, ctx.ints([0]), step])
        y = ctx.op("Gather", [y, index], axis=axis % rank)
    return [y]


def _check_slice(ctx: RewriteContext) -> str | None:
    if ctx.opset < 11:
        return "needs opset >= 11"
    if ctx.input(3) is not None and ctx.const_input(3) is None:
        return "the axes input is not a constant"
    if ctx.input(4) is not None and ctx.const_input(4) is None:
        return "the steps input is not a constant"
    starts = ctx.input(1)
    if ctx.input(3) is None and ctx.const_input(1) is None and (starts is None or starts.shape is None
                                                                  or not starts.shape.is_static()):
        return "the number of sliced axes is unknown"
    return _both(_check_rank, _float32_data)(ctx)


def _rw_compress(ctx: RewriteContext) -> list[ir.Value | None]:
    x, cond = ctx.input(0), ctx.input(1)
    assert x is not None and cond is not None
    index = ctx.squeeze(ctx.op("NonZero", [cond]), [0])
    axis = ctx.attr("axis")
    if axis is None:
        return [ctx.op("Gather", [ctx.op("Reshape", [x, ctx.ints([-1])]), index], axis=0)]
    return [ctx.op("Gather", [x, index], axis=int(axis))]


def _rw_cast_like(ctx: RewriteContext) -> list[ir.Value | None]:
    target = ctx.input(1)
    assert target is not None and target.dtype is not None
    return [ctx.op("Cast", [ctx.input(0)], to=int(target.dtype))]


def _check_cast_like(ctx: RewriteContext) -> str | None:
    target = ctx.input(1)
    return None if target is not None and target.dtype is not None else "the target type is unknown"


def _rw_cumsum(ctx: RewriteContext) -> list[ir.Value | None]:
    """``x @ T`` along the axis, ``T[i, j] = 1`` where ``i <= j`` (``<`` exclusive, reversed for
    ``reverse``), built from ``Range`` comparisons."""
    x = ctx.input(0)
    assert x is not None
    rank = ctx.rank(x)
    assert rank is not None
    axis_value = ctx.const_input(1)
    assert axis_value is not None  # _check_cumsum: a constant axis
    axis = int(axis_value.reshape(-1)[0]) % rank
    i = _iota(ctx, x, axis)
    rows, cols = ctx.unsqueeze(i, [1]), ctx.unsqueeze(i, [0])
    exclusive, reverse = int(ctx.attr("exclusive", 0)), int(ctx.attr("reverse", 0))
    first, second = (cols, rows) if reverse else (rows, cols)
    picked = ctx.op("Less", [first, second]) if exclusive else ctx.op("Not", [ctx.op("Greater", [first, second])])
    tri = ctx.op("Cast", [picked], to=_F32)
    perm = [a for a in range(rank) if a != axis] + [axis]
    moved = x if axis == rank - 1 else ctx.op("Transpose", [x], perm=perm)
    y = ctx.op("MatMul", [moved, tri])
    if axis != rank - 1:
        y = ctx.op("Transpose", [y], perm=[int(p) for p in np.argsort(perm)])
    return [y]


def _check_cumsum(ctx: RewriteContext) -> str | None:
    if ctx.const_input(1) is None:
        return "the axis input is not a constant"
    if ctx.opset < 11:
        return "needs opset >= 11 (Range)"
    return _both(_check_rank, _float32_data)(ctx)


# -- convolution, pooling, linear algebra ---------------------------------------------------------
def _same_pads(ctx: RewriteContext, kernel: Sequence[int]) -> list[int]:
    x = ctx.input(0)
    dims = ctx.static_dims(x)
    assert dims is not None
    spatial = dims[2:]
    strides = ctx.attr("strides", [1] * len(kernel))
    dilations = ctx.attr("dilations", [1] * len(kernel))
    begins, ends = [], []
    for n, k, s, d in zip(spatial, kernel, strides, dilations):
        assert n is not None
        out = -(-n // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        small, large = total // 2, total - total // 2
        if ctx.attr("auto_pad") == "SAME_UPPER":
            begins.append(small)
            ends.append(large)
        else:
            begins.append(large)
            ends.append(small)
    return begins + ends


def _known(dims: Sequence[int | None]) -> list[int] | None:
    """``dims`` when every one is known, else None."""
    known = [d for d in dims if d is not None]
    return known if len(known) == len(dims) else None


def _kernel(ctx: RewriteContext) -> list[int] | None:
    if "kernel_shape" in ctx.node.attributes:
        return [int(k) for k in ctx.attr("kernel_shape")]
    w = ctx.static_dims(ctx.input(1))
    kernel = _known(w[2:]) if w is not None else None
    if ctx.node.op_type in ("Conv", "ConvTranspose") and kernel is not None:
        return kernel
    return None


def _rw_explicit_pads(ctx: RewriteContext) -> list[ir.Value | None]:
    kernel = _kernel(ctx)
    assert kernel is not None
    attrs = [a for name, a in ctx.node.attributes.items() if name not in ("auto_pad", "pads")]
    attrs.append(ir.AttrInt64s("pads", _same_pads(ctx, kernel)))
    outs = ctx.emit(ctx.node.op_type, list(ctx.node.inputs), attrs, outputs=len(ctx.node.outputs))
    return list(outs)


def _check_explicit_pads(ctx: RewriteContext) -> str | None:
    if ctx.attr("auto_pad", "NOTSET") not in ("SAME_UPPER", "SAME_LOWER"):
        return f"auto_pad={ctx.attr('auto_pad', 'NOTSET')} (only SAME_* gradients are wrong)"
    dims = ctx.static_dims(ctx.input(0))
    if dims is None or any(d is None for d in dims[2:]):
        return "the spatial input size is not static (needed to make auto_pad explicit)"
    if _kernel(ctx) is None:
        return "the kernel size is not static"
    return None


def _pool_geometry(ctx: RewriteContext) -> tuple[list[int], list[int], list[int], list[int], list[int]] | str:
    """kernel, strides, dilations, begin and end pads of a pooling node (SAME made explicit)."""
    kernel = [int(k) for k in ctx.attr("kernel_shape", [])]
    if not kernel:
        return "no kernel_shape"
    k = len(kernel)
    strides = [int(v) for v in ctx.attr("strides", [1] * k)]
    dilations = [int(v) for v in ctx.attr("dilations", [1] * k)]
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        dims = ctx.static_dims(ctx.input(0))
        if dims is None or any(d is None or d <= 0 for d in dims[2:]):  # _windows pads at run time
            return kernel, strides, dilations, [0] * k, [0] * k
        pads = _same_pads(ctx, kernel)
    elif auto_pad == "VALID":
        pads = [0] * (2 * k)
    else:
        pads = [int(v) for v in ctx.attr("pads", [0] * (2 * k))]
    return kernel, strides, dilations, pads[:k], pads[k:]


def _same_at_run_time(ctx: RewriteContext) -> bool:
    dims = ctx.static_dims(ctx.input(0))
    return ctx.attr("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER") and (
        dims is None or any(d is None or d <= 0 for d in dims[2:]))


def _pool_sizes(ctx: RewriteContext, x: ir.Value, geometry: tuple[list[int], ...]) -> list[ir.Value]:
    """Output size per spatial axis, in int64 from ``Shape`` (any spatial size works).

    ``o = floor((n + b + e - span) / s) + 1``; with ``ceil_mode`` the ceiling, minus a last window
    that would start in the end padding (as onnxruntime counts them); ``ceil(n / s)`` for SAME.
    """
    kernel, strides, dilations, begins, ends = geometry
    ceil_mode = int(ctx.attr("ceil_mode", 0)) == 1

    def i64(v: int) -> ir.Value:
        return ctx.b.const(np.asarray([v], np.int64), np.int64, "i")

    sizes = []
    for i in range(len(kernel)):
        n = ctx.dim(x, 2 + i)
        if _same_at_run_time(ctx):
            sizes.append(ctx.op("Div", [ctx.op("Add", [n, i64(strides[i] - 1)]), i64(strides[i])]))
            continue
        span = (kernel[i] - 1) * dilations[i] + 1
        num = ctx.op("Add", [n, i64(begins[i] + ends[i] - span + (strides[i] - 1 if ceil_mode else 0))])
        o = ctx.op("Add", [ctx.op("Div", [num, i64(strides[i])]), i64(1)])
        if ceil_mode:
            start_last = ctx.op("Mul", [ctx.op("Sub", [o, i64(1)]), i64(strides[i])])
            late = ctx.op("Not", [ctx.op("Less", [start_last, ctx.op("Add", [n, i64(begins[i])])])])
            o = ctx.op("Sub", [o, ctx.op("Cast", [late], to=ir.DataType.INT64)])
        sizes.append(o)
    return sizes


def _windows(ctx: RewriteContext, x: ir.Value, pad_value: float, geometry: tuple[list[int], ...],
             sizes: Sequence[ir.Value], data: ir.Value | None = None) -> list[ir.Value]:
    """The pooling windows: strided Slices of ``x`` padded with ``pad_value`` (plus ``s - 1`` at the
    end under ``ceil_mode``, so every window exists; the slices stop after ``sizes`` windows).

    SAME padding with a run-time size pads by its largest amount (``span - 1`` in total) and starts
    the slices at ``largest begin - begin(n)``, ``begin(n)`` computed from ``data``'s shape.
    """
    kernel, strides, dilations, begins, ends = geometry
    k = len(kernel)
    ceil_mode = int(ctx.attr("ceil_mode", 0)) == 1

    def i64(v: int) -> ir.Value:
        return ctx.b.const(np.asarray([v], np.int64), np.int64, "i")

    shift: list[ir.Value | None] = [None] * k
    if _same_at_run_time(ctx):
        upper = ctx.attr("auto_pad") == "SAME_UPPER"
        begins, ends = [], []
        for i in range(k):
            span = (kernel[i] - 1) * dilations[i] + 1
            most = span - 1
            begins.append(most // 2 if upper else most - most // 2)
            ends.append(most - begins[-1])
            n = ctx.dim(data if data is not None else x, 2 + i)
            total = ctx.op("Max", [ctx.op("Sub", [ctx.op("Add", [ctx.op("Mul", [ctx.op("Sub", [sizes[i], i64(1)]),
                                                                              i64(strides[i])]), i64(span)]), n]), i64(0)])
            half = ctx.op("Div", [total, i64(2)])
            begin = half if upper else ctx.op("Sub", [total, half])
            shift[i] = ctx.op("Sub", [i64(begins[-1]), begin])
    pads = [0, 0, *begins, 0, 0, *[e + (s - 1 if ceil_mode else 0) for e, s in zip(ends, strides)]]
    padded = x if not any(pads) else ctx.op("Pad", [x, ctx.ints(pads), ctx.const(pad_value)])
    axes = ctx.ints(list(range(2, 2 + k)))
    steps = ctx.ints(strides)
    views = []
    for offset in np.ndindex(*kernel):
        starts: list[ir.Value] = []
        stops: list[ir.Value] = []
        for i in range(k):
            start = i64(int(offset[i]) * dilations[i])
            if shift[i] is not None:
                start = ctx.op("Add", [start, shift[i]])
            starts.append(start)
            stops.append(ctx.op("Add", [ctx.op("Add", [ctx.op("Mul", [ctx.op("Sub", [sizes[i], i64(1)]), i64(strides[i])]),
                                                       i64(1)]), start]))
        views.append(ctx.op("Slice", [padded, ctx.op("Concat", starts, axis=0), ctx.op("Concat", stops, axis=0), axes,
                                      steps]))
    return views


def _rw_max_pool(ctx: RewriteContext) -> list[ir.Value | None]:
    """Max over the window slices, first maximum kept (``where(t > m, t, m)``): onnxruntime's
    MaxPoolGrad is wrong with symbolic spatial dims. Pads are -inf. An Indices output comes
    from the native op (integers need no gradient)."""
    x = ctx.input(0)
    assert x is not None
    geometry = _pool_geometry(ctx)
    assert not isinstance(geometry, str)
    views = _windows(ctx, x, -np.inf, geometry, _pool_sizes(ctx, x, geometry))
    y = views[0]
    for view in views[1:]:
        y = ctx.where(ctx.op("Greater", [view, y]), view, y)
    if y is views[0]:
        y = ctx.op("Identity", [y])
    if len(ctx.node.outputs) > 1 and (ctx.node.outputs[1].uses() or ctx.node.outputs[1].is_graph_output()):
        native = ctx.emit("MaxPool", [x], list(ctx.node.attributes.values()), outputs=2)
        return [y, native[1]]
    return [y] + [None] * (len(ctx.node.outputs) - 1)


def _rw_average_pool(ctx: RewriteContext) -> list[ir.Value | None]:
    """Static shapes with SAME padding: the same op with explicit pads. Otherwise the window slices
    summed and divided by the kernel size (count_include_pad=1, as onnxruntime does even for
    ceil_mode windows past the pads) or by the number of input elements each window covers (the
    same windows summed over ones)."""
    dims = ctx.static_dims(ctx.input(0))
    if dims is not None and all(d is not None and d > 0 for d in dims):
        return _rw_explicit_pads(ctx)  # static shapes: only SAME padding was the problem
    x = ctx.input(0)
    assert x is not None
    geometry = _pool_geometry(ctx)
    assert not isinstance(geometry, str)
    kernel = geometry[0]
    sizes = _pool_sizes(ctx, x, geometry)
    views = _windows(ctx, x, 0.0, geometry, sizes)
    total = views[0]
    for view in views[1:]:
        total = ctx.op("Add", [total, view])
    if int(ctx.attr("count_include_pad", 0)) == 1:  # onnxruntime divides by the kernel size, ceil windows too
        return [ctx.op("Div", [total, ctx.const(float(np.prod(kernel)))])]
    rank = 2 + len(kernel)
    spatial = ctx.op("Slice", [ctx.op("Shape", [x]), ctx.ints([2]), ctx.ints([rank])])
    ones = ctx.op("Expand", [ctx.const(1.0), ctx.op("Concat", [ctx.ints([1, 1]), spatial], axis=0)])
    count_views = _windows(ctx, ones, 0.0, geometry, sizes, data=x)
    count = count_views[0]
    for view in count_views[1:]:
        count = ctx.op("Add", [count, view])
    return [ctx.op("Div", [total, count])]


def _check_pool(ctx: RewriteContext) -> str | None:
    if ctx.opset < 11:
        return "needs opset >= 11 (Pad with a pads input)"
    geometry = _pool_geometry(ctx)
    if isinstance(geometry, str):
        return geometry
    if ctx.rank(ctx.input(0)) is None:
        return "the rank of the input is unknown"
    if int(np.prod(geometry[0])) > 64:
        return f"kernel {geometry[0]} has more than 64 windows to slice"
    return _float32_data(ctx)


def _rw_expand(ctx: RewriteContext) -> list[ir.Value | None]:
    """One Gather per output axis with indices ``Range(out) * (in != 1)``, computed from ``Shape`` at
    run time: index 0 repeated where the input broadcasts, the identity elsewhere. ExpandGrad, and
    MulGrad for an operand mixing static 1s with symbolic dims, fail at run time on symbolic shapes;
    GatherGrad scatter-adds with the shapes it sees."""
    x, shape = ctx.input(0), ctx.input(1)
    assert x is not None and shape is not None
    rank, target = ctx.rank(x), _expand_rank(ctx)
    assert rank is not None and target is not None
    if target > rank:  # leading 1s, as broadcasting aligns trailing axes
        padded = ctx.op("Concat", [ctx.ints([1] * (target - rank)), ctx.op("Shape", [x])], axis=0)
        x = ctx.op("Reshape", [x, padded])
    shape_now = ctx.op("Shape", [x])
    zero, one = ctx.b.const(0, np.int64, "zero_i"), ctx.b.const(1, np.int64, "one_i")
    y = x
    for axis in range(max(rank, target)):
        pick = [ctx.ints([axis]), ctx.ints([axis + 1])]
        have = ctx.op("Squeeze", [ctx.op("Slice", [shape_now, *pick])])
        asked = ctx.op("Squeeze", [ctx.op("Slice", [shape, ctx.ints([axis - max(rank, target) + target]),
                                                     ctx.ints([axis - max(rank, target) + target + 1])])]) \
            if axis >= max(rank, target) - target else one
        size = ctx.op("Max", [have, asked])
        keep = ctx.op("Cast", [ctx.op("Not", [ctx.op("Equal", [have, one])])], to=ir.DataType.INT64)
        index = ctx.op("Mul", [ctx.op("Range", [zero, size, one]), keep])
        y = ctx.op("Gather", [y, index], axis=axis)
    return [y]


def _expand_rank(ctx: RewriteContext) -> int | None:
    shape = ctx.input(1)
    known = ctx.const_input(1)
    if known is not None:
        return int(known.size)
    if shape is not None and shape.shape is not None and len(shape.shape) == 1 and isinstance(shape.shape[0], int):
        return int(shape.shape[0])
    return None


def _check_expand(ctx: RewriteContext) -> str | None:
    if ctx.rank(ctx.input(0)) is None or _expand_rank(ctx) is None:
        return "the input rank or the length of the shape is unknown"
    if ctx.opset < 13:
        return "needs opset >= 13 (Squeeze without axes, Range)"
    return _float32_data(ctx)


def _rw_conv_transpose(ctx: RewriteContext) -> list[ir.Value | None]:
    """Conv of the zero-interleaved input with the flipped, group-transposed kernel.

    ``ConvTranspose(x, W)`` with stride ``s`` equals ``Conv(up(x), W')`` with stride 1 and
    dilations ``d``, where ``up`` inserts ``s - 1`` zeros between inputs, ``W'`` flips the kernel
    and swaps its channel axes per group, and the padding becomes ``(k - 1) d - pad`` (plus
    ``output_padding`` at the end); negative amounts crop.
    """
    x, w, bias = ctx.input(0), ctx.input(1), ctx.input(2)
    assert x is not None and w is not None
    dims = ctx.static_dims(w)
    wdims = _known(dims) if dims is not None else None
    assert wdims is not None
    c_in, c_out_g, kernel = wdims[0], wdims[1], wdims[2:]
    k = len(kernel)
    group = int(ctx.attr("group", 1))
    strides = [int(s) for s in ctx.attr("strides", [1] * k)]
    dilations = [int(d) for d in ctx.attr("dilations", [1] * k)]
    begins, ends = _transpose_pads(ctx, kernel, strides, dilations)
    # zero-interleave: [N, C, S1, S2] -> [N, C, S1, 1, S2, 1] -> pad -> [N, C, S1*s1, S2*s2]
    y = x
    if any(s > 1 for s in strides):
        positions = [3 + 2 * i for i in range(k)]
        expanded = ctx.unsqueeze(x, positions)
        pads = [0] * (2 + 2 * k) + [0, 0] + [v for s in strides for v in (0, s - 1)]
        expanded = ctx.op("Pad", [expanded, ctx.ints(pads)])
        sizes = [ctx.op("Mul", [ctx.dim(x, 2 + i), ctx.ints([strides[i]])]) for i in range(k)]
        y = ctx.op("Reshape", [expanded, ctx.shape_vector([0, 0, *sizes])])
        ends = [e - (s - 1) for e, s in zip(ends, strides)]
    crop_b = [max(0, -b) for b in begins]
    crop_e = [max(0, -e) for e in ends]
    if any(crop_b) or any(crop_e):
        starts = ctx.ints(crop_b)
        stops = ctx.ints([-c if c else np.iinfo(np.int64).max for c in crop_e])
        y = ctx.op("Slice", [y, starts, stops, ctx.ints(list(range(2, 2 + k)))])
    pads = [max(0, b) for b in begins] + [max(0, e) for e in ends]
    # kernel: flip the spatial axes, [Cin, Cout/g, K] -> [g, Cin/g, Cout/g, K] -> [Cout, Cin/g, K]
    flipped = w
    for axis, size in enumerate(kernel):
        if size > 1:
            flipped = ctx.op("Gather", [flipped, ctx.ints(list(range(size - 1, -1, -1)))], axis=2 + axis)
    grouped = ctx.op("Reshape", [flipped, ctx.ints([group, c_in // group, c_out_g, *kernel])])
    swapped = ctx.op("Transpose", [grouped], perm=[0, 2, 1, *range(3, 3 + k)])
    kernel_w = ctx.op("Reshape", [swapped, ctx.ints([group * c_out_g, c_in // group, *kernel])])
    inputs = [y, kernel_w] + ([bias] if bias is not None else [])
    return [ctx.op("Conv", inputs, dilations=dilations, group=group, pads=pads, strides=[1] * k)]


def _transpose_pads(ctx: RewriteContext, kernel: Sequence[int], strides: Sequence[int],
                    dilations: Sequence[int]) -> tuple[list[int], list[int]]:
    """Conv padding (begin, end) per spatial axis, before zero interleaving is accounted for."""
    k = len(kernel)
    out_pad = [int(p) for p in ctx.attr("output_padding", [0] * k)]
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    output_shape = ctx.attr("output_shape")
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        dims = ctx.static_dims(ctx.input(0))
        assert dims is not None
        pb, pe = [], []
        for i in range(k):
            n = dims[2 + i]
            assert n is not None
            target = int(output_shape[-k + i]) if output_shape is not None else n * strides[i]
            total = strides[i] * (n - 1) + out_pad[i] + (kernel[i] - 1) * dilations[i] + 1 - target
            if auto_pad == "SAME_UPPER":
                pb.append(total // 2)
                pe.append(total - total // 2)
            else:
                pb.append(total - total // 2)
                pe.append(total // 2)
    elif auto_pad == "VALID":
        pb, pe = [0] * k, [0] * k
    else:
        pads = [int(p) for p in ctx.attr("pads", [0] * (2 * k))]
        pb, pe = pads[:k], pads[k:]
    begins = [(kernel[i] - 1) * dilations[i] - pb[i] for i in range(k)]
    ends = [(kernel[i] - 1) * dilations[i] - pe[i] + out_pad[i] for i in range(k)]
    return begins, ends


def _check_conv_transpose(ctx: RewriteContext) -> str | None:
    w = ctx.static_dims(ctx.input(1))
    if w is None or any(d is None for d in w):
        return "the weight shape is not static"
    if ctx.rank(ctx.input(0)) is None:
        return "the rank of the input is unknown"
    if ctx.attr("output_shape") is not None or ctx.attr("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER"):
        dims = ctx.static_dims(ctx.input(0))
        if dims is None or any(d is None for d in dims[2:]):
            return "output_shape/auto_pad with a non-static spatial input size"
    if ctx.opset < 11:
        return "needs opset >= 11 (Pad with a pads input)"
    return _float32_data(ctx)


# -- Einsum -----------------------------------------------------------------------------------------
def _einsum_terms(ctx: RewriteContext) -> tuple[list[str], str] | str:
    """Operand and output subscripts with ``...`` expanded (or the reason that is impossible)."""
    equation = str(ctx.attr("equation")).replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    values = [v for v in ctx.node.inputs if v is not None]
    if len(terms) != len(values) or len(terms) > 2:
        return "more than two operands"
    used = set(re.sub(r"[^a-zA-Z]", "", equation))
    spare = [c for c in string.ascii_letters if c not in used]
    ellipsis_rank = 0
    for term, value in zip(terms, values):
        if "..." in term:
            rank = ctx.rank(value)
            if rank is None:
                return "an operand with '...' has unknown rank"
            ellipsis_rank = max(ellipsis_rank, rank - len(term.replace("...", "")))
    fill = "".join(spare[:ellipsis_rank])
    expanded = []
    for term, value in zip(terms, values):
        if "..." in term:
            rank = ctx.rank(value)
            assert rank is not None
            own = rank - len(term.replace("...", ""))
            term = term.replace("...", fill[ellipsis_rank - own:])
        if len(set(term)) != len(term):
            return f"repeated subscript in '{term}' (a diagonal)"
        rank = ctx.rank(value)
        if rank is not None and rank != len(term):
            return f"subscripts '{term}' do not match the operand rank {rank}"
        expanded.append(term)
    if arrow:
        out = rhs.replace("...", fill)
    else:
        counts = {c: sum(t.count(c) for t in expanded) for c in set("".join(expanded))}
        out = fill + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in fill))
    return expanded, out


def _check_einsum(ctx: RewriteContext) -> str | None:
    parsed = _einsum_terms(ctx)
    if isinstance(parsed, str):
        return parsed
    terms, out = parsed
    if len(terms) == 2 and any(ctx.rank(v) is None for v in ctx.node.inputs if v is not None):
        return "an operand has unknown rank"
    return _float32_data(ctx)


def _rw_einsum(ctx: RewriteContext) -> list[ir.Value | None]:
    """Sum out private letters, then one batched MatMul: ``[batch, left, sum] @ [batch, sum, right]``."""
    parsed = _einsum_terms(ctx)
    assert not isinstance(parsed, str)
    terms, out = parsed
    values = [v for v in ctx.node.inputs if v is not None]

    def reduce_private(value: ir.Value, term: str, others: str) -> tuple[ir.Value, str]:
        private = [i for i, c in enumerate(term) if c not in out and c not in others]
        if not private:
            return value, term
        kept = "".join(c for c in term if c not in [term[i] for i in private])
        return ctx.reduce("ReduceSum", value, private, keepdims=0), kept

    def permute(value: ir.Value, term: str, order: str) -> ir.Value:
        if term == order:
            return value
        return ctx.op("Transpose", [value], perm=[term.index(c) for c in order])

    if len(values) == 1:
        value, term = reduce_private(values[0], terms[0], "")
        result = permute(value, term, out)
        return [result if result is not values[0] else ctx.op("Identity", [result])]
    (a, ta), (b, tb) = reduce_private(values[0], terms[0], terms[1]), reduce_private(values[1], terms[1], terms[0])
    batch = "".join(c for c in out if c in ta and c in tb)
    left = "".join(c for c in ta if c in out and c not in tb)
    right = "".join(c for c in tb if c in out and c not in ta)
    summed = "".join(c for c in ta if c in tb and c not in out)
    a = permute(a, ta, batch + left + summed)
    b = permute(b, tb, batch + summed + right)
    product = ctx.op("MatMul", [_merge(ctx, a, len(batch), [left, summed]), _merge(ctx, b, len(batch), [summed, right])])
    parts: list[ir.Value | int] = [0] * len(batch)
    parts += [ctx.dim(a, len(batch) + i) for i in range(len(left))]
    parts += [ctx.dim(b, len(batch) + len(summed) + i) for i in range(len(right))]
    shaped = ctx.op("Reshape", [product, ctx.shape_vector(parts) if parts else ctx.ints(np.zeros(0, np.int64))])
    return [permute(shaped, batch + left + right, out)]


def _merge(ctx: RewriteContext, value: ir.Value, batch: int, groups: Sequence[str]) -> ir.Value:
    """Reshape ``[batch..., g1..., g2...]`` to ``[batch..., prod(g1), prod(g2)]`` (batch dims copied)."""
    parts: list[ir.Value | int] = [0] * batch
    start = batch
    for group in groups:
        size = _prod_or(ctx, value, start, len(group))
        if size >= 0:
            parts.append(size)
        else:
            dims = ctx.op("Gather", [ctx.op("Shape", [value]), ctx.ints(list(range(start, start + len(group))))], axis=0)
            parts.append(ctx.op("ReduceProd", [dims], keepdims=1))
        start += len(group)
    return ctx.op("Reshape", [value, ctx.shape_vector(parts)])


def _prod_or(ctx: RewriteContext, value: ir.Value, start: int, count: int) -> int:
    """The static product of ``count`` dims from ``start`` (1 when empty), or -1 when unknown."""
    dims = ctx.static_dims(value)
    if count == 0:
        return 1
    known = _known(dims[start:start + count]) if dims is not None else None
    if known is None:
        return -1
    return int(np.prod(known))


# -- Resize / Upsample ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _ResizePlan:
    rank: int
    axes: tuple[int, ...]              # resized axes
    scales: tuple[float, ...] | None   # full-rank scales, or None when sizes drive the op
    sizes: tuple[int, ...] | None      # full-rank sizes (-1: given at run time by ``sizes_value``)
    mode: str
    sizes_value: ir.Value | None = None  # the sizes input, when not a constant
    positions: tuple[int, ...] = ()      # axis -> index into the sizes input


def _resize_plan(ctx: RewriteContext) -> _ResizePlan | str:
    node, x = ctx.node, ctx.input(0)
    rank = ctx.rank(x)
    if rank is None:
        return "the rank of the input is unknown"
    mode = str(ctx.attr("mode", "nearest"))
    if mode not in ("nearest", "linear", "cubic", "bilinear"):
        return f"mode={mode}"
    if ctx.attr("coordinate_transformation_mode") == "tf_crop_and_resize":
        return "coordinate_transformation_mode=tf_crop_and_resize (depends on roi and extrapolation)"
    if ctx.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        return "keep_aspect_ratio_policy other than stretch"
    scales: np.ndarray | None
    sizes: np.ndarray | None = None
    if node.op_type == "Upsample" and "scales" in node.attributes:
        scales = np.asarray(ctx.attr("scales"), np.float32)
    elif node.op_type == "Upsample" or ctx.opset < 11:
        scales = ctx.const_input(1)
        if scales is None:
            return "the scales input is not a constant"
    else:
        scales = ctx.const_input(2) if ctx.input(2) is not None else None
        sizes = ctx.const_input(3) if ctx.input(3) is not None else None
        if scales is not None and scales.size == 0:
            scales = None
        if scales is None and sizes is None:
            if ctx.input(3) is None or (ctx.input(2) is not None and ctx.const_input(2) is None):
                return "the scales input is not a constant"
            return _dynamic_sizes_plan(ctx, rank, mode)
    listed = [int(a) % rank for a in ctx.attr("axes", list(range(rank)))]
    full_scales = full_sizes = None
    dims = ctx.static_dims(x)
    assert dims is not None
    if scales is not None:
        full = [1.0] * rank
        for a, s in zip(listed, scales.reshape(-1)):
            full[a] = float(s)
        full_scales = tuple(full)
        axes = tuple(a for a in range(rank) if full[a] != 1.0)
    else:
        assert sizes is not None
        full_i = [d if d is not None else -1 for d in dims]
        for a, s in zip(listed, sizes.reshape(-1)):
            full_i[a] = int(s)
        if any(s < 0 for s in full_i):
            return "sizes leave an axis of unknown length"
        full_sizes = tuple(full_i)
        axes = tuple(a for a in listed if dims[a] is None or dims[a] != full_i[a])
    return _ResizePlan(rank, axes, full_scales, full_sizes, "linear" if mode == "bilinear" else mode)


def _dynamic_sizes_plan(ctx: RewriteContext, rank: int, mode: str) -> _ResizePlan | str:
    """Sizes computed at run time. Exporters write ``Concat(Slice(Shape(x), 0, k), hw)``
    (PyTorch's ``interpolate(x, size=...)``): the first ``k`` axes keep their size and the others
    are resized, with their sizes read from the sizes tensor at run time."""
    listed = [int(a) % rank for a in ctx.attr("axes", list(range(rank)))]
    kept = _kept_prefix(ctx, ctx.input(3), ctx.input(0), rank)
    if kept is None:
        return "the sizes input is computed at run time and does not show which axes keep their size"
    axes = tuple(a for a in listed if listed.index(a) >= kept)
    return _ResizePlan(rank, axes, None, tuple(-1 for _ in range(rank)), "linear" if mode == "bilinear" else mode,
                       ctx.input(3), tuple(listed.index(a) if a in listed else -1 for a in range(rank)))


def _kept_prefix(ctx: RewriteContext, sizes: ir.Value | None, x: ir.Value | None, rank: int) -> int | None:
    """``k`` if ``sizes`` is ``Concat(Slice(Shape(x), [0], [k]), ...)``, else None."""
    concat = sizes.producer() if sizes is not None else None
    if concat is None or concat.op_type != "Concat" or not concat.inputs or concat.inputs[0] is None:
        return None
    piece = concat.inputs[0].producer()
    if piece is None or piece.op_type != "Slice" or piece.inputs[0] is None:
        return None
    shape = piece.inputs[0].producer()
    if shape is None or shape.op_type != "Shape" or shape.inputs[0] is not x or shape.attributes.get("start") is not None:
        return None

    def const(i: int) -> list[int] | None:
        value = piece.inputs[i] if i < len(piece.inputs) else None
        if value is None:
            return None
        return [int(v) for v in value.const_value.numpy().reshape(-1)] if value.const_value is not None else [-999]

    starts, ends, axes, steps = const(1), const(2), const(3), const(4)
    if starts != [0] or ends is None or len(ends) != 1 or axes not in (None, [0]) or steps not in (None, [1]):
        return None
    end = ends[0] + rank if ends[0] < 0 else ends[0]
    return max(0, min(end, rank))


def _check_resize(ctx: RewriteContext) -> str | None:
    plan = _resize_plan(ctx)
    if isinstance(plan, str):
        return plan
    dims = ctx.static_dims(ctx.input(0))
    if ctx.opset < 11 and (dims is None or any(dims[a] is None for a in plan.axes)):
        return "needs opset >= 11 for a resized axis of dynamic size (Range)"
    return _float32_data(ctx)


def _native_resize(ctx: RewriteContext, plan: _ResizePlan, data: ir.Value, axis: int,
                   basis: tuple[int, ir.Value] | None = None) -> ir.Value:
    """The node's own op on ``data`` resizing only ``axis`` (``basis``: an axis kept at its size)."""
    node = ctx.node
    attrs = [a for name, a in node.attributes.items() if name not in ("axes", "scales")]
    if plan.scales is not None:
        scale = [1.0] * plan.rank
        scale[axis] = plan.scales[axis]
        if node.op_type == "Upsample" and "scales" in node.attributes:
            return ctx.emit("Upsample", [data], attrs + [ir.AttrFloat32s("scales", scale)])[0]
        scale_value = ctx.b.const(np.asarray(scale, np.float32), np.float32, "scales")
        if node.op_type == "Upsample" or ctx.opset < 11:
            return ctx.emit(node.op_type, [data, scale_value], attrs)[0]
        roi = ctx.b.const(np.zeros(0, np.float32), np.float32, "roi") if ctx.opset < 13 else None
        return ctx.emit("Resize", [data, roi, scale_value], attrs)[0]
    assert plan.sizes is not None
    parts: list[ir.Value | int] = [1] * plan.rank
    parts[axis] = _size_of(ctx, plan, axis)
    if basis is not None:
        parts[basis[0]] = basis[1]
    roi = ctx.b.const(np.zeros(0, np.float32), np.float32, "roi") if ctx.opset < 13 else None
    empty = ctx.b.const(np.zeros(0, np.float32), np.float32, "scales") if ctx.opset < 13 else None
    return ctx.emit("Resize", [data, roi, empty, ctx.shape_vector(parts)], attrs)[0]


def _size_of(ctx: RewriteContext, plan: _ResizePlan, axis: int) -> ir.Value | int:
    """The requested output size of ``axis``: an int, or a 1-D slice of the run-time sizes."""
    assert plan.sizes is not None
    if plan.sizes[axis] >= 0 or plan.sizes_value is None:
        return plan.sizes[axis]
    at = plan.positions[axis]
    return ctx.op("Slice", [plan.sizes_value, ctx.ints([at]), ctx.ints([at + 1])])


def _rw_resize(ctx: RewriteContext) -> list[ir.Value | None]:
    """Per resized axis: nearest as a Gather with the native op's indices (the op applied to
    ``Range(n)``), linear/cubic as a MatMul with the native op's weights (the op applied to an
    identity matrix): interpolation is separable, so the weights are onnxruntime's own."""
    plan = _resize_plan(ctx)
    assert not isinstance(plan, str)
    x = ctx.input(0)
    assert x is not None
    y = x
    r = plan.rank
    for axis in plan.axes:
        n = ctx.dim(x, axis)
        layout: list[ir.Value | int] = [1] * r
        if plan.mode == "nearest":
            layout[axis] = n
            iota = ctx.op("Reshape", [_iota(ctx, x, axis, _F32), ctx.shape_vector(layout)])
            index = ctx.op("Cast", [ctx.op("Reshape", [_native_resize(ctx, plan, iota, axis), ctx.ints([-1])])],
                           to=ir.DataType.INT64)
            y = ctx.op("Gather", [y, index], axis=axis)
            continue
        basis = r - 2 if axis == r - 1 else r - 1
        layout[axis], layout[basis] = n, n
        dims = ctx.static_dims(x)
        assert dims is not None
        static = dims[axis]
        if static is not None:
            identity = ctx.b.const(np.eye(static, dtype=np.float32), np.float32, "eye")
        else:
            identity = ctx.op("EyeLike", [ctx.op("Expand", [ctx.const(0.0), ctx.shape_vector([n, n])])])
        eye = ctx.op("Reshape", [identity, ctx.shape_vector(layout)])
        weights = _native_resize(ctx, plan, eye, axis, (basis, n))
        if plan.sizes is None:
            out_n = ctx.dim(weights, axis)
        else:
            size = _size_of(ctx, plan, axis)
            out_n = ctx.ints([size]) if isinstance(size, int) else size
        if axis == r - 1:  # weights laid out [.., n (basis), out]: y @ W
            matrix = ctx.op("Reshape", [weights, ctx.shape_vector([n, out_n])])
            y = ctx.op("MatMul", [y, matrix])
            continue
        matrix = ctx.op("Reshape", [weights, ctx.shape_vector([out_n, n])])  # [out, n]
        if axis == r - 2:
            y = ctx.op("MatMul", [matrix, y])
            continue
        perm = list(range(r))
        perm[axis], perm[r - 2] = r - 2, axis
        y = ctx.op("Transpose", [ctx.op("MatMul", [matrix, ctx.op("Transpose", [y], perm=perm)])], perm=perm)
    if y is x:
        y = ctx.op("Identity", [x])
    return [y]


# -- scatter with reduction=add -----------------------------------------------------------------
def _rw_scatter_add(ctx: RewriteContext) -> list[ir.Value | None]:
    """``data + Scatter(zeros, indices, updates, add)``: the data gradient is the identity, the
    updates gradient the gather of it (onnxruntime's own ignores the reduction for ``data``)."""
    data, indices, updates = ctx.input(0), ctx.input(1), ctx.input(2)
    assert data is not None and indices is not None and updates is not None
    zeros = ctx.op("ConstantOfShape", [ctx.op("Shape", [data])])
    scattered = ctx.emit(ctx.node.op_type, [zeros, indices, updates], list(ctx.node.attributes.values()))[0]
    return [ctx.op("Add", [data, scattered])]


def _check_scatter_add(ctx: RewriteContext) -> str | None:
    if ctx.attr("reduction", "none") != "add":
        return f"reduction={ctx.attr('reduction', 'none')} (only add is rewritten)"
    return _float32_data(ctx)


# -- the rules as data ---------------------------------------------------------------------------
_STRICT = "strict inequalities: gradient 0 at the knees, as in PyTorch"
_NO_BUILDER = "onnxruntime-training 1.19 has no gradient builder for it"


def _activation(op: str, rewrite: Rewrite, covers: str, how: str, forward: str) -> Decomposition:
    return Decomposition(op, covers, f"{_NO_BUILDER}; {how}", forward, _float32_data, rewrite)


_RULES: list[Decomposition] = [
    _activation("HardSigmoid", _rw_hard_sigmoid, "HardSigmoid-6, any alpha/beta",
                f"where(u > 0, where(u < 1, u, 1), 0) with u = alpha x + beta ({_STRICT})", "exact (pinned)"),
    _activation("HardSwish", _rw_hard_swish, "HardSwish-14", "x * HardSigmoid(x; 1/6, 1/2) as above",
                "<= 1 ulp (onnxruntime multiplies by 1/6 in its own order)"),
    _activation("PRelu", _rw_prelu, "PRelu-6..16, slope broadcast to x", "where(x < 0, x * slope, x)", "exact"),
    _activation("Elu", _rw_elu, "Elu-6, any alpha", "where(x < 0, alpha (exp(min(x, 0)) - 1), x)", "<= 2 ulps (exp)"),
    _activation("Selu", _rw_selu, "Selu-6, any alpha/gamma", "gamma where(x > 0, x, alpha exp(min(x, 0)) - alpha)",
                "<= 2 ulps (exp)"),
    _activation("Celu", _rw_celu, "Celu-12, any alpha", "where(x > 0, x, alpha (exp(min(x, 0) / alpha) - 1))",
                "<= 2 ulps (exp)"),
    _activation("Softplus", _rw_softplus, "Softplus-1",
                "x > 0 ? x + log1p(exp(-x)) : log1p(exp(x)), each branch fed only its half (no overflow, "
                "derivative sigmoid(x) everywhere), log1p from Log by the w = 1 + u correction",
                "<= 4 ulps (exp/log)"),
    _activation("Softsign", _rw_softsign, "Softsign-1", "x / (1 + |x|)", "exact"),
    _activation("Mish", _rw_mish, "Mish-18", "x * tanh(softplus(x)) with the Softplus rule",
                "<= 4 ulps (exp/log/tanh)"),
    _activation("ThresholdedRelu", _rw_thresholded_relu, "ThresholdedRelu-10, any alpha", "where(x > alpha, x, 0)",
                "exact"),
    _activation("Shrink", _rw_shrink, "Shrink-9, any lambd/bias",
                "where(x < -lambd, x + bias, where(x > lambd, x - bias, 0))", "exact"),
    Decomposition("Clip", "Clip-6 (bounds as attributes), Clip-11 at opset 11, any Clip whose declared output "
                  "shape has a 0 dimension", "Clip-6's gradient ignores its bounds (identity everywhere), "
                  "Clip-11's gradient uses LessOrEqual, which opset 11 lacks, and ClipGrad reads a declared 0 "
                  "dimension as a real size; where(x < lo, lo, x) then where(. > hi, hi, .) keeps Clip's semantics "
                  "(min > max gives max; an absent bound is +-FLT_MAX, as onnxruntime clamps infinities)", "exact",
                  _float32_data, _rw_clip, exact=True, also_when=_zero_dim_shape),
    Decomposition("Sum", "Sum-6..13, any number of inputs, broadcasting", f"{_NO_BUILDER}; a left fold of Add",
                  "exact (same order as onnxruntime)", _float32_data, _rw_sum),
    Decomposition("Mean", "Mean-6..13, any number of inputs, broadcasting", f"{_NO_BUILDER}; Sum, then / n",
                  "<= 1 ulp", _float32_data, _rw_sum),
    Decomposition("ReduceMax", "ReduceMax-1..20, axes as attribute or constant input, keepdims, "
                  "noop_with_empty_axes", f"{_NO_BUILDER}; m + sum(where(x == m, x - m, 0)) / count with m the "
                  "stopped native ReduceMax: forward exactly m, gradient split evenly among ties (torch.amax)",
                  "exact", _check_reduce, _rw_reduce_max, exact=True),
    Decomposition("ReduceMin", "as ReduceMax", f"{_NO_BUILDER}; as ReduceMax with ReduceMin", "exact",
                  _check_reduce, _rw_reduce_max, exact=True),
    Decomposition("GlobalMaxPool", "GlobalMaxPool-1, known rank", f"{_NO_BUILDER}; the ReduceMax rule over the "
                  "spatial axes", "exact", _both(_check_rank, _float32_data), _rw_global_max_pool, exact=True),
    Decomposition("ReduceL1", "ReduceL1-1..18", f"{_NO_BUILDER}; ReduceSum(|x|)", "<= 1 ulp per term (order)",
                  _check_reduce, _rw_reduce_via_sum),
    Decomposition("ReduceSumSquare", "ReduceSumSquare-1..18", f"{_NO_BUILDER}; ReduceSum(x * x)",
                  "<= 1 ulp per term (order)", _check_reduce, _rw_reduce_via_sum),
    Decomposition("ReduceLogSum", "ReduceLogSum-1..18", f"{_NO_BUILDER}; Log(ReduceSum(x))", "<= 1 ulp per term",
                  _check_reduce, _rw_reduce_via_sum),
    Decomposition("ReduceL2", "ReduceL2-18 without axes and keepdims=0 (the only broken variant)",
                  "the gradient builder fails for keepdims=0 without axes; native op with keepdims=1, then Reshape",
                  "exact", _float32_data, _rw_keepdims_then_reshape, exact=True),
    Decomposition("ReduceLogSumExp", "as ReduceL2", "as ReduceL2", "exact", _float32_data, _rw_keepdims_then_reshape,
                  exact=True),
    Decomposition("InstanceNormalization", "InstanceNormalization-6, known rank", f"{_NO_BUILDER}; (x - mean) / "
                  "sqrt(var + eps) * scale + bias over the spatial axes", "<= 4 ulps of the output scale",
                  _both(_check_rank, _float32_data), _rw_instance_norm),
    Decomposition("GroupNormalization", "GroupNormalization-18 (scale per group) and -21 (per channel), "
                  "stash_type=1", f"{_NO_BUILDER}; reshape to [N, G, -1], normalize as InstanceNormalization",
                  "<= 4 ulps of the output scale", _check_group_norm, _rw_group_norm),
    Decomposition("LayerNormalization", "LayerNormalization-17 with fewer than 3 outputs", "its gradient builder "
                  "reads the optional Mean and InvStdDev outputs ('i < node_->OutputDefs().size()'); the same op "
                  "with all three outputs", "exact", _always, _rw_add_outputs(3), exact=True),
    Decomposition("SoftmaxCrossEntropyLoss", "SoftmaxCrossEntropyLoss-12/13 without the log_prob output",
                  "its gradient builder reads the optional log_prob output; the same op with both outputs",
                  "exact", _always, _rw_add_outputs(2), exact=True),
    Decomposition("MeanVarianceNormalization", "MeanVarianceNormalization-13, any axes", "building its gradient "
                  "fails in the function body's shape inference; ONNX's function body as plain ops",
                  "<= 4 ulps of the output scale", _float32_data, _rw_mvn),
    Decomposition("LRN", "LRN-13, known rank", f"{_NO_BUILDER}; squares padded on the channel axis, the window "
                  "summed by shifted Slices", "<= 4 ulps", _check_lrn, _rw_lrn),
    Decomposition("LpNormalization", "LpNormalization-1, p = 1 or 2", f"{_NO_BUILDER}; x / ||x||_p",
                  "<= 2 ulps", _float32_data, _rw_lp_normalization),
    Decomposition("GlobalLpPool", "GlobalLpPool-2, known rank", f"{_NO_BUILDER}; (sum |x|^p)^(1/p)",
                  "<= 4 ulps", _both(_check_rank, _float32_data), _rw_global_lp_pool),
    Decomposition("BatchNormalization", "BatchNormalization-9..15 with training_mode=0 and unused statistics "
                  "outputs", "onnxruntime differentiates it with batch statistics (the wrong function for "
                  "fine-tuning a deployed model); the inference affine form, statistics stopped",
                  "<= 4 ulps", _check_batch_norm, _rw_batch_norm),
    Decomposition("DepthToSpace", "DepthToSpace-13 (DCR and CRD), 4-D", f"{_NO_BUILDER}; Reshape, Transpose, "
                  "Reshape", "exact", _check_rank4, _rw_depth_to_space, exact=True),
    Decomposition("SpaceToDepth", "SpaceToDepth-13, 4-D", f"{_NO_BUILDER}; Reshape, Transpose, Reshape", "exact",
                  _check_rank4, _rw_depth_to_space, exact=True),
    Decomposition("Pad", "Pad-11..21 reflect/edge/wrap with constant pads (and axes)", "the Pad gradient "
                  "supports constant mode only; one Gather per axis with an index map", "exact", _check_pad,
                  _rw_pad, exact=True),
    Decomposition("Slice", "Slice-13 with negative steps (constant axes and steps)", "SliceGrad fails at run time "
                  "on negative steps (narrowing_error); Gather with the native Slice of Range(n) as indices",
                  "exact", _check_slice, _rw_slice, exact=True),
    Decomposition("Compress", "Compress-11", f"{_NO_BUILDER}; Gather with NonZero(condition)", "exact",
                  _float32_data, _rw_compress, exact=True),
    Decomposition("CastLike", "CastLike-15..21 with a known target type", f"{_NO_BUILDER}; Cast", "exact",
                  _check_cast_like, _rw_cast_like, exact=True),
    Decomposition("CumSum", "CumSum-11/14, constant axis, exclusive/reverse", f"{_NO_BUILDER}; MatMul with a "
                  "0/1 triangular matrix built from Range comparisons", "<= n ulps of the partial sums (order)",
                  _check_cumsum, _rw_cumsum),
    Decomposition("Conv", "Conv-1..11 with auto_pad=SAME_UPPER/SAME_LOWER, static spatial size", "its gradient "
                  "ignores the SAME padding (wrong and nondeterministic); the same Conv with explicit pads",
                  "exact", _check_explicit_pads, _rw_explicit_pads, exact=True),
    Decomposition("AveragePool", "AveragePool-11..19: auto_pad=SAME_* with a static size (explicit pads), "
                  "or symbolic spatial dims (pads, strides, dilations, ceil_mode, count_include_pad)",
                  "its gradient ignores SAME padding, and is wrong with symbolic spatial dims; the same op with "
                  "explicit pads, or the window slices summed / the element count", "<= 1 ulp", _check_pool,
                  _rw_average_pool),
    Decomposition("MaxPool", "MaxPool-8..12 with symbolic spatial dims (pads, strides, dilations, ceil_mode, "
                  "SAME with a static size, Indices output)", "MaxPoolGrad is wrong (all zero) when the "
                  "spatial dims are symbolic; the maximum over strided window slices, first maximum wins",
                  "exact (an all-padding window gives -inf, onnxruntime -FLT_MAX)", _check_pool, _rw_max_pool, exact=True),
    Decomposition("Expand", "Expand-8/13 with symbolic input dims", "ExpandGrad fails at run time when the "
                  "input's dims are symbolic; one Gather per axis with run-time indices", "exact", _check_expand,
                  _rw_expand, exact=True),
    Decomposition("ConvTranspose", "ConvTranspose-11, any strides/dilations/pads/output_padding/group, "
                  "output_shape and auto_pad with a static input size", "onnxruntime has no CPU kernel for "
                  "ConvTransposeGrad; Conv of the zero-interleaved input with the flipped kernel",
                  "<= 1e-6 relative (another summation order)", _check_conv_transpose, _rw_conv_transpose),
    Decomposition("Einsum", "Einsum-12 with one or two operands, '...', no repeated subscript in an operand",
                  f"{_NO_BUILDER}; private subscripts summed out, one batched MatMul, Reshape/Transpose",
                  "<= 1 ulp per term (summation order)", _check_einsum, _rw_einsum),
    Decomposition("Resize", "Resize-10..19 nearest/linear/cubic (antialias, all coordinate modes but "
                  "tf_crop_and_resize), constant scales or sizes, or run-time sizes Concat(Slice(Shape(x), 0, k), "
                  "...) as exporters write them, keep_aspect_ratio_policy=stretch",
                  "onnxruntime has no CPU kernel for ResizeGrad; per axis a Gather (nearest) or MatMul "
                  "(linear/cubic) whose indices/weights the native op computes on Range/identity inputs",
                  "nearest exact; linear/cubic <= 2 ulps of the output scale", _check_resize, _rw_resize),
    Decomposition("Upsample", "Upsample-7/9 nearest/linear, constant scales", f"{_NO_BUILDER}; as Resize",
                  "nearest exact; linear <= 2 ulps of the output scale", _check_resize, _rw_resize),
    Decomposition("ScatterElements", "ScatterElements-16/18 with reduction=add", "onnxruntime's gradient "
                  "ignores the reduction for data; data + ScatterElements(zeros, ...)", "<= 1 ulp per update",
                  _check_scatter_add, _rw_scatter_add),
    Decomposition("ScatterND", "ScatterND-16/18 with reduction=add", "as ScatterElements", "<= 1 ulp per update",
                  _check_scatter_add, _rw_scatter_add),
]
for _op in ("Round", "Floor", "Ceil"):
    _RULES.append(Decomposition(
        _op, f"{_op} on a float path", f"{_NO_BUILDER}; native forward behind an exact stop-gradient: the "
        "derivative is 0 almost everywhere, as PyTorch/TensorFlow autodiff give (straight-through with "
        "straight_through_rounding=True)", "exact", _float32_data, _rw_stopped, exact=True))
for _op, _what in (("Sign", "derivative 0 almost everywhere"), ("Hardmax", "piecewise constant")):
    _RULES.append(Decomposition(_op, f"{_op} on a float path", f"{_NO_BUILDER}; native forward behind an exact "
                                f"stop-gradient ({_what})", "exact", _float32_data, _rw_stopped, exact=True))
for _op, (_formula, _fn) in _DERIVATIVES.items():
    _RULES.append(Decomposition(
        _op, f"{_op}", f"{_NO_BUILDER}; native forward with the derivative {_formula} (with_derivative; the "
        "gradient is 0 where the derivative is infinite)", "exact", _float32_data, _derivative_rule(_fn), exact=True))

DECOMPOSITIONS: Mapping[str, Decomposition] = types.MappingProxyType({rule.op_type: rule for rule in _RULES})
assert len(DECOMPOSITIONS) == len(_RULES), "one rule per op type"


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DecomposeResult(ir.passes.PassResult):
    """What :class:`DecomposeForTrainingPass` did.

    Attributes:
        rewritten: Node name -> op type of every node rewritten.
        not_decomposable: Node name -> one-line reason, for nodes on a gradient path that
            onnxruntime cannot differentiate and no rule rewrote.
        created_initializers: Initializers the rewrites added (constants: never train them).
        values: Original output name -> the value that now carries it (the rewritten node's
            ``ir.Value`` objects are gone: refresh any name -> value map kept across the pass).
    """

    rewritten: dict[str, str] = dataclasses.field(default_factory=dict)
    not_decomposable: dict[str, str] = dataclasses.field(default_factory=dict)
    created_initializers: frozenset[str] = frozenset()
    values: dict[str, ir.Value] = dataclasses.field(default_factory=dict)


class DecomposeForTrainingPass(TypedInPlacePass[DecomposeResult]):
    """Rewrite the nodes on a gradient path that onnxruntime-training 1.19 cannot differentiate.

    A node is on a gradient path when a float value derived from a trainable initializer reaches
    one of its data inputs and one of its float outputs reaches a graph output. It is rewritten
    when its row in the gradient table is broken (or its rule's ``also_when`` holds) and a rule's
    check passes; otherwise it is reported in :attr:`DecomposeResult.not_decomposable`. Nodes in
    subgraphs are left alone.

    Args:
        trainable: Initializers that will be trained (default: every float initializer with more
            than one element, as the lowering picks them).
        table: Gradient table (default: the shipped one).
        rules: Rules by op type (default: :data:`DECOMPOSITIONS`).
        straight_through_rounding: Round/Floor/Ceil get an identity gradient instead of 0.
        bit_exact: Wrap non-exact rewrites so that forward values are bit-identical to the native
            op's (about 70 extra elementwise ops per output).

    Example:
        >>> result = DecomposeForTrainingPass()(model)        # doctest: +SKIP
        >>> result.rewritten, result.not_decomposable          # doctest: +SKIP
        ({'/act/HardSwish': 'HardSwish'}, {})
    """

    def __init__(
        self,
        trainable: Collection[str] | None = None,
        *,
        table: Mapping[tuple[str, int, str], GradientRow] | None = None,
        rules: Mapping[str, Decomposition] | None = None,
        straight_through_rounding: bool = False,
        bit_exact: bool = False,
    ) -> None:
        super().__init__()
        self.trainable = None if trainable is None else frozenset(trainable)
        self.table = table
        self.rules = dict(DECOMPOSITIONS if rules is None else rules)
        if straight_through_rounding:
            for op in ("Round", "Floor", "Ceil"):
                self.rules[op] = dataclasses.replace(
                    self.rules[op], rewrite=_rw_straight_through, exact=True,
                    reason=f"{_NO_BUILDER}; native forward with an identity (straight-through) gradient")
        self.bit_exact = bit_exact

    def requires(self, model: ir.Model) -> None:
        """The graph is topologically sorted: which nodes are on a gradient path is found in one
        walk in graph order."""
        _require_sorted(model.graph, ir.passes.PreconditionError, "sort it first (graph.sort())")

    def ensures(self, model: ir.Model) -> None:
        """Still sorted: rewrites append nodes, and the pass sorts the graph after them."""
        _require_sorted(model.graph, ir.passes.PostconditionError, "after the rewrites")

    def call(self, model: ir.Model) -> DecomposeResult:
        graph = model.graph
        opset = opset_version(model)
        table = self.table if self.table is not None else load_gradient_table()
        on_path = _gradient_nodes(graph, self._sources(graph))
        before = set(graph.initializers)
        imports = dict(model.opset_imports)
        builder: Builder | None = None
        rewritten: dict[str, str] = {}
        missing: dict[str, str] = {}
        values: dict[str, ir.Value] = {}
        for index, node in enumerate(list(graph)):
            if id(node) not in on_path or node.domain not in ("", "ai.onnx"):
                continue
            rule = self.rules.get(node.op_type)
            facts = node_facts(node)
            row = row_for(node.op_type, opset, facts, table=table)
            effective = row.effective(int(facts.get("static_shape") or 0)) if row is not None else None
            broken = effective is not None and effective[0] in BROKEN_STATUSES
            if not broken and not (rule is not None and rule.also_when is not None and rule.also_when(node)):
                continue
            label = _unique(node.name or f"{node.op_type}_{index}", rewritten, missing)
            if rule is None:
                missing[label] = _reason(node, label, effective, "no decomposition exists for it")
                continue
            if builder is None:
                builder = Builder(model, NameScope(model))
            ctx = RewriteContext(builder, node, opset)
            why = rule.check(ctx)
            if why:
                missing[label] = _reason(node, label, effective, f"it cannot be rewritten: {why}")
                continue
            existing = {id(n) for n in graph}
            outputs = list(rule.rewrite(ctx))
            if self.bit_exact and not rule.exact:
                outputs = _bit_exact(ctx, outputs)
            values.update(_take_over(ctx, node, outputs, existing))
            rewritten[label] = node.op_type
        if rewritten:
            graph.sort()
        else:  # the builder registers com.microsoft; leave an untouched model untouched
            model.opset_imports.clear()
            model.opset_imports.update(imports)
        created = frozenset(set(graph.initializers) - before)
        return DecomposeResult(model, bool(rewritten), rewritten, missing, created, values)

    def _sources(self, graph: ir.Graph) -> set[str]:
        if self.trainable is not None:
            return set(self.trainable)
        return {name for name, v in graph.initializers.items()
                if is_float(v) and v.const_value is not None and v.const_value.size > 1}


def _require_sorted(graph: ir.Graph, error: type[ir.passes.InvariantError], hint: str) -> None:
    node = first_unsorted(graph)
    if node is not None:
        raise error(f"the graph is not topologically sorted: node '{node.name}' ({node.op_type}) reads a value "
                    f"produced after it; {hint}")


def _unique(label: str, *taken: Mapping[str, str]) -> str:
    name, i = label, 1
    while any(name in t for t in taken):
        name, i = f"{label}#{i}", i + 1
    return name


def _reason(node: ir.Node, label: str, status: tuple[str, str] | None, why: str) -> str:
    found = f"{status[0]}: {status[1]}" if status is not None and status[1] else (status[0] if status else "?")
    return (f"{node.op_type} node '{label}' has no usable gradient in onnxruntime-training 1.19 ({found}) and "
            f"{why}; freeze the parameters before it (freeze=[...]) or train only the layers after it (train_last_n)")


def _float_values(graph: ir.Graph) -> set[int]:
    """Ids of the float values of ``graph``, inferred where no type is recorded.

    Nodes that passes add (the lowering's among them) often carry no types; a ``Cast`` to an
    integer there is still a stop edge, so types are derived from the structure: the ``to`` of a
    Cast, comparisons and shape ops give non-float outputs, index outputs are integers, and other
    outputs take the type of their (first) data input.
    """
    floats: set[int] = set()
    for value in list(graph.inputs) + list(graph.initializers.values()):
        if value.dtype is None or is_float(value):
            floats.add(id(value))
    for node in graph:
        for k, out in enumerate(node.outputs):
            if out.dtype is not None:
                is_f = is_float(out)
            elif node.op_type == "Cast":
                to = node.attributes.get("to")
                is_f = to is not None and ir.DataType(to.as_int()) in (
                    ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
            elif node.op_type in _NON_FLOAT_OUTPUTS or _INDEX_OUTPUTS.get(node.op_type) == k:
                is_f = False
            elif node.op_type in ("ConstantOfShape", "EyeLike", "RandomNormalLike", "RandomUniformLike"):
                is_f = True
            else:
                i = _TYPE_SOURCE.get(node.op_type, 0)
                source = node.inputs[i] if i < len(node.inputs) else None
                is_f = source is None or id(source) in floats or (source.producer() is None and source.dtype is None
                                                                    and source.const_value is None)
            if is_f:
                floats.add(id(out))
    return floats


def _data_inputs(node: ir.Node, floats: set[int]) -> list[ir.Value]:
    """Float inputs onnxruntime differentiates, and outer values that subgraphs read."""
    skip = _PARAMETER_INPUTS.get(node.op_type, frozenset())
    values = [v for i, v in enumerate(node.inputs) if v is not None and i not in skip]
    for attr in node.attributes.values():
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            subgraphs = [attr.as_graph()] if attr.type == ir.AttributeType.GRAPH else list(attr.as_graphs())
            for sub in subgraphs:
                inner = {id(v) for n in ir.traversal.RecursiveGraphIterator(sub) for v in n.outputs}
                inner |= {id(v) for v in sub.inputs}
                values += [v for n in ir.traversal.RecursiveGraphIterator(sub) for v in n.inputs
                           if v is not None and id(v) not in inner]
    return [v for v in values if id(v) in floats or (v.dtype is not None and is_float(v))]


def _gradient_nodes(graph: ir.Graph, sources: Collection[str]) -> set[int]:
    """Ids of the nodes between ``sources`` and the graph outputs along float values."""
    floats = _float_values(graph)
    reached: set[int] = set()
    for node in graph:  # topological order
        if any(v.name in sources or id(v) in reached for v in _data_inputs(node, floats)):
            reached.update(id(out) for out in node.outputs if id(out) in floats)
    needed: set[int] = {id(v) for v in graph.outputs}
    on_path: set[int] = set()
    for node in reversed(list(graph)):
        if not any(id(out) in needed for out in node.outputs):
            continue
        needed.update(id(v) for v in _data_inputs(node, floats))
        if any(id(out) in reached and id(out) in needed for out in node.outputs):
            on_path.add(id(node))
    return on_path


def _bit_exact(ctx: RewriteContext, outputs: list[ir.Value | None]) -> list[ir.Value | None]:
    """``stop(native) + where(finite(d), d - stop(d), 0)`` per output: native values, ``d``'s gradient."""
    node = ctx.node
    native = ctx.emit(node.op_type, list(node.inputs), list(node.attributes.values()), outputs=len(node.outputs))
    exact: list[ir.Value | None] = []
    for value, reference, original in zip(outputs, native, node.outputs):
        if value is None or not is_float(original):
            exact.append(value)
            continue
        finite = ctx.op("Not", [ctx.op("Or", [ctx.op("IsInf", [value]), ctx.op("IsNaN", [value])])])
        delta = ctx.where(finite, ctx.op("Sub", [value, ctx.stop(value)]), ctx.const(0.0))
        exact.append(ctx.op("Add", [ctx.stop(reference), delta]))
    return exact


def _take_over(ctx: RewriteContext, node: ir.Node, outputs: Sequence[ir.Value | None],
               existing: set[int]) -> dict[str, ir.Value]:
    """Give each new output the original output's name, uses and graph-output slot; drop ``node``."""
    graph = ctx.b.graph
    taken: dict[str, ir.Value] = {}
    if len(outputs) != len(node.outputs):
        raise AssertionError(f"rule for {node.op_type} returned {len(outputs)} outputs for {len(node.outputs)}")
    for old, new in zip(node.outputs, outputs):
        if new is None:
            if old.uses() or old.is_graph_output():
                raise AssertionError(f"rule for {node.op_type} dropped a used output '{old.name}'")
            continue
        if not old.name and not old.uses() and not old.is_graph_output():
            continue  # an absent optional output: the new one keeps its fresh name
        producer = new.producer()
        if producer is None or id(producer) in existing:
            new = ctx.op("Identity", [new])
        if old.type is not None:
            new.type = old.type
        if old.shape is not None and not any(d == 0 for d in old.shape):  # 0: a stale 'unknown' marker
            new.shape = old.shape
        name = old.name
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        old.name = None
        new.name = name
        if name:
            taken[name] = new
    graph.remove(node, safe=True)
    return taken
