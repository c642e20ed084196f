"""The quantization pipeline as pure stages over plain values.

    prepare -> plan -> encode weights -> calibrate -> finalize -> lower -> export
                                                        ^
                                       train (QAT) -----+  (new weights and encodings)

Each stage takes values and returns new ones; nothing is mutated in place. The value flowing
between them is a :class:`SimState`: the float model (canonicalised, BatchNorm folded), the plan
decided by the placement rules, and the encodings. :class:`~onnxqat.sim.QuantizationSimModel` is a
thin facade that holds the current state and caches a session for it; the QAT trainer takes a
state and produces new ones.

>>> prepared = prepare("models/fmnist_dsconv.onnx")                       # doctest: +SKIP
>>> plan = make_plan(prepared.model, load_config("onnxruntime"))          # doctest: +SKIP
>>> state = SimState(prepared.model, plan, encode_weights(prepared.model, plan))   # doctest: +SKIP
>>> state = state.with_encodings(calibrate(state, batches).encodings)     # doctest: +SKIP
>>> export(state, "out", prepared.float16)                                 # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxqat import distributed
from onnxqat.calibrate.runner import collect_statistics
from onnxqat.calibrate.schemes import DEFAULT_PERCENTILE, Scheme, activation_encoding, weight_encoding
from onnxqat.config import QuantSimConfig
from onnxqat.encodings import (ENCODINGS_FORMATS, MISSING, Binding, ParsedEncodings, SourceGraph, aimet_names,
                               aimet_param_names, bind, dumps, to_aimet)
from onnxqat.errors import ConfigError, EncodingsError, ModelError
from onnxqat.graph import const_array, name_of
from onnxqat.io import load_model, save_model
from onnxqat.ops import POOLED_LINEAR, ChannelPadRule, LayoutRule, Reason
from onnxqat.outputs import transaction
from onnxqat.passes.annotate import annotate
from onnxqat.passes.canonicalize import canonical_passes
from onnxqat.passes.elementwise import SubtractConstantAsAddPass
from onnxqat.passes.fix_inputs import FixInputsPass
from onnxqat.passes.float16 import Float16Record, Float16ToFloat32Pass, cast_interface, restore_float16
from onnxqat.passes.fold_batchnorm import FoldAffinePass, FoldBatchNormPass, RescaleBatchNormPass
from onnxqat.passes.insert_qdq import InsertQDQPass, bias_encoding, bias_fits
from onnxqat.passes.pad_channels import PadDepthwiseChannelsPass
from onnxqat.passes.pooled_linear import PooledLinearAsConvPass
from onnxqat.plan import ActivationQuantizer, QuantPlan
from onnxqat.qparams import Encoding, compute_encoding
from onnxqat.runtime import SEGMENT_NODES, Session, release_if_mapped, serialized_once
from onnxqat.target import Target

__all__ = [
    "ModelSource",
    "Prepared",
    "SimState",
    "apply_weights",
    "bind_encodings",
    "Calibration",
    "SHARED_RANGE_RATIO",
    "calibrate",
    "encode_weights",
    "encodings_document",
    "export",
    "finalize",
    "lower",
    "make_plan",
    "prepare",
]

ModelSource = str | os.PathLike[str] | onnx.ModelProto | ir.Model


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A loaded, canonicalised model and what was changed to simulate it.

    Attributes:
        model: Float32 model, opset >= 13, Constant nodes as initializers, BatchNorm folded.
        float16: The float16 interface of the original model (empty for float32 models).
        unfolded_batchnorm: Each BatchNormalization left unfolded -> why (empty when folding is off).
        unpadded_depthwise: Each depthwise Conv of a channel count not a multiple of the target's
            that was not padded -> why (empty when padding is off).
    """

    model: ir.Model
    float16: Float16Record
    unfolded_batchnorm: Mapping[str, Reason] = dataclasses.field(default_factory=dict)
    unpadded_depthwise: Mapping[str, Reason] = dataclasses.field(default_factory=dict)


def prepare(source: ModelSource, *, fold_batchnorm: bool = True,
            fix_inputs: Mapping[str, Any] | None = None, fold_affine: bool = True,
            rescale_batchnorm: bool = False, pad_depthwise: ChannelPadRule | None = None,
            layout_rules: Sequence[LayoutRule] = ()) -> Prepared:
    """Load (if a path) and canonicalise a model; the caller's object or file is never modified.

    ``fold_affine`` (with ``fold_batchnorm``) also folds a Mul/Add of constants after a Conv/Gemm
    into it (:class:`~onnxqat.passes.fold_batchnorm.FoldAffinePass`; the ``aimet`` preset does not).
    ``rescale_batchnorm`` writes each BatchNormalization left as scale and shift
    (:class:`~onnxqat.passes.fold_batchnorm.RescaleBatchNormPass`, the ``aimet`` preset).

    ``pad_depthwise`` (the target's :attr:`~onnxqat.target.Target.pad_depthwise`) pads depthwise
    convolutions to its channel multiple at their producers (:mod:`onnxqat.passes.pad_channels`);
    ``layout_rules`` (the target's) rewrite the graph into an equivalent one its runtime lays out
    better (:data:`onnxqat.ops.POOLED_LINEAR`: :mod:`onnxqat.passes.pooled_linear`).

    ``fix_inputs`` makes those inputs constants and folds the control flow that then has a
    constant condition (:mod:`onnxqat.passes.fix_inputs`).
    """
    if isinstance(source, (str, os.PathLike)):
        model = load_model(source)
    elif isinstance(source, onnx.ModelProto):
        try:
            onnx.checker.check_model(source)
        except onnx.checker.ValidationError as e:
            raise ModelError(f"model fails the ONNX checker: {str(e).strip().splitlines()[0]}") from None
        model = ir.from_proto(source)
    elif isinstance(source, ir.Model):
        model = source.clone()
    else:
        raise ModelError(f"expected a path, onnx.ModelProto or onnx_ir.Model, got {type(source).__name__}")
    if fix_inputs:
        FixInputsPass(fix_inputs)(model)
    model = canonical_passes()(model).model
    SubtractConstantAsAddPass()(model)
    to_float32 = Float16ToFloat32Pass()(model)
    if to_float32.modified:
        ShapeInferencePass(strict_mode=False)(model)
    unfolded: Mapping[str, Reason] = {}
    if fold_batchnorm:
        unfolded = FoldBatchNormPass()(model).unfolded
        # Conv -> Add(bias) -> BatchNormalization: the BatchNorm only becomes foldable once the
        # Add is folded, so fold again until nothing changes. Preparing an exported model.onnx then
        # gives the graph its encodings were computed on (prepare is idempotent); PP-OCRv4 det's
        # ConvTranspose -> Add -> BatchNorm otherwise came back BatchNorm-folded, its weight
        # encodings applied to other weights (255 output steps from the deployed model).
        while fold_affine and FoldAffinePass()(model).modified:
            again = FoldBatchNormPass()(model)
            unfolded = again.unfolded
            if not again.modified:
                break
    if rescale_batchnorm:
        RescaleBatchNormPass()(model)
    if POOLED_LINEAR in layout_rules:
        PooledLinearAsConvPass()(model)
    unpadded: Mapping[str, Reason] = {}
    if pad_depthwise is not None:
        unpadded = PadDepthwiseChannelsPass(pad_depthwise.multiple)(model).unpadded
    return Prepared(model, to_float32.record, unfolded, unpadded)


def make_plan(model: ir.Model, config: QuantSimConfig, *, param_bw: int = 8, activation_bw: int = 8,
              target: Target | str | None = None, untie: Mapping[str, str] | None = None) -> QuantPlan:
    """The placement rules applied to a prepared model (see :mod:`onnxqat.passes.annotate`)."""
    return annotate(model, config, param_bw=param_bw, activation_bw=activation_bw, target=target, untie=untie)


def encode_weights(model: ir.Model, plan: QuantPlan, scheme: Scheme = Scheme.MINMAX) -> dict[str, Encoding]:
    """Encodings of every weight quantizer of ``plan`` from the model's current weights."""
    initializers = model.graph.initializers
    out = {}
    for p in plan.params:
        weight = const_array(initializers[p.name])
        if weight is None:
            raise ModelError(f"weight '{p.name}' is not a constant initializer")
        out[p.name] = weight_encoding(weight, p.spec, scheme)
        del weight
        release_if_mapped(initializers[p.name].const_value)
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class SimState:
    """One point of the pipeline: float model, plan and encodings. Never mutated.

    Attributes:
        float_model: The prepared float model. Treated as immutable: stages that change weights
            return a state with a new model.
        plan: The plan as annotated (biases included before the int32 check).
        encodings: Encodings by quantizer name (activations, weights).
        fixed: Weight quantizers whose encodings no longer follow the weights (set by a weight
            rounding search: SeqMSE's scales, AdaRound's grid); QAT keeps their grids.
    """

    float_model: ir.Model
    plan: QuantPlan
    encodings: Mapping[str, Encoding]
    fixed: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        encodings = dict(self.encodings)
        for q in self.plan.activations:  # derived encodings always follow their sources
            if q.derived_from is not None:
                source, factor = q.derived_from
                if source in encodings:
                    src = encodings[source]
                    encodings[q.name] = dataclasses.replace(
                        src, scale=(src.scale.astype(np.float64) * factor).astype(np.float32))
                else:
                    encodings.pop(q.name, None)
        object.__setattr__(self, "encodings", types.MappingProxyType(encodings))

    @property
    def calibrated(self) -> bool:
        return all(q.name in self.encodings for q in self.plan.activations) and all(
            p.name in self.encodings for p in self.plan.params
        )

    def require_calibrated(self) -> None:
        if not self.calibrated:
            raise EncodingsError("the simulation is not calibrated: call compute_encodings() or load_encodings()")

    def with_encodings(self, updates: Mapping[str, Encoding], fixed: frozenset[str] | None = None) -> SimState:
        """A state whose encodings are these, replaced or added by ``updates`` (and ``fixed``, if
        given, as the set of weight encodings that do not follow the weights)."""
        return SimState(self.float_model, self.plan, {**self.encodings, **updates},
                        self.fixed if fixed is None else fixed)

    @functools.cached_property
    def effective_plan(self) -> QuantPlan:
        """The plan as simulated: see :func:`finalize`."""
        self.require_calibrated()
        return finalize(self.float_model, self.plan, self.encodings)

    def bias_scales(self) -> dict[str, np.ndarray]:
        return {
            b.name: bias_encoding(self.encodings[b.input_quantizer], self.encodings[b.weight_quantizer])[0]
            for b in self.effective_plan.biases
        }


# A Concat whose inputs' ranges differ by more than this factor does not share one grid: its
# smallest input would keep about 255 / 16 = 16 steps (YOLOv8's head concatenates boxes in pixels
# with class scores in [0, 1] and kept 14% of its detections so).
SHARED_RANGE_RATIO = 16.0


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What calibration found.

    Attributes:
        plan: The plan the encodings are for (the state's, or one with Concat nodes untied).
        encodings: Encodings of every calibrated activation quantizer of ``plan``.
        untied: Concat node -> why its inputs got their own quantizers and it runs in float.
        candidates: With the ``auto`` scheme, the encodings of each scheme it chooses among
            (:data:`AUTO_CANDIDATES`, from the same statistics); :func:`choose_scheme` picks one.
    """

    plan: QuantPlan
    encodings: Mapping[str, Encoding]
    untied: Mapping[str, str]
    candidates: Mapping[Scheme, Mapping[str, Encoding]] = dataclasses.field(default_factory=dict)


# The schemes ``auto`` chooses among, by the model's output error on calibration data.
# meanminmax (NNCF's default) is not one of them: as a fourth candidate it raised no held-out
# metric on the demo, ppocr-cls/det/rec and MiniLM, auto picked it where it then scored lower on
# held-out data (ppocr-det mask IoU 0.950 -> 0.942, ppocr-cls W4A8 one image fewer), and scoring
# it made auto's calibration ~20% slower (bench/results in BENCHMARKS.md, issue 12). It can be forced.
AUTO_CANDIDATES = (Scheme.MINMAX, Scheme.PERCENTILE, Scheme.SQNR)
# Above this many observed tensors auto calibrates with min-max: histogram calibration fetches
# every tensor as a graph output, whose cost grows faster than the graph (a 20k-node chain did not
# calibrate in 15 minutes; min-max's in-graph reductions stay linear, see tests/test_scaling.py).
AUTO_MAX_TENSORS = 5000


def calibrate(
    state: SimState,
    batches: Iterable[Mapping[str, np.ndarray]],
    scheme: Scheme = Scheme.MINMAX,
    *,
    percentile: float = DEFAULT_PERCENTILE,
    progress: bool | None = None,
    replan: Callable[[Mapping[str, str]], QuantPlan] | None = None,
    device: str = "cpu",
) -> Calibration:
    """Encodings of every activation quantizer from the batches (streamed, one pass, on ``device``).

    The tensors a Concat ties are observed one by one; where its inputs' ranges differ by more
    than :data:`SHARED_RANGE_RATIO`, ``replan(untie)`` gives the plan without that tie (no
    ``replan``: the tie is kept).
    """
    split: list[ActivationQuantizer] = []
    for q in state.plan.calibrated_activations:
        if q.shared_by and len(q.tensors) > 1:
            split.extend(dataclasses.replace(q, name=t, tensors=(t,), shared_by=()) for t in q.tensors)
        else:
            split.append(q)
    observed = dataclasses.replace(state.plan, activations=tuple(split), biases=(), integer_forms=())
    if scheme is Scheme.AUTO and len(observed.activations) > AUTO_MAX_TENSORS:
        import warnings

        warnings.warn(f"calibration: {len(observed.activations)} tensors to observe; above {AUTO_MAX_TENSORS} the "
                      "histograms the auto scheme needs cost more than the graph grows, so min-max is used "
                      "(--scheme percentile or sqnr forces histograms)", RuntimeWarning, stacklevel=3)
        scheme = Scheme.MINMAX
    batches = distributed.own_batches(batches)  # under MPI: every N-th batch, observers merged below
    observers = collect_statistics(state.float_model, observed, batches, scheme,
                                   progress=progress if distributed.is_root() else False, device=device)
    observers = distributed.merge_observers(observers)
    untie = _untie(state, observers) if replan is not None else {}
    plan = replan(untie) if untie and replan is not None else state.plan
    group_of = {t: q.name for q in observed.activations for t in q.tensors}
    schemes = AUTO_CANDIDATES if scheme is Scheme.AUTO else (scheme,)
    found: dict[Scheme, dict[str, Encoding]] = {s: {} for s in schemes}
    for q in plan.calibrated_activations:
        if q.spec.fixed_range is not None:
            for s in schemes:
                found[s][q.name] = compute_encoding(*q.spec.fixed_range, q.spec)
            continue
        parts = {group_of[t] for t in q.tensors if t in group_of}
        obs = None
        for part in sorted(parts):
            if obs is None:
                obs = copy.deepcopy(observers[part])
            else:
                obs.merge(observers[part])  # type: ignore[arg-type]  # one scheme per run: all observers are of one class
        if obs is None or obs.empty:
            raise ModelError(
                f"tensor '{q.name}' held no finite value on the calibration data; exclude its producer in the config"
            )
        for s in schemes:
            found[s][q.name] = activation_encoding(obs, q.spec, s, percentile)
    if scheme is Scheme.AUTO:  # until choose_scheme() picks: percentile, the safest single guess
        return Calibration(plan, found[Scheme.PERCENTILE], untie, found)
    return Calibration(plan, found[scheme], untie)


@dataclasses.dataclass(frozen=True)
class SchemeChoice:
    """What :func:`choose_scheme` measured on the calibration samples for each candidate: the
    top-1 agreement with the float model of every output a Softmax makes (the decision a
    classifier or recognizer takes from it; None without such outputs), and the output SQNR (dB,
    mean over the float outputs, each capped at 100 dB). The chosen candidate has the best
    agreement, then the best SQNR."""

    chosen: Scheme
    sqnr_db: Mapping[Scheme, float]
    agreement: Mapping[Scheme, float | None] = dataclasses.field(default_factory=dict)
    unscored: str | None = None  # why nothing could be scored (the fallback, percentile, is kept)

    def summary(self) -> str:
        if self.unscored:
            return f"auto kept {self.chosen.value}: {self.unscored}"

        def one(s: Scheme) -> str:
            top1 = self.agreement.get(s)
            return f"{s.value} {self.sqnr_db[s]:.1f} dB" + (f" / top-1 {top1:.3f}" if top1 is not None else "")

        return f"auto chose {self.chosen.value} (output SQNR{' / agreement' if self.agreement else ''}: " \
               f"{', '.join(one(s) for s in self.sqnr_db)})"


def output_sqnr_db(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float:
    """Mean over float outputs of ``10 log10(sum f^2 / sum (f - q)^2)``, each capped at 100 dB."""
    scores = []
    for f, q in zip(reference, outputs):
        f, q = np.asarray(f), np.asarray(q)
        if f.dtype.kind != "f":
            continue
        signal = float(np.sum(f.astype(np.float64) ** 2))
        noise = float(np.sum((f.astype(np.float64) - q.astype(np.float64)) ** 2))
        scores.append(100.0 if noise <= signal * 1e-10 else 10.0 * np.log10(max(signal, 1e-30) / noise))
    return float(np.mean(scores)) if scores else 0.0


def _softmax_axes(model: ir.Model) -> dict[int, int]:
    """Output position -> the class axis, for the graph outputs a Softmax/LogSoftmax makes."""
    axes = {}
    for position, value in enumerate(model.graph.outputs):
        node = value.producer()
        if node is not None and node.op_type in ("Softmax", "LogSoftmax") and node.domain in ("", "ai.onnx"):
            attr = node.attributes.get("axis")
            axes[position] = attr.as_int() if attr is not None else -1
    return axes


def choose_scheme(state: SimState, candidates: Mapping[Scheme, Mapping[str, Encoding]],
                  feeds: Sequence[Mapping[str, np.ndarray]], device: str = "cpu") -> tuple[SimState, SchemeChoice]:
    """The state with the candidate encodings whose simulation is closest to the float model on
    ``feeds``: best top-1 agreement of the Softmax outputs, then best output SQNR; ties keep the
    earlier candidate."""
    float_session = Session(state.float_model, device=device)
    reference = [float_session.run(feed) for feed in feeds]
    axes = _softmax_axes(state.float_model)
    scores: dict[Scheme, float] = {}
    agreement: dict[Scheme, float | None] = {}
    states: dict[Scheme, SimState] = {}
    for scheme, encodings in candidates.items():
        candidate = state.with_encodings(encodings)
        try:
            session = Session(lower(candidate), device=device, max_nodes=SEGMENT_NODES)  # linear build
            runs = [(ref, session.run(feed)) for ref, feed in zip(reference, feeds)]
        except Exception as e:  # noqa: BLE001 - onnxruntime cannot run this QDQ model: nothing to score
            # the state keeps the fallback; the export's check run reports the failure naming the node
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            return state, SchemeChoice(Scheme.PERCENTILE, {}, unscored=f"the {scheme.value} simulation "
                                       f"does not run in onnxruntime ({reason})")
        scores[scheme] = float(np.mean([output_sqnr_db(ref, out) for ref, out in runs])) if runs else 0.0
        matches = [np.argmax(ref[i], axis=axis) == np.argmax(out[i], axis=axis)
                   for ref, out in runs for i, axis in axes.items() if np.ndim(ref[i])]
        agreement[scheme] = float(np.mean(np.concatenate([m.reshape(-1) for m in matches]))) if matches else None
        states[scheme] = candidate
        del session
    order = list(scores)
    best = max(order, key=lambda s: (agreement[s] or 0.0, scores[s], -order.index(s)))
    return states[best], SchemeChoice(best, scores, agreement if axes else {})


def _untie(state: SimState, observers: Mapping[str, Any]) -> dict[str, str]:
    nodes = {n.name: n for n in state.float_model.graph}
    untie = {}
    for q in state.plan.calibrated_activations:
        for name in q.shared_by:
            node = nodes.get(name)
            if node is None:
                continue
            spans = {}
            for value in node.inputs:
                obs = observers.get(name_of(value)) if value is not None else None
                if obs is not None and not obs.empty:
                    spans[name_of(value)] = max(obs.max, 0.0) - min(obs.min, 0.0)
            positive = [v for v in spans.values() if v > 0]
            if len(positive) < 2 or max(positive) <= SHARED_RANGE_RATIO * min(positive):
                continue
            small = min(spans, key=lambda k: spans[k] if spans[k] > 0 else np.inf)
            large = max(spans, key=lambda k: spans[k])
            untie[name] = (f"Concat '{name}': its inputs span {spans[small]:.3g} ('{small}') to {spans[large]:.3g} "
                           f"('{large}'), {spans[large] / spans[small]:.0f}x, more than the {SHARED_RANGE_RATIO:.0f}x "
                           "one grid serves; it runs in float, each input keeps its own quantizer")
    return untie


def finalize(model: ir.Model, plan: QuantPlan, encodings: Mapping[str, Encoding]) -> QuantPlan:
    """The plan without the int32 biases the encodings cannot hold (they stay float, with a reason).

    ``round(bias / (input scale x weight scale))`` overflows int32 with tiny 16-bit scales, where a
    saturated bias would be badly wrong.
    """
    initializers = model.graph.initializers
    overflow = {}
    for b in plan.biases:
        scale, _ = bias_encoding(encodings[b.input_quantizer], encodings[b.weight_quantizer])
        bias = const_array(initializers[b.name])
        assert bias is not None
        if not bias_fits(bias, scale):
            overflow[b.name] = Reason("finalize.bias_overflow",
                                      f"bias of '{b.node}' overflows int32 with scale input x weight scale "
                                      f"(min {float(scale.min()):.3g}); kept float")
    if not overflow:
        return plan
    return dataclasses.replace(
        plan,
        biases=tuple(b for b in plan.biases if b.name not in overflow),
        skipped=types.MappingProxyType({**plan.skipped, **overflow}),
    )


def lower(state: SimState, *, deploy: bool = False, pack_4bit: bool = False) -> ir.Model:
    """The simulation graph: float weights + Q/DQ (``deploy=False``), or the deployable graph with
    integer weights behind DequantizeLinear (``deploy=True``); with ``pack_4bit``, weights of at
    most 4 bits are stored as packed INT4/UINT4 (:mod:`onnxqat.passes.pack_int4`)."""
    result = InsertQDQPass(state.effective_plan, state.encodings, fold_weights=deploy)(state.float_model)
    if deploy and pack_4bit:
        from onnxqat.passes.pack_int4 import PackInt4Pass

        small = frozenset(result.folded_weights[p.name] for p in state.effective_plan.params
                          if p.name in result.folded_weights and state.encodings[p.name].bitwidth <= 4)
        PackInt4Pass(small)(result.model)
    return result.model


def apply_weights(state: SimState, weights: Mapping[str, np.ndarray], scheme: Scheme = Scheme.MINMAX) -> SimState:
    """A state with new float weights (e.g. trained ones); weight encodings follow the weights.

    The new state has its own copy of the model graph; tensors that did not change are shared.
    """
    initializers = state.float_model.graph.initializers
    checked = {}
    for name, array in weights.items():
        if name not in initializers:
            raise ModelError(f"no initializer named '{name}' in the model")
        old = initializers[name].const_value
        assert old is not None
        array = np.asarray(array)
        if tuple(array.shape) != tuple(old.shape.numpy()):
            raise ModelError(f"initializer '{name}': shape {tuple(array.shape)} differs from {tuple(old.shape)}")
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise ModelError(f"initializer '{name}': values are not all finite")
        checked[name] = array.astype(old.dtype.numpy())
    model = state.float_model.clone()
    for name, array in checked.items():
        model.graph.initializers[name].const_value = ir.tensor(array, name=name)
    changed = [p for p in state.plan.params if p.name in checked and p.name not in state.fixed]
    encodings = encode_weights(model, dataclasses.replace(state.plan, params=tuple(changed)), scheme)
    return SimState(model, state.plan, {**state.encodings, **encodings}, state.fixed)


def bind_encodings(parsed: ParsedEncodings, state: SimState, where: str = "encodings", *,
                   source: SourceGraph | None = None, missing: str = "error",
                   fallback: Mapping[str, Encoding] | None = None) -> tuple[dict[str, Encoding], Binding]:
    """Encodings of a parsed file for every quantizer of ``state.plan`` (validated), and what the
    matching found (:func:`onnxqat.encodings.bind`: names mapped through tensors holding the same
    values, also in ``source``, the model the file was made for).

    A quantizer the file has no encoding for is an error with ``missing="error"``; with
    ``missing="calibrate"`` it takes its encoding from ``fallback`` (the sim's own calibration; weights
    from the weights). Bitwidth and symmetry come from the file.
    """
    if missing not in MISSING:
        raise ConfigError(f"missing must be one of {MISSING}, got {missing!r}")
    found = bind(parsed, state.plan, state.float_model, source, where)
    encodings = dict(found.encodings)
    absent = [m for m in found.missing if missing == "error" or fallback is None or m not in fallback]
    if absent:
        hint = "" if missing == "calibrate" else " (missing='calibrate' calibrates them)"
        raise EncodingsError(f"{where}: no encoding for quantized tensor(s) {absent[:5]}"
                             f"{f' and {len(absent) - 5} more' if len(absent) > 5 else ''}{hint}")
    for name in found.missing:
        assert fallback is not None
        encodings[name] = fallback[name]
    for p in state.plan.params:
        enc = encodings[p.name]
        if p.name in found.missing:
            continue
        weight = state.float_model.graph.initializers[p.name]
        channels = weight.shape[p.spec.axis] if p.spec.axis is not None and weight.shape is not None else None
        if channels == 1 and not enc.per_channel:  # 0.6.1 cannot tell one channel from per-tensor
            enc = dataclasses.replace(enc, scale=enc.scale.reshape(1), zero_point=enc.zero_point.reshape(1),
                                      axis=p.spec.axis)
        if p.spec.axis is not None and enc.per_channel:
            if channels != enc.scale.shape[0]:
                raise EncodingsError(
                    f"{where}: '{p.name}' has {enc.scale.shape[0]} channel encodings, the weight has {channels}"
                )
            enc = enc.with_axis(p.spec.axis)
        elif enc.per_channel:
            raise EncodingsError(f"{where}: '{p.name}' is per-channel in the file, per-tensor in the sim")
        elif p.spec.axis is not None:
            raise EncodingsError(f"{where}: '{p.name}' is per-tensor in the file, per-channel in the sim")
        encodings[p.name] = enc
    return encodings, found


def encodings_document(state: SimState, quantizer_args: Mapping[str, Any], excluded: Iterable[str] = (),
                       version: str = "1.0.0", *, encodings_format: str = "onnxqat",
                       source: SourceGraph | None = None) -> dict[str, Any]:
    """The AIMET encodings document of a calibrated state.

    ``encodings_format="aimet-strict"`` names activations as aimet-onnx 2.42's own graph of
    ``source`` (the model before onnxqat prepared it) does (:func:`onnxqat.encodings.aimet_names`),
    so its ``load_encodings(strict=True)`` accepts the file when both placed the same quantizers.
    """
    if encodings_format not in ENCODINGS_FORMATS:
        raise ConfigError(f"encodings_format must be one of {ENCODINGS_FORMATS}, got {encodings_format!r}")
    names: dict[str, tuple[str, ...]] | None = None
    param_names: dict[str, str] | None = None
    if encodings_format == "aimet-strict":
        if source is None:
            raise ConfigError("encodings_format='aimet-strict' needs the tensor names of the model the sim was "
                              "built from, and its file is gone or no longer an ONNX model")
        names = aimet_names(state.effective_plan, state.float_model, source)
        param_names = aimet_param_names(state.effective_plan, state.float_model, source)
    return to_aimet(state.effective_plan, state.encodings, state.bias_scales(), version=version,
                    quantizer_args=dict(quantizer_args), excluded_layers=sorted(excluded), names=names,
                    param_names=param_names)


def export(
    state: SimState,
    out_dir: str | os.PathLike[str],
    float16: Float16Record,
    document: Mapping[str, Any],
    prefix: str = "model",
    check_feed: Mapping[str, np.ndarray] | None = None,
    pack_4bit: bool = False,
) -> dict[str, str]:
    """Write ``<prefix>.onnx``, ``<prefix>.encodings`` and ``<prefix>_qdq.onnx`` as one set.

    ``pack_4bit``: weights of at most 4 bits are stored as packed INT4/UINT4 in the QDQ model
    (half the bytes; on onnxruntime's CPU provider such layers run in float, see
    :mod:`onnxqat.passes.pack_int4`).

    The set is one output transaction (:mod:`onnxqat.outputs`): published all together, replacing
    an earlier set only once every file was written; inside an enclosing ``transaction()`` it is
    published with the other outputs of that transaction.

    With ``check_feed`` (a few calibration samples), the deployable model is first run in
    onnxruntime fused and unfused (:mod:`onnxqat.deploycheck`): one that cannot run is an error
    and nothing is written.
    """
    state.require_calibrated()
    if (not isinstance(prefix, str) or not prefix or os.sep in prefix or (os.altsep and os.altsep in prefix)
            or "\0" in prefix or prefix in (".", "..")):
        raise ConfigError(f"invalid export prefix {prefix!r}")
    _warn_subnormal_scales(state)
    deploy = lower(state, deploy=True, pack_4bit=pack_4bit)
    if check_feed is not None:
        from onnxqat.deploycheck import check_deployment

        lsbs = {}
        for value in state.float_model.graph.outputs:
            q = state.effective_plan.activation_of(value.name or "")
            lsbs[value.name or ""] = float(np.max(state.encodings[q.name].scale)) if q is not None else None
        with serialized_once(deploy):  # one protobuf for the fused and the reference session
            check_deployment(deploy, check_feed, lsbs)
    float_model = state.float_model
    if float16:
        float_model = restore_float16(float_model, float16)
        deploy = cast_interface(deploy, float16)
    with transaction() as tx:
        stage = tx.folder(out_dir, f"export-{prefix}", also=(f"{prefix}.onnx.data", f"{prefix}_qdq.onnx.data"))
        save_model(float_model, stage.path(f"{prefix}.onnx"))
        with open(stage.path(f"{prefix}.encodings"), "w", encoding="utf-8") as f:
            f.write(dumps(document))
        save_model(deploy, stage.path(f"{prefix}_qdq.onnx"))
    out = os.fspath(out_dir)
    return {
        "float": os.path.join(out, f"{prefix}.onnx"),
        "encodings": os.path.join(out, f"{prefix}.encodings"),
        "qdq": os.path.join(out, f"{prefix}_qdq.onnx"),
    }


def _warn_subnormal_scales(state: SimState) -> None:
    """A scale below float32's normal range makes ``x / scale`` overflow: legal, almost surely wrong."""
    tiny = float(np.finfo(np.float32).tiny)
    for name, enc in state.encodings.items():
        low = float(np.min(enc.scale))
        if low < tiny:
            import warnings

            warnings.warn(f"tensor '{name}': scale {low:.3g} is below float32's normal range ({tiny:.3g}); "
                          "x / scale overflows and the tensor quantizes to its grid's ends", RuntimeWarning,
                          stacklevel=3)
