"""QuantizationSimModel: simulate, calibrate, export.

The sim holds three plain values: the float model (canonicalised, BatchNorm folded), the
:class:`QuantPlan` decided by the annotation rules, and the encodings found by calibration. The
ONNX model with QDQ pairs (:attr:`QuantizationSimModel.model`) and the exported artifacts are
derived from those values on demand; nothing is mutated behind the user's back.

>>> sim = QuantizationSimModel("models/fmnist_dsconv.onnx")          # doctest: +SKIP
>>> sim.compute_encodings(calibration_batches)                       # doctest: +SKIP
>>> sim.run({"image": images})                                       # doctest: +SKIP
>>> sim.export("out")   # out/model.onnx, out/model.encodings, out/model_qdq.onnx  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxqat.calibrate.runner import collect_statistics
from onnxqat.calibrate.schemes import DEFAULT_PERCENTILE, Scheme, activation_encoding, weight_encoding
from onnxqat.config import QuantSimConfig, load_config
from onnxqat.data import input_signature, validate_feed
from onnxqat.encodings import dumps, parse_aimet, to_aimet
from onnxqat.errors import ConfigError, EncodingsError, ModelError
from onnxqat.graph import const_array, values_by_name
from onnxqat.io import load_model, save_model, staged_outputs
from onnxqat.passes.annotate import annotate
from onnxqat.passes.canonicalize import canonical_passes
from onnxqat.passes.float16 import Float16Record, Float16ToFloat32Pass, cast_interface, restore_float16
from onnxqat.passes.fold_batchnorm import FoldBatchNormPass
from onnxqat.passes.insert_qdq import InsertQDQPass, bias_encoding, bias_fits
from onnxqat.plan import QuantPlan
from onnxqat.qparams import Encoding, compute_encoding
from onnxqat.runtime import Session, release_if_mapped
from onnxqat.spec import MAX_BITWIDTH, MIN_BITWIDTH
from onnxqat.target import Target, resolve_target

__all__ = ["QuantizationSimModel", "prepare_model"]

ModelSource = str | os.PathLike[str] | onnx.ModelProto | ir.Model


def prepare_model(source: ModelSource, *, fold_batchnorm: bool = True) -> ir.Model:
    """Load (if a path) and canonicalise a model; fold BatchNorm unless told not to.

    The caller's object or file is never modified. Float16 models come back in float32 (see
    :mod:`onnxqat.passes.float16`).
    """
    return _prepare(source, fold_batchnorm)[0]


def _prepare(source: ModelSource, fold_batchnorm: bool) -> tuple[ir.Model, Float16Record]:
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
    model = canonical_passes()(model).model
    to_float32 = Float16ToFloat32Pass()
    if to_float32(model).modified:
        ShapeInferencePass(strict_mode=False)(model)
    if fold_batchnorm:
        FoldBatchNormPass()(model)
    return model, to_float32.record


def _check_bitwidth(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITWIDTH <= value <= MAX_BITWIDTH:
        raise ConfigError(f"{name} must be an integer from {MIN_BITWIDTH} to {MAX_BITWIDTH}, got {value!r}")
    return value


class QuantizationSimModel:
    """A quantization simulation of an ONNX model.

    Args:
        model: Path to an ``.onnx`` file, an ``onnx.ModelProto`` or an ``onnx_ir.Model``.
        param_bw: Bitwidth of weights (4 to 16).
        activation_bw: Bitwidth of activations (4 to 16).
        quant_scheme: Activation calibration: ``minmax``, ``percentile`` or ``sqnr``.
        per_channel: Per-channel weight quantization; None takes the config's setting.
        config: Preset name (``onnxruntime``, ``aimet``), JSON path, dict or QuantSimConfig.
        percentile: Percentile for the ``percentile`` scheme.
        param_scheme: Weight calibration (``minmax`` or ``sqnr``); default ``sqnr`` when
            ``quant_scheme`` is ``sqnr``, else ``minmax``.
        fold_batchnorm: Fold BatchNormalization into preceding Conv/Gemm weights.
        target: Deployment target (``x86-avx2``, ``x86-vnni``, ``arm64``, ``htp``; default:
            detected from this machine): what the deployed integer kernels compute exactly, and
            the default config (see :mod:`onnxqat.target`).
    """

    def __init__(
        self,
        model: ModelSource,
        *,
        param_bw: int = 8,
        activation_bw: int = 8,
        quant_scheme: str | Scheme = Scheme.MINMAX,
        per_channel: bool | None = None,
        config: str | os.PathLike[str] | Mapping[str, Any] | QuantSimConfig | None = None,
        percentile: float = DEFAULT_PERCENTILE,
        param_scheme: str | Scheme | None = None,
        fold_batchnorm: bool = True,
        target: str | Target | None = None,
    ) -> None:
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
        self.float_model, self.float16 = _prepare(model, fold_batchnorm)
        self.plan: QuantPlan = annotate(
            self.float_model, cfg, param_bw=self.param_bw, activation_bw=self.activation_bw, target=self.target
        )
        self.encodings: dict[str, Encoding] = {}
        self._session: Session | None = None
        self.refresh_param_encodings()

    # -- calibration ---------------------------------------------------------------------------
    def compute_encodings(
        self, batches: Iterable[Mapping[str, np.ndarray]], *, progress: bool | None = None
    ) -> QuantizationSimModel:
        """Calibrate every activation quantizer on ``batches`` (dicts of input arrays)."""
        observers = collect_statistics(self.float_model, self.plan, batches, self.quant_scheme, progress=progress)
        encodings = dict(self.encodings)
        for q in self.plan.activations:
            if q.spec.fixed_range is not None:
                encodings[q.name] = compute_encoding(*q.spec.fixed_range, q.spec)
                continue
            obs = observers[q.name]
            if obs.empty:
                raise ModelError(
                    f"tensor '{q.name}' held no finite value on the calibration data; "
                    "exclude its producer in the config"
                )
            encodings[q.name] = activation_encoding(obs, q.spec, self.quant_scheme, self.percentile)
        self.encodings = encodings
        self._session = None
        return self

    def refresh_param_encodings(self) -> None:
        """Recompute weight encodings from the current float weights."""
        initializers = self.float_model.graph.initializers
        for p in self.plan.params:
            weight = const_array(initializers[p.name])
            assert weight is not None
            self.encodings[p.name] = weight_encoding(weight, p.spec, self.param_scheme)
            del weight
            release_if_mapped(initializers[p.name].const_value)
        self._session = None

    @property
    def calibrated(self) -> bool:
        return all(q.name in self.encodings for q in self.plan.activations)

    def _require_calibrated(self) -> None:
        if not self.calibrated:
            raise EncodingsError("the simulation is not calibrated: call compute_encodings() or load_encodings()")

    # -- weights -------------------------------------------------------------------------------
    def weights(self) -> dict[str, np.ndarray]:
        """Float values of every initializer of the float model, by name."""
        return {
            name: v.const_value.numpy()
            for name, v in self.float_model.graph.initializers.items()
            if v.const_value is not None
        }

    def set_weights(self, values: Mapping[str, np.ndarray]) -> None:
        """Replace float initializers (e.g. trained weights); weight encodings follow."""
        initializers = self.float_model.graph.initializers
        for name, array in values.items():
            if name not in initializers:
                raise ModelError(f"no initializer named '{name}' in the model")
            old = initializers[name].const_value
            assert old is not None
            array = np.asarray(array)
            if tuple(array.shape) != tuple(old.shape.numpy()):
                raise ModelError(f"initializer '{name}': shape {array.shape} differs from {tuple(old.shape)}")
            initializers[name].const_value = ir.tensor(array.astype(old.dtype.numpy()), name=name)
        self.refresh_param_encodings()

    # -- the simulation ------------------------------------------------------------------------
    def _overflowing_biases(self) -> dict[str, str]:
        """Biases that cannot be int32 with the current encodings -> reason (they stay float)."""
        out = {}
        initializers = self.float_model.graph.initializers
        for b in self.plan.biases:
            scale, _ = bias_encoding(self.encodings[b.input_quantizer], self.encodings[b.weight_quantizer])
            bias = const_array(initializers[b.name])
            assert bias is not None
            if not bias_fits(bias, scale):
                out[b.name] = (
                    f"bias of '{b.node}' overflows int32 with scale input x weight scale "
                    f"(min {float(scale.min()):.3g}); kept float"
                )
        return out

    @property
    def effective_plan(self) -> QuantPlan:
        """The plan as simulated: without int32 biases that the current encodings cannot hold."""
        self._require_calibrated()
        overflow = self._overflowing_biases()
        if not overflow:
            return self.plan
        return dataclasses.replace(
            self.plan,
            biases=tuple(b for b in self.plan.biases if b.name not in overflow),
            skipped=types.MappingProxyType({**self.plan.skipped, **overflow}),
        )

    def sim_ir(self, *, fold_weights: bool = False) -> ir.Model:
        return InsertQDQPass(self.effective_plan, self.encodings, fold_weights=fold_weights)(self.float_model).model

    @property
    def model(self) -> onnx.ModelProto:
        """The simulation as an ONNX model: float weights, QDQ pairs at every quantizer."""
        return ir.to_proto(self.sim_ir())

    @property
    def session(self) -> Session:
        if self._session is None:
            self._session = Session(self.sim_ir())
        return self._session

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in input_signature(self.float_model)]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self.float_model.graph.outputs]  # type: ignore[misc]

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the simulation on one batch; returns the model outputs in order (in the model's
        own dtypes: a float16 model's outputs come back as float16)."""
        feed = validate_feed(feed, input_signature(self.float_model), where="feed")
        outputs = self.session.run(feed)
        return [o.astype(np.float16) if name in self.float16.outputs else o
                for name, o in zip(self.output_names, outputs)]

    def why_not_quantized(self) -> Mapping[str, str]:
        """For every float tensor without a quantizer: the rule that left it float."""
        return self.effective_plan.skipped if self.calibrated else self.plan.skipped

    def report(self) -> dict[str, Any]:
        """Plain-data description of the plan: quantizers and why float tensors stay float."""
        plan = self.effective_plan if self.calibrated else self.plan
        return {
            "summary": plan.summary(),
            "activations": [
                {"quantizer": q.name, "tensors": list(q.tensors), "bitwidth": q.spec.bitwidth,
                 "symmetric": q.spec.symmetric}
                for q in plan.activations
            ],
            "params": [
                {"tensor": p.name, "bitwidth": p.spec.bitwidth, "per_channel_axis": p.spec.axis,
                 "consumers": list(p.consumers)}
                for p in plan.params
            ],
            "int32_biases": [{"tensor": b.name, "node": b.node} for b in plan.biases],
            "not_quantized": dict(sorted(plan.skipped.items())),
        }

    # -- encodings -----------------------------------------------------------------------------
    def bias_scales(self) -> dict[str, np.ndarray]:
        return {
            b.name: bias_encoding(self.encodings[b.input_quantizer], self.encodings[b.weight_quantizer])[0]
            for b in self.effective_plan.biases
        }

    def encodings_document(self, version: str = "1.0.0") -> dict[str, Any]:
        return to_aimet(
            self.effective_plan,
            self.encodings,
            self.bias_scales(),
            version=version,
            quantizer_args={
                "activation_bitwidth": self.activation_bw,
                "param_bitwidth": self.param_bw,
                "dtype": "int",
                "is_symmetric": self.config.param_symmetric,
                "per_channel_quantization": self.config.per_channel_quantization,
                "quant_scheme": self.quant_scheme.value,
                "target": self.target.name,
            },
            excluded_layers=sorted(self.config.exclude_nodes),
        )

    def load_encodings(self, source: str | os.PathLike[str] | Mapping[str, Any]) -> QuantizationSimModel:
        """Load AIMET encodings (ours or AIMET's) into the simulation.

        Every quantizer of the plan must get an encoding; a name that is no tensor of the model is
        an error. Bitwidth and symmetry come from the file.
        """
        where = "encodings"
        if isinstance(source, Mapping):
            data: Any = source
        else:
            where = os.fspath(source)
            try:
                with open(where, encoding="utf-8") as f:
                    data = json.load(f)
            except FileNotFoundError:
                raise EncodingsError(f"{where}: no such file") from None
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise EncodingsError(f"{where}: not a readable JSON file: {e}") from None
        parsed = parse_aimet(data, source=where)
        known = set(values_by_name(self.float_model.graph))
        unknown = sorted(n for n in [*parsed.activations, *parsed.params, *parsed.biases] if n not in known)
        if unknown:
            raise EncodingsError(f"{where}: tensor(s) not in the model: {unknown[:5]}")
        encodings = dict(self.encodings)
        missing = []
        for q in self.plan.activations:
            found = [parsed.activations[t] for t in q.tensors if t in parsed.activations]
            if not found:
                missing.append(q.name)
                continue
            if any(not f.equals(found[0]) for f in found[1:]):
                raise EncodingsError(f"{where}: tied tensors of '{q.name}' carry different encodings")
            encodings[q.name] = found[0]
        for p in self.plan.params:
            enc = parsed.params.get(p.name)
            if enc is None:
                missing.append(p.name)
                continue
            weight = self.float_model.graph.initializers[p.name]
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
        if missing:
            raise EncodingsError(f"{where}: no encoding for quantized tensor(s) {missing[:5]}")
        self.encodings = encodings
        self._session = None
        return self

    # -- training ------------------------------------------------------------------------------
    def trainer(self, **options: Any) -> Any:
        """A :class:`~onnxqat.train.trainer.QATTrainer` for this sim (options as its arguments)."""
        from onnxqat.train.trainer import QATTrainer

        return QATTrainer(self, **options)

    # -- export --------------------------------------------------------------------------------
    def export(
        self, out_dir: str | os.PathLike[str], prefix: str = "model", *, encoding_version: str = "1.0.0"
    ) -> dict[str, str]:
        """Write ``<prefix>.onnx``, ``<prefix>.encodings`` and ``<prefix>_qdq.onnx`` atomically.

        Returns the paths by kind (``float``, ``encodings``, ``qdq``).
        """
        self._require_calibrated()
        if not prefix or os.sep in prefix or prefix in (".", ".."):
            raise ConfigError(f"invalid export prefix {prefix!r}")
        doc = self.encodings_document(encoding_version)
        deploy = self.sim_ir(fold_weights=True)
        float_model = self.float_model
        if self.float16:
            float_model = restore_float16(float_model, self.float16)
            deploy = cast_interface(deploy, self.float16)
        with staged_outputs(out_dir) as stage:
            for staged in save_model(float_model, stage.path(f"{prefix}.onnx")):
                stage.add(staged)
            enc_path = stage.path(f"{prefix}.encodings")
            with open(enc_path, "w", encoding="utf-8") as f:
                f.write(dumps(doc))
            stage.add(enc_path)
            for staged in save_model(deploy, stage.path(f"{prefix}_qdq.onnx")):
                stage.add(staged)
        out = os.fspath(out_dir)
        return {
            "float": os.path.join(out, f"{prefix}.onnx"),
            "encodings": os.path.join(out, f"{prefix}.encodings"),
            "qdq": os.path.join(out, f"{prefix}_qdq.onnx"),
        }
