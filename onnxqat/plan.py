"""The quantization plan: which tensors are quantized, how, and which quantizers are tied.

A plan is the output of the annotation pass and the input of every later stage (insertion,
calibration, lowering for training, export). It refers to tensors by their names in the float
model; quantizers are identified by explicit names, never derived from tensor-name suffixes.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterator, Mapping

from onnxqat.ops import Reason
from onnxqat.spec import QuantSpec

__all__ = ["ActivationQuantizer", "BiasQuantizer", "IntegerForm", "LinearForm", "ParamQuantizer", "QuantPlan"]


@dataclasses.dataclass(frozen=True)
class ActivationQuantizer:
    """One activation encoding, shared by one or more tensors (tied quantizers).

    Attributes:
        name: Quantizer name (the first tensor it was created for).
        spec: Grid of the quantizer (always per tensor).
        tensors: Every tensor that is quantized with this encoding, ``name`` first.
        derived_from: ``(source quantizer, k)`` when ``name`` is ``x * k`` of a tensor ``x`` of the
            source quantizer (a Mul/Div by a positive scalar; the source comes earlier in the
            plan and may itself be derived): its encoding is the source's with
            the scale multiplied by ``k``, and the deployed graph reads the source's integers with
            that scale instead of running the Mul/Div. Not calibrated.
        shared_by: Nodes (Concat) whose inputs and output this quantizer ties onto one grid;
            calibration checks that their inputs' ranges are close enough to share it.
    """

    name: str
    spec: QuantSpec
    tensors: tuple[str, ...]
    derived_from: tuple[str, float] | None = None
    shared_by: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ParamQuantizer:
    """Quantizer of a constant weight tensor.

    Attributes:
        name: Name of the weight tensor (an initializer of the float model).
        spec: Grid; ``spec.axis`` is the per-channel axis or None.
        consumers: Names of the nodes whose weight input reads the quantized weight.
    """

    name: str
    spec: QuantSpec
    consumers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class BiasQuantizer:
    """int32 bias with derived scale ``input_scale * weight_scale`` and zero point 0.

    Attributes:
        name: Name of the bias tensor.
        node: The Conv/ConvTranspose/Gemm node that adds the bias (for a :class:`LinearForm`, its Add).
        input_quantizer: Activation quantizer of the node's data input.
        weight_quantizer: Param quantizer of the node's weight.
    """

    name: str
    node: str
    input_quantizer: str
    weight_quantizer: str


@dataclasses.dataclass(frozen=True)
class IntegerForm:
    """A node without an integer kernel deployed as integer kernels (see :mod:`onnxqat.ops`).

    Attributes:
        node: Name of the HardSigmoid/HardSwish/PRelu node.
        op_type: Its op type.
        alpha, beta: ``clip(alpha x + beta, 0, 1)`` (HardSwish: 1/6, 1/2); 0 for PRelu, whose
            slope is its constant input 1.
        input: Its (quantized) input tensor.
        output: Its (quantized) output tensor.
    """

    node: str
    op_type: str
    alpha: float
    beta: float
    input: str
    output: str


@dataclasses.dataclass(frozen=True)
class LinearForm:
    """``MatMul(x, W) + b`` deployed as one Gemm with an int32 bias (see :class:`onnxqat.ops.LinearRule`).

    Deployed so while its bias is an int32 bias of the plan (:func:`onnxqat.pipeline.finalize`
    drops biases that overflow int32: the pair then runs as MatMul and a float Add).

    Attributes:
        matmul: Name of the MatMul node.
        add: Name of the Add node of the bias.
        bias: The bias tensor (a :class:`BiasQuantizer` of the plan).
        input: The MatMul's (quantized) data input.
        output: The Add's output.
    """

    matmul: str
    add: str
    bias: str
    input: str
    output: str


@dataclasses.dataclass(frozen=True)
class QuantPlan:
    """Everything the annotation pass decided about a model.

    Attributes:
        activations: Activation quantizers.
        params: Weight quantizers.
        biases: Derived int32 bias quantizers.
        skipped: For every float tensor left unquantized, the rule that skipped it: a
            :class:`~onnxqat.ops.Reason` (``rule_id`` from
            :data:`onnxqat.passes.annotate.PLACEMENT_RULES`, ``str()`` the readable detail).
        integer_forms: Nodes deployed as integer forms.
        linear_forms: MatMul + Add pairs deployed as one Gemm with an int32 bias.
    """

    activations: tuple[ActivationQuantizer, ...] = ()
    params: tuple[ParamQuantizer, ...] = ()
    biases: tuple[BiasQuantizer, ...] = ()
    skipped: Mapping[str, Reason] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({})
    )
    integer_forms: tuple[IntegerForm, ...] = ()
    linear_forms: tuple[LinearForm, ...] = ()

    def __post_init__(self) -> None:
        names = [q.name for q in self.activations] + [q.name for q in self.params]
        names += [q.name for q in self.biases]
        if len(names) != len(set(names)):
            raise ValueError("quantizer names must be unique")
        loose = [t for t, r in self.skipped.items() if not isinstance(r, Reason)]
        if loose:
            raise ValueError(f"skipped tensors {sorted(loose)[:3]} need a Reason, not {type(self.skipped[loose[0]]).__name__}")
        seen: set[str] = set()
        for q in self.activations:
            if q.spec.axis is not None:
                raise ValueError(f"activation quantizer {q.name} cannot be per-channel")
            if not q.tensors or q.tensors[0] != q.name:
                raise ValueError(f"activation quantizer {q.name} must list its own tensor first")
            overlap = seen.intersection(q.tensors)
            if overlap:
                raise ValueError(f"tensors {sorted(overlap)} belong to two quantizers")
            seen.update(q.tensors)
        known: set[str] = set()
        for q in self.activations:
            if q.derived_from is not None:
                source, factor = q.derived_from
                if source not in known or not factor > 0:
                    raise ValueError(f"quantizer {q.name} derives from {source!r}, which is not an earlier "
                                     "quantizer, or by a factor that is not positive")
            known.add(q.name)

    def activation_of(self, tensor: str) -> ActivationQuantizer | None:
        """The activation quantizer applied to ``tensor``, if any."""
        return self._tensor_index.get(tensor)

    @property
    def _tensor_index(self) -> Mapping[str, ActivationQuantizer]:
        index = self.__dict__.get("_index")
        if index is None:
            index = {t: q for q in self.activations for t in q.tensors}
            object.__setattr__(self, "_index", index)
        return index

    @property
    def calibrated_activations(self) -> tuple[ActivationQuantizer, ...]:
        """Activation quantizers whose encodings come from data (not derived)."""
        return tuple(q for q in self.activations if q.derived_from is None)

    def param(self, name: str) -> ParamQuantizer | None:
        return next((q for q in self.params if q.name == name), None)

    def quantizer_names(self) -> Iterator[str]:
        for group in (self.activations, self.params, self.biases):
            for q in group:
                yield q.name

    def summary(self) -> str:
        tied = sum(len(q.tensors) for q in self.activations)
        per_channel = sum(q.spec.per_channel for q in self.params)
        derived = sum(q.derived_from is not None for q in self.activations)
        forms = f", {len(self.integer_forms)} integer forms" if self.integer_forms else ""
        forms += f", {len(self.linear_forms)} Linear (MatMul+Add) as Gemm" if self.linear_forms else ""
        return (
            f"{len(self.activations)} activation quantizers on {tied} tensors"
            f"{f' ({derived} derived)' if derived else ''}{forms}, "
            f"{len(self.params)} weight quantizers ({per_channel} per-channel), "
            f"{len(self.biases)} int32 biases, {len(self.skipped)} float tensors left float"
        )
