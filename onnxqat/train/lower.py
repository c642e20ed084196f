"""Lower a calibrated simulation to a differentiable forward graph with its loss.

QuantizeLinear has no gradient in onnxruntime, so the QDQ pairs of the simulation become:

* activations, fixed encodings: ``com.microsoft::FakeQuant`` (straight-through gradient to ``x``,
  zero outside the clamp range);
* activations, range learning: ``(STE(clip(x / s + zp, qmin, qmax)) - zp) * s`` with trainable
  ``s = s0 * t`` and zero point ``zp`` (rounded straight-through), which gives the LSQ/AIMET
  gradients: ``dL/dx = g`` inside the range and 0 outside, ``dL/ds = g * (round(x/s) - x/s)``
  inside and ``g * (bound - zp)`` outside;
* weights: the encoding is recomputed from the current weights in the graph at every step (per
  channel where chosen) behind an exact stop-gradient, and applied with a straight-through round;
* int32 biases: ``STE(b / (s_in * s_w)) * (s_in * s_w)``, so training sees the deployed bias.

Fake-quant is skipped where the value is already on its quantizer's grid (outputs of data-movement
ops and Concat tied to their inputs). Remaining BatchNormalization nodes become their inference
affine form (statistics frozen). The loss is appended and becomes the first graph output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping

import numpy as np
import onnx_ir as ir

from onnxqat.errors import ConfigError, ModelError
from onnxqat.graph import NameScope, const_array, is_float, name_of, remove_dead_nodes, values_by_name
from onnxqat import ops
from onnxqat.plan import ActivationQuantizer, IntegerForm, ParamQuantizer, QuantPlan
from onnxqat.qparams import MIN_SCALE, Encoding, integer_form_constants, prelu_form_constants
from onnxqat.train.builder import CONTRIB, Builder
from onnxqat.train.decompose import DecomposeForTrainingPass
from onnxqat.train.options import Loss

__all__ = ["LossSource", "LossSpec", "RangeParams", "TrainingGraph", "binary_output", "loss_source", "lower_for_training"]


# Half a step minus this is how far past the grid the straight-through band reaches (float32 has
# room for it up to 16-bit grids: round(65535 + 0.5 - 2^-6) is still 65535).
_BAND = 2.0**-6

# Smallest value passed through the exact stop-gradient (its domain is [2^-100, 2^100]); far
# below any scale an encoding can have.
_SG_FLOOR = 1e-30



@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Which loss to train with, on which model output.

    Attributes:
        kind: ``cross_entropy`` (integer labels; binary cross-entropy with labels in [0, 1] on a
            Sigmoid output or a one-channel class axis), ``mse`` (float targets) or ``distill``
            (match the float model: soft cross-entropy on logits for classifiers, the Bernoulli
            KL divergence on the logits of a Sigmoid output, MSE otherwise).
        output_index: Model output the loss reads. If it is produced by Softmax/LogSoftmax (through
            Identity nodes), the logits feeding it are used for cross-entropy and distillation; if
            by Sigmoid, the logits feeding it are used for (binary) cross-entropy and distillation.
        label_key: Batch key of labels (``cross_entropy``).
        target_key: Batch key of targets (``mse``).
        temperature: Distillation temperature.
    """

    kind: str = "cross_entropy"
    output_index: int = 0
    label_key: str = "label"
    target_key: str = "target"
    temperature: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Loss.parse(self.kind, "loss").value)
        if not self.temperature > 0:
            raise ConfigError(f"distillation temperature must be > 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class RangeParams:
    """Trainable parameters of one activation quantizer under range learning.

    ``scale = initial_scale * exp(scale_gain * u)`` and
    ``zero_point = clip(round(initial_zero_point + zero_point_gain * v), qmin, qmax)`` with ``u`` and
    ``v`` the trained tensors (both start at 0). The gains set how fast encodings move relative to
    the weights under a scale-free optimizer such as Adam: one step of size ``lr`` changes the
    scale by about ``scale_gain * lr`` relatively, and the zero point by ``zero_point_gain * lr``
    quantization steps.
    """

    quantizer: str
    scale_param: str
    zero_point_param: str | None  # None when the zero point is not learned
    initial_scale: float
    initial_zero_point: int
    scale_gain: float
    zero_point_gain: float

    def scale(self, u: float) -> np.float32:
        return np.float32(max(np.float32(self.initial_scale) * np.exp(np.float32(self.scale_gain * u)), MIN_SCALE))

    def zero_point(self, v: float, qmin: int, qmax: int) -> int:
        return int(np.clip(np.rint(np.float32(self.initial_zero_point + self.zero_point_gain * v)), qmin, qmax))


@dataclasses.dataclass(frozen=True)
class TrainingGraph:
    """The lowered forward graph: outputs ``[loss, prediction]``.

    Attributes:
        model: Forward model with the loss as its first output.
        trainable: Initializers that receive gradients.
        feeds: Graph input name -> batch key (model inputs, labels, targets).
        teacher_input: Graph input fed with the float model's ``teacher_source`` (distillation).
        teacher_source: Tensor of the float model the teacher input reads.
        prediction: Name of the second output (logits or the model output).
        range_params: Range-learning parameters per activation quantizer.
        class_axis: Class axis of the prediction (cross-entropy and distillation).
        decomposed: Node name -> op type of the nodes rewritten into differentiable ops.
        binary: The loss is binary cross-entropy on the prediction (logits) with float labels in
            [0, 1] of the prediction's shape.
        sigmoid: The model output is ``Sigmoid(prediction)`` (else the prediction is the output).
        weight_input: Graph input of the per-sample loss weights (shape ``[N]``, axis 0 of the
            prediction): the loss is ``sum_i w_i * mean(loss of sample i)``; ``1/N`` each is the
            mean over the batch, padding rows of a micro-batch get 0.
    """

    model: ir.Model
    trainable: tuple[str, ...]
    feeds: Mapping[str, str]
    teacher_input: str | None
    teacher_source: str | None
    prediction: str
    range_params: tuple[RangeParams, ...]
    class_axis: int = 1
    decomposed: Mapping[str, str] = dataclasses.field(default_factory=dict)
    binary: bool = False
    sigmoid: bool = False
    weight_input: str = ""


def lower_for_training(
    float_model: ir.Model,
    plan: QuantPlan,
    encodings: Mapping[str, Encoding],
    loss: LossSpec,
    *,
    range_learning: bool = False,
    encoding_lr_scale: float = 10.0,
    frozen: Collection[str] = (),
    freeze_ranges: bool = False,
    fixed_weights: Collection[str] = (),
) -> TrainingGraph:
    """Build the training forward graph (see module docstring).

    ``frozen``: initializer names not to train; ``freeze_ranges``: keep the range-learning
    parameters (scales and zero points) fixed too; ``fixed_weights``: weight quantizers whose
    encodings stay as given (a rounding search chose them) instead of following the weights.
    """
    return _Lowering(float_model, plan, encodings, loss, range_learning, encoding_lr_scale, frozen,
                     freeze_ranges, fixed_weights).run()


class _Lowering:
    def __init__(
        self, float_model: ir.Model, plan: QuantPlan, encodings: Mapping[str, Encoding],
        loss: LossSpec, range_learning: bool, encoding_lr_scale: float, frozen: Collection[str],
        freeze_ranges: bool = False, fixed_weights: Collection[str] = (),
    ) -> None:
        self.freeze_ranges = freeze_ranges
        self.fixed_weights = set(fixed_weights)
        self.encoding_lr_scale = encoding_lr_scale
        self.model = float_model.clone()
        self.original_params = {
            n for n, v in self.model.graph.initializers.items() if is_float(v) and v.const_value is not None
        }
        self.plan = plan
        self.encodings = encodings
        self.loss = loss
        self.range_learning = range_learning
        self.frozen = set(frozen)
        self.b = Builder(self.model, NameScope(self.model))
        self.values = values_by_name(self.model.graph)
        self.act_scale: dict[str, ir.Value] = {}
        self.weight_scale: dict[str, ir.Value] = {}
        self.range_params: list[RangeParams] = []
        self.stats: set[str] = set()
        self.decomposed: dict[str, str] = {}
        self.weight_input = ""
        self.source = loss_source(float_model, loss)

    # -- activations -----------------------------------------------------------------------------
    def on_grid(self, tensor: str, q: ActivationQuantizer) -> bool:
        value = self.values[tensor]
        producer = value.producer()
        kind = ops.rule(producer.op_type, producer.domain).kind if producer is not None else None
        if producer is None or kind not in (ops.OpKind.DATA_MOVEMENT, ops.OpKind.SHARED):
            return False
        inputs = [v for v in producer.inputs if is_float(v)]
        if kind is ops.OpKind.DATA_MOVEMENT:
            inputs = inputs[:1]
        return bool(inputs) and all(v is not None and self.plan.activation_of(name_of(v)) is q for v in inputs)

    def implied_clamp(self, tensor: str, enc: Encoding) -> ir.Value | None:
        """Input of a Relu/Clip whose effect the quantizer's own clamp already has, else None.

        ``FQ(Relu(x)) == FQ(x)`` when the grid starts at 0 (zero point at its minimum), and
        ``FQ(Clip(x, lo, hi)) == FQ(x)`` when the grid lies within ``[lo, hi]``; onnxruntime drops
        such ops from the deployed model too. Under range learning only Relu is dropped (its zero
        point is then not learned), since a learned scale may outgrow a Clip's bound.
        """
        producer = self.values[tensor].producer()
        if producer is None or producer.domain not in ("", "ai.onnx") or (enc.symmetric and enc.signed):
            return None
        lo_grid, hi_grid = float(enc.min), float(enc.max)
        if producer.op_type == "Relu" and lo_grid == 0.0:
            return producer.inputs[0]
        if producer.op_type == "Clip" and not self.range_learning:
            bounds = [producer.inputs[i] if len(producer.inputs) > i else None for i in (1, 2)]
            if any(b is not None and const_array(b) is None for b in bounds):
                return None
            lo_bound, hi_bound = (const_array(b) for b in bounds)  # None exactly where a bound is absent
            lo = float(lo_bound) if lo_bound is not None else -np.inf
            hi = float(hi_bound) if hi_bound is not None else np.inf
            if lo <= lo_grid and hi_grid <= hi:
                return producer.inputs[0]
        return None

    def clamp_to_grid(self, u: ir.Value, enc: Encoding, base: str, offset: int = 0) -> ir.Value:
        """Clip to the band that rounds onto ``[qmin, qmax]``.

        The band reaches just short of half a step beyond the grid, so the gradient passes exactly
        where FakeQuant's mask passes it (``round(u)`` on the grid); a weight at the edge of its
        range (``u == qmax``) keeps its gradient, which a clip at ``qmax`` itself would cut.
        """
        lo = self.b.const(enc.qmin - offset - 0.5 + _BAND, name="grid_lo")
        hi = self.b.const(enc.qmax - offset + 0.5 - _BAND, name="grid_hi")
        return self.b.op("Clip", [u, lo, hi], base)

    def activation(self, q: ActivationQuantizer) -> None:
        enc = self.encodings[q.name]
        if q.derived_from is not None:
            # x * k of a fake-quantized x is on the derived grid already: only the scale is needed
            source, factor = q.derived_from
            self.act_scale[q.name] = self.b.op("Mul", [self.act_scale[source], self.b.const(factor, name="derived")], q.name)
            return
        sources = {t: self.implied_clamp(t, enc) for t in q.tensors}
        if self.range_learning and q.spec.fixed_range is None:
            gain = self.encoding_lr_scale
            u = self.b.param(f"{q.name}.log_scale", np.array(0.0))
            s = self.b.op("Max", [self.b.op("Mul", [self.b.op("Exp", [self.b.op("Mul", [u, self.b.const(gain, name="gain")], q.name)], q.name),
                                                    self.b.const(float(enc.scale), name="s0")], q.name),
                                  self.b.const(MIN_SCALE, name="min_scale")], q.name)
            zp_value = self.b.const(float(enc.zero_point), name="zero_point")
            zp_name: str | None = None
            zp_gain = gain * (enc.qmax - enc.qmin) / 2
            if not any(sources.values()) and not enc.symmetric:
                v = self.b.param(f"{q.name}.zero_point_offset", np.array(0.0))
                zp_name = name_of(v)
                zp = self.b.op("Add", [self.b.op("Mul", [v, self.b.const(zp_gain, name="zp_gain")], q.name),
                                       self.b.const(float(enc.zero_point), name="zp0")], q.name)
                zp_value = self.b.op("Clip", [self.b.ste_round(zp, q.name, bounded=True), self.b.const(float(enc.qmin), name="qmin"),
                                              self.b.const(float(enc.qmax), name="qmax")], q.name)
            self.range_params.append(RangeParams(
                q.name, name_of(u), zp_name, float(enc.scale), int(enc.zero_point), gain, zp_gain,
            ))
            self.act_scale[q.name] = s
            learned = {q.name}
        else:
            learned = set()
            zp_name = None
            s = self.b.const(float(enc.scale), name="scale")
            zp_value = self.b.const(float(enc.zero_point), name="zero_point")
            self.act_scale[q.name] = s
        for tensor in q.tensors:
            if self.on_grid(tensor, q):
                continue
            value = self.values[tensor]
            users = list(value.uses())
            data = sources[tensor] or value
            if q.name in learned:
                out = self.learned_fake_quant(data, s, zp_value, zp_name is not None, enc, tensor)
            else:
                out = self.b.op("FakeQuant", [data, s, zp_value], tensor, domain=CONTRIB, outputs=2,
                                quant_min=enc.qmin, quant_max=enc.qmax)
            out.type, out.shape = value.type, value.shape
            for use in users:
                use.node.replace_input_with(use.idx, out)
            self.values[tensor] = out

    def learned_fake_quant(self, x: ir.Value, s: ir.Value, zp: ir.Value, zp_learned: bool, enc: Encoding,
                           base: str) -> ir.Value:
        """Fake-quant with a trained scale (and zero point) whose backward keeps little memory.

        The value and the gradient to ``x`` come from ``FakeQuant`` on the current encoding behind a
        stop-gradient (it keeps a one-byte mask for its backward). The LSQ gradients are added with
        terms that are zero in value: ``(s - sg(s)) * h`` with ``h = (y - x * inside) / s``, which is
        ``round(x/s) - x/s`` inside the grid and ``bound - zp`` outside, and, for a learned zero
        point, ``Where(inside, 0, (zp - sg(zp)) * -s)``. ``h`` is cut from autodiff by an int64
        round trip at 2^-20 resolution (it only scales the encoding gradients), so the backward
        keeps ``h`` and the mask: 5 bytes per element, where the Div/Clip/round/Mul chain kept
        three float tensors plus their gradient temporaries. The activation-sized values get their
        static shapes here (onnx shape inference stops at ``FakeQuant``).
        """
        b = self.b

        def full(v: ir.Value, dtype: ir.DataType = ir.DataType.FLOAT) -> ir.Value:
            v.type, v.shape = ir.TensorType(dtype), x.shape
            return v

        def scalar(v: ir.Value) -> ir.Value:
            v.type, v.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([])
            return v

        s_fixed = scalar(b.stop_gradient(s, base))
        zp_fixed = zp
        if zp_learned:
            lift = b.const(float(1 - enc.qmin), name="zp_lift")  # zp - qmin + 1 >= 1: the stop-gradient's domain
            zp_fixed = scalar(b.op("Sub", [b.stop_gradient(b.op("Add", [zp, lift], base), base), lift], base))
        y = full(b.op("FakeQuant", [x, s_fixed, zp_fixed], base, domain=CONTRIB, outputs=2,
                      quant_min=enc.qmin, quant_max=enc.qmax))
        producer = y.producer()
        assert producer is not None
        inside = full(producer.outputs[1], ir.DataType.BOOL)
        inside_f = full(b.op("Cast", [inside], base, to=ir.DataType.FLOAT))
        h = full(b.op("Div", [full(b.op("Sub", [y, full(b.op("Mul", [x, inside_f], base))], base)), s_fixed], base))
        resolution = 2.0**20  # |h| <= 2^16 on any grid: h * 2^20 fits int64 exactly
        h = full(b.op("Cast", [full(b.op("Mul", [h, b.const(resolution, name="h_res")], base))], base,
                      to=ir.DataType.INT64), ir.DataType.INT64)
        h = full(b.op("Mul", [full(b.op("Cast", [h], base, to=ir.DataType.FLOAT)),
                              b.const(1.0 / resolution, name="h_inv_res")], base))
        out = full(b.op("Add", [y, full(b.op("Mul", [scalar(b.op("Sub", [s, s_fixed], base)), h], base))], base))
        if zp_learned:
            push = scalar(b.op("Mul", [scalar(b.op("Sub", [zp, zp_fixed], base)),
                                       scalar(b.op("Neg", [s_fixed], base))], base))
            # broadcast first: Add reduces its gradient, Where's gradient in onnxruntime-training 1.19
            # does not (and Expand's fails on these shapes). The zeros are computed at run time:
            # ConstantOfShape of a static shape would be folded into one constant per quantizer.
            zeros = full(b.op("Mul", [inside_f, b.const(0.0, name="zero")], base))
            push = full(b.op("Add", [push, zeros], base))
            out = full(b.op("Add", [out, full(b.op("Where", [inside, b.const(0.0, name="zero"), push], base))], base))
        return out

    # -- weights and biases ----------------------------------------------------------------------
    def weight(self, p: ParamQuantizer) -> None:
        value = self.values[p.name]
        enc = self.encodings[p.name]
        rank = len(value.shape) if value.shape is not None else 0
        axes = [i for i in range(rank) if p.spec.axis is None or i != p.spec.axis % rank]
        base = p.name
        tiny = self.b.const(_SG_FLOOR, name="sg_floor")
        min_scale = self.b.const(MIN_SCALE, name="min_scale")
        steps_total = float((1 << enc.bitwidth) - 1)
        zp = None
        if p.name in self.fixed_weights:
            shape = [1] * rank
            if enc.axis is not None:
                shape[enc.axis % rank] = -1
            s = self.b.const(enc.scale.astype(np.float32).reshape(shape), name="fixed_scale")
            if not enc.symmetric:
                zp = self.b.const(enc.zero_point.astype(np.float32).reshape(shape), name="fixed_zp")
        elif enc.symmetric and p.spec.symmetric_scale == "aimet" and not p.spec.strict_symmetric:
            # aimet's grid (qparams.compute_encoding): max(-min / 2^(b-1), max / (2^(b-1) - 1))
            half = float(1 << (enc.bitwidth - 1))
            zero = self.b.const(0.0, name="zero")
            neg_lo = self.b.op("Neg", [self.b.op("Min", [self.b.reduce("ReduceMin", value, axes, base), zero], base)],
                               base)
            hi = self.b.op("Max", [self.b.reduce("ReduceMax", value, axes, base), zero], base)
            wide = self.b.op("Max", [self.b.op("Div", [neg_lo, self.b.const(half, name="half")], base),
                                     self.b.op("Div", [hi, self.b.const(half - 1, name="steps")], base)], base)
            wide = self.b.stop_gradient(self.b.op("Max", [wide, tiny], base), base)
            s = self.b.op("Max", [wide, min_scale], base)
            if p.spec.pair_limit is not None and enc.signed:
                s = self.b.op("Max", [s, self.pair_scale(value, p, rank, s.shape, base)], base)
        elif enc.symmetric:
            absmax = self.b.reduce("ReduceMax", self.b.op("Abs", [value], base), axes, base)
            absmax = self.b.stop_gradient(self.b.op("Max", [absmax, tiny], base), base)
            steps = float((1 << (enc.bitwidth - 1)) - 1)
            s = self.b.op("Max", [self.b.op("Div", [absmax, self.b.const(steps, name="steps")], base), min_scale], base)
            if p.spec.pair_limit is not None and enc.signed:
                s = self.b.op("Max", [s, self.pair_scale(value, p, rank, s.shape, base)], base)
        else:
            zero = self.b.const(0.0, name="zero")
            lo = self.b.op("Min", [self.b.reduce("ReduceMin", value, axes, base), zero], base)
            hi = self.b.op("Max", [self.b.reduce("ReduceMax", value, axes, base), zero], base)
            neg_lo = self.b.stop_gradient(self.b.op("Max", [self.b.op("Neg", [lo], base), tiny], base), base)
            hi = self.b.stop_gradient(self.b.op("Max", [hi, tiny], base), base)
            span = self.b.op("Add", [hi, neg_lo], base)
            s = self.b.op("Max", [self.b.op("Div", [span, self.b.const(steps_total, name="steps")], base), min_scale], base)
            zp = self.b.op("Clip", [self.b.op("Round", [self.b.op("Div", [neg_lo, s], base)], base), zero,
                                    self.b.const(steps_total, name="steps")], base)
        u = self.b.op("Div", [value, s], base)
        if zp is not None:
            u = self.b.op("Add", [u, zp], base)
        r = self.b.ste_round(self.clamp_to_grid(u, enc, base), base, bounded=True)
        if zp is not None:
            r = self.b.op("Sub", [r, zp], base)
        out = self.b.op("Mul", [r, s], base)
        out.type, out.shape = value.type, value.shape
        self.weight_scale[p.name] = s
        for use in list(value.uses()):
            if use.node.name in p.consumers and ops.rule(use.node.op_type, use.node.domain).weight is not None:
                use.node.replace_input_with(use.idx, out)

    def pair_scale(self, value: ir.Value, p: ParamQuantizer, rank: int, like: ir.Shape | None, base: str) -> ir.Value:
        """:func:`~onnxqat.qparams.pair_safe_scale` in the graph, shaped like the weight scale.

        ``(a1 + a2) / (limit - 0.5)`` per output channel from TopK of each sign's magnitudes,
        behind a stop-gradient; the largest over channels for a per-tensor weight. The same float32
        operations as the numpy reference, so the encodings agree bit for bit.
        """
        b = self.b
        assert p.spec.pair_axis is not None and p.spec.pair_limit is not None
        axis = p.spec.pair_axis % rank
        rows = value
        if axis != 0:
            rows = b.op("Transpose", [rows], base, perm=[axis] + [i for i in range(rank) if i != axis])
        rows = b.op("Reshape", [rows, b.const(np.array([0, -1]), np.int64, "rows_shape")], base)
        zero = b.const(0.0, name="zero")
        assert value.shape is not None
        row_length = int(np.prod([d for i, d in enumerate(value.shape.numpy()) if i != axis]))
        sums = []
        for signed in (rows, b.op("Neg", [rows], base)):
            mag = b.op("Max", [signed, zero], base)
            if row_length >= 2:
                top = b.op("TopK", [mag, b.const(np.array([2]), np.int64, "two")], base, outputs=2, axis=1)
                sums.append(b.reduce_sum(top, 1, base))
            else:
                sums.append(b.op("Reshape", [mag, b.const(np.array([-1]), np.int64, "flat")], base))
        need = b.op("Div", [b.op("Max", sums, base), b.const(float(p.spec.pair_limit) - 0.5, name="pair_div")], base)
        if p.spec.axis is None:
            need = b.reduce("ReduceMax", need, [0], base)
            need = b.op("Reshape", [need, b.const(np.array([], np.int64), np.int64, "scalar")], base)
        else:
            shape = [1] * rank
            shape[p.spec.axis % rank] = -1
            need = b.op("Reshape", [need, b.const(np.array(shape), np.int64, "pc_shape")], base)
        return b.stop_gradient(b.op("Max", [need, b.const(_SG_FLOOR, name="sg_floor")], base), base)

    def integer_forms(self) -> None:
        """HardSigmoid/HardSwish as deployed: ``round(clip((x + offset) / grid)) * read`` (times
        ``x``), with a straight-through gradient inside the grid, zero outside (the clip)."""
        nodes = {n.name: n for n in self.model.graph}
        for form in self.plan.integer_forms:
            node = nodes[form.node]
            x = node.inputs[0]
            assert x is not None
            if form.op_type == "PRelu":
                self.prelu_form(node, form)
                continue
            c = integer_form_constants(form.alpha, form.beta)
            gate_grid = Encoding(np.asarray(c.grid_scale, np.float32), np.asarray(0, np.int64), 8, False, False)
            base = form.node
            t = self.b.op("Add", [x, self.b.const(float(c.offset), name="form_offset")], base)
            u = self.b.op("Div", [t, self.b.const(float(c.grid_scale), name="form_grid")], base)
            r = self.b.ste_round(self.clamp_to_grid(u, gate_grid, base), base, bounded=True)
            out = self.b.op("Mul", [r, self.b.const(float(c.read_scale), name="form_read")], base)
            if form.op_type == "HardSwish":
                out = self.b.op("Mul", [x, out], base)
            value = node.outputs[0]
            out.type, out.shape = value.type, value.shape
            value.replace_all_uses_with(out, replace_graph_outputs=True)
            self.model.graph.remove(node, safe=True)

    def prelu_form(self, node: ir.Node, form: IntegerForm) -> None:
        """PRelu as deployed: ``x + sum round(clip(d x / s)) s`` on each part's grid, straight-through
        inside it (the requantization between two parts is left out)."""
        x, slope = node.inputs[0], ops.prelu_slope(node)
        in_q = self.plan.activation_of(form.input)
        assert x is not None and x.shape is not None and in_q is not None and not isinstance(slope, ops.Reason)
        out = x
        for part in prelu_form_constants(slope, self.encodings[in_q.name]):
            grid = Encoding(np.asarray(part.grid_scale, np.float32), np.asarray(part.grid_zero_point, np.int64), 8, False, False)
            d = (part.weight_q.astype(np.float32) * part.weight_scale).reshape([-1] + [1] * (len(x.shape) - 2))
            u = self.b.op("Add", [self.b.op("Div", [self.b.op("Mul", [x, self.b.const(d, name="prelu_d")], form.node),
                                                    self.b.const(float(part.grid_scale), name="prelu_grid")], form.node),
                                  self.b.const(float(part.grid_zero_point), name="prelu_zp")], form.node)
            r = self.b.ste_round(self.clamp_to_grid(u, grid, form.node), form.node, bounded=True)
            r = self.b.op("Sub", [r, self.b.const(float(part.grid_zero_point), name="prelu_zp")], form.node)
            out = self.b.op("Add", [out, self.b.op("Mul", [r, self.b.const(float(part.grid_scale), name="prelu_grid")], form.node)],
                            form.node)
        value = node.outputs[0]
        out.type, out.shape = value.type, value.shape
        value.replace_all_uses_with(out, replace_graph_outputs=True)
        self.model.graph.remove(node, safe=True)

    def biases(self) -> None:
        for bq in self.plan.biases:
            value = self.values[bq.name]
            use = next(u for u in value.uses() if u.node.name == bq.node)
            s_w = self.b.op("Reshape", [self.weight_scale[bq.weight_quantizer], self.b.const(np.array([-1]), np.int64, "flat")], bq.name)
            s_b = self.b.op("Mul", [self.act_scale[bq.input_quantizer], s_w], bq.name)
            if self.range_learning:
                s_b = self.b.stop_gradient(s_b, bq.name)
            q = self.b.ste_round(self.b.op("Div", [value, s_b], bq.name), bq.name)
            out = self.b.op("Mul", [q, s_b], bq.name)
            out.type, out.shape = value.type, value.shape
            use.node.replace_input_with(use.idx, out)  # input 2 of Conv/Gemm, the bias operand of a Linear's Add

    def batchnorms(self) -> None:
        for node in [n for n in self.model.graph if n.op_type == "BatchNormalization"]:
            x, gamma, beta, mean, var = node.inputs[:5]
            eps = node.attributes.get("epsilon")
            eps_value = eps.as_float() if eps is not None else 1e-5
            rank = len(x.shape) if x is not None and x.shape is not None else 4
            shape = self.b.const(np.array([-1] + [1] * (rank - 2)), np.int64, "bn_shape")
            base = node.name or "bn"
            a = self.b.op("Div", [gamma, self.b.op("Sqrt", [self.b.op("Add", [var, self.b.const(eps_value, name="eps")], base)], base)], base)
            c = self.b.op("Sub", [beta, self.b.op("Mul", [mean, a], base)], base)
            y = self.b.op("Add", [self.b.op("Mul", [x, self.b.op("Reshape", [a, shape], base)], base),
                                  self.b.op("Reshape", [c, shape], base)], base)
            out = node.outputs[0]
            y.type, y.shape = out.type, out.shape
            out.replace_all_uses_with(y, replace_graph_outputs=True)
            self.stats.update(name_of(v) for v in (mean, var) if v is not None)

    # -- loss ------------------------------------------------------------------------------------
    def loss_graph(self) -> tuple[ir.Value, ir.Value, dict[str, str], str | None]:
        source = self.source
        logits = self.values[source.tensor]  # after fake-quant insertion
        b = self.b
        feeds: dict[str, str] = {}
        teacher = None
        rank = source.rank
        # the loss is a weighted sum of per-sample means, weights fed per batch (1/N each for the
        # mean over a batch of N; 1/N and 0 for the rows of a micro-batch and its padding)
        weight = self.new_input("sample_weight", ir.DataType.FLOAT,
                                ir.Shape([logits.shape[0] if logits.shape is not None and len(logits.shape) else "batch"]))
        self.weight_input = name_of(weight)
        if self.loss.kind == "cross_entropy" and source.binary:
            labels = self.new_input(self.loss.label_key, ir.DataType.FLOAT, logits.shape)
            feeds[name_of(labels)] = self.loss.label_key
            loss = self.weighted_mean(_binary_cross_entropy(b, logits, labels), rank, weight)
        elif self.loss.kind == "cross_entropy":
            labels = self.new_input(self.loss.label_key, ir.DataType.INT64, ir.Shape([f"d{i}" for i in range(rank - 1)]))
            feeds[name_of(labels)] = self.loss.label_key
            scores = _move_axis_to_1(b, logits, source.class_axis, rank, "loss")
            elements = b.op("SoftmaxCrossEntropyLoss", [scores, labels], "loss", outputs=2, reduction="none")
            loss = self.weighted_mean(elements, rank - 1, weight)
        elif self.loss.kind == "mse":
            target = self.new_input(self.loss.target_key, logits.dtype, logits.shape)
            feeds[name_of(target)] = self.loss.target_key
            diff = b.op("Sub", [logits, target], "loss")
            loss = self.weighted_mean(b.op("Mul", [diff, diff], "loss"), rank, weight)
        else:
            teacher_value = self.new_input("teacher", logits.dtype, logits.shape)
            teacher = teacher_value.name
            if source.softmax:
                # T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over samples
                temp = b.const(float(self.loss.temperature), name="temperature")
                student = b.op("LogSoftmax", [b.op("Div", [logits, temp], "loss")], "loss", axis=source.class_axis)
                teacher_log = b.op("LogSoftmax", [b.op("Div", [teacher_value, temp], "loss")], "loss", axis=source.class_axis)
                gap = b.op("Mul", [b.op("Exp", [teacher_log], "loss"), b.op("Sub", [teacher_log, student], "loss")], "loss")
                per_sample = b.reduce_sum(gap, source.class_axis, "loss")
                loss = b.op("Mul", [self.weighted_mean(per_sample, rank - 1, weight),
                                    b.const(float(self.loss.temperature) ** 2, name="t2")], "loss")
            elif source.sigmoid:
                # T^2 * KL(Bernoulli(sigmoid(teacher / T)) || Bernoulli(sigmoid(student / T))) per
                # element: the binary cross-entropies of both logits against the teacher's
                # probabilities, in their stable form; averaged over all elements (per sample, then weighted)
                temp = b.const(float(self.loss.temperature), name="temperature")
                student = b.op("Div", [logits, temp], "loss")
                teacher_logits = b.op("Div", [teacher_value, temp], "loss")
                target = b.op("Sigmoid", [teacher_logits], "loss")
                gap = b.op("Sub", [_binary_cross_entropy(b, student, target),
                                   _binary_cross_entropy(b, teacher_logits, target)], "loss")
                loss = b.op("Mul", [self.weighted_mean(gap, rank, weight),
                                    b.const(float(self.loss.temperature) ** 2, name="t2")], "loss")
            else:
                diff = b.op("Sub", [logits, teacher_value], "loss")
                loss = self.weighted_mean(b.op("Mul", [diff, diff], "loss"), rank, weight)
        loss.dtype = ir.DataType.FLOAT
        loss.shape = ir.Shape([])
        graph = self.model.graph
        graph.outputs.clear()
        graph.outputs.append(loss)
        prediction = logits
        if prediction.is_graph_input() or prediction.producer() is None:
            prediction = b.op("Identity", [prediction], "prediction")
            prediction.type, prediction.shape = logits.type, logits.shape
        graph.outputs.append(prediction)
        return loss, prediction, feeds, teacher

    def weighted_mean(self, elements: ir.Value, rank: int, weight: ir.Value) -> ir.Value:
        """``sum_i weight_i * mean(elements[i])``: the mean over each sample's elements (axis 0 is
        the sample), weighted per sample; the mean over the batch when every weight is 1/N."""
        b = self.b
        if rank > 1:
            axes = list(range(1, rank))
            if b.opset >= 18:
                elements = b.op("ReduceMean", [elements, b.const(np.asarray(axes), np.int64, "axes")], "loss", keepdims=0)
            else:
                elements = b.op("ReduceMean", [elements], "loss", axes=axes, keepdims=0)
        return b.op("ReduceSum", [b.op("Mul", [elements, weight], "loss")], "loss", keepdims=0)

    def new_input(self, name: str, dtype: ir.DataType | None, shape: ir.Shape | None) -> ir.Value:
        value = ir.Value(name=self.b.names.fresh(name), type=ir.TensorType(dtype or ir.DataType.FLOAT), shape=shape)
        if shape is None and dtype == ir.DataType.INT64:
            value.shape = ir.Shape(["batch"])
        self.model.graph.inputs.append(value)
        return value

    # -- ops without a gradient ----------------------------------------------------------------------
    def decompose(self) -> None:
        """Rewrite the ops on the gradient path that onnxruntime-training cannot differentiate
        (:mod:`onnxqat.train.decompose`); refuse, before any training, what no rule covers."""
        sources = {n for n in self.original_params if n not in self.frozen and n not in self.stats}
        sources.update(p.scale_param for p in self.range_params)
        sources.update(p.zero_point_param for p in self.range_params if p.zero_point_param)
        result = DecomposeForTrainingPass(sources)(self.model)
        self.decomposed = dict(result.rewritten)
        if result.not_decomposable:
            node, reason = next(iter(result.not_decomposable.items()))
            more = len(result.not_decomposable) - 1
            raise ModelError(f"cannot train this model: {reason}" + (f" (and {more} more node(s))" if more else ""))

    # -- trainable parameters ----------------------------------------------------------------------
    def trainable(self, loss: ir.Value) -> tuple[str, ...]:
        reached: set[str] = set()
        stack = [loss]
        seen: set[int] = set()
        value: ir.Value | None
        while stack:
            value = stack.pop()
            node = value.producer()
            if node is None:
                if value.name:
                    reached.add(value.name)
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            node_rule = ops.rule(node.op_type, node.domain)
            if node_rule.no_gradient or (node.op_type == "Cast" and not _float_cast(node)):
                continue
            stops = node_rule.stop_inputs
            for i, v in enumerate(node.inputs):
                if v is not None and i not in stops and (v.dtype is None or is_float(v)):
                    stack.append(v)
        candidates = []
        for name in sorted(reached):
            value = self.model.graph.initializers.get(name)
            if value is None or value.const_value is None:
                continue
            if name in self.original_params:
                if value.const_value.size > 1 and name not in self.frozen and name not in self.stats:
                    candidates.append(name)
        self.range_params = [p for p in self.range_params if p.scale_param in reached]
        if not self.freeze_ranges:
            for p in self.range_params:
                candidates += [n for n in (p.scale_param, p.zero_point_param) if n and n in reached]
        return tuple(candidates)

    def run(self) -> TrainingGraph:
        for q in self.plan.activations:
            self.activation(q)
        for p in self.plan.params:
            self.weight(p)
        self.biases()
        self.integer_forms()
        self.batchnorms()
        loss, prediction, feeds, teacher = self.loss_graph()
        # sorted first: the nodes appended above go where their inputs are, so the decomposition
        # (a topological walk) sees them, and pruning (a backward walk) removes a dead consumer of
        # them (e.g. an output the loss does not read) before them
        self.model.graph.sort()
        self.decompose()
        remove_dead_nodes(self.model.graph)
        self.model.graph.sort()
        for value in self.model.graph.inputs:
            if value.name not in feeds and value.name not in (teacher, self.weight_input):
                feeds[name_of(value)] = name_of(value)
        trainable = self.trainable(loss)
        if not trainable:
            raise ConfigError("no trainable parameter reaches the loss (all frozen?)")
        return TrainingGraph(
            model=self.model,
            trainable=trainable,
            feeds=feeds,
            teacher_input=teacher,
            teacher_source=self.source.tensor if teacher else None,
            prediction=name_of(self.model.graph.outputs[1]),  # a decomposed output node leaves `prediction` unnamed
            range_params=tuple(self.range_params),
            class_axis=self.source.class_axis,
            decomposed=self.decomposed,
            binary=self.source.binary,
            sigmoid=self.source.sigmoid,
            weight_input=self.weight_input,
        )


def _float_cast(node: ir.Node) -> bool:
    to = node.attributes.get("to")
    return to is not None and ir.DataType(to.as_int()) in (
        ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16
    )


def _binary_cross_entropy(b: Builder, z: ir.Value, y: ir.Value) -> ir.Value:
    """Elementwise ``-y log(sigmoid(z)) - (1 - y) log(1 - sigmoid(z))`` in a form that cannot
    overflow: ``|z| / 2 + z (1/2 - y) + log(1 + exp(-|z|))`` (``exp`` of a non-positive number only).
    This is ``max(z, 0) - z y + log(1 + exp(-|z|))`` with ``max(z, 0) = (z + |z|) / 2``: the
    coefficient of ``|z|`` in the gradient, ``1/2 - sigmoid(-|z|)``, is 0 at ``z = 0``, so the
    gradient is ``sigmoid(z) - y`` everywhere, also at ``z = 0`` exactly (where quantized logits
    sit) whatever subgradient ``Abs`` takes there. Abs, Exp, Log, Mul and Add have gradients in
    onnxruntime-training."""
    a = b.op("Abs", [z], "bce")
    soft = b.op("Log", [b.op("Add", [b.op("Exp", [b.op("Neg", [a], "bce")], "bce"), b.const(1.0, name="one")], "bce")],
                "bce")
    half = b.const(0.5, name="half")
    linear = b.op("Add", [b.op("Mul", [a, half], "bce"), b.op("Mul", [z, b.op("Sub", [half, y], "bce")], "bce")], "bce")
    return b.op("Add", [linear, soft], "bce")


def _move_axis_to_1(b: Builder, x: ir.Value, axis: int, rank: int, base: str) -> ir.Value:
    if axis == 1:
        return x
    perm = [0, axis] + [i for i in range(1, rank) if i != axis]
    return b.op("Transpose", [x], base, perm=perm)


@dataclasses.dataclass(frozen=True)
class LossSource:
    """The float-model tensor a loss reads, and how.

    Attributes:
        tensor: Name of the tensor (the logits feeding a final Softmax, or the output itself).
        rank: Its rank.
        class_axis: Class axis for cross-entropy / distillation.
        softmax: True when the output is a Softmax/LogSoftmax of ``tensor``.
        binary: Cross-entropy is binary, on ``tensor`` as logits: the output is a Sigmoid of
            ``tensor``, or ``tensor`` is the output and its class axis has one channel.
        sigmoid: True when the output is a Sigmoid of ``tensor``.
    """

    tensor: str
    rank: int
    class_axis: int
    softmax: bool
    binary: bool = False
    sigmoid: bool = False


def _flattened_softmax(node: ir.Node | None, output_shape: ir.Shape | None = None) -> ir.Value | None:
    """``x`` of ``Reshape(Softmax(Flatten(x, axis=r-1), axis=-1), Shape(x))``, the form onnx's
    version converter gives a Softmax over the last axis of a rank-r tensor when it upgrades a
    model below opset 13 (PaddleOCR's recognizers: [N, T, C]); None for anything else.
    ``output_shape``: the graph output's shape (the Reshape's, through Identity nodes), for when
    shape inference left both ``x`` and the Reshape without one."""
    if node is None or node.op_type != "Reshape" or len(node.inputs) < 2:
        return None
    inner, shape = node.inputs[0].producer() if node.inputs[0] else None, node.inputs[1]
    if inner is None or inner.op_type not in ("Softmax", "LogSoftmax") or not inner.inputs or inner.inputs[0] is None:
        return None
    attr = inner.attributes.get("axis")
    flatten = inner.inputs[0].producer()
    if (attr is not None and attr.as_int() not in (-1, 1)) or flatten is None or flatten.op_type != "Flatten":
        return None
    x = flatten.inputs[0]
    of = shape.producer() if shape is not None else None
    # Reshape(., Shape(x)) has x's shape: the output's rank stands in where inference left x's unknown
    known = next((k for k in (x.shape if x is not None else None, node.outputs[0].shape, output_shape)
                  if k is not None), None)
    if (x is None or known is None or of is None or of.op_type != "Shape" or of.inputs[0] is not x
            or "start" in of.attributes or "end" in of.attributes):
        return None
    along = flatten.attributes.get("axis")
    rank = len(known)
    if along is None or along.as_int() % rank != rank - 1:
        return None  # a softmax over several trailing axes: no single class axis
    return x


def loss_source(model: ir.Model, loss: LossSpec) -> LossSource:
    """Find what the loss is computed on; raises :class:`ModelError` for unusable outputs."""
    outputs = model.graph.outputs
    index = loss.output_index
    if not -len(outputs) <= index < len(outputs):
        raise ConfigError(f"output index {index} is out of range: the model has {len(outputs)} output(s)")
    output = outputs[index]
    value: ir.Value | None = output
    softmax, sigmoid, axis = False, False, -1
    producer = output.producer()
    while (producer is not None and producer.op_type == "Identity" and producer.domain in ("", "ai.onnx")
           and loss.kind != "mse" and producer.inputs and producer.inputs[0] is not None):
        producer = producer.inputs[0].producer()  # PaddlePaddle's cls: Identity(Softmax(logits)) is the output
    flattened = _flattened_softmax(producer, output.shape) if loss.kind != "mse" else None
    if flattened is not None:
        value, softmax, axis = flattened, True, -1
    elif producer is not None and producer.op_type in ("Softmax", "LogSoftmax") and loss.kind != "mse":
        value, softmax = producer.inputs[0], True
        attr = producer.attributes.get("axis")
        axis = attr.as_int() if attr is not None else -1
    elif (producer is not None and producer.op_type == "Sigmoid" and producer.domain in ("", "ai.onnx")
          and loss.kind in ("cross_entropy", "distill") and producer.inputs[0] is not None):
        value, sigmoid = producer.inputs[0], True
    assert value is not None
    # Sigmoid and the flattened softmax keep the type and shape: the output's stand in for the
    # logits' where shape inference left them unknown (else the two lowerings of a trainer, symbolic
    # and concrete, would disagree on the loss source)
    like_output = sigmoid or flattened is not None
    if not is_float(output if like_output and value.dtype is None else value):
        raise ModelError(f"output '{output.name}' is not a float tensor: cannot train a {loss.kind} loss on it")
    shape = output.shape if like_output and value.shape is None else value.shape
    if shape is None:
        raise ModelError(f"the rank of '{value.name}' is unknown: cannot build a {loss.kind} loss on it")
    rank = len(shape)
    one_channel = rank >= 2 and shape[1] == 1 and not softmax
    if loss.kind == "cross_entropy" and rank < 2 and not sigmoid:
        raise ModelError(
            f"output '{output.name}' has rank {rank}: cross-entropy needs [batch, classes, ...] logits"
        )
    class_axis = (axis % rank) if softmax else (1 if rank >= 2 else 0)
    binary = loss.kind == "cross_entropy" and (sigmoid or one_channel)
    return LossSource(name_of(value), rank, class_axis, softmax, binary, sigmoid)


def binary_output(model: ir.Model, output_index: int = 0) -> tuple[str, bool] | None:
    """``(output name, is a Sigmoid)`` when cross-entropy on output ``output_index`` is binary (a
    Sigmoid output, or one channel on axis 1), else None (also for an output no loss can use:
    building the loss reports that)."""
    try:
        source = loss_source(model, LossSpec("cross_entropy", output_index))
    except (ConfigError, ModelError):
        return None
    return (name_of(model.graph.outputs[output_index]), source.sigmoid) if source.binary else None
