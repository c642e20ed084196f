"""AIMET encodings files: write (1.0.0 or 0.6.1) and read back, with validation.

1.0.0 (default) lists ``{name, enc_type, dtype, bw, is_sym, scale, offset}`` entries; 0.6.1 maps
each name to a list of ``{bitwidth, dtype, is_symmetric, min, max, scale, offset}`` (one per
channel). Offsets follow AIMET's convention (``offset = -zero_point`` on the unsigned grid,
``-2^(b-1)`` for symmetric). Every tensor quantized in the float model appears under its name in
that model; tied tensors appear once each with the same encoding; int32 biases appear as 32-bit
symmetric param encodings with the derived scale.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from onnxqat.errors import EncodingsError
from onnxqat.plan import QuantPlan
from onnxqat.qparams import Encoding

__all__ = ["VERSIONS", "ParsedEncodings", "parse_aimet", "read_document", "to_aimet"]

VERSIONS = ("1.0.0", "0.6.1")


def _entry_1_0_0(name: str, scale: np.ndarray, offset: np.ndarray, bw: int, is_sym: bool) -> dict[str, Any]:
    return {
        "name": name,
        "enc_type": "PER_CHANNEL" if scale.ndim == 1 else "PER_TENSOR",
        "dtype": "INT",
        "bw": int(bw),
        "is_sym": bool(is_sym),
        "scale": [float(s) for s in np.atleast_1d(scale)],
        "offset": [int(o) for o in np.atleast_1d(offset)],
    }


def _entries_0_6_1(scale: np.ndarray, offset: np.ndarray, bw: int, is_sym: bool) -> list[dict[str, Any]]:
    steps = (1 << bw) - 1
    out = []
    for s, o in zip(np.atleast_1d(scale).astype(np.float64), np.atleast_1d(offset)):
        out.append(
            {
                "bitwidth": int(bw),
                "dtype": "int",
                "is_symmetric": str(bool(is_sym)),
                "min": float(o * s),
                "max": float((o + steps) * s),
                "offset": int(o),
                "scale": float(s),
            }
        )
    return out


def to_aimet(
    plan: QuantPlan,
    encodings: Mapping[str, Encoding],
    bias_scales: Mapping[str, np.ndarray],
    *,
    version: str = "1.0.0",
    quantizer_args: Mapping[str, Any] | None = None,
    excluded_layers: list[str] | None = None,
) -> dict[str, Any]:
    """The encodings file content for a calibrated plan."""
    if version not in VERSIONS:
        raise EncodingsError(f"unsupported encodings version {version!r}; choose one of {VERSIONS}")
    act_items: list[tuple[str, Encoding]] = [
        (tensor, encodings[q.name]) for q in plan.activations for tensor in q.tensors
    ]
    param_items: list[tuple[str, Encoding]] = [(p.name, encodings[p.name]) for p in plan.params]
    bias_items = [(b.name, bias_scales[b.name]) for b in plan.biases]
    if version == "1.0.0":
        acts: Any = [
            _entry_1_0_0(n, e.scale, e.aimet_offset, e.bitwidth, e.symmetric) for n, e in act_items
        ]
        params: Any = [
            _entry_1_0_0(n, e.scale, e.aimet_offset, e.bitwidth, e.symmetric) for n, e in param_items
        ]
        params += [
            _entry_1_0_0(n, s, np.full(s.shape, -(1 << 31), np.int64), 32, True) for n, s in bias_items
        ]
    else:
        acts = {n: _entries_0_6_1(e.scale, e.aimet_offset, e.bitwidth, e.symmetric) for n, e in act_items}
        params = {n: _entries_0_6_1(e.scale, e.aimet_offset, e.bitwidth, e.symmetric) for n, e in param_items}
        params.update(
            {n: _entries_0_6_1(s, np.full(s.shape, -(1 << 31), np.int64), 32, True) for n, s in bias_items}
        )
    return {
        "version": version,
        "activation_encodings": acts,
        "param_encodings": params,
        "excluded_layers": list(excluded_layers or []),
        "quantizer_args": dict(quantizer_args or {}),
    }


@dataclasses.dataclass(frozen=True)
class ParsedEncodings:
    """Encodings read from a file, by tensor name (axis not yet known for per-channel ones)."""

    activations: Mapping[str, Encoding]
    params: Mapping[str, Encoding]
    biases: Mapping[str, np.ndarray]
    version: str


def parse_aimet(data: Any, *, source: str = "encodings") -> ParsedEncodings:
    """Validate and read an AIMET encodings document (already JSON-decoded)."""

    def fail(msg: str) -> EncodingsError:
        return EncodingsError(f"{source}: {msg}")

    if not isinstance(data, Mapping):
        raise fail("expected a JSON object at the top level")
    version = data.get("version", "0.6.1")
    if not isinstance(version, str):
        raise fail(f"version must be a string, got {version!r}")
    sections = {}
    for key in ("activation_encodings", "param_encodings"):
        section = data.get(key, [] if version.startswith("1.") else {})
        sections[key] = _entries(section, version, key, fail)
    acts = {}
    params = {}
    biases = {}
    for key, target in (("activation_encodings", acts), ("param_encodings", params)):
        for name, fields in sections[key].items():
            where = f"{key} '{name}'"
            bw, is_sym, scale, offset, per_channel = fields
            if bw == 32 and key == "param_encodings" and is_sym:
                biases[name] = scale
                continue
            try:
                target[name] = Encoding.from_aimet(
                    bitwidth=bw, is_symmetric=is_sym, scale=scale if per_channel else scale[0],
                    offset=offset if per_channel else offset[0], axis=0 if per_channel else None,
                )
            except EncodingsError as e:
                raise fail(f"{where}: {e}") from None
    return ParsedEncodings(acts, params, biases, version)


def _entries(section: Any, version: str, key: str, fail: Any) -> dict[str, tuple[int, bool, np.ndarray, np.ndarray, bool]]:
    """name -> (bw, is_sym, scales, offsets, per_channel) from either file layout."""
    out: dict[str, tuple[int, bool, np.ndarray, np.ndarray, bool]] = {}
    if version.startswith("1."):
        if not isinstance(section, list):
            raise fail(f"{key} must be a list in version {version}")
        for i, entry in enumerate(section):
            where = f"{key}[{i}]"
            if not isinstance(entry, Mapping):
                raise fail(f"{where}: expected an object")
            name = entry.get("name")
            if not isinstance(name, str) or not name:
                raise fail(f"{where}: missing tensor name")
            where = f"{key} '{name}'"
            if entry.get("dtype", "INT") != "INT":
                raise fail(f"{where}: dtype {entry.get('dtype')!r} is not supported (only INT)")
            enc_type = entry.get("enc_type", "PER_TENSOR")
            if enc_type not in ("PER_TENSOR", "PER_CHANNEL"):
                raise fail(f"{where}: enc_type {enc_type!r} is not supported")
            bw = _bitwidth(entry.get("bw"), where, fail)
            is_sym = entry.get("is_sym")
            if not isinstance(is_sym, bool):
                raise fail(f"{where}: is_sym must be true or false")
            scale = _scales(entry.get("scale"), where, fail)
            offset = _numbers(entry.get("offset"), where, "offset", fail)
            if len(scale) != len(offset):
                raise fail(f"{where}: {len(scale)} scales but {len(offset)} offsets")
            if enc_type == "PER_TENSOR" and len(scale) != 1:
                raise fail(f"{where}: PER_TENSOR needs exactly one scale, got {len(scale)}")
            if name in out:
                raise fail(f"{where}: listed twice")
            out[name] = (bw, is_sym, scale, offset, enc_type == "PER_CHANNEL")
        return out
    if not isinstance(section, Mapping):
        raise fail(f"{key} must be an object in version {version}")
    for name, channels in section.items():
        where = f"{key} '{name}'"
        if not isinstance(channels, list) or not channels or not all(isinstance(c, Mapping) for c in channels):
            raise fail(f"{where}: expected a non-empty list of encodings")
        if any(c.get("dtype", "int") != "int" for c in channels):
            raise fail(f"{where}: only integer encodings are supported")
        bws = {_bitwidth(c.get("bitwidth"), where, fail) for c in channels}
        syms = {str(c.get("is_symmetric")) for c in channels}
        if len(bws) != 1 or len(syms) != 1 or not syms <= {"True", "False"}:
            raise fail(f"{where}: inconsistent or invalid bitwidth/is_symmetric across channels")
        scale = _scales([c.get("scale") for c in channels], where, fail)
        offset = _numbers([c.get("offset") for c in channels], where, "offset", fail)
        out[name] = (bws.pop(), syms.pop() == "True", scale, offset, len(channels) > 1)
    return out


def _bitwidth(value: Any, where: str, fail: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (4 <= value <= 16 or value == 32):
        raise fail(f"{where}: bitwidth must be 4 to 16 (or 32 for biases), got {value!r}")
    return value


def _numbers(value: Any, where: str, field: str, fail: Any) -> np.ndarray:
    if not isinstance(value, list) or not value:
        raise fail(f"{where}: {field} must be a non-empty list of numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise fail(f"{where}: {field} must hold finite numbers")
    return np.asarray(value, dtype=np.float64)


_FLOAT32_NORMAL = float(np.finfo(np.float32).tiny)


def _scales(value: Any, where: str, fail: Any) -> np.ndarray:
    """Scales are finite numbers; a positive one below float32's normal range (1.18e-38, e.g. a
    denormal 1e-45) makes ``x / scale`` overflow, so every value lands on the grid's ends."""
    scale = _numbers(value, where, "scale", fail)
    tiny = scale[(scale > 0) & (scale < _FLOAT32_NORMAL)]
    if tiny.size:
        raise fail(f"{where}: scale {float(tiny[0]):.3g} is below float32's normal range ({_FLOAT32_NORMAL:.3g}); "
                   "x / scale would overflow and wreck the tensor")
    return scale


def read_document(path: str) -> Any:
    """The JSON document of an encodings file; errors (unreadable, not JSON, nested absurdly
    deep) are :class:`EncodingsError` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise EncodingsError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EncodingsError(f"{path}: not a readable JSON file: {e}") from None
    except RecursionError:
        raise EncodingsError(f"{path}: nested too deeply to be an encodings file") from None


def dumps(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"
