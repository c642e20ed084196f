from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxqat import pipeline
from onnxqat.backend import providers, require_training
from onnxqat.calibrate.schemes import DEFAULT_PERCENTILE, Scheme
from onnxqat.config import QuantSimConfig, check_names, load_config
from onnxqat.coverage import coverage
from onnxqat.data import input_signature, validate_feed
from onnxqat.encodings import SourceGraph, parse_aimet, read_document
from onnxqat.errors import ConfigError
from onnxqat.graph import name_of
from onnxqat.pipeline import ModelSource, SimState
from onnxqat.plan import QuantPlan
from onnxqat.qparams import Encoding
from onnxqat.rounding import Rounding, WeightRoundingReport, collect_layer_stats, round_weights
from onnxqat.runtime import Session
from onnxqat.spec import MAX_BITWIDTH, MIN_BITWIDTH
from onnxqat.target import Target, resolve_target

__all__ = ["QuantizationSimModel", "prepare_model"]

_AUTO_BATCHES = 8  # calibration batches (at most) the auto scheme scores its candidates on ...
_AUTO_SAMPLES = 256  # ... stopping once this many samples are kept


def prepare_model(source: ModelSource, *, fold_batchnorm: bool = True) -> ir.Model:
    """Load (if a path) and canonicalise a model; fold BatchNorm unless told not to.

    The caller's object or file is never modified. Float16 models come back in float32 (see
    :mod:`onnxqat.passes.float16`).
    """
    return pipeline.prepare(source, fold_batchnorm=fold_batchnorm).model


def _check_bitwidth(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITWIDTH <= value <= MAX_BITWIDTH:
        raise ConfigError(f"{name} must be an integer from {MIN_BITWIDTH} to {MAX_BITWIDTH}, got {value!r}")
    return value


class QuantizationSimModel:
    """A quantization simulation of an ONNX model.

    A facade over :mod:`onnxqat.pipeline`: it holds the current :class:`~onnxqat.pipeline.SimState`
    (float model, plan, encodings) and replaces it with a new one when calibration, loaded
    encodings, new weights or training change it; a session is cached per state.

    Args:
        model: Path to an ``.onnx`` file, an ``onnx.ModelProto`` or an ``onnx_ir.Model``.
        param_bw: Bitwidth of weights (4 to 16).
        activation_bw: Bitwidth of activations (4 to 16).
        quant_scheme: Activation calibration: ``auto`` (default: the one of ``minmax``,
            ``percentile`` and ``sqnr`` whose simulation is closest to the float model's outputs
            on the first calibration batches, all from one pass of statistics; see
            ``scheme_choice`` after calibration), or one of those forced.
        per_channel: Per-channel weight quantization; None takes the config's setting.
        config: Preset name (``onnxruntime``, ``aimet``), JSON path, dict or QuantSimConfig;
            None takes the target's default preset.
        percentile: Percentile for the ``percentile`` scheme.
        param_scheme: Weight calibration (``minmax`` or ``sqnr``); default ``sqnr`` when
            ``quant_scheme`` is ``sqnr``, else ``minmax``.
        fold_batchnorm: Fold BatchNormalization into preceding Conv/Gemm weights.
        target: Deployment target (``x86-avx2``, ``x86-vnni``, ``arm64``, ``htp``; default:
            detected from this machine): what the deployed integer kernels compute exactly, and
            the default config (see :mod:`onnxqat.target`).
        fix_inputs: ``{input name: value}`` to specialise the model to (the inputs become
            constants; ``If`` nodes whose condition is then constant are folded, exposing the
            weights inside them).
        device: Where calibration, ``run`` and (by default) training run: ``cpu``, or ``cuda``
            for onnxruntime's CUDA provider (an error when the installed runtime has none).
    """

    def __init__(
        self,
        model: ModelSource,
        *,
        param_bw: int = 8,
        activation_bw: int = 8,
        quant_scheme: str | Scheme = Scheme.AUTO,
        per_channel: bool | None = None,
        config: str | os.PathLike[str] | Mapping[str, Any] | QuantSimConfig | None = None,
        percentile: float = DEFAULT_PERCENTILE,
        param_scheme: str | Scheme | None = None,
        fold_batchnorm: bool = True,
        target: str | Target | None = None,
        fix_inputs: Mapping[str, Any] | None = None,
        device: str = "cpu",
    ) -> None:
        providers(device)  # refused before any work when the runtime lacks it
        self.device = device
        self.param_bw = _check_bitwidth("param_bw", param_bw)
        self.activation_bw = _check_bitwidth("activation_bw", activation_bw)
        self.quant_scheme = Scheme.parse(quant_scheme)
        if param_scheme is None:
            param_scheme = Scheme.SQNR if self.quant_scheme is Scheme.SQNR else Scheme.MINMAX
        self.param_scheme = Scheme.parse(param_scheme)
        if self.param_scheme is Scheme.PERCENTILE:
            raise ConfigError("weights are calibrated with minmax or sqnr, not percentile")
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        self.target = resolve_target(target)
        cfg = load_config(config if config is not None else self.target.default_config)
        if per_channel is not None:
            cfg = cfg.with_overrides(per_channel_quantization=bool(per_channel))
        self.config = cfg
        self._source = model  # its tensor names: encodings made for it (AIMET's) name them
        prepared = pipeline.prepare(model, fold_batchnorm=fold_batchnorm, fix_inputs=fix_inputs,
                                    fold_affine=cfg.fold_affine,
                                    rescale_batchnorm=cfg.quantize_standalone_batchnorm,
                                    pad_depthwise=self.target.pad_depthwise if cfg.integer_forms else None,
                                    layout_rules=self.target.layout_rules if cfg.integer_forms else ())
        self.float16 = prepared.float16
        # config names that match nothing are errors here too, not only in the CLI (which checks
        # them before loading); against the simulated graph, whose nodes the rules apply to
        check_names(cfg, (n.name for n in prepared.model.graph if n.name), (n.op_type for n in prepared.model.graph),
                    source=str(config) if isinstance(config, (str, os.PathLike)) else "config", warn=False)
        plan = pipeline.make_plan(prepared.model, cfg, param_bw=self.param_bw, activation_bw=self.activation_bw,
                                  target=self.target)
        self._state = SimState(prepared.model, plan, pipeline.encode_weights(prepared.model, plan, self.param_scheme))
        covered = coverage(prepared.model, plan)
        if covered.quantized_share < 0.5:
            hint = ""
            if any("control flow" in place for place in covered.float_places):
                hint = "; an If chosen by an input can be folded with fix_inputs (--fix-input NAME=VALUE)"
            warnings.warn(f"most of the compute stays float: {covered.summary()}{hint}", RuntimeWarning, stacklevel=2)
        self._session: tuple[SimState, Session] | None = None
        self._check_feed: dict[str, np.ndarray] | None = None
        self.scheme_choice: pipeline.SchemeChoice | None = None  # what the auto scheme measured and chose

    # -- the state -----------------------------------------------------------------------------
    @property
    def state(self) -> SimState:
        """The current pipeline value (float model, plan, encodings)."""
        return self._state

    def adopt(self, state: SimState) -> None:
        """Make ``state`` (e.g. one a trainer produced from this sim's) the current one."""
        if state.plan is not self._state.plan:
            raise ConfigError("that state was made for another plan; it does not belong to this simulation")
        self._state = state

    @property
    def float_model(self) -> ir.Model:
        return self._state.float_model

    @property
    def plan(self) -> QuantPlan:
        return self._state.plan

    @property
    def encodings(self) -> Mapping[str, Encoding]:
        """Encodings by quantizer name (read-only; the sim changes them by replacing its state)."""
        return self._state.encodings

    # -- calibration ---------------------------------------------------------------------------
    def compute_encodings(
        self, batches: Iterable[Mapping[str, np.ndarray]], *, progress: bool | None = None,
        weight_rounding: str = "none", bias_correction: bool | None = None,
    ) -> QuantizationSimModel:
        """Calibrate every activation quantizer on ``batches`` (dicts of input arrays).

        ``weight_rounding`` (``none``, ``seqmse``, ``adaround``) then optimises the weight grids on
        the same data (:meth:`round_weights`; ``batches`` must be re-iterable). The first batch is
        kept for the check run at export.
        """
        signature = input_signature(self.float_model)
        kept: list[dict[str, np.ndarray]] = []
        # the auto scheme scores its candidates on the first batches (up to _AUTO_SAMPLES samples)
        keep = _AUTO_BATCHES if self.quant_scheme is Scheme.AUTO else 1
        samples = [0]

        def keep_first(items: Iterable[Mapping[str, np.ndarray]]) -> Iterable[Mapping[str, np.ndarray]]:
            for index, batch in enumerate(items):
                if len(kept) < keep and (not kept or samples[0] < _AUTO_SAMPLES):
                    feed = validate_feed(batch, signature, where=f"calibration data: batch {index}")
                    kept.append({k: np.array(v) for k, v in feed.items()})
                    samples[0] += max((len(v) for v in feed.values() if np.ndim(v)), default=1)
                yield batch

        model = self._state.float_model

        def replan(untie: Mapping[str, str]) -> QuantPlan:
            return pipeline.make_plan(model, self.config, param_bw=self.param_bw, activation_bw=self.activation_bw,
                                      target=self.target, untie=untie)

        observed = self._state
        if self.config.calibrate_quantized_weights:  # aimet-onnx observes activations so
            from onnxqat.graph import require_const
            from onnxqat.passes.insert_qdq import aimet_quantize
            from onnxqat.qparams import dequantize, fake_quantize

            inits = model.graph.initializers
            encs = self._state.encodings
            observed = pipeline.apply_weights(observed, {
                p.name: dequantize(aimet_quantize(require_const(inits[p.name]), encs[p.name]), encs[p.name])
                if p.spec.rounding == "aimet" else fake_quantize(require_const(inits[p.name]), encs[p.name])
                for p in self._state.plan.params})
        found = pipeline.calibrate(observed, keep_first(batches), self.quant_scheme, percentile=self.percentile,
                                   progress=progress, replan=replan if self.config.untie_wide_concats else None,
                                   device=self.device)
        for reason in found.untied.values():
            warnings.warn(reason, RuntimeWarning, stacklevel=2)
        if found.plan is self._state.plan:
            self._state = self._state.with_encodings(found.encodings)
        else:
            weights = pipeline.encode_weights(model, found.plan, self.param_scheme)
            self._state = SimState(model, found.plan, {**weights, **found.encodings})
        self.scheme_choice = None
        if found.candidates and kept:
            self._state, self.scheme_choice = pipeline.choose_scheme(self._state, found.candidates, kept,
                                                                     device=self.device)
        if self.config.raise_weight_scales:  # aimet-onnx's guard against int32 bias / requantization overflow
            self._raise_weight_scales()
        self._check_feed = kept[0] if kept else None
        if Rounding.parse(weight_rounding) is not Rounding.NONE or bias_correction:
            self.round_weights(batches, weight_rounding, bias_correction=bias_correction is not False, progress=progress)
        return self

    def round_weights(self, batches: Iterable[Mapping[str, np.ndarray]], method: str = "seqmse", *,
                      bias_correction: bool = True, iterations: int = 500, target: str = "quantized",
                      centered: bool = True, progress: bool | None = None) -> WeightRoundingReport:
        """Optimise weight grids on calibration data (:mod:`onnxqat.rounding`): ``seqmse``
        (per-channel scales), ``adaround`` (SeqMSE scales, then rounding), ``none`` (bias
        correction only). ``target``: match each layer to the float model's layer output
        (``"float"``) or to the float weights on the simulated input (``"quantized"``); see
        :func:`onnxqat.rounding.round_weights`. Call after calibration; returns each layer's
        output error before/after."""
        self._require_calibrated()
        stats = collect_layer_stats(self._state, batches, progress=progress, float_inputs=target == "float")
        if not stats and self._state.plan.params:
            raise ConfigError("weight rounding saw no calibration batch: pass batches that can be iterated again "
                              "(a list or NpzBatches, not a generator already used by calibration)")
        self._state, report = round_weights(self._state, stats, method, bias_correction=bias_correction,
                                            iterations=iterations, target=target, centered=centered,
                                            progress=progress)
        return report

    def mixed_precision(self, batches: Sequence[Mapping[str, np.ndarray]],
                        eval_batches: Sequence[Mapping[str, Any]] | None = None, *,
                        target_accuracy_drop: float | None = None, target_sqnr: float | None = None,
                        label_key: str = "label", output_index: int = 0, progress: bool | None = None) -> Any:
        """Search the cheapest 4/8/16-bit assignment per node that meets the target and adopt it
        (:func:`onnxqat.mixed.search`): ``target_accuracy_drop`` (top-1 on ``eval_batches``,
        labelled) or ``target_sqnr`` (dB, output ``output_index`` against float). Call after
        calibration; ``batches`` calibrates the other bitwidths. Returns the
        :class:`~onnxqat.mixed.MixedPrecision` (its ``config`` reloads to the same quantizers)."""
        from onnxqat.mixed import search

        found = search(self, list(batches), None if eval_batches is None else list(eval_batches),
                       target_accuracy_drop=target_accuracy_drop, target_sqnr=target_sqnr, label_key=label_key,
                       output_index=output_index, progress=progress)
        assert found.sim is not None
        self.config, self._state, self._check_feed = found.sim.config, found.sim.state, found.sim._check_feed
        return found

    @property
    def calibrated(self) -> bool:
        return self._state.calibrated

    def _require_calibrated(self) -> None:
        self._state.require_calibrated()

    # -- weights -------------------------------------------------------------------------------
    def weights(self) -> dict[str, np.ndarray]:
        """Float values of every initializer of the float model, by name."""
        return {
            name: v.const_value.numpy()
            for name, v in self.float_model.graph.initializers.items()
            if v.const_value is not None
        }

    def set_weights(self, values: Mapping[str, np.ndarray]) -> None:
        """Replace float initializers (e.g. trained weights); weight encodings follow (raised as
        after calibration where the config says ``raise_weight_scales``)."""
        self._state = pipeline.apply_weights(self._state, values, self.param_scheme)
        if self.config.raise_weight_scales and self._state.calibrated:
            self._raise_weight_scales()

    def _raise_weight_scales(self) -> None:
        from onnxqat.overflow import raise_weight_scales

        raised = {name: enc for name, enc in raise_weight_scales(self.float_model, self._state.plan,
                                                                 self._state.encodings).items()
                  if name not in self._state.fixed}  # a weight rounding search's grid stays (aimet: frozen)
        if raised:
            self._state = self._state.with_encodings(raised)

    # -- the simulation ------------------------------------------------------------------------
    @property
    def effective_plan(self) -> QuantPlan:
        """The plan as simulated: without int32 biases that the current encodings cannot hold."""
        return self._state.effective_plan

    def sim_ir(self, *, fold_weights: bool = False) -> ir.Model:
        return pipeline.lower(self._state, deploy=fold_weights)

    @property
    def model(self) -> onnx.ModelProto:
        """The simulation as an ONNX model: float weights, QDQ pairs at every quantizer."""
        return ir.to_proto(self.sim_ir())

    @property
    def session(self) -> Session:
        cached = self._session
        if cached is None or cached[0] is not self._state:
            self._session = cached = (self._state, Session(self.sim_ir(), device=self.device))
        return cached[1]

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in input_signature(self.float_model)]

    @property
    def output_names(self) -> list[str]:
        return [name_of(v) for v in self.float_model.graph.outputs]

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the simulation on one batch; returns the model outputs in order (in the model's
        own dtypes: a float16 model's outputs come back as float16)."""
        feed = validate_feed(feed, input_signature(self.float_model), where="feed")
        outputs = self.session.run(feed)
        return [o.astype(np.float16) if name in self.float16.outputs else o
                for name, o in zip(self.output_names, outputs)]

    def runner(self) -> Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]:
        """``run`` bound to the current state (later state changes do not affect it)."""
        session = self.session
        names = self.output_names
        signature = input_signature(self.float_model)
        float16 = self.float16

        def run(feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
            outputs = session.run(validate_feed(feed, signature, where="feed"))
            return [o.astype(np.float16) if n in float16.outputs else o for n, o in zip(names, outputs)]

        return run

    def why_not_quantized(self) -> Mapping[str, str]:
        """For every float tensor without a quantizer: the rule that left it float, as text (the
        plan's ``skipped`` keeps the :class:`~onnxqat.ops.Reason` with its rule id)."""
        plan = self.effective_plan if self.calibrated else self.plan
        return {tensor: str(reason) for tensor, reason in plan.skipped.items()}

    def report(self) -> dict[str, Any]:
        """Plain-data description of the plan: quantizers and why float tensors stay float."""
        plan = self.effective_plan if self.calibrated else self.plan
        return {
            "target": self.target.name,
            "summary": plan.summary(),
            "activations": [
                {"quantizer": q.name, "tensors": list(q.tensors), "bitwidth": q.spec.bitwidth,
                 "symmetric": q.spec.symmetric}
                for q in plan.activations
            ],
            "params": [
                {"tensor": p.name, "bitwidth": p.spec.bitwidth, "per_channel_axis": p.spec.axis,
                 "pair_limit": p.spec.pair_limit, "consumers": list(p.consumers)}
                for p in plan.params
            ],
            "int32_biases": [{"tensor": b.name, "node": b.node} for b in plan.biases],
            "not_quantized": {tensor: str(reason) for tensor, reason in sorted(plan.skipped.items())},
        }

    # -- encodings -----------------------------------------------------------------------------
    def bias_scales(self) -> dict[str, np.ndarray]:
        return self._state.bias_scales()

    def quantizer_args(self) -> dict[str, Any]:
        return {
            "activation_bitwidth": self.activation_bw,
            "param_bitwidth": self.param_bw,
            "dtype": "int",
            "is_symmetric": self.config.param_symmetric,
            "per_channel_quantization": self.config.per_channel_quantization,
            "quant_scheme": (self.scheme_choice.chosen if self.scheme_choice else self.quant_scheme).value,
            "target": self.target.name,
        }

    def encodings_document(self, version: str = "1.0.0", *, encodings_format: str = "onnxqat") -> dict[str, Any]:
        """The encodings file content; ``encodings_format="aimet-strict"`` names tensors as aimet-onnx's
        graph of the source model does (see :func:`onnxqat.pipeline.encodings_document`)."""
        source = self._source_graph() if encodings_format == "aimet-strict" else None
        return pipeline.encodings_document(self._state, self.quantizer_args(), self.config.exclude_nodes, version,
                                           encodings_format=encodings_format, source=source)

    def _source_graph(self) -> SourceGraph | None:
        return SourceGraph.of_file_if_readable(self._source)

    def load_encodings(self, source: str | os.PathLike[str] | Mapping[str, Any], *, missing: str = "error",
                       batches: Iterable[Mapping[str, np.ndarray]] | None = None) -> QuantizationSimModel:
        """Load AIMET encodings (ours or AIMET's) into the simulation.

        Names are matched through tensors holding the same values (before/after Identity, Reshape,
        Flatten, Transpose, Squeeze/Unsqueeze; a Conv's output named before its folded BatchNorm).
        A quantizer the file has no encoding for is an error (``missing="error"``) or calibrated
        (``missing="calibrate"``: on ``batches``, or the sim's current calibration; weights from the
        weights). Entries no quantizer takes are reported in one warning. A name that is no tensor of
        the model is an error. Bitwidth and symmetry come from the file.
        """
        where = "encodings"
        if isinstance(source, Mapping):
            data: Any = source
        else:
            where = os.fspath(source)
            data = read_document(where)
        parsed = parse_aimet(data, source=where)
        if missing == "calibrate" and batches is not None:
            self.compute_encodings(batches)
        fallback = dict(self._state.encodings) if missing == "calibrate" else None
        encodings, found = pipeline.bind_encodings(parsed, self._state, where, source=self._source_graph(),
                                                   missing=missing, fallback=fallback)
        self._state = self._state.with_encodings(encodings)
        notes = []
        if found.missing:
            notes.append(f"{len(found.missing)} quantizer(s) had no encoding in the file and were calibrated: "
                         f"{list(found.missing[:5])}")
        if found.unused:
            notes.append(f"{len(found.unused)} entr(y/ies) name tensors onnxqat does not quantize "
                         "(or whose grid it derives from another quantizer's, and the file's differs), not applied: "
                         f"{list(found.unused[:5])}")
        if notes:
            warnings.warn(f"{where}: " + "; ".join(notes), UserWarning, stacklevel=2)
        return self

    # -- training ------------------------------------------------------------------------------
    def trainer(self, **options: Any) -> Any:
        """A :class:`~onnxqat.train.trainer.QATTrainer` on this sim's state; each trained epoch's
        state becomes the sim's (options as :class:`~onnxqat.train.options.TrainOptions`; ``device``
        defaults to the sim's)."""
        require_training("quantization-aware training")
        from onnxqat.train.trainer import QATTrainer

        options.setdefault("device", self.device)
        return QATTrainer.from_options(self._state, param_scheme=self.param_scheme, on_state=self.adopt, **options)

    # -- export --------------------------------------------------------------------------------
    def export(
        self, out_dir: str | os.PathLike[str], prefix: str = "model", *, encoding_version: str = "1.0.0",
        encodings_format: str = "onnxqat", pack_4bit: bool = False,
    ) -> dict[str, str]:
        """Write ``<prefix>.onnx``, ``<prefix>.encodings`` and ``<prefix>_qdq.onnx`` atomically.

        ``encodings_format="aimet-strict"``: the encodings name the tensors of aimet-onnx's graph of
        the model this sim was built from (load them there into a sim of that model). Returns the
        paths by kind (``float``, ``encodings``, ``qdq``). ``pack_4bit``: weights of at most 4
        bits go into the QDQ model as packed INT4/UINT4 (half the file; float kernels on CPU).
        """
        self._require_calibrated()
        document = self.encodings_document(encoding_version, encodings_format=encodings_format)
        return pipeline.export(self._state, out_dir, self.float16, document, prefix, check_feed=self._check_feed,
                               pack_4bit=pack_4bit)
