"""Annotation: decide where quantizers go, by rules from a :class:`QuantSimConfig`.

Reads the float model, writes nothing; returns a :class:`QuantPlan`. The rules, in order:

1. Excluded nodes (by name or op type) get no quantizers.
2. Weights (constant weight inputs of Conv, ConvTranspose, Gemm, MatMul) get param quantizers,
   per channel on the output-channel axis of each op when configured. Constant biases of nodes
   whose data input and weight are quantized become int32 with the derived scale. A node whose
   integer kernel is slower than float on the target (:attr:`onnxqat.target.Target.float_kernels`,
   e.g. a depthwise Conv of a channel count that is not a multiple of 16 on x86) keeps its weight
   and bias float: onnxruntime runs its float kernel between its quantized input and output. Like
   the integer forms of rule 8 this is a deploy form for onnxruntime: with the config's
   ``integer_forms`` false (the ``aimet`` preset, aimet-onnx's placement) the weight is quantized.
3. Model inputs are quantized when ``model_input.is_input_quantized``.
4. An op output inside a supergroup (e.g. Conv followed by Relu, the only consumer) is left float;
   the supergroup's last output carries the quantizer. AIMET's ``MatmulAdd`` graph pass, when the
   config lists it, makes MatMul + Add of a constant bias one; with ``depthwise_supergroups`` false
   no supergroup starts at a depthwise or 3-d convolution (aimet-onnx 2.42's rule). For onnxruntime
   targets a MatMul + Add of a constant ``[N]`` (a PyTorch Linear, :func:`onnxqat.ops.linear_bias`)
   is one Linear: the product stays float inside it, the bias is an int32 bias (rule 2) and the
   pair deploys as one Gemm (QGemm) when its input is quantized.
5. Outputs of data-movement ops (Reshape, Transpose, MaxPool, ...) and of the config's
   ``tied_op_types`` reuse their input's quantizer.
6. The output of a Mul/Div by a positive scalar constant whose input is quantized is *derived*:
   the input's integers read with the scale times the factor (the deployed graph drops the node).
7. Other outputs are quantized when a consumer's op type has ``is_input_quantized`` and is a
   compute-heavy kernel (convolution, matrix product; under configs that quantize every output,
   any consumer), when they are model outputs and ``model_output.is_output_quantized``, or when
   the op type's ``is_output_quantized`` says so and, for a cheap kernel, its inputs are quantized
   (an Add between float ops stays float: conversions around it cost more than it saves). Add/Sub/Mul with a constant operand whose other input is
   quantized count as integer ops (the constant is quantized, so onnxruntime runs
   QLinearAdd/QLinearMul); they never make their input quantized, so a float island (GELU's
   erf) gets no extra conversion. Ops whose integer kernel does not cover the node's attributes
   (Resize in cubic mode) do not count.
8. HardSigmoid/HardSwish with a quantized uint8 input become integer forms (:mod:`onnxqat.ops`);
   HardSigmoid's output then has the fixed encoding [0, 1]. A PRelu with a per-channel slope whose
   input and output are quantized on uint8 grids becomes one too (:func:`onnxqat.ops.prelu_slope`).
9. All float inputs and the output of a Concat share one quantizer (a derived quantizer tied so
   becomes a calibrated one).

The config's placement switches (``defaults`` keys, set in the ``aimet`` preset) change rules 6-8
to aimet-onnx 2.42's: ``derive_rescale`` false calibrates a Mul/Div by a scalar on its own,
``integer_forms`` false leaves HardSigmoid/HardSwish as they are, ``tie_branching_concat_inputs``
false leaves out of rule 9 a Concat input that another op reads too, ``symmetric_dynamic_weights``
makes the quantizer of a non-constant weight input (attention) symmetric, and ``quantize_constant_inputs``
gives every float constant an op reads its own quantizer calibrated on its values, except the
inputs aimet-onnx takes as parameters (:data:`AIMET_PARAM_INPUTS`, a MatMul's weight, the bias of
a MatMul+Add group) and Resize's scales; such an op is no float island of rule 7 then.

Every float tensor left unquantized gets its :class:`~onnxqat.ops.Reason` in ``plan.skipped``: a
stable ``rule_id`` (:data:`PLACEMENT_RULES`) and the readable detail naming the node.
"""

from __future__ import annotations

import dataclasses

import types
from collections.abc import Mapping

import onnx_ir as ir

from onnxqat import ops
from onnxqat.config import QuantSimConfig
from onnxqat.graph import is_constant, is_float, name_of
from onnxqat.ops import Reason
from onnxqat.plan import ActivationQuantizer, BiasQuantizer, IntegerForm, LinearForm, ParamQuantizer, QuantPlan
from onnxqat.spec import QuantSpec
from onnxqat.target import Target, resolve_target

__all__ = ["AIMET_PARAM_INPUTS", "PLACEMENT_RULES", "annotate", "weight_channel_axis", "weight_input_index"]

# Inputs aimet-onnx 2.42 takes as parameters of an op (its connected graph's weights, biases and
# norm statistics, quantized by its param rules, not as activations): op type -> input indices.
AIMET_PARAM_INPUTS: Mapping[str, tuple[int, ...]] = types.MappingProxyType({
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "BatchNormalization": (1, 2, 3, 4),
    "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2), "GroupNormalization": (1, 2),
    "RMSNormalization": (1,), "RNN": (1, 2, 3), "LSTM": (1, 2, 3), "GRU": (1, 2, 3),
})

# Rule id -> what it means; every Reason in ``plan.skipped`` has one of these ids (or a ``kernel.*``
# id of :mod:`onnxqat.ops`, or ``finalize.bias_overflow`` from :func:`onnxqat.pipeline.finalize`).
PLACEMENT_RULES: Mapping[str, str] = types.MappingProxyType({
    "placement.excluded_node": "the node is excluded by name in the config (rule 1)",
    "placement.excluded_op_type": "the node's op type is excluded in the config (rule 1)",
    "placement.params_off": "the config does not quantize this op type's weights (rule 2)",
    "placement.bias_not_constant": "the bias is not a float constant (rule 2)",
    "placement.bias_off": "params.bias.is_quantized is false in the config (rule 2)",
    "placement.bias_shared": "the bias feeds several nodes (rule 2)",
    "placement.bias_input_float": "the node's data input is not quantized (rule 2)",
    "placement.bias_weight_shared": "the per-channel weight is shared by several nodes (rule 2)",
    "placement.bias_not_1d": "the bias is not a 1-d tensor (rule 2)",
    "placement.bias_channels": "the bias's channel count differs from the weight's (rule 2)",
    "placement.model_input": "model_input.is_input_quantized is false (rule 3)",
    "placement.supergroup_interior": "inside a supergroup: its last output carries the quantizer (rule 4)",
    "placement.untied": "a Concat whose inputs calibration gave their own grids runs in float (rule 9)",
    "placement.output_override_off": "is_output_quantized false for this node in the config (rule 7)",
    "placement.movement_input_float": "a data-movement op whose input is float (rule 5)",
    "placement.constant_operand_float": "an op with a constant operand between float ops (rule 7)",
    "placement.cheap_kernel_float_inputs": "a cheap integer kernel whose inputs are float (rule 7)",
    "placement.output_not_quantized": "the config does not quantize this op's output and no consumer needs it (rule 7)",
    "placement.constant_input_float": "a constant of Add/Sub/Mul whose input or output is float (rule 7)",
    "placement.constant_not_weight": "a constant input that is not a weight (rule 2)",
})

def weight_input_index(node: ir.Node) -> int | None:
    """Index of the constant weight input of a weighted op, or None (see :mod:`onnxqat.ops`)."""
    return ops.weight_index(node)


def weight_channel_axis(node: ir.Node, index: int, rank: int) -> int | None:
    """Output-channel axis of a weight input, or None when per-channel does not apply."""
    return ops.channel_axis(node, index, rank)


def _depthwise_or_3d(node: ir.Node) -> bool:
    """A Conv/ConvTranspose with one input channel per group, or a 3-d one (5-d weight)."""
    if node.op_type not in ("Conv", "ConvTranspose") or len(node.inputs) < 2 or node.inputs[1] is None:
        return False
    shape = node.inputs[1].shape
    if shape is None:
        return False
    if len(shape) == 5:
        return True
    attr = node.attributes.get("group")
    group = attr.as_int() if attr is not None else 1
    if group == 1 or len(shape) < 2:
        return False
    return shape[1] == 1 if node.op_type == "Conv" else shape[0] == group


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def add(self, x: str) -> None:
        self.parent.setdefault(x, x)

    def find(self, x: str) -> str:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def __contains__(self, x: str) -> bool:
        return x in self.parent


def _sources_first(derived: list[ActivationQuantizer]) -> list[ActivationQuantizer]:
    """Derived quantizers ordered so each comes after the derived quantizer it reads (if any)."""
    names = {q.name for q in derived}
    done: set[str] = set()
    ordered: list[ActivationQuantizer] = []
    pending = list(derived)
    while pending:
        ready = [q for q in pending if q.derived_from is None or q.derived_from[0] not in names
                 or q.derived_from[0] in done]
        if not ready:  # a cycle cannot arise from a DAG; keep the rest in creation order
            ready = pending[:1]
        for q in ready:
            ordered.append(q)
            done.add(q.name)
            pending.remove(q)
    return ordered


def annotate(
    model: ir.Model,
    config: QuantSimConfig,
    *,
    param_bw: int = 8,
    activation_bw: int = 8,
    target: Target | str | None = None,
    untie: Mapping[str, str] | None = None,
) -> QuantPlan:
    """Apply the placement rules to ``model`` (BatchNorm already folded, shapes inferred).

    ``target`` (default: detected) sets what the deployed integer kernels compute exactly; on
    ``x86-avx2`` 8-bit weights of U8S8 GEMM kernels get a pair limit (see :mod:`onnxqat.target`).
    ``untie``: Concat node name -> why its inputs must not share one grid (found by calibration);
    such a Concat runs in float and its inputs keep their own quantizers.
    """
    return _Annotator(model, config, param_bw, activation_bw, resolve_target(target), untie or {}).run()


class _Annotator:
    def __init__(self, model: ir.Model, config: QuantSimConfig, param_bw: int, act_bw: int, target: Target,
                 untie: Mapping[str, str]) -> None:
        self.graph = model.graph
        self.target = target
        self.untie = untie
        self.shared_by: dict[str, list[str]] = {}  # a tensor of the group -> Concat nodes tying it
        self.config = config
        self.param_bw = param_bw
        self.act_bw = act_bw
        self.groups = _UnionFind()
        self.group_spec: dict[str, QuantSpec] = {}
        self.order: list[str] = []  # quantized tensors in creation order
        self.skipped: dict[str, Reason] = {}
        self.nodes = list(self.graph)
        self.derived: dict[str, tuple[str, float]] = {}  # tensor -> (input tensor, factor)
        self.constant_kernels: list[tuple[ir.Node, int]] = []
        self.forms: list[IntegerForm] = []
        self.chain_end: dict[str, str] = {}  # tensor inside a supergroup -> the group's last output
        self.chain_start: dict[str, ir.Node] = {}  # a supergroup's last output -> its first node
        self.linears: dict[str, tuple[ir.Node, int]] = {}  # MatMul of a Linear -> (its bias Add, bias index)
        self.linear_adds: set[str] = set()

    # -- helpers -------------------------------------------------------------------------------
    def excluded(self, node: ir.Node) -> Reason | None:
        if node.name in self.config.exclude_nodes:
            return Reason("placement.excluded_node", f"node '{node.name}' excluded by config")
        if node.op_type in self.config.exclude_op_types:
            return Reason("placement.excluded_op_type", f"op type {node.op_type} excluded by config")
        return None

    def act_spec(self, node: ir.Node | None) -> QuantSpec:
        bw = self.act_bw
        symmetric = self.config.activation_symmetric
        fixed = None
        if node is not None:
            override = self.config.nodes.get(name_of(node))
            if override is not None and override.activation_bw is not None:
                bw = override.activation_bw
            symmetric = self.config.activation_symmetric_for(node.op_type)
            fixed = self.config.output_range_for(node.op_type)
        return QuantSpec(
            bitwidth=bw,
            symmetric=symmetric,
            strict_symmetric=symmetric and self.config.strict_symmetric,
            unsigned_symmetric=self.config.unsigned_symmetric,
            fixed_range=fixed,
            symmetric_scale=self.config.symmetric_scale,
        )

    def new_group(self, tensor: str, spec: QuantSpec) -> None:
        self.groups.add(tensor)
        self.group_spec[tensor] = spec
        self.order.append(tensor)

    def tie(self, tensor: str, to: str) -> None:
        self.groups.add(tensor)
        self.groups.union(to, tensor)
        self.order.append(tensor)

    def quantized(self, tensor: str) -> bool:
        return tensor in self.groups

    def skip(self, value: ir.Value, reason: Reason) -> None:
        if is_float(value) and value.name and not self.quantized(value.name):
            self.skipped.setdefault(value.name, reason)

    # -- rules ---------------------------------------------------------------------------------
    def find_linears(self) -> None:
        """MatMul + Add(constant bias) pairs deployed as one Gemm with an int32 bias (rule 4)."""
        if self.target.name == "htp":
            return  # QNN/SNPE deploy the float model with encodings: AIMET's MatmulAdd pass decides there
        for node in self.nodes:
            if ops.rule(node.op_type, node.domain).linear is None or self.excluded(node):
                continue
            found = ops.linear_bias(node)
            if isinstance(found, Reason) or self.excluded(found[0]):
                continue
            weight_on, _ = self.config.param_rule(node.op_type, "weight")
            bias_on, _ = self.config.param_rule(node.op_type, "bias")
            if weight_on and bias_on and self.config.input_quantized_for(node.op_type):
                self.linears[name_of(node)] = found
                self.linear_adds.add(name_of(found[0]))

    def supergroup_interiors(self) -> dict[str, Reason]:
        """Tensors strictly inside a supergroup chain (or a Linear) -> reason."""
        interior: dict[str, Reason] = {}
        for node in self.nodes:
            linear = self.linears.get(name_of(node))
            if linear is not None:
                end = name_of(linear[0].outputs[0])
                interior[name_of(node.outputs[0])] = Reason(
                    "placement.supergroup_interior",
                    f"inside Linear '{node.name}' + '{linear[0].name}': {ops.rule(node.op_type).linear.reason}")  # type: ignore[union-attr]
                self.chain_end[name_of(node.outputs[0])] = end
                self.chain_start[end] = node
        for node in self.nodes:
            if self.excluded(node) or node.name in self.linears:
                continue
            if not self.config.depthwise_supergroups and _depthwise_or_3d(node):
                continue
            for group in self.supergroups():
                if node.op_type != group[0] or not self.matmul_add(node, group):
                    continue
                chain = [node]
                for op_type in group[1:]:
                    out = chain[-1].outputs[0]
                    users = [u.node for u in out.uses()]
                    if (
                        out.is_graph_output()
                        or len(users) != 1
                        or users[0].op_type != op_type
                        or self.excluded(users[0])
                    ):
                        break
                    chain.append(users[0])
                else:
                    label = "+".join(group)
                    for member in chain[:-1]:
                        interior[name_of(member.outputs[0])] = Reason("placement.supergroup_interior",
                                                                  f"inside supergroup {label}")
                        self.chain_end[name_of(member.outputs[0])] = name_of(chain[-1].outputs[0])
                    # a supergroup after a Linear (Add + Relu) starts at its MatMul
                    self.chain_start[name_of(chain[-1].outputs[0])] = self.chain_start.get(name_of(chain[0].outputs[0]), chain[0])
        return interior

    def supergroups(self) -> tuple[tuple[str, ...], ...]:
        """The config's supergroups, and MatMul+Add when its ``MatmulAdd`` graph pass is listed."""
        extra = (("MatMul", "Add"),) if "MatmulAdd" in self.config.graph_passes else ()
        return self.config.supergroups + extra

    def matmul_add(self, node: ir.Node, group: tuple[str, ...]) -> bool:
        """A MatMul+Add group needs a constant weight and an Add of a constant (the bias)."""
        if group != ("MatMul", "Add"):
            return True
        users = [u.node for u in node.outputs[0].uses()]
        return (weight_input_index(node) is not None and len(users) == 1 and users[0].op_type == "Add"
                and any(is_constant(v) for v in users[0].inputs))

    def kernel_problem(self, node: ir.Node) -> Reason | None:
        """Why the node cannot use its integer kernel in onnxruntime (not for HTP), or None."""
        return None if self.target.name == "htp" else ops.kernel_problem(node)

    def constant_kernel(self, node: ir.Node) -> int | None:
        """Index of a constant operand quantized so the node runs on its integer kernel, or None
        (never the bias of a Linear: it is an int32 bias)."""
        if node.name in self.linear_adds:
            return None
        index = ops.constant_operand(node)
        if index is None:
            return None
        config_op = "Add" if node.op_type == "Sub" else node.op_type
        return index if self.config.input_quantized_for(config_op) else None

    def pays_conversions(self, node: ir.Node) -> bool:
        """Whether an integer kernel is worth quantizing float inputs for.

        Compute-heavy kernels (convolutions, matrix products) are: QLinearConv beats the float
        path even with a QuantizeLinear in front. A cheap kernel (Add, Mul, pooling, Concat, a
        lookup) is not: between float ops, Q -> QLinearAdd -> DQ only adds two conversions and an
        8-bit grid (the power spectrum of silero-vad's STFT lost 4 points of frame accuracy so).
        Configs that quantize every output by default (AIMET/HTP) quantize cheap ops anyway.
        """
        if self.config.output_quantized:
            return True
        start = self.chain_start.get(name_of(node.outputs[0]) if node.outputs else "", node)
        return ops.rule(start.op_type, start.domain).kind is ops.OpKind.WEIGHTED

    def inputs_quantized(self, node: ir.Node) -> bool:
        """Every float, non-constant data input of ``node`` (of its supergroup's first node, for
        the group's last op) is quantized."""
        node = self.chain_start.get(name_of(node.outputs[0]) if node.outputs else "", node)
        data = [v for v in node.inputs if is_float(v) and not is_constant(v)]
        return all(v is not None and self.quantized(name_of(v)) for v in data)

    def integer_with_constant(self, node: ir.Node) -> bool:
        """An Add/Sub/Mul with a constant whose data input is quantized: it runs on the integer
        kernel with the constant quantized (rule 7); it never makes its input quantized."""
        index = self.constant_kernel(node)
        data = node.inputs[1 - index] if index is not None else None
        return data is not None and self.quantized(name_of(data))

    @staticmethod
    def moves_data(node: ir.Node) -> bool:
        return ops.rule(node.op_type, node.domain).kind is ops.OpKind.DATA_MOVEMENT

    def float_elementwise(self, node: ir.Node) -> bool:
        if self.config.quantize_constant_inputs:
            return False  # its constants are quantized like any input
        return ops.rule(node.op_type, node.domain).kind is ops.OpKind.ELEMENTWISE and any(
            is_constant(v) for v in node.inputs
        )

    def demanded(self) -> dict[str, str]:
        """Tensors that a consumer or the model-output rule needs quantized -> why."""
        demand: dict[str, str] = {}
        for node in self.nodes:
            if self.excluded(node) or self.kernel_problem(node):
                continue
            if self.float_elementwise(node):
                continue  # runs on integers only where its input is quantized anyway (rule 7)
            if not self.config.input_quantized_for(node.op_type) or not self.pays_conversions(node):
                continue
            for value in node.inputs:
                if is_float(value) and not is_constant(value):
                    assert value is not None
                    demand.setdefault(name_of(value), f"input of {node.op_type} node '{node.name}'")
        if self.config.model_output_quantized:
            for value in self.graph.outputs:
                demand.setdefault(name_of(value), "model output")
        return demand

    def run(self) -> QuantPlan:
        self.find_linears()
        interior = self.supergroup_interiors()
        demand = self.demanded()

        for value in self.graph.inputs:
            if not is_float(value) or is_constant(value):
                continue
            if self.config.model_input_quantized or value.name in demand:
                spec = self.act_spec(None)
                if self.config.aimet_rounding and not spec.symmetric:
                    spec = dataclasses.replace(spec, rounding="aimet")
                self.new_group(name_of(value), spec)
            else:
                self.skip(value, Reason("placement.model_input", "model input (model_input.is_input_quantized is false)"))

        for node in self.nodes:
            self.visit_outputs(node, interior, demand)

        if self.config.quantize_constant_inputs:
            self.quantize_constant_inputs()
        self.quantize_constants()
        self.tie_concats()
        if self.config.symmetric_dynamic_weights:
            self.symmetric_dynamic_weights()
        activations = self.activation_quantizers()
        by_tensor = {t: q.name for q in activations for t in q.tensors}
        params, biases = self.params(by_tensor)
        self.explain_constants({q.name for q in params} | {b.name for b in biases})
        int32 = {b.name for b in biases}
        linear_forms = []
        for node in self.nodes:
            if node.name in self.linears:
                add, index = self.linears[node.name]
                bias, data = add.inputs[index], node.inputs[0]
                assert bias is not None and data is not None and bias.name is not None and data.name is not None
                if bias.name in int32:
                    linear_forms.append(LinearForm(name_of(node), name_of(add), bias.name, data.name,
                                                   name_of(add.outputs[0])))
        return QuantPlan(
            activations=activations,
            params=tuple(params),
            biases=tuple(biases),
            skipped=types.MappingProxyType(dict(self.skipped)),
            integer_forms=tuple(f for f in self.forms if self.quantized(f.output) and self.quantized(f.input)),
            linear_forms=tuple(linear_forms),
        )

    def visit_outputs(self, node: ir.Node, interior: dict[str, Reason], demand: dict[str, str]) -> None:
        excluded = self.excluded(node)
        override = self.config.nodes.get(name_of(node))
        problem = self.kernel_problem(node)
        for out in node.outputs:
            if not is_float(out):
                continue
            name = name_of(out)
            if excluded:
                self.skip(out, excluded)
            elif problem:
                # never Q right after it: onnxruntime would form the integer kernel that does not exist
                self.skip(out, Reason(problem.rule_id, f"{problem.detail}; its output stays float"))
            elif node.name in self.untie and name not in demand:
                self.skip(out, Reason("placement.untied", self.untie[name_of(node)]))
            elif name in interior:
                self.skip(out, interior[name])
                index = self.constant_kernel(node) if self.float_elementwise(node) else None
                if index is not None and out is node.outputs[0]:
                    self.constant_kernels.append((node, index))
            elif self.derive(node, out, override is not None):
                pass
            elif (
                (self.moves_data(node) or node.op_type in self.config.tied_op_types)
                and node.inputs
                and node.inputs[0] is not None
                and self.quantized(name_of(node.inputs[0]))
            ):
                self.tie(name, name_of(node.inputs[0]))
            elif override is not None and override.is_output_quantized is not None:
                if override.is_output_quantized:
                    self.new_group(name, self.act_spec(node))
                else:
                    self.skip(out, Reason("placement.output_override_off",
                                          f"node '{node.name}': is_output_quantized false in config"))
            elif self.integer_form(node, out, demand):
                pass
            elif name in demand or (
                self.config.output_quantized_for(node.op_type)
                and (not self.float_elementwise(node) or self.integer_with_constant(node)
                     or self.chain_start.get(name, node).op_type == "MatMul")
                and (self.pays_conversions(node) or self.inputs_quantized(node))
                and not self.kernel_problem(node)
            ):
                self.new_group(name, self.act_spec(node))
                index = self.constant_kernel(node) if self.float_elementwise(node) else None
                if index is not None:
                    self.constant_kernels.append((node, index))
            elif self.moves_data(node):
                self.skip(out, Reason("placement.movement_input_float",
                                      f"{node.op_type} reuses its input's encoding and its input is float"))
            elif self.float_elementwise(node):
                self.skip(out, Reason("placement.constant_operand_float",
                                      f"{node.op_type} with a constant operand runs in float and no consumer "
                                      "needs a quantized input"))
            elif self.config.output_quantized_for(node.op_type) and not self.inputs_quantized(node):
                self.skip(out, Reason("placement.cheap_kernel_float_inputs",
                                      f"{node.op_type} node '{node.name}': its inputs are float and no consumer "
                                      "needs a quantized input (a cheap integer kernel does not pay for conversions)"))
            else:
                self.skip(out, Reason("placement.output_not_quantized",
                                      f"op type {node.op_type}: output not quantized by config and no consumer "
                                      "needs a quantized input"))

    def derive(self, node: ir.Node, out: ir.Value, overridden: bool) -> bool:
        """Rule 6: a Mul/Div by a positive scalar of a quantized tensor reads its integers."""
        if not self.config.derive_rescale:
            return False
        factor = ops.rescale_factor(node)
        if factor is None or overridden or out is not node.outputs[0]:
            return False
        data = next(v for v in node.inputs if v is not None and not is_constant(v))
        if not self.quantized(name_of(data)):
            return False
        self.new_group(name_of(out), self.group_spec[self.groups.find(name_of(data))])
        self.derived[name_of(out)] = (name_of(data), factor)
        return True

    def integer_form(self, node: ir.Node, out: ir.Value, demand: dict[str, str]) -> bool:
        """Rule 8: HardSigmoid/HardSwish (PRelu) of a quantized uint8 tensor as integer kernels."""
        if not self.config.integer_forms:
            return False
        if node.op_type == "PRelu":
            return self.prelu_form(node, out)
        found = ops.integer_form(node)
        data = node.inputs[0] if node.inputs else None
        if found is None or data is None or out is not node.outputs[0] or not self.quantized(name_of(data)):
            return False
        if not self.config.input_quantized_for(node.op_type) and out.name not in demand:
            return False
        spec = self.act_spec(node)
        source = self.group_spec[self.groups.find(name_of(data))]
        if spec.bitwidth != 8 or source.bitwidth != 8 or source.symmetric or spec.symmetric:
            return False
        form, alpha, beta = found
        if not form.multiplies_input:
            spec = spec.replace(fixed_range=(0.0, 1.0))
        self.new_group(name_of(out), spec)
        self.forms.append(IntegerForm(name_of(node), node.op_type, alpha, beta, name_of(data), name_of(out)))
        return True

    def prelu_form(self, node: ir.Node, out: ir.Value) -> bool:
        """Rule 8: a PRelu of a uint8 tensor deploys as its integer form, its output quantized
        (its float kernel on onnxruntime's NHWC layout of integer convolutions is slow)."""
        data = node.inputs[0] if node.inputs else None
        if (self.target.name == "htp" or data is None or out is not node.outputs[0] or not self.quantized(name_of(data))
                or isinstance(ops.prelu_slope(node), Reason)):
            return False
        spec, source = self.act_spec(node), self.group_spec[self.groups.find(name_of(data))]
        if spec.bitwidth != 8 or source.bitwidth != 8 or source.symmetric or spec.symmetric:
            return False
        self.new_group(name_of(out), spec)
        self.forms.append(IntegerForm(name_of(node), node.op_type, 0.0, 0.0, name_of(data), name_of(out)))
        return True

    def quantize_constant_inputs(self) -> None:
        """Every float constant an op reads gets its own quantizer, calibrated on its values (the
        default activation spec), but for aimet-onnx's parameters and Resize's scales."""
        for node in self.nodes:
            if self.excluded(node) or node.op_type == "Resize":
                continue
            params = set(AIMET_PARAM_INPUTS.get(node.op_type, ()))
            weight = weight_input_index(node)
            if weight is not None:
                params.add(weight)
            if node.op_type == "Add":
                out = name_of(node.outputs[0])
                start = self.chain_start.get(self.chain_end.get(out, out))
                if start is not None and start.op_type == "MatMul" and start.outputs[0] in node.inputs:
                    params.update(range(len(node.inputs)))  # the bias of MatMul+Add (aimet's MatmulAdd pass)
            for index, value in enumerate(node.inputs):
                if (value is None or index in params or not is_float(value) or not is_constant(value)
                        or self.quantized(name_of(value))):
                    continue
                self.new_group(name_of(value), self.act_spec(None))

    def quantize_constants(self) -> None:
        """Constants of Add/Sub/Mul whose data input and output are quantized get quantizers."""
        for node, index in self.constant_kernels:
            const = node.inputs[index]
            data = node.inputs[1 - index]
            assert const is not None and data is not None
            if self.quantized(name_of(const)):
                continue
            out = self.chain_end.get(name_of(node.outputs[0]), name_of(node.outputs[0]))
            if self.quantized(name_of(data)) and self.quantized(out):
                self.new_group(name_of(const), self.group_spec[self.groups.find(out)])
            else:
                self.skip(const, Reason("placement.constant_input_float",
                                        f"constant of {node.op_type} node '{node.name}': its input or output is float"))

    def underive(self, tensor: str) -> None:
        root = self.groups.find(tensor)
        for name in [t for t in self.derived if self.groups.find(t) == root]:
            del self.derived[name]

    def tie_concats(self) -> None:
        for node in self.nodes:
            if ops.rule(node.op_type, node.domain).kind is not ops.OpKind.SHARED or self.excluded(node):
                continue
            if node.name in self.untie:
                continue
            out = node.outputs[0]
            if not self.quantized(name_of(out)):
                continue
            for value in node.inputs:
                if not is_float(value):
                    continue
                assert value is not None
                if not self.config.tie_branching_concat_inputs and self.branches(value, node):
                    continue  # aimet-onnx ties only an input no other op reads
                if not self.quantized(name_of(value)):
                    if is_constant(value):
                        self.new_group(name_of(value), self.group_spec[self.groups.find(name_of(out))])
                    else:
                        continue
                self.underive(name_of(out))
                self.underive(name_of(value))
                self.groups.union(name_of(out), name_of(value))
            self.shared_by.setdefault(name_of(out), []).append(name_of(node))

    def branches(self, value: ir.Value, reader: ir.Node) -> bool:
        """Whether aimet-onnx 2.42 leaves a Concat's input on its own grid: another op reads it, or
        reads a tensor on its way up through ops whose outputs it never quantizes (a Split's other
        output, ...), or it is the output of a tied op (Relu, Resize, ...) that reuses its input's
        grid (aimet-onnx ties those after the Concat, and they win)."""
        from onnxqat.encodings import AIMET_UNQUANTIZED_OUTPUTS

        below = reader
        while True:
            if any(use.node is not below for use in value.uses()):
                return True
            producer = value.producer()
            if producer is None or not producer.inputs or producer.inputs[0] is None:
                return False
            source = producer.inputs[0]
            if producer.op_type in self.config.tied_op_types:
                return (self.quantized(name_of(source)) and self.quantized(name_of(value))
                        and self.groups.find(name_of(source)) == self.groups.find(name_of(value)))
            if producer.op_type not in AIMET_UNQUANTIZED_OUTPUTS:
                return False
            if any(out is not value and out.uses() for out in producer.outputs):
                return True
            below, value = producer, source

    def symmetric_dynamic_weights(self) -> None:
        """The quantizer of a Conv/ConvTranspose/Gemm/MatMul's weight input that is no constant (an
        attention's keys and values) takes the weights' symmetry, as aimet-onnx 2.42 does."""
        for node in self.nodes:
            if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2:
                continue
            weight = node.inputs[1]
            if weight is None or is_constant(weight) or not self.quantized(name_of(weight)):
                continue
            _, symmetric = self.config.param_rule(node.op_type, "weight")
            root = self.groups.find(name_of(weight))
            for tensor, spec in list(self.group_spec.items()):
                if self.groups.find(tensor) == root:
                    self.group_spec[tensor] = spec.replace(symmetric=symmetric,
                                                           strict_symmetric=symmetric and self.config.strict_symmetric)

    def activation_quantizers(self) -> tuple[ActivationQuantizer, ...]:
        members: dict[str, list[str]] = {}
        for tensor in self.order:
            members.setdefault(self.groups.find(tensor), []).append(tensor)
        name_of = {t: tensors[0] for tensors in members.values() for t in tensors}
        shared: dict[str, list[str]] = {}
        for tensor, nodes in self.shared_by.items():
            shared.setdefault(name_of[tensor], []).extend(nodes)
        calibrated, derived = [], []
        for tensors in members.values():
            specs = [self.group_spec[t] for t in tensors if t in self.group_spec]
            spec = max(specs, key=lambda s: s.bitwidth)
            source = self.derived.get(tensors[0])
            by = tuple(shared.get(tensors[0], ()))
            if source is not None:
                derived.append(ActivationQuantizer(tensors[0], spec, tuple(tensors), (name_of[source[0]], source[1]), by))
            else:
                calibrated.append(ActivationQuantizer(tensors[0], spec, tuple(tensors), shared_by=by))
        return tuple(calibrated + _sources_first(derived))

    def params(
        self, by_tensor: dict[str, str]
    ) -> tuple[list[ParamQuantizer], list[BiasQuantizer]]:
        weights: dict[str, ParamQuantizer] = {}
        bias_candidates: list[tuple[ir.Node, ir.Value, ir.Value]] = []
        for node in self.nodes:
            slot = ops.rule(node.op_type, node.domain).weight
            if slot is None or self.excluded(node):
                continue
            index = weight_input_index(node)
            if index is None:
                continue
            weight = node.inputs[index]
            assert weight is not None
            if not is_float(weight):
                continue
            slow = ops.float_kernel(node, self.target.float_kernels) if self.config.integer_forms else None
            if slow is not None:
                self.skip(weight, slow)
                bias = node.inputs[slot.bias] if slot.bias is not None and len(node.inputs) > slot.bias else None
                if bias is not None:
                    self.skip(bias, slow)
                continue
            quantize, symmetric = self.config.param_rule(node.op_type, "weight")
            if not quantize:
                self.skip(weight, Reason("placement.params_off", f"weights of {node.op_type}: params not quantized by config"))
                continue
            spec = self.param_spec(node, weight, index, symmetric)
            previous = weights.get(name_of(weight))
            if previous is not None:
                if previous.spec != spec:
                    spec = previous.spec.with_axis(None) if previous.spec.axis != spec.axis else previous.spec
                weights[name_of(weight)] = ParamQuantizer(name_of(weight), spec, previous.consumers + (name_of(node),))
            else:
                weights[name_of(weight)] = ParamQuantizer(name_of(weight), spec, (name_of(node),))
            candidate = node.inputs[slot.bias] if slot.bias is not None and len(node.inputs) > slot.bias else None
            if candidate is not None:
                bias_candidates.append((node, candidate, weight))
            elif node.name in self.linears:
                add, at = self.linears[name_of(node)]
                linear_bias = add.inputs[at]
                assert linear_bias is not None
                bias_candidates.append((node, linear_bias, weight))
        if self.config.quantize_standalone_batchnorm:
            for node in self.nodes:
                if node.op_type == "BatchNormalization" and not self.excluded(node):
                    scale = node.inputs[1] if len(node.inputs) > 1 else None
                    if scale is not None and is_float(scale) and is_constant(scale) and scale.name not in weights:
                        weights[name_of(scale)] = ParamQuantizer(name_of(scale), self.batchnorm_spec(node),
                                                                 (name_of(node),))

        biases = []
        for node, bias, weight in bias_candidates:
            reason = self.bias_problem(node, bias, weight, weights[name_of(weight)])
            if reason:
                self.skip(bias, reason)
                continue
            data = node.inputs[0]
            assert data is not None
            adder = name_of(self.linears[name_of(node)][0]) if node.name in self.linears else name_of(node)
            biases.append(BiasQuantizer(name_of(bias), adder, by_tensor[name_of(data)], name_of(weight)))
        return list(weights.values()), biases

    def batchnorm_spec(self, node: ir.Node) -> QuantSpec:
        """A standalone BatchNormalization's scale, as aimet-onnx 2.42 quantizes it: per tensor, at
        least 8 bits, symmetric only from 16 bits."""
        override = self.config.nodes.get(name_of(node))
        bw = max(override.param_bw if override is not None and override.param_bw is not None else self.param_bw, 8)
        return QuantSpec(bitwidth=bw, symmetric=bw >= 16, strict_symmetric=False, unsigned_symmetric=False,
                         symmetric_scale=self.config.symmetric_scale,
                         rounding="aimet" if self.config.aimet_rounding else "half_even")

    def param_spec(self, node: ir.Node, weight: ir.Value, index: int, symmetric: bool) -> QuantSpec:
        bw = self.param_bw
        override = self.config.nodes.get(name_of(node))
        if override is not None and override.param_bw is not None:
            bw = override.param_bw
        axis = None
        rank = len(weight.shape) if weight.shape is not None else 0
        if self.config.per_channel_for(node.op_type):
            axis = weight_channel_axis(node, index, rank)
        pair_limit = pair_axis = None
        if self.target.pair_limit is not None and bw == 8 and symmetric and ops.saturates_u8s8(node) and rank >= 1:
            pair_limit = self.target.pair_limit
            channel = weight_channel_axis(node, index, rank)
            pair_axis = channel if channel is not None else max(rank - 2, 0)
        return QuantSpec(
            bitwidth=bw,
            symmetric=symmetric,
            strict_symmetric=symmetric and self.config.strict_symmetric,
            unsigned_symmetric=False,
            axis=axis,
            pair_limit=pair_limit,
            pair_axis=pair_axis,
            symmetric_scale=self.config.symmetric_scale,
            rounding="aimet" if self.config.aimet_rounding else "half_even",
        )

    def bias_problem(
        self, node: ir.Node, bias: ir.Value, weight_value: ir.Value, weight: ParamQuantizer
    ) -> Reason | None:
        if not is_float(bias) or not is_constant(bias):
            return Reason("placement.bias_not_constant", f"bias of {node.op_type} node '{node.name}' is not a float constant")
        quantize, _ = self.config.param_rule(node.op_type, "bias")
        if not quantize:
            return Reason("placement.bias_off", "bias: params.bias.is_quantized is false in config")
        if len(bias.uses()) != 1:
            return Reason("placement.bias_shared", "bias shared by several nodes")
        data = node.inputs[0]
        if data is None or not self.quantized(name_of(data)):
            return Reason("placement.bias_input_float", f"bias of '{node.name}': the node's input is not quantized")
        if len(weight.consumers) > 1 and weight.spec.axis is not None:
            return Reason("placement.bias_weight_shared", f"bias of '{node.name}': weight shared by several nodes")
        shape = bias.shape
        if shape is None or len(shape) != 1:
            return Reason("placement.bias_not_1d", f"bias of '{node.name}' is not a 1-d tensor")
        if weight.spec.axis is not None:
            assert weight_value.shape is not None
            if weight_value.shape[weight.spec.axis] != shape[0]:
                return Reason("placement.bias_channels",
                              f"bias of '{node.name}': channel count differs from the weight's (grouped op)")
        return None

    def explain_constants(self, quantized: set[str]) -> None:
        for node in self.nodes:
            for value in node.inputs:
                if value is not None and is_constant(value) and value.name not in quantized:
                    self.skip(value, Reason("placement.constant_not_weight",
                                            f"constant input of {node.op_type} node '{node.name}' (not a weight)"))
