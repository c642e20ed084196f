"""Insert QuantizeLinear/DequantizeLinear pairs for a plan and its encodings.

Two flavours of the same graph:

* ``fold_weights=False`` (the simulation): weights stay float initializers followed by
  ``[Clip] -> QuantizeLinear -> DequantizeLinear``, so the model follows its weights.
  Weights whose spec rounds as aimet-onnx (``QuantSpec.rounding == "aimet"``) are integers
  computed here in both flavours (:func:`aimet_quantize`; QuantizeLinear rounds half to even).
* ``fold_weights=True`` (the deployable model): weights are stored as integer initializers
  followed by ``DequantizeLinear``; what onnxruntime fuses into integer kernels. Generated names
  are short (``q7_scale``) to keep the file small; the model's own names are kept.

Activations get ``[Clip] -> QuantizeLinear -> DequantizeLinear`` in both; the Clip appears only
for grids narrower than their container type (e.g. 4-bit values in int8, strict symmetric).
Tied tensors share one pair of scale/zero-point initializers. Quantized biases are int32
initializers with ``DequantizeLinear`` (scale = input scale x weight scale).

Graph inputs and outputs keep their names: a quantized graph output is produced by the
DequantizeLinear node and the float tensor before it gets a fresh name.

Derived quantizers (a Mul/Div by a positive scalar of a quantized tensor) drop their node: the
consumers read the input's integers with the derived scale. Integer forms replace their node
(HardSigmoid/HardSwish) with ``Add(x, DQ(offset)) -> Q(grid) -> DQ(read)`` (and, for HardSwish,
``Mul(x, .)``), which onnxruntime runs as QLinearAdd (QLinearMul). Linear forms replace a MatMul
and the Add of its bias with ``[Reshape to 2-D] -> Gemm(x, W, DQ(int32 bias)) -> [Reshape back]``,
which onnxruntime runs as QGemm (the Q/DQ pairs move across the reshapes). Both flavours get
exactly the same activation graph, so the simulation runs what is deployed.

A Conv/ConvTranspose/Gemm whose weight stays float (:attr:`onnxqat.target.Target.float_kernels`,
weights the config does not quantize) between quantized activations reads its input through a
DequantizeLinear of its own with the scale and zero point repeated per channel (axis 1): the same
values, but onnxruntime >= 1.21's ``WeightBiasQuantization`` transformer, which quantizes the
float weight of a node whose input comes from a per-tensor DequantizeLinear (int8 per tensor,
so onnxruntime fuses it into QLinearConv) leaves it alone, and the node runs its float kernel as
in the simulation.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxqat.graph import NameScope, const_array, make_initializer, name_of, opset_version, values_by_name
from onnxqat.ops import Reason, prelu_slope, rule
from onnxqat.passes import TypedFunctionalPass
from onnxqat.plan import ActivationQuantizer, IntegerForm, LinearForm, QuantPlan
from onnxqat.qparams import Encoding, broadcast_shape, integer_form_constants, prelu_form_constants, quantize
from onnxqat.runtime import release_if_mapped

__all__ = ["InsertQDQPass", "aimet_quantize", "bias_encoding", "bias_fits", "qdq_domain", "quantize_bias"]

_INT32 = np.iinfo(np.int32)
# Op types whose float weight onnxruntime >= 1.21 quantizes itself when the input comes from a
# per-tensor DequantizeLinear (its WeightBiasQuantization transformer).
_SELF_QUANTIZED = ("Conv", "ConvTranspose", "Gemm")


def qdq_domain(model: ir.Model, enc: Encoding) -> str:
    """ONNX domain of Q/DQ nodes for ``enc``: 16-bit types need opset 21 or the contrib ops."""
    if enc.container_bits == 16 and opset_version(model) < 21:
        return "com.microsoft"
    return ""


def bias_encoding(input_enc: Encoding, weight_enc: Encoding) -> tuple[np.ndarray, int | None]:
    """float32 scale of an int32 bias and its axis (None for per-tensor)."""
    scale = (input_enc.scale.astype(np.float32) * weight_enc.scale.astype(np.float32)).astype(np.float32)
    return np.maximum(scale, np.finfo(np.float32).tiny), (0 if scale.ndim == 1 else None)


def bias_fits(bias: np.ndarray, scale: np.ndarray) -> bool:
    """True when ``round(bias / scale)`` is representable in int32 (it overflows with tiny
    16-bit input and weight scales, where a saturated bias would be badly wrong)."""
    q = np.rint(bias.astype(np.float32) / scale.astype(np.float32)).astype(np.float64)
    return bool(np.all(np.abs(q) <= _INT32.max))


def quantize_bias(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``round(bias / scale)`` saturated to int32 (round half to even, float32 division)."""
    q = np.rint(bias.astype(np.float32) / scale.astype(np.float32)).astype(np.float64)
    return np.clip(q, _INT32.min, _INT32.max).astype(np.int32)


@dataclasses.dataclass
class InsertQDQResult(ir.passes.PassResult):
    """Attributes:
        sites: Each quantized activation tensor of the float model -> the name of the
            DequantizeLinear output that replaces it in the new model.
        folded_weights: Each weight folded to integers (``fold_weights=True``) -> the name of the
            integer initializer holding it.
    """

    sites: dict[str, str] = dataclasses.field(default_factory=dict)
    folded_weights: dict[str, str] = dataclasses.field(default_factory=dict)


class InsertQDQPass(TypedFunctionalPass[InsertQDQResult]):
    """Return a copy of the model with Q/DQ pairs for every quantizer of ``plan``.

    The result (:class:`InsertQDQResult`) tells where each quantizer went (``sites``).
    """

    def __init__(
        self, plan: QuantPlan, encodings: Mapping[str, Encoding], *, fold_weights: bool
    ) -> None:
        super().__init__()
        biases = {b.name for b in plan.biases}  # one set: a scan of the biases per quantizer was quadratic
        missing = [name for name in plan.quantizer_names() if name not in encodings and name not in biases]
        if missing:
            raise ValueError(f"no encoding for quantizer(s) {missing[:5]}: calibrate first")
        self.plan = plan
        self.encodings = encodings
        self.fold_weights = fold_weights

    def call(self, model: ir.Model) -> InsertQDQResult:
        model = model.clone()
        inserter = _Inserter(model, self.plan, self.encodings, self.fold_weights)
        inserter.run()
        return InsertQDQResult(model, modified=True, sites=dict(inserter.sites), folded_weights=dict(inserter.folded))


class _Inserter:
    def __init__(
        self, model: ir.Model, plan: QuantPlan, encodings: Mapping[str, Encoding], fold: bool
    ) -> None:
        self.model = model
        self.graph = model.graph
        self.plan = plan
        self.encodings = encodings
        self.fold = fold
        self.names = NameScope(model)
        self.values = values_by_name(self.graph)
        self.nodes = {node.name: node for node in self.graph if node.name}
        self.count = 0
        self.sites: dict[str, str] = {}
        self.folded: dict[str, str] = {}  # weight -> its integer initializer (fold)
        self.qvalues: dict[str, ir.Value] = {}  # tensor -> the QuantizeLinear output holding its integers
        self.tensor_of: dict[str, str] = {}  # DequantizeLinear output -> the tensor it replaces
        self.leading: dict[int, ir.Value] = {}  # id of a tensor -> its shape without the last dim

    def base(self, name: str) -> str:
        """Stem of generated names: the tensor's name, or a short id in the deployable model."""
        if not self.fold:
            return name
        self.count += 1
        return f"q{self.count}"

    def run(self) -> None:
        for q in self.plan.activations:
            enc = self.encodings[q.name]
            params = self.qparam_values(self.base(q.name), enc)
            for tensor in q.tensors:
                if q.derived_from is not None and tensor == q.name:
                    self.read_derived(q, enc, params)
                else:
                    self.quantize_activation(self.values[tensor], enc, params, q.spec.rounding)
        for form in self.plan.integer_forms:
            self.integer_form(form)
        self.drop_unused_dequantize()
        for p in self.plan.params:
            self.quantize_param(p.name, p.consumers, self.encodings[p.name], p.spec.rounding)
        for b in self.plan.biases:
            self.quantize_bias(b.name, b.node, self.encodings[b.input_quantizer], self.encodings[b.weight_quantizer])
        self.keep_float_weights()
        int32 = {b.name for b in self.plan.biases}
        for linear in self.plan.linear_forms:
            if linear.bias in int32:  # else (overflow) it stays MatMul + a float Add
                self.linear_form(linear)
        if any(self.qdq_domain(e) == "com.microsoft" for e in self.encodings.values()):
            self.model.opset_imports.setdefault("com.microsoft", 1)
        self.graph.sort()

    # -- building blocks -------------------------------------------------------------------------
    def qdq_domain(self, enc: Encoding) -> str:
        return qdq_domain(self.model, enc)

    def qparam_values(self, base: str, enc: Encoding) -> tuple[ir.Value, ir.Value]:
        scale = make_initializer(self.graph, self.names.fresh(f"{base}_scale"), enc.scale.astype(np.float32))
        zp = make_initializer(
            self.graph, self.names.fresh(f"{base}_zero_point"), enc.zero_point.astype(enc.container_dtype)
        )
        return scale, zp

    def node(self, op_type: str, inputs: list[ir.Value], base: str, domain: str = "", **attrs: int) -> ir.Value:
        node = ir.Node(
            domain,
            op_type,
            inputs,
            attributes=[ir.AttrInt64(k, v) for k, v in attrs.items()],
            name=self.names.fresh(f"{base}_{op_type}"),
            num_outputs=1,
        )
        node.outputs[0].name = self.names.fresh(f"{base}_{op_type.lower()}")
        self.graph.append(node)
        return node.outputs[0]

    def clip_range(self, x: ir.Value, enc: Encoding, base: str) -> ir.Value:
        """Clip to a narrow grid's float range (per-tensor only; per-channel is clamped offline)."""
        lo = make_initializer(self.graph, self.names.fresh(f"{base}_clip_min"), enc.min.astype(np.float32))
        hi = make_initializer(self.graph, self.names.fresh(f"{base}_clip_max"), enc.max.astype(np.float32))
        return self.node("Clip", [x, lo, hi], base)

    def qdq(self, x: ir.Value, enc: Encoding, params: tuple[ir.Value, ir.Value], base: str) -> ir.Value:
        domain = self.qdq_domain(enc)
        axis = {} if enc.axis is None else {"axis": enc.axis}
        if enc.narrow:
            x = self.clip_range(x, enc, base)
        q = self.node("QuantizeLinear", [x, *params], base, domain, **axis)
        return self.node("DequantizeLinear", [q, *params], base, domain, **axis)

    # -- activations -----------------------------------------------------------------------------
    def aimet_round(self, x: ir.Value, enc: Encoding, params: tuple[ir.Value, ir.Value], base: str) -> ir.Value:
        """aimet-onnx's rounding in standard ops: ``v = x / s + zp`` in float32, rounded half away
        from zero as ``Floor(v) + (v - Floor(v) >= 0.5)`` (exact for v >= 0; below 0 both give 0
        after the clamp), clamped to the grid, made integers by a ``QuantizeLinear`` of scale 1 and
        dequantized as usual (tests/test_aimet.py: exact against aimet-onnx's own outputs)."""
        scale, zp = params
        domain = self.qdq_domain(enc)

        def const(tag: str, value: float | int, dtype: Any = np.float32) -> ir.Value:
            return make_initializer(self.graph, self.names.fresh(f"{base}_aimet_{tag}"), np.asarray(value, dtype))

        v = self.node("Add", [self.node("Div", [x, scale], base), const("zp", float(enc.zero_point))], base)
        low = self.node("Floor", [v], base)
        up = self.node("GreaterOrEqual", [self.node("Sub", [v, low], base), const("half", 0.5)], base)
        k = self.node("Add", [low, self.node("Cast", [up], base, to=ir.DataType.FLOAT.value)], base)
        k = self.node("Clip", [k, const("qmin", float(enc.qmin)), const("qmax", float(enc.qmax))], base)
        q = self.node("QuantizeLinear", [k, const("one", 1.0), const("z0", 0, enc.container_dtype)], base, domain)
        return self.node("DequantizeLinear", [q, *params], base, domain)

    def quantize_activation(self, value: ir.Value, enc: Encoding, params: tuple[ir.Value, ir.Value],
                            rounding: str = "half_even") -> None:
        name = value.name
        assert name is not None
        users = list(value.uses())
        was_output = value.is_graph_output()
        if rounding == "aimet" and value.is_graph_input() and not enc.symmetric and not enc.per_channel:
            dq = self.aimet_round(value, enc, params, self.base(name))
        else:
            dq = self.qdq(value, enc, params, self.base(name))
        dq.type, dq.shape = value.type, value.shape
        q_node = dq.producer()
        assert q_node is not None and q_node.inputs[0] is not None
        self.qvalues[name] = q_node.inputs[0]
        self.move_uses(users, dq, self.qvalues[name])
        self.publish(value, dq, was_output)

    @staticmethod
    def move_uses(users: list[Any], dq: ir.Value, integers: ir.Value) -> None:
        """Consumers read ``dq``; those that read only the shape (Shape, Size) read the integers."""
        for use in users:
            shape_only = rule(use.node.op_type, use.node.domain).shape_only
            use.node.replace_input_with(use.idx, integers if shape_only else dq)

    def publish(self, value: ir.Value, dq: ir.Value, was_output: bool) -> None:
        """Make ``dq`` take ``value``'s graph-output slot and name (its uses are already moved)."""
        name = value.name
        assert name is not None
        if was_output:
            value.name = self.names.fresh(f"{name}_float")
            for i, out in enumerate(self.graph.outputs):
                if out is value:
                    self.graph.outputs[i] = dq
            dq.name = name
        self.sites[name] = name_of(dq)
        self.tensor_of[name_of(dq)] = name

    def read_derived(self, q: ActivationQuantizer, enc: Encoding, params: tuple[ir.Value, ir.Value]) -> None:
        """``y = x * k``: the consumers of ``y`` read ``x``'s integers with ``y``'s scale; the
        Mul/Div node is dropped."""
        value = self.values[q.name]
        node = value.producer()
        assert node is not None
        data = next(v for v in node.inputs if v is not None and v.const_value is None)
        source = self._source_tensor(data)
        qvalue = self.qvalues[source]
        domain = self.qdq_domain(enc)
        dq = self.node("DequantizeLinear", [qvalue, *params], self.base(q.name), domain)
        dq.type, dq.shape = value.type, value.shape
        self.qvalues[q.name] = qvalue
        was_output = value.is_graph_output()
        self.move_uses(list(value.uses()), dq, qvalue)
        self.publish(value, dq, was_output)
        if not value.uses() and not value.is_graph_output():
            self.graph.remove(node, safe=True)

    def drop_unused_dequantize(self) -> None:
        """A source's own DequantizeLinear is left without uses when every consumer now reads a
        derived scale; onnxruntime would keep it (and lay out a transpose for it)."""
        for node in reversed(list(self.graph)):
            if node.op_type == "DequantizeLinear" and not node.outputs[0].uses() and not node.outputs[0].is_graph_output():
                self.graph.remove(node, safe=True)

    def _source_tensor(self, value: ir.Value) -> str:
        """The float-model tensor whose integers ``value`` (a DQ output after insertion) carries."""
        assert value.name is not None
        return self.tensor_of.get(value.name, value.name)

    def integer_form(self, form: IntegerForm) -> None:
        """HardSigmoid / HardSwish as ``Add -> Q -> DQ (-> Mul)`` on the integer kernels."""
        if form.op_type == "PRelu":
            self.prelu_form(form)
            return
        node = self.nodes[form.node]
        x = node.inputs[0]
        assert x is not None
        base = self.base(form.output)
        c = integer_form_constants(form.alpha, form.beta)
        offset_q = make_initializer(self.graph, self.names.fresh(f"{base}_offset_quantized"), np.array(c.offset_q, np.uint8))
        offset_s = make_initializer(self.graph, self.names.fresh(f"{base}_offset_scale"), np.array(c.offset_scale, np.float32))
        offset_z = make_initializer(self.graph, self.names.fresh(f"{base}_offset_zero_point"),
                                    np.array(c.offset_zero_point, np.uint8))
        offset = self.node("DequantizeLinear", [offset_q, offset_s, offset_z], base)
        added = self.node("Add", [x, offset], base)
        zero = make_initializer(self.graph, self.names.fresh(f"{base}_gate_zero_point"), np.array(0, np.uint8))
        grid = make_initializer(self.graph, self.names.fresh(f"{base}_gate_grid_scale"), np.array(c.grid_scale, np.float32))
        read = make_initializer(self.graph, self.names.fresh(f"{base}_gate_read_scale"), np.array(c.read_scale, np.float32))
        gate_q = self.node("QuantizeLinear", [added, grid, zero], base)
        out = self.node("DequantizeLinear", [gate_q, read, zero], base)
        if form.op_type == "HardSwish":
            out = self.node("Mul", [x, out], base)
        value = node.outputs[0]
        out.type, out.shape = value.type, value.shape
        value.replace_all_uses_with(out, replace_graph_outputs=True)  # its quantizer reads ``out``
        self.graph.remove(node, safe=True)

    def prelu_form(self, form: IntegerForm) -> None:
        """PRelu as ``x + sum Q(Conv_1x1,depthwise(x, slope - 1))`` onto grids saturating at 0
        (:func:`~onnxqat.qparams.prelu_form_constants`): QLinearConv (depthwise) and QLinearAdd.
        With both signs of ``slope - 1`` the first sum is requantized onto the output's grid."""
        node = self.nodes[form.node]
        x = node.inputs[0]
        slope = prelu_slope(node)
        in_q, out_q = self.plan.activation_of(form.input), self.plan.activation_of(form.output)
        assert x is not None and x.shape is not None and in_q is not None and out_q is not None
        assert not isinstance(slope, Reason)
        parts = prelu_form_constants(slope, self.encodings[in_q.name])
        channels, spatial = len(slope), len(x.shape) - 2
        base = self.base(form.output)
        out, conv_in, flat = x, x, None
        if spatial == 0:  # [N, C]: a 1-D convolution of the integers reshaped to [N, C, 1]
            dq_x = x.producer()
            assert dq_x is not None and dq_x.op_type == "DequantizeLinear"
            x_scale, x_zero = dq_x.inputs[1], dq_x.inputs[2]
            assert x_scale is not None and x_zero is not None
            wide = make_initializer(self.graph, self.names.fresh(f"{base}_wide_shape"), np.array([0, channels, 1], np.int64))
            flat = make_initializer(self.graph, self.names.fresh(f"{base}_flat_shape"), np.array([0, channels], np.int64))
            conv_in = self.node("DequantizeLinear", [self.node("Reshape", [self.qvalues[form.input], wide], base),
                                                     x_scale, x_zero], base)
            spatial = 1
        for i, part in enumerate(parts):
            w = make_initializer(self.graph, self.names.fresh(f"{base}_slope{i}_quantized"),
                                 part.weight_q.reshape([channels, 1] + [1] * spatial))
            ws = make_initializer(self.graph, self.names.fresh(f"{base}_slope{i}_scale"), part.weight_scale)
            wz = make_initializer(self.graph, self.names.fresh(f"{base}_slope{i}_zero_point"), np.zeros(channels, np.int8))
            conv = ir.Node("", "Conv", [conv_in, self.node("DequantizeLinear", [w, ws, wz], base, axis=0)],
                           attributes=[ir.AttrInt64("group", channels), ir.AttrInt64s("kernel_shape", [1] * spatial)],
                           name=self.names.fresh(f"{base}_Conv"), num_outputs=1)
            conv.outputs[0].name = self.names.fresh(f"{base}_conv")
            self.graph.append(conv)
            grid = (make_initializer(self.graph, self.names.fresh(f"{base}_part{i}_scale"), np.array(part.grid_scale, np.float32)),
                    make_initializer(self.graph, self.names.fresh(f"{base}_part{i}_zero_point"),
                                     np.array(part.grid_zero_point, np.uint8)))
            t_q = self.node("QuantizeLinear", [conv.outputs[0], *grid], base)
            if flat is not None:
                t_q = self.node("Reshape", [t_q, flat], base)
            t = self.node("DequantizeLinear", [t_q, *grid], base)
            if i > 0:  # x + t0 onto the output's grid before the next sum
                out = self.qdq(out, self.encodings[out_q.name], self.qparam_values(base, self.encodings[out_q.name]), base)
            out = self.node("Add", [out, t], base)
        value = node.outputs[0]
        out.type, out.shape = value.type, value.shape
        value.replace_all_uses_with(out, replace_graph_outputs=True)  # its quantizer reads ``out``
        self.graph.remove(node, safe=True)

    # -- weights and biases ----------------------------------------------------------------------
    def quantize_param(self, name: str, consumers: tuple[str, ...], enc: Encoding, rounding: str = "half_even") -> None:
        value = self.values[name]
        users = [u for u in value.uses() if u.node.name in consumers]
        base = self.base(name)
        scale, zp = self.qparam_values(base, enc)
        axis = {} if enc.axis is None else {"axis": enc.axis}
        domain = self.qdq_domain(enc)
        if self.fold or rounding == "aimet":  # aimet's rounding: the integers are computed here, sim and deploy alike
            weight = const_array(value)
            assert weight is not None
            integers = aimet_quantize(weight, enc) if rounding == "aimet" else quantize(weight, enc)
            q_value = make_initializer(self.graph, self.names.fresh(f"{base}_quantized"), integers)
            if self.fold:
                self.folded[name] = name_of(q_value)
            del weight
            release_if_mapped(value.const_value)
            dq = self.node("DequantizeLinear", [q_value, scale, zp], base, domain, **axis)
        elif enc.narrow and enc.axis is not None:
            # Per-channel clip bounds are not expressible with Clip; clamp via Min/Max.
            lo = make_initializer(self.graph, self.names.fresh(f"{base}_clip_min"), _per_channel(enc.min, enc, value))
            hi = make_initializer(self.graph, self.names.fresh(f"{base}_clip_max"), _per_channel(enc.max, enc, value))
            clamped = self.node("Min", [self.node("Max", [value, lo], base), hi], base)
            q = self.node("QuantizeLinear", [clamped, scale, zp], base, domain, **axis)
            dq = self.node("DequantizeLinear", [q, scale, zp], base, domain, **axis)
        else:
            dq = self.qdq(value, enc, (scale, zp), base)
        dq.type, dq.shape = value.type, value.shape
        for use in users:
            use.node.replace_input_with(use.idx, dq)
        if not value.uses() and not value.is_graph_output():
            self.graph.initializers.pop(name)

    def quantize_bias(self, name: str, node_name: str, input_enc: Encoding, weight_enc: Encoding) -> None:
        value = self.values[name]
        bias = const_array(value)
        assert bias is not None
        scale, axis = bias_encoding(input_enc, weight_enc)
        base = self.base(name)
        q_value = make_initializer(self.graph, self.names.fresh(f"{base}_quantized"), quantize_bias(bias, scale))
        scale_value = make_initializer(self.graph, self.names.fresh(f"{base}_scale"), scale)
        attrs = {} if axis is None else {"axis": axis}
        dq = self.node("DequantizeLinear", [q_value, scale_value], base, "", **attrs)
        for use in list(value.uses()):
            if use.node.name == node_name:
                use.node.replace_input_with(use.idx, dq)
        if not value.uses():
            self.graph.initializers.pop(name)

    def keep_float_weights(self) -> None:
        """A node onnxruntime would quantize itself (float weight, input from a per-tensor DQ)
        reads its input through a per-channel DQ of the same integers (see the module notes)."""
        for node in list(self.graph):
            if node.op_type not in _SELF_QUANTIZED or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            x, w = node.inputs[0], node.inputs[1]
            dq = x.producer() if x is not None else None
            if (w is None or w.const_value is None or w.producer() is not None or w.const_value.dtype != ir.DataType.FLOAT
                    or dq is None or dq.op_type != "DequantizeLinear" or "axis" in dq.attributes or len(dq.inputs) < 3):
                continue
            assert x is not None
            channels = x.shape[1] if x.shape is not None and len(x.shape) >= 2 else None
            scale, zp = (const_array(v) for v in dq.inputs[1:3])
            integers = dq.inputs[0]
            if not isinstance(channels, int) or scale is None or zp is None or scale.size != 1 or integers is None:
                continue
            base = self.base(name_of(x))
            wide_scale = make_initializer(self.graph, self.names.fresh(f"{base}_scale_c"),
                                          np.full([channels], scale.reshape(()), scale.dtype))
            wide_zp = make_initializer(self.graph, self.names.fresh(f"{base}_zero_point_c"),
                                       np.full([channels], zp.reshape(()), zp.dtype))
            read = self.node("DequantizeLinear", [integers, wide_scale, wide_zp], base, dq.domain, axis=1)
            read.type, read.shape = x.type, x.shape
            node.replace_input_with(0, read)
            if not x.uses() and not x.is_graph_output():
                self.graph.remove(dq, safe=True)  # onnxruntime would keep it (and lay out a transpose for it)

    def linear_form(self, form: LinearForm) -> None:
        """MatMul + Add(int32 bias) as one Gemm, reshaped to 2-D and back when the input is not."""
        matmul, add = self.nodes[form.matmul], self.nodes[form.add]
        x, w = matmul.inputs
        product = matmul.outputs[0]
        bias = next(v for v in add.inputs if v is not product)
        assert x is not None and w is not None and bias is not None and w.shape is not None
        k, n = (int(d) for d in w.shape.numpy())
        base = self.base(form.output)
        rank = len(x.shape) if x.shape is not None else None
        flat = x
        if rank != 2:
            to_2d = make_initializer(self.graph, self.names.fresh(f"{base}_rows"), np.array([-1, k], np.int64))
            flat = self.node("Reshape", [x, to_2d], base)
        gemm = ir.Node("", "Gemm", [flat, w, bias], name=self.names.fresh(f"{base}_Gemm"), num_outputs=1,
                       attributes=[ir.AttrFloat32("alpha", 1.0), ir.AttrFloat32("beta", 1.0)])
        gemm.outputs[0].name = self.names.fresh(f"{base}_gemm")
        self.graph.append(gemm)
        out = gemm.outputs[0]
        if rank != 2:
            out = self.node("Reshape", [out, self.output_shape(x, n, base)], base)
        value = add.outputs[0]
        out.type, out.shape = value.type, value.shape
        value.replace_all_uses_with(out, replace_graph_outputs=True)  # its quantizer reads ``out``
        self.graph.remove([add, matmul], safe=True)

    def output_shape(self, x: ir.Value, n: int, base: str) -> ir.Value:
        """``x``'s shape with the last dimension ``n``: a constant when at most one leading
        dimension is symbolic, else ``Shape -> Slice -> Concat`` of the integers ``x`` is read
        from (the float DequantizeLinear output is then needed by the Gemm alone)."""
        dims = list(x.shape) if x.shape is not None else None
        if dims is not None and sum(not isinstance(d, int) for d in dims[:-1]) <= 1:
            shape = [d if isinstance(d, int) else -1 for d in dims[:-1]] + [n]
            return make_initializer(self.graph, self.names.fresh(f"{base}_shape"), np.array(shape, np.int64))
        producer = x.producer()
        source = producer.inputs[0] if producer is not None and producer.op_type == "DequantizeLinear" else x
        assert source is not None
        lead = self.leading.get(id(source))
        if lead is None:
            start = make_initializer(self.graph, self.names.fresh(f"{base}_start"), np.array([0], np.int64))
            end = make_initializer(self.graph, self.names.fresh(f"{base}_end"), np.array([-1], np.int64))
            lead = self.node("Slice", [self.node("Shape", [source], base), start, end], base)
            self.leading[id(source)] = lead
        last = make_initializer(self.graph, self.names.fresh(f"{base}_cols"), np.array([n], np.int64))
        return self.node("Concat", [lead, last], base, axis=0)


def aimet_quantize(x: np.ndarray, enc: Encoding) -> np.ndarray:
    """aimet-onnx 2.42's quantizer (tests/fixtures/aimet/rounding): ``v = float32(x / s - offset)``
    with AIMET's offset (``qmin - zero_point``), rounded half away from zero, clamped to the grid;
    returned as ``enc``'s integers (``k + offset``). ``quantize`` rounds half to even instead."""
    x = np.asarray(x, dtype=np.float32)
    shape = broadcast_shape(enc, x.ndim)
    scale = enc.scale.reshape(shape)
    offset = enc.aimet_offset.reshape(shape).astype(np.float32)
    v = (x / scale).astype(np.float32) - offset
    low = np.floor(v)
    k = np.where(v - low >= np.float32(0.5), low + 1, low).astype(np.float64) + offset
    out: np.ndarray = np.clip(k, enc.qmin, enc.qmax).astype(enc.container_dtype)
    return out


def _per_channel(bound: np.ndarray, enc: Encoding, value: ir.Value) -> np.ndarray:
    assert value.shape is not None and enc.axis is not None
    rank = len(value.shape)
    shape = [1] * rank
    shape[enc.axis % rank] = -1
    return bound.astype(np.float32).reshape(shape)
