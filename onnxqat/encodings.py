"""AIMET encodings files: write (1.0.0 or 0.6.1) and read back (also aimet-onnx's 2.0.0), with validation.

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
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from onnxqat.errors import EncodingsError
from onnxqat.plan import QuantPlan
from onnxqat.qparams import Encoding

__all__ = [
    "AIMET_UNQUANTIZED_OUTPUTS", "ENCODINGS_FORMATS", "MISSING", "VALUE_PRESERVING", "VERSIONS", "Binding", "ParsedEncodings", "SourceGraph",
    "aimet_names", "aimet_param_names", "bind", "parse_aimet", "read_document", "same_values", "to_aimet",
]

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
    names: Mapping[str, tuple[str, ...]] | None = None,
    param_names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The encodings file content for a calibrated plan; ``names`` replaces the tensors each
    activation quantizer is written under (by quantizer name, e.g. :func:`aimet_names`),
    ``param_names`` the names of weights (:func:`aimet_param_names`)."""
    if version not in VERSIONS:
        raise EncodingsError(f"unsupported encodings version {version!r}; choose one of {VERSIONS}")
    act_items: list[tuple[str, Encoding]] = [
        (tensor, encodings[q.name]) for q in plan.activations
        for tensor in (q.tensors if names is None else names[q.name])
    ]
    param_items: list[tuple[str, Encoding]] = [((param_names or {}).get(p.name, p.name), encodings[p.name])
                                               for p in plan.params]
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
    if version.startswith("2."):
        return _parse_2(data, version, fail)
    sections = {}
    for key in ("activation_encodings", "param_encodings"):
        section = data.get(key, [] if version.startswith("1.") else {})
        sections[key] = _entries(section, version, key, fail)
    acts: dict[str, Encoding] = {}
    params: dict[str, Encoding] = {}
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


_DTYPE_BITS = re.compile(r"(u?)int(\d+)$")


def _parse_2(data: Mapping[str, Any], version: str, fail: Any) -> ParsedEncodings:
    """aimet-onnx's 2.0.0 layout: one ``encodings`` list of ``{name, output_dtype, y_scale[,
    y_zero_point][, axis]}`` for activations and weights alike (``uintN``: asymmetric with that zero
    point, 0 when absent; ``intN``: symmetric; ``int32``: a derived bias). Each entry is offered as
    activation and as weight encoding; the plan's quantizer of that name takes it."""
    section = data.get("encodings")
    if not isinstance(section, list):
        raise fail(f"encodings must be a list in version {version}")
    encodings: dict[str, Encoding] = {}
    biases: dict[str, np.ndarray] = {}
    for i, entry in enumerate(section):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise fail(f"encodings[{i}]: expected an object with a tensor name")
        name = entry["name"]
        where = f"encodings '{name}'"
        found = _DTYPE_BITS.match(str(entry.get("output_dtype", "")))
        if found is None:
            raise fail(f"{where}: output_dtype {entry.get('output_dtype')!r} is not supported (only integer types)")
        unsigned, bw = found.group(1) == "u", int(found.group(2))
        bw = _bitwidth(bw, where, fail)
        raw = entry.get("y_scale")
        scale = _scales(raw if isinstance(raw, list) else [raw], where, fail)
        zp = entry.get("y_zero_point", 0)
        zero = _numbers(zp if isinstance(zp, list) else [zp] * len(scale), where, "y_zero_point", fail)
        if name in encodings or name in biases:
            raise fail(f"{where}: listed twice")
        if bw == 32:
            biases[name] = scale
            continue
        per_channel = "axis" in entry or isinstance(raw, list)
        offset = -zero if unsigned else np.full(scale.shape, -(1 << (bw - 1)), np.float64)
        if not unsigned and np.any(zero != 0):
            raise fail(f"{where}: a signed encoding with a zero point other than 0 is not supported")
        try:
            encodings[name] = Encoding.from_aimet(
                bitwidth=bw, is_symmetric=not unsigned, scale=scale if per_channel else scale[0],
                offset=offset if per_channel else offset[0], axis=0 if per_channel else None)
        except EncodingsError as e:
            raise fail(f"{where}: {e}") from None
    return ParsedEncodings(encodings, dict(encodings), biases, version)


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
    bitwidth: int = value
    return bitwidth


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


# -- exchange with aimet-onnx: tensor names across placements --------------------------------------

# Ops whose output holds the same values as their first input (its encoding applies unchanged).
VALUE_PRESERVING = frozenset({"Identity", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"})
# onnxqat and aimet-onnx both fold BatchNormalization into the Conv/ConvTranspose/Gemm before it:
# aimet's folded op keeps its output name, onnxqat's takes the BatchNorm's. (A Mul/Add that onnxqat
# folds too is no BatchNorm to aimet: the tensors before it hold other values there.)
_FOLDED = frozenset({"BatchNormalization"})
# Op types whose outputs aimet-onnx 2.42 never quantizes (they reuse their input's quantizer): its
# grid-preserving ops and its list of ignored outputs (aimet_onnx.quantsim, measured in
# tests/fixtures/aimet/measured.json).
AIMET_UNQUANTIZED_OUTPUTS = frozenset({
    "Col2Im", "Compress", "DepthToSpace", "Dropout", "Expand", "Flatten", "Gather", "GatherElements",
    "GatherND", "Identity", "MaxPool", "MaxRoiPool", "NonZero", "Pad", "ReduceMax", "ReduceMin", "Reshape",
    "Shape", "Slice", "SpaceToDepth", "Split", "SplitToSequence", "Squeeze", "Tile", "TopK", "Transpose",
    "Unsqueeze",
})
MISSING = ("error", "calibrate")
ENCODINGS_FORMATS = ("onnxqat", "aimet-strict")


@dataclasses.dataclass(frozen=True)
class SourceGraph:
    """The tensor names of the model an encodings file was made for (before onnxqat prepared it):
    ``(op_type, inputs, outputs)`` per node in graph order, and the graph inputs."""

    nodes: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]
    inputs: tuple[str, ...]

    @classmethod
    def of(cls, model: Any) -> SourceGraph:
        """From a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` (weights not needed)."""
        import os

        import onnx

        if isinstance(model, (str, os.PathLike)):
            model = onnx.load(os.fspath(model), load_external_data=False)
        if isinstance(model, onnx.ModelProto):
            g = model.graph
            nodes = tuple((n.op_type, tuple(n.input), tuple(n.output)) for n in g.node)
            return cls(nodes, tuple(i.name for i in g.input))
        g = model.graph
        nodes = tuple((n.op_type, tuple(v.name if v is not None else "" for v in n.inputs),
                       tuple(v.name or "" for v in n.outputs)) for n in g)
        return cls(nodes, tuple(v.name or "" for v in g.inputs))

    @classmethod
    def of_file_if_readable(cls, model: Any) -> SourceGraph | None:
        """:meth:`of`, or None when the model's file is gone or no longer an ONNX model (the
        prepared model's names are then all there is)."""
        from google.protobuf.message import Error as ProtobufError

        try:
            return cls.of(model)
        except (OSError, ProtobufError):
            return None

    @property
    def names(self) -> set[str]:
        out = set(self.inputs)
        for _, ins, outs in self.nodes:
            out.update(ins)
            out.update(outs)
        out.discard("")
        return out


class _Classes:
    """Union-find over tensor names: names in one class hold the same values."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)

    def members(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for x in list(self.parent):
            out.setdefault(self.find(x), set()).add(x)
        return out


def same_values(float_model: Any, source: SourceGraph | None) -> dict[str, set[str]]:
    """For every tensor name, the names holding the same values: through value-preserving ops of
    the prepared float model and of the source model, and from an op's output before a folded
    BatchNorm to the name the folded op's output has now."""
    classes = _Classes()
    present = set()
    for node in float_model.graph:
        for v in node.outputs:
            present.add(v.name)
        if node.op_type in VALUE_PRESERVING and node.inputs and node.inputs[0] is not None:
            classes.union(node.inputs[0].name, node.outputs[0].name)
    present.update(v.name for v in float_model.graph.inputs)
    present.update(float_model.graph.initializers)
    if source is not None:
        for op_type, ins, outs in source.nodes:
            if not ins or not outs or not ins[0]:
                continue
            if op_type in VALUE_PRESERVING or (op_type in _FOLDED and ins[0] not in present):
                classes.union(ins[0], outs[0])
    members = classes.members()
    return {x: members[classes.find(x)] for x in classes.parent}


@dataclasses.dataclass(frozen=True)
class Binding:
    """What binding a file's encodings to a plan found: encodings by quantizer name, quantizers the
    file has no encoding for, and file entries that no quantizer took (not applied)."""

    encodings: Mapping[str, Encoding]
    missing: tuple[str, ...]
    unused: tuple[str, ...]


def bind(parsed: ParsedEncodings, plan: QuantPlan, float_model: Any, source: SourceGraph | None,
         where: str = "encodings") -> Binding:
    """Match a file's encodings to the quantizers of ``plan`` by tensor name.

    An activation quantizer takes the entry of one of its tensors, else of a tensor holding the same
    values (:func:`same_values`: before/after Identity/Reshape/..., a Conv output named before its
    folded BatchNorm). Entries of one quantizer must agree. Weights match by name. A name that is
    no tensor of the float model or of ``source`` is an error.
    """
    equal = same_values(float_model, source)
    renamed = {} if source is None else aimet_param_names(plan, float_model, source)
    known = set(float_model.graph.initializers) | {v.name for v in float_model.graph.inputs} | set(renamed.values())
    known.update(v.name for n in float_model.graph for v in n.outputs)
    if source is not None:
        known |= source.names
    names = list(dict.fromkeys([*parsed.activations, *parsed.params, *parsed.biases]))  # 2.0.0: in both
    # a 32-bit bias entry may name a bias aimet created when folding BatchNorm into a Conv without
    # one; onnxqat derives biases anyway, so such an entry is only reported
    unknown = [n for n in names if n not in known and n not in parsed.biases]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], sorted(known), n=1, cutoff=0.6)
        hint = f" (closest to '{unknown[0]}': '{close[0]}')" if close else ""
        raise EncodingsError(f"{where}: tensor(s) not in the model: {unknown[:5]}"
                             f"{f' and {len(unknown) - 5} more' if len(unknown) > 5 else ''}{hint}")
    encodings: dict[str, Encoding] = {}
    missing: list[str] = []
    used: set[str] = set()
    for q in plan.calibrated_activations:
        exact = [t for t in q.tensors if t in parsed.activations]
        found = exact + sorted({n for t in q.tensors for n in equal.get(t, {t})
                                if n in parsed.activations and n not in exact})
        if not found:
            missing.append(q.name)
            continue
        first = parsed.activations[found[0]]
        for other in found[1:]:
            if not parsed.activations[other].equals(first):
                raise EncodingsError(f"{where}: '{found[0]}' and '{other}' hold the same values (quantizer "
                                     f"'{q.name}') but carry different encodings")
        used.update(found)
        encodings[q.name] = first
    # a derived quantizer (x * k of a quantized x) takes its source's grid scaled by k, as the
    # simulation does; the file's entry for it (onnxqat's export writes one) is taken when it is
    # that grid, and else reported as not applied
    derived: dict[str, Encoding] = {}
    for q in plan.activations:
        if q.derived_from is None:
            continue
        origin, factor = q.derived_from
        src = encodings.get(origin) or derived.get(origin)
        if src is None:
            continue
        derived[q.name] = dataclasses.replace(src, scale=(src.scale.astype(np.float64) * factor).astype(np.float32))
        for t in q.tensors:
            entry = parsed.activations.get(t)
            if entry is not None and _same_grid(entry, derived[q.name]):
                used.add(t)
    for p in plan.params:
        name = p.name if p.name in parsed.params else renamed.get(p.name, p.name)
        if name in parsed.params:
            encodings[p.name] = parsed.params[name]
            used.add(name)
        else:
            missing.append(p.name)
    used.update(b.name for b in plan.biases if b.name in parsed.biases)  # derived; the file's is not needed
    unused = tuple(n for n in names if n not in used)
    return Binding(encodings, tuple(missing), unused)


def _same_grid(a: Encoding, b: Encoding) -> bool:
    """The same bitwidth, signedness and zero points, scales equal to float32 precision (a file
    stores scales as decimal text)."""
    return (a.bitwidth == b.bitwidth and a.signed == b.signed and a.scale.shape == b.scale.shape
            and np.array_equal(a.zero_point, b.zero_point) and bool(np.allclose(a.scale, b.scale, rtol=1e-6, atol=0)))


def aimet_param_names(plan: QuantPlan, float_model: Any, source: SourceGraph) -> dict[str, str]:
    """Weights aimet-onnx 2.42 renames -> its name: the scale of a standalone BatchNormalization
    (one the preset quantizes) that a Constant node holds or other nodes read too, which aimet-onnx
    rewrites into a new initializer named ``<name>_1`` (the first free suffix)."""
    op_type = {n.name: n.op_type for n in float_model.graph if n.name}
    producer = {o: op for op, _, outs in source.nodes for o in outs}
    readers: dict[str, int] = {}
    for _, ins, _ in source.nodes:
        for i in ins:
            readers[i] = readers.get(i, 0) + 1
    taken = source.names | set(float_model.graph.initializers)
    out: dict[str, str] = {}
    for p in plan.params:
        if not all(op_type.get(c) == "BatchNormalization" for c in p.consumers):
            continue
        if producer.get(p.name) == "Constant" or readers.get(p.name, 0) > 1:
            suffix = 1
            while f"{p.name}_{suffix}" in taken:
                suffix += 1
            out[p.name] = f"{p.name}_{suffix}"
            taken.add(out[p.name])
    return out


def aimet_names(plan: QuantPlan, float_model: Any, source: SourceGraph) -> dict[str, tuple[str, ...]]:
    """For every activation quantizer, the tensors aimet-onnx 2.42 quantizes with it in the source
    model: names of the source model (a folded BatchNorm's output is the Conv's output there), not
    outputs of ops aimet never quantizes (:data:`AIMET_UNQUANTIZED_OUTPUTS`); a quantized constant
    under the name of the source's initializer or Constant-node output holding its values (before
    a Reshape folded into it)."""
    equal = same_values(float_model, source)
    producer = {o: op for op, _, outs in source.nodes for o in outs}
    folded_bn = {outs[0] for op, ins, outs in source.nodes if op == "BatchNormalization" and ins
                 and ins[0] in producer and producer[ins[0]] in ("Conv", "ConvTranspose", "Gemm")}
    graph_inputs = set(source.inputs)
    read = {i for _, ins, _ in source.nodes for i in ins if i}
    # the source's constants: its initializers (read, made by no node) and Constant-node outputs
    constants = {n for n in read if n not in producer and n not in graph_inputs}
    constants.update(n for n, op in producer.items() if op == "Constant")
    inits = float_model.graph.initializers
    out: dict[str, tuple[str, ...]] = {}
    for q in plan.activations:
        names: set[str] = set()
        for t in q.tensors:
            for n in equal.get(t, {t}):
                if t in inits:  # a quantized constant: aimet names the constant it reads
                    if n in constants:
                        names.add(n)
                elif n in graph_inputs or (n in producer and n not in folded_bn
                                           and producer[n] not in AIMET_UNQUANTIZED_OUTPUTS
                                           and producer[n] != "Constant"):
                    names.add(n)
        out[q.name] = tuple(sorted(names))
    return out
