"""Typed quantization config, loadable from JSON in AIMET's config vocabulary.

The JSON keys follow AIMET's quantsim config (``defaults``, ``params``, ``op_type``,
``supergroups``, ``supergroup_pass_list``, ``model_input``, ``model_output``) so AIMET config
files load as they are (AIMET's ``"True"``/``"False"`` strings are accepted and converted once,
here): every quantsim config aimet-onnx 2.42 ships loads. AIMET keys onnxqat does not use
(``hw_version``, ``supported_kernels``, BatchNormalization's ``running_mean``/``running_var``
params, a fixed minimum without a maximum, ...) are listed in :attr:`QuantSimConfig.unused` and
reported as a warning by :func:`load_config`, never silently dropped. Three keys are onnxqat's
own: ``exclude`` (node names and op types left float), ``nodes`` (per-node bitwidth overrides,
e.g. for mixed precision) and ``defaults.symmetric_scale`` (the symmetric grid convention, see
:mod:`onnxqat.spec`). Keys that are neither AIMET's nor onnxqat's are errors, so a typo never
silently does nothing.

Two presets ship with the package:

* ``onnxruntime`` (default): quantizers where onnxruntime's CPU provider has integer kernels
  (Conv, MatMul, Gemm, Add, Mul, pooling, Concat, Softmax, ...) and at the boundaries of float-only
  ops, so the deployed QDQ model runs fused integer kernels without Q/DQ churn. Softmax outputs
  use the fixed encoding [0, 255/256] (scale 1/256) that onnxruntime's QLinearSoftmax assumes.
* ``aimet``: every op output quantized, as aimet-onnx 2.42's default config (for targets such as
  HTP that run every op in integer arithmetic): its supergroups, unquantized biases, and its
  symmetric weight scale ``max(-min / 2^(b-1), max / (2^(b-1) - 1))``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import warnings
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

from onnxqat.errors import ConfigError
from onnxqat.spec import SYMMETRIC_SCALES

__all__ = ["PRESETS", "NodeOverride", "OpTypeRule", "ParamRule", "QuantSimConfig", "check_names", "load_config"]

PRESETS = ("onnxruntime", "aimet")

# aimet graph passes (``supergroup_pass_list``) that onnxqat's placement follows: ``MatmulAdd`` leaves
# a MatMul's output and the constant bias of the Add after it unquantized (one quantizer after the Add).
GRAPH_PASSES = frozenset({"MatmulAdd"})


@dataclasses.dataclass(frozen=True)
class ParamRule:
    """How a parameter role ("weight" or "bias") is quantized; None = inherit."""

    is_quantized: bool | None = None
    is_symmetric: bool | None = None


@dataclasses.dataclass(frozen=True)
class OpTypeRule:
    """Overrides for all nodes of one op type; None = inherit the defaults."""

    is_output_quantized: bool | None = None
    is_input_quantized: bool | None = None
    is_symmetric: bool | None = None
    per_channel_quantization: bool | None = None
    encoding_constraints: tuple[float, float] | None = None
    params: Mapping[str, ParamRule] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({})
    )


@dataclasses.dataclass(frozen=True)
class NodeOverride:
    """Overrides for one node, by node name (mixed precision, selective quantization)."""

    activation_bw: int | None = None
    param_bw: int | None = None
    is_output_quantized: bool | None = None


# onnxqat's placement switches in ``defaults`` (see QuantSimConfig)
_PLACEMENT_SWITCHES = ("quantize_constant_inputs", "fold_affine", "derive_rescale", "integer_forms",
                       "tie_branching_concat_inputs", "quantize_standalone_batchnorm", "symmetric_dynamic_weights",
                       "untie_wide_concats", "raise_weight_scales", "aimet_rounding")


@dataclasses.dataclass(frozen=True)
class QuantSimConfig:
    """Placement and grid rules. Build with :func:`load_config` or :meth:`from_dict`.

    ``symmetric_scale`` is the scale convention of symmetric signed grids (``"onnxqat"`` or
    ``"aimet"``, see :mod:`onnxqat.spec`). ``graph_passes`` are AIMET's ``supergroup_pass_list``;
    the annotation follows ``MatmulAdd`` (:data:`GRAPH_PASSES`), the others are reported unused. ``unused`` lists the keys of the
    source file that onnxqat read but does not use, each as ``"path: why"`` (not compared).
    ``depthwise_supergroups`` (onnxqat's key ``defaults.depthwise_supergroups``): whether a
    supergroup may start at a depthwise (or 3-d) convolution; aimet-onnx 2.42 never fuses those,
    so its depthwise Conv output keeps a quantizer before the Relu (the ``aimet`` preset: false).
    ``tied_op_types`` (``defaults.tied_op_types``): op types whose output reuses their quantized
    input's encoding, as data-movement ops do (aimet-onnx 2.42 ties Relu, AveragePool and its
    interpolation ops Resize and Upsample so).
    ``calibrate_quantized_weights`` (``defaults.calibrate_quantized_weights``): observe activation
    ranges with the weights already quantized, as aimet-onnx's ``compute_encodings`` does, instead of
    with the float weights.
    Ten more onnxqat keys of ``defaults`` make aimet-onnx's placement and numerics (all ten set
    in the ``aimet`` preset; the defaults keep onnxqat's own rules):
    ``quantize_constant_inputs`` (default false): every float constant an op reads, other than its
    weights and biases, gets its own activation quantizer calibrated on its values (aimet-onnx
    treats constants and Constant-node outputs as model inputs: HardSwish's 3 and 6, Clip bounds,
    a bias added after a Conv); ``fold_affine`` (default true): fold a Mul/Add of per-channel
    constants after a Conv/Gemm into it (aimet-onnx folds only BatchNormalization nodes);
    ``derive_rescale`` (default true): a Mul/Div by a positive scalar reads its input's integers
    (aimet-onnx calibrates its output); ``integer_forms`` (default true): HardSigmoid/HardSwish of a
    uint8 tensor as integer forms with HardSigmoid's fixed output range [0, 1] (aimet-onnx
    calibrates their outputs); ``tie_branching_concat_inputs`` (default true): a Concat input that
    other ops read too shares the Concat's quantizer (aimet-onnx ties only an input the Concat alone
    reads); ``quantize_standalone_batchnorm`` (default false): a BatchNormalization left unfolded
    computes ``x * s + shift`` and its scale ``s`` gets a weight quantizer (per tensor, at least 8
    bits, asymmetric below 16), as aimet-onnx 2.42 does; ``symmetric_dynamic_weights`` (default
    false): the quantizer of a Conv/Gemm/MatMul weight input that is no constant (attention's keys
    and values) takes the weights' symmetry, as aimet-onnx does; ``untie_wide_concats`` (default
    true): a Concat whose inputs' calibrated ranges differ more than
    :data:`onnxqat.pipeline.SHARED_RANGE_RATIO` gets one quantizer per input and runs in float
    (aimet-onnx keeps every Concat tie); ``raise_weight_scales`` (default false): after
    calibration, weight scales are raised where the int32 bias or the requantization scale of an
    integer accelerator would overflow (:mod:`onnxqat.overflow`), as aimet-onnx 2.42 does even with
    biases left float; ``aimet_rounding`` (default false): weights and asymmetric model inputs
    are rounded as aimet-onnx's quantizer rounds (``float32(x / s - offset)`` half away from zero)
    instead of half to even: weights offline (their integers are what deploys), a model input in
    standard ops before a ``QuantizeLinear`` of scale 1 (deployed so too); normalised 8-bit images
    sit on midpoints of the grid. Tensors computed by integer kernels stay half to even (the
    kernels round so).
    """

    output_quantized: bool = True
    activation_symmetric: bool = False
    param_quantized: bool = True
    param_symmetric: bool = True
    strict_symmetric: bool = False
    unsigned_symmetric: bool = True
    per_channel_quantization: bool = False
    params: Mapping[str, ParamRule] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({})
    )
    op_types: Mapping[str, OpTypeRule] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({})
    )
    supergroups: tuple[tuple[str, ...], ...] = ()
    model_input_quantized: bool = True
    model_output_quantized: bool = True
    exclude_nodes: frozenset[str] = frozenset()
    exclude_op_types: frozenset[str] = frozenset()
    nodes: Mapping[str, NodeOverride] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({})
    )
    symmetric_scale: str = "onnxqat"
    graph_passes: tuple[str, ...] = ()
    depthwise_supergroups: bool = True
    tied_op_types: frozenset[str] = frozenset()
    calibrate_quantized_weights: bool = False
    quantize_constant_inputs: bool = False
    fold_affine: bool = True
    derive_rescale: bool = True
    integer_forms: bool = True
    tie_branching_concat_inputs: bool = True
    quantize_standalone_batchnorm: bool = False
    symmetric_dynamic_weights: bool = False
    untie_wide_concats: bool = True
    raise_weight_scales: bool = False
    aimet_rounding: bool = False
    unused: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.symmetric_scale not in SYMMETRIC_SCALES:
            raise ConfigError(f"symmetric_scale must be one of {SYMMETRIC_SCALES}, got {self.symmetric_scale!r}")
        for group in self.supergroups:
            if len(group) < 2:
                raise ConfigError(f"a supergroup needs at least two op types, got {list(group)}")

    # -- queries used by the annotation pass -----------------------------------------------------
    def op_rule(self, op_type: str) -> OpTypeRule:
        return self.op_types.get(op_type, _EMPTY_RULE)

    def param_rule(self, op_type: str, role: str) -> tuple[bool, bool]:
        """(is_quantized, is_symmetric) of parameter ``role`` of an ``op_type`` node."""
        quantized, symmetric = self.param_quantized, self.param_symmetric
        general = self.params.get(role)
        if general is not None:
            quantized = _pick(general.is_quantized, quantized)
            symmetric = _pick(general.is_symmetric, symmetric)
        specific = self.op_rule(op_type).params.get(role)
        if specific is not None:
            quantized = _pick(specific.is_quantized, quantized)
            symmetric = _pick(specific.is_symmetric, symmetric)
        return quantized, symmetric

    def per_channel_for(self, op_type: str) -> bool:
        return _pick(self.op_rule(op_type).per_channel_quantization, self.per_channel_quantization)

    def output_quantized_for(self, op_type: str) -> bool:
        return _pick(self.op_rule(op_type).is_output_quantized, self.output_quantized)

    def input_quantized_for(self, op_type: str) -> bool:
        return bool(self.op_rule(op_type).is_input_quantized)

    def activation_symmetric_for(self, op_type: str) -> bool:
        return _pick(self.op_rule(op_type).is_symmetric, self.activation_symmetric)

    def output_range_for(self, op_type: str) -> tuple[float, float] | None:
        """Fixed output encoding range of an op type (``encoding_constraints``), if any."""
        return self.op_rule(op_type).encoding_constraints

    def with_overrides(self, **changes: Any) -> QuantSimConfig:
        return dataclasses.replace(self, **changes)

    # -- JSON ------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> QuantSimConfig:
        return _Parser(source).config(data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in the same vocabulary :meth:`from_dict` reads."""
        out: dict[str, Any] = {
            "defaults": {
                "ops": {
                    "is_output_quantized": self.output_quantized,
                    "is_symmetric": self.activation_symmetric,
                },
                "params": {
                    "is_quantized": self.param_quantized,
                    "is_symmetric": self.param_symmetric,
                },
                "strict_symmetric": self.strict_symmetric,
                "unsigned_symmetric": self.unsigned_symmetric,
                "per_channel_quantization": self.per_channel_quantization,
                "symmetric_scale": self.symmetric_scale,
                "depthwise_supergroups": self.depthwise_supergroups,
                "tied_op_types": sorted(self.tied_op_types),
                "calibrate_quantized_weights": self.calibrate_quantized_weights,
                "quantize_constant_inputs": self.quantize_constant_inputs,
                "fold_affine": self.fold_affine,
                "derive_rescale": self.derive_rescale,
                "integer_forms": self.integer_forms,
                "tie_branching_concat_inputs": self.tie_branching_concat_inputs,
                "quantize_standalone_batchnorm": self.quantize_standalone_batchnorm,
                "symmetric_dynamic_weights": self.symmetric_dynamic_weights,
                "untie_wide_concats": self.untie_wide_concats,
                "raise_weight_scales": self.raise_weight_scales,
                "aimet_rounding": self.aimet_rounding,
            },
            "params": {k: _drop_none(dataclasses.asdict(v)) for k, v in self.params.items()},
            "op_type": {},
            "supergroups": [{"op_list": list(g)} for g in self.supergroups],
            "supergroup_pass_list": list(self.graph_passes),
            "model_input": {"is_input_quantized": self.model_input_quantized},
            "model_output": {"is_output_quantized": self.model_output_quantized},
            "exclude": {
                "nodes": sorted(self.exclude_nodes),
                "op_types": sorted(self.exclude_op_types),
            },
            "nodes": {k: _drop_none(dataclasses.asdict(v)) for k, v in self.nodes.items()},
        }
        for op_type, rule in self.op_types.items():
            entry = _drop_none(
                {f.name: getattr(rule, f.name) for f in dataclasses.fields(rule)
                 if f.name not in ("params", "encoding_constraints")}
            )
            if rule.encoding_constraints is not None:
                lo, hi = rule.encoding_constraints
                entry["encoding_constraints"] = {"min": lo, "max": hi}
            if rule.params:
                entry["params"] = {k: _drop_none(dataclasses.asdict(v)) for k, v in rule.params.items()}
            out["op_type"][op_type] = entry
        return out


_EMPTY_RULE = OpTypeRule()


def _pick(value: bool | None, default: bool) -> bool:
    return default if value is None else value


def _drop_none(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


class _Parser:
    """Validating JSON reader; every error names the key path it is about."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.unused: list[str] = []

    def report(self, path: str, why: str) -> None:
        self.unused.append(f"{path}: {why}")

    def fail(self, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {message}")

    def obj(self, value: Any, path: str, allowed: set[str]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(path, f"expected an object, got {type(value).__name__}")
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise self.fail(path, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if isinstance(value, bool):
            return value
        if value in ("True", "true"):
            return True
        if value in ("False", "false"):
            return False
        raise self.fail(path, f"expected true/false, got {value!r}")

    def opt_bool(self, d: Mapping[str, Any], key: str, path: str) -> bool | None:
        return self.boolean(d[key], f"{path}.{key}") if key in d else None

    def bitwidth(self, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 4 <= value <= 16:
            raise self.fail(path, f"expected a bitwidth from 4 to 16, got {value!r}")
        bitwidth: int = value
        return bitwidth

    def range(self, value: Any, path: str) -> tuple[float, float] | None:
        if value is None:
            return None
        body = self.obj(value, path, {"min", "max"})
        if "min" in body and "max" not in body:  # AIMET's schema requires only "min"
            try:
                lo = float(body["min"])
            except (TypeError, ValueError):
                raise self.fail(path, "expected {\"min\": number[, \"max\": number]}") from None
            same = " (for min 0 calibration gives the same: ranges always include 0)" if lo == 0.0 else ""
            self.report(path, f"a fixed minimum ({lo:g}) without a maximum is not applied; onnxqat fixes whole "
                              f"ranges only{same}")
            return None
        try:
            lo, hi = float(body["min"]), float(body["max"])
        except (KeyError, TypeError, ValueError):
            raise self.fail(path, "expected {\"min\": number, \"max\": number}") from None
        if not lo <= 0.0 <= hi or lo == hi:
            raise self.fail(path, f"the range must contain 0 and be non-empty, got [{lo}, {hi}]")
        return lo, hi

    def names(self, value: Any, path: str) -> frozenset[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(path, "expected a list of strings")
        return frozenset(value)

    def param_rules(self, value: Any, path: str) -> Mapping[str, ParamRule]:
        rules = {}
        if not isinstance(value, Mapping):
            raise self.fail(path, f"expected an object, got {type(value).__name__}")
        for role, body in value.items():
            p = f"{path}.{role}"
            body = self.obj(body, p, {"is_quantized", "is_symmetric"})
            if role not in ("weight", "bias"):
                for key in body:
                    self.opt_bool(body, key, p)
                self.report(p, "not used: onnxqat quantizes the weights and biases of weighted ops only "
                               "(BatchNormalization is folded into the op before it)")
                continue
            rules[role] = ParamRule(
                is_quantized=self.opt_bool(body, "is_quantized", p),
                is_symmetric=self.opt_bool(body, "is_symmetric", p),
            )
        return types.MappingProxyType(rules)

    def kernels(self, body: Mapping[str, Any], path: str) -> None:
        if "supported_kernels" in body:
            if not isinstance(body["supported_kernels"], list):
                raise self.fail(f"{path}.supported_kernels", "expected a list")
            self.report(f"{path}.supported_kernels", "not used: bitwidths come from param_bw/activation_bw "
                                                     "and the nodes overrides")

    def config(self, data: Mapping[str, Any]) -> QuantSimConfig:
        if isinstance(data, Mapping) and {"handlers", "loggers", "formatters"} & set(data) and not (
            {"defaults", "op_type", "supergroups", "params"} & set(data)
        ):
            raise self.fail("$", "this is a Python logging config (logging.config.dictConfig: 'version', "
                                 "'handlers', 'loggers'), not a quantsim config; aimet-onnx ships it as "
                                 "default_logging_config.json beside its quantsim configs")
        top = self.obj(
            data,
            "$",
            {
                "defaults",
                "params",
                "op_type",
                "supergroups",
                "supergroup_pass_list",
                "model_input",
                "model_output",
                "exclude",
                "nodes",
            },
        )
        kw: dict[str, Any] = {}
        defaults = self.obj(
            top.get("defaults", {}),
            "defaults",
            {"ops", "params", "strict_symmetric", "unsigned_symmetric", "per_channel_quantization",
             "hw_version", "supported_kernels", "symmetric_scale", "depthwise_supergroups",
             "tied_op_types", "calibrate_quantized_weights", *_PLACEMENT_SWITCHES},
        )
        if "hw_version" in defaults:
            if not isinstance(defaults["hw_version"], str):
                raise self.fail("defaults.hw_version", "expected a string")
            self.report("defaults.hw_version", f"{defaults['hw_version']!r} not used (aimet-onnx 2.42 only logs it "
                                               "and applies its default per-op rules)")
        self.kernels(defaults, "defaults")
        if "symmetric_scale" in defaults:
            if defaults["symmetric_scale"] not in SYMMETRIC_SCALES:
                raise self.fail("defaults.symmetric_scale", f"expected one of {list(SYMMETRIC_SCALES)}, "
                                                            f"got {defaults['symmetric_scale']!r}")
            kw["symmetric_scale"] = defaults["symmetric_scale"]
        value = self.opt_bool(defaults, "depthwise_supergroups", "defaults")
        if value is not None:
            kw["depthwise_supergroups"] = value
        for key in ("calibrate_quantized_weights", *_PLACEMENT_SWITCHES):
            value = self.opt_bool(defaults, key, "defaults")
            if value is not None:
                kw[key] = value
        if "tied_op_types" in defaults:
            tied = defaults["tied_op_types"]
            if not isinstance(tied, list) or not all(isinstance(x, str) and x for x in tied):
                raise self.fail("defaults.tied_op_types", "expected a list of op types")
            kw["tied_op_types"] = frozenset(tied)
        ops = self.obj(defaults.get("ops", {}), "defaults.ops",
                       {"is_output_quantized", "is_symmetric", "is_input_quantized"})
        if "is_input_quantized" in ops:
            self.opt_bool(ops, "is_input_quantized", "defaults.ops")
            self.report("defaults.ops.is_input_quantized", "not used: input quantization is set per op type "
                                                          "(op_type.<T>.is_input_quantized)")
        params = self.obj(
            defaults.get("params", {}), "defaults.params", {"is_quantized", "is_symmetric"}
        )
        for key, src, path in (
            ("output_quantized", (ops, "is_output_quantized"), "defaults.ops"),
            ("activation_symmetric", (ops, "is_symmetric"), "defaults.ops"),
            ("param_quantized", (params, "is_quantized"), "defaults.params"),
            ("param_symmetric", (params, "is_symmetric"), "defaults.params"),
            ("strict_symmetric", (defaults, "strict_symmetric"), "defaults"),
            ("unsigned_symmetric", (defaults, "unsigned_symmetric"), "defaults"),
            ("per_channel_quantization", (defaults, "per_channel_quantization"), "defaults"),
        ):
            value = self.opt_bool(src[0], src[1], path)
            if value is not None:
                kw[key] = value
        if "params" in top:
            kw["params"] = self.param_rules(top["params"], "params")
        if "op_type" in top:
            op_types = {}
            op_fields = {
                "is_output_quantized",
                "is_input_quantized",
                "is_symmetric",
                "per_channel_quantization",
                "encoding_constraints",
                "params",
                "supported_kernels",
            }
            for op_type, body in self.obj(top["op_type"], "op_type", set(top["op_type"])).items():
                p = f"op_type.{op_type}"
                body = self.obj(body, p, op_fields)
                self.kernels(body, p)
                op_types[op_type] = OpTypeRule(
                    is_output_quantized=self.opt_bool(body, "is_output_quantized", p),
                    is_input_quantized=self.opt_bool(body, "is_input_quantized", p),
                    is_symmetric=self.opt_bool(body, "is_symmetric", p),
                    per_channel_quantization=self.opt_bool(body, "per_channel_quantization", p),
                    encoding_constraints=self.range(body.get("encoding_constraints"), f"{p}.encoding_constraints"),
                    params=self.param_rules(body.get("params", {}), f"{p}.params"),
                )
            kw["op_types"] = types.MappingProxyType(op_types)
        if "supergroups" in top:
            groups = top["supergroups"]
            if not isinstance(groups, list):
                raise self.fail("supergroups", "expected a list of {\"op_list\": [...]} objects")
            parsed = []
            for i, g in enumerate(groups):
                g = self.obj(g, f"supergroups[{i}]", {"op_list"})
                ops_list = g.get("op_list")
                if (
                    not isinstance(ops_list, list)
                    or len(ops_list) < 2
                    or not all(isinstance(o, str) for o in ops_list)
                ):
                    raise self.fail(f"supergroups[{i}].op_list", "expected two or more op types")
                parsed.append(tuple(ops_list))
            kw["supergroups"] = tuple(parsed)
        if "supergroup_pass_list" in top:
            passes = top["supergroup_pass_list"]
            if not isinstance(passes, list) or not all(isinstance(x, str) for x in passes):
                raise self.fail("supergroup_pass_list", "expected a list of pass names")
            kw["graph_passes"] = tuple(passes)
            if passes:
                others = [x for x in passes if x not in GRAPH_PASSES]
                if others:
                    self.report("supergroup_pass_list", f"{', '.join(others)} not followed (aimet's patterns for "
                                                        "decomposed layers); MatmulAdd is")
        if "model_input" in top:
            mi = self.obj(top["model_input"], "model_input", {"is_input_quantized"})
            value = self.opt_bool(mi, "is_input_quantized", "model_input")
            if value is not None:
                kw["model_input_quantized"] = value
        if "model_output" in top:
            mo = self.obj(top["model_output"], "model_output", {"is_output_quantized"})
            value = self.opt_bool(mo, "is_output_quantized", "model_output")
            if value is not None:
                kw["model_output_quantized"] = value
        if "exclude" in top:
            ex = self.obj(top["exclude"], "exclude", {"nodes", "op_types"})
            kw["exclude_nodes"] = self.names(ex.get("nodes", []), "exclude.nodes")
            kw["exclude_op_types"] = self.names(ex.get("op_types", []), "exclude.op_types")
        if "nodes" in top:
            nodes = {}
            for name, body in self.obj(top["nodes"], "nodes", set(top["nodes"])).items():
                p = f"nodes.{name}"
                body = self.obj(body, p, {"activation_bw", "param_bw", "is_output_quantized"})
                nodes[name] = NodeOverride(
                    activation_bw=(
                        self.bitwidth(body["activation_bw"], f"{p}.activation_bw")
                        if "activation_bw" in body
                        else None
                    ),
                    param_bw=(
                        self.bitwidth(body["param_bw"], f"{p}.param_bw") if "param_bw" in body else None
                    ),
                    is_output_quantized=self.opt_bool(body, "is_output_quantized", p),
                )
            kw["nodes"] = types.MappingProxyType(nodes)
        return QuantSimConfig(**kw, unused=tuple(self.unused))


def load_config(source: str | os.PathLike[str] | Mapping[str, Any] | QuantSimConfig | None) -> QuantSimConfig:
    """A config from a preset name, a JSON file path, a dict, or an existing config.

    ``None`` gives the ``onnxruntime`` preset. AIMET keys the config holds but onnxqat does not use
    (:attr:`QuantSimConfig.unused`) are reported in one ``UserWarning``.
    """
    if isinstance(source, QuantSimConfig):
        return source
    if source is None:
        source = "onnxruntime"
    if isinstance(source, Mapping):
        return _reported(QuantSimConfig.from_dict(source), "config")
    text_source = os.fspath(source)
    if text_source in PRESETS:
        text = resources.files("onnxqat").joinpath("configs").joinpath(f"{text_source}.json").read_text()
        return QuantSimConfig.from_dict(json.loads(text), source=f"preset {text_source}")  # documented, not warned
    try:
        with open(text_source, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"{text_source}: no such config file (presets: {', '.join(PRESETS)})"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{text_source}: cannot read config: {e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{text_source}: not valid JSON: {e}") from None
    except RecursionError:
        raise ConfigError(f"{text_source}: nested too deeply to be a quantization config") from None
    return _reported(QuantSimConfig.from_dict(data, source=text_source), text_source)


def _reported(config: QuantSimConfig, source: str) -> QuantSimConfig:
    if config.unused:
        warnings.warn(f"{source}: {len(config.unused)} AIMET config key(s) not used by onnxqat: "
                      + "; ".join(config.unused), UserWarning, stacklevel=3)
    return config


def check_names(config: QuantSimConfig, node_names: Iterable[str], op_types: Iterable[str], *,
                source: str = "config", warn: bool = True) -> None:
    """Refuse ``exclude``/``nodes`` entries that match nothing in the model (a typo would
    otherwise silently do nothing), naming the closest real name.

    An excluded op type that is a known ONNX operator the model lacks only warns (``warn``):
    shared configs list op types for many models.
    """
    import difflib
    import warnings

    import onnx.defs

    nodes = set(node_names)
    present = set(op_types)

    def closest(name: str, candidates: Iterable[str]) -> str:
        found = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.5)
        return f" (closest: '{found[0]}')" if found else ""

    for path, names in (("exclude.nodes", sorted(config.exclude_nodes)), ("nodes", sorted(config.nodes))):
        for name in names:
            if name not in nodes:
                raise ConfigError(f"{source}: {path}: no node named '{name}' in the model{closest(name, nodes)}")
    for op_type in sorted(config.exclude_op_types - present):
        if any(onnx.defs.has(op_type, domain) for domain in ("", "com.microsoft")):
            if warn:
                warnings.warn(f"{source}: exclude.op_types: the model has no {op_type} node; the rule does nothing",
                              RuntimeWarning, stacklevel=2)
        else:
            known = present | {s.name for s in onnx.defs.get_all_schemas() if s.domain == ""}
            raise ConfigError(f"{source}: exclude.op_types: '{op_type}' is no op type of the model or of "
                              f"ONNX{closest(op_type, known)}")
