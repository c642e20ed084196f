"""Which standard ONNX ops onnxruntime-training 1.19 can differentiate: the probe and its table.

``python -m onnxqat.train.probe [--out PATH]`` builds, for every op of the ONNX standard domain up
to opset 21 (each op's latest version, plus older versions and attribute values whose gradient
can differ: Clip-6 attributes vs Clip-11 inputs, Resize/Upsample modes, Reduce* axes attributes vs
inputs, ...), a one-node model ``y = Op(input + p, ...)`` with trainable zero initializers ``p`` on
the float data inputs and the loss ``sum(w * y)`` (fixed random ``w``). Each row then goes through
what QAT does:

1. the forward model runs in onnxruntime (else the row is ``unprobed``: the op itself fails);
2. ``generate_artifacts`` builds the gradient graph;
3. ``api.Module`` runs one training step;
4. the gradient is compared with central differences of the loss along random directions.

Every probed row runs three times: with static shapes, with input 0's batch dim symbolic, and
with all its dims symbolic (its trainable ``p`` broadcast from ``[1, ..., 1]`` along them, so
that nothing makes the shapes static again). Several gradient builders read static shapes:
``MaxPool`` gives an all-zero gradient when the spatial dims are symbolic, ``AveragePool`` a
wrong one as soon as the batch dim is. These are the rows' ``batch`` and ``dynamic`` statuses;
:func:`has_gradient` picks the one the node's shape calls for (``static_shape`` fact).

Statuses (:data:`STATUSES`):

* ``grad``: all four steps passed.
* ``no_grad_builder``: onnxruntime has no gradient builder for the op.
* ``build_error``: a builder exists but building the gradient graph failed.
* ``runtime_error``: the training step raised, crashed (probes run in worker processes, so a
  segfault is recorded, not fatal) or timed out.
* ``wrong_grad``: the step ran but the gradient is not finite or disagrees with finite
  differences.
* ``non_differentiable``: by nature: no float input, no float output, or an output that does not
  depend on input values (random ops, ``EyeLike``).
* ``unprobed``: with the reason (sequence/optional types, the forward op fails, ...).

The table (``gradients.json`` next to this module) is what :func:`has_gradient` reads; the lowering
consults it before asking onnxruntime for a gradient, and :mod:`onnxqat.train.decompose` rewrites
the ops it marks as lacking one.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FACTS",
    "MAX_OPSET",
    "STATUSES",
    "TABLE_PATH",
    "Case",
    "GradientRow",
    "all_cases",
    "format_table",
    "has_gradient",
    "has_gradient_for_node",
    "load_gradient_table",
    "main",
    "node_facts",
    "probe_case",
    "probe_cases",
    "row_for",
    "summarize",
]

MAX_OPSET = 21
STATUSES = ("grad", "no_grad_builder", "build_error", "runtime_error", "wrong_grad", "non_differentiable", "unprobed")
TABLE_PATH = Path(__file__).with_name("gradients.json")
_TIMEOUT_S = 60.0
# Test hook: a worker asked to probe this row key kills itself with SIGSEGV (tests pin that a
# crash is recorded as runtime_error and the next rows still run).
_CRASH_ENV = "ONNXQAT_PROBE_CRASH_ON"
_FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)")


# ---------------------------------------------------------------------------------------------
# The table and its readers (no onnxruntime needed)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GradientRow:
    """One probed (op, op version, variant).

    Attributes:
        op: Op type (standard domain).
        opset: The op's version (``since_version`` of its schema), not the model opset.
        variant: Short description of the attributes/inputs probed; ``""`` for the default row.
        match: What a node must have for this row to describe it: attribute values, and
            ``"inputs"`` (comma-separated indices of the present inputs) where that matters.
        status: One of :data:`STATUSES`, with static input shapes.
        error: First line of the error (or the reason), ``""`` for ``grad``.
        dynamic: The status with all of input 0's dims symbolic.
        dynamic_error: Its error line.
        batch: The status with only input 0's first (batch) dim symbolic.
        batch_error: Its error line.
    """

    op: str
    opset: int
    variant: str
    match: Mapping[str, Any]
    status: str
    error: str
    dynamic: str = ""
    dynamic_error: str = ""
    batch: str = ""
    batch_error: str = ""

    def __post_init__(self) -> None:
        if not self.dynamic:
            object.__setattr__(self, "dynamic", self.status)
            object.__setattr__(self, "dynamic_error", self.error)
        if not self.batch:
            object.__setattr__(self, "batch", self.status)
            object.__setattr__(self, "batch_error", self.error)

    def effective(self, static_shape: bool | int = 0) -> tuple[str, str]:
        """``(status, error)`` for a node whose input 0 has static dims (``static_shape=1``), a
        symbolic batch dim only (``2``) or unknown/other symbolic dims (``0``/False)."""
        level = int(static_shape)
        if level == 1 or self.status != "grad":
            return self.status, self.error
        if level == 2 or self.batch != "grad":
            return self.batch, self.batch_error
        return self.dynamic, self.dynamic_error

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.op, self.opset, self.variant)

    def to_json(self) -> dict[str, Any]:
        data = {"op": self.op, "opset": self.opset, "variant": self.variant, "match": dict(self.match),
                "status": self.status, "error": self.error, "batch": self.batch, "dynamic": self.dynamic}
        if self.batch_error != self.error:
            data["batch_error"] = self.batch_error
        if self.dynamic_error != self.error:
            data["dynamic_error"] = self.dynamic_error
        return data

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> GradientRow:
        match = {k: tuple(v) if isinstance(v, list) else v for k, v in data.get("match", {}).items()}
        status, error = str(data["status"]), str(data.get("error", ""))
        dynamic, batch = str(data.get("dynamic", status)), str(data.get("batch", status))
        return GradientRow(str(data["op"]), int(data["opset"]), str(data["variant"]), types.MappingProxyType(match),
                           status, error, dynamic, str(data.get("dynamic_error", error)), batch,
                           str(data.get("batch_error", error)))


@functools.lru_cache(maxsize=4)
def _load(path: str) -> Mapping[tuple[str, int, str], GradientRow]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    rows = {row.key: row for row in (GradientRow.from_json(r) for r in data["rows"])}
    return types.MappingProxyType(rows)


def load_gradient_table(path: str | os.PathLike[str] | None = None) -> Mapping[tuple[str, int, str], GradientRow]:
    """The committed table as a read-only mapping ``(op, op version, variant) -> GradientRow``.

    Args:
        path: Another table file (default: the ``gradients.json`` shipped with onnxqat).
    """
    return _load(os.fspath(path or TABLE_PATH))


@functools.lru_cache(maxsize=None)
def _op_version(op_type: str, opset: int) -> int | None:
    import onnx.defs

    try:
        return int(onnx.defs.get_schema(op_type, min(opset, MAX_OPSET), "").since_version)
    except onnx.defs.SchemaError:
        return None


@functools.lru_cache(maxsize=None)
def _attr_default(op_type: str, version: int, name: str) -> Any:
    import onnx
    import onnx.defs

    try:
        attr = onnx.defs.get_schema(op_type, version, "").attributes.get(name)
    except onnx.defs.SchemaError:
        return None
    if attr is None or attr.default_value is None or not attr.default_value.name:
        return None
    return _plain(onnx.helper.get_attribute_value(attr.default_value))


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, (np.floating, float)):
        return float(np.float32(value))
    return value


FACTS = ("inputs", "outputs", "rank", "negative_steps", "static_shape")


def row_for(
    op_type: str,
    opset: int,
    attrs: Mapping[str, Any] | None = None,
    *,
    table: Mapping[tuple[str, int, str], GradientRow] | None = None,
) -> GradientRow | None:
    """The table row describing ``op_type`` at model opset ``opset`` with ``attrs``, or None.

    The op version in effect at ``opset`` is looked up; if that version was not probed on its
    own, the nearest newer probed version stands for it (older versions are probed separately
    wherever their signature differs), else the nearest older one. Among that version's rows, the
    one whose ``match`` agrees with ``attrs`` and has the most entries wins (among equally specific
    rows, a failing one: they describe different aspects of the node). Attributes absent from
    ``attrs`` take their schema defaults. ``attrs`` may also hold node facts (:data:`FACTS`):
    ``inputs`` (comma-separated indices of the present inputs), ``outputs`` (number of outputs),
    ``rank`` (of input 0), ``negative_steps`` (Slice: 1 if a step is negative), ``static_shape``
    (input 0's shape: 1 fully static, 2 static but the batch dim; it selects the row's status, see
    :meth:`GradientRow.effective`); a row needing a
    fact that is not given does not match. When no row matches but all rows of the version agree
    on the status, the first of them is returned.
    """
    table = load_gradient_table() if table is None else table
    version = _op_version(op_type, opset)
    by_version = _index(table).get(op_type)
    if version is None or not by_version:
        return None
    newer = [v for v in by_version if v >= version]
    rows = by_version[newer[0] if newer else max(by_version)]
    described = {k: _plain(v) for k, v in (attrs or {}).items()}
    matching: list[GradientRow] = []
    for row in rows:
        ok = True
        for key, want in row.match.items():
            if key in described:
                have = described[key]
            else:
                have = None if key in FACTS else _attr_default(op_type, version, key)
            if isinstance(want, float) and isinstance(have, (int, float)):
                ok = ok and bool(np.float32(have) == np.float32(want))
            else:
                ok = ok and _plain(have) == want
        if ok:
            matching.append(row)
    if not matching:
        return rows[0] if len({r.status for r in rows}) == 1 else None
    most = max(len(r.match) for r in matching)
    specific = [r for r in matching if len(r.match) == most]
    # equally specific rows that disagree: the failing one (a needless rewrite is harmless)
    return next((r for r in specific if r.status != "grad"), specific[0])


_INDEXES: dict[int, tuple[Mapping[tuple[str, int, str], GradientRow], dict[str, dict[int, list[GradientRow]]]]] = {}


def _index(table: Mapping[tuple[str, int, str], GradientRow]) -> dict[str, dict[int, list[GradientRow]]]:
    """``op -> version -> rows`` (sorted by variant), built once per table object."""
    cached = _INDEXES.get(id(table))
    if cached is not None and cached[0] is table:
        return cached[1]
    index: dict[str, dict[int, list[GradientRow]]] = {}
    for (op, version, _), row in sorted(table.items()):
        index.setdefault(op, {}).setdefault(version, []).append(row)
    index = {op: dict(sorted(versions.items())) for op, versions in index.items()}
    _INDEXES[id(table)] = (table, index)
    return index


def has_gradient(
    op_type: str,
    opset: int,
    attrs: Mapping[str, Any] | None = None,
    *,
    table: Mapping[tuple[str, int, str], GradientRow] | None = None,
) -> bool | None:
    """Whether onnxruntime-training differentiates this op correctly (see :func:`row_for`).

    >>> has_gradient("Relu", 17), has_gradient("HardSwish", 17), has_gradient("NoSuchOp", 17)
    (True, False, None)
    >>> has_gradient("Resize", 13, {"mode": "linear"})
    False

    Returns:
        True for ``grad`` rows (with symbolic shapes too, unless ``attrs`` says
        ``static_shape=1``); False for every failing status (missing builder, build or run
        failure, wrong gradient) and for ops that are non-differentiable by nature; None when the
        op is unknown at that opset, was not probed, or its rows disagree and ``attrs`` does not
        say which applies.
    """
    row = row_for(op_type, opset, attrs, table=table)
    if row is None or row.status == "unprobed":
        return None
    return row.effective(int((attrs or {}).get("static_shape") or 0))[0] == "grad"


def node_facts(node: Any) -> dict[str, Any]:
    """Attributes and :data:`FACTS` of an ``onnx_ir.Node``, as :func:`row_for` reads them."""
    facts: dict[str, Any] = {name: attr.value for name, attr in node.attributes.items()
                             if attr.type.name not in ("GRAPH", "GRAPHS")}
    facts["inputs"] = ",".join(str(i) for i, v in enumerate(node.inputs) if v is not None)
    facts["outputs"] = sum(1 for v in node.outputs if v.name)
    first = node.inputs[0] if node.inputs else None
    if first is not None and first.shape is not None:
        facts["rank"] = len(first.shape)
        known = [isinstance(d, int) and d > 0 for d in first.shape]
        facts["static_shape"] = 1 if all(known) else 2 if known and all(known[1:]) else 0
    if node.op_type == "Slice":
        steps = node.inputs[4] if len(node.inputs) > 4 else None
        if steps is None:
            facts["negative_steps"] = 0
        elif steps.const_value is not None:
            facts["negative_steps"] = int(bool(np.any(steps.const_value.numpy() < 0)))
    return facts


def has_gradient_for_node(
    node: Any, opset: int, table: Mapping[tuple[str, int, str], GradientRow] | None = None
) -> bool | None:
    """:func:`has_gradient` for an ``onnx_ir.Node`` of the standard domain (None for others)."""
    if node.domain not in ("", "ai.onnx"):
        return None
    return has_gradient(node.op_type, opset, node_facts(node), table=table)


def format_table(rows: Iterable[GradientRow]) -> str:
    """The JSON text of the table file: sorted rows, one per line, stable across runs."""
    from onnx.version import version as onnx_version

    lines = [json.dumps(r.to_json(), sort_keys=True) for r in sorted(rows, key=lambda r: r.key)]
    header = {"generator": "python -m onnxqat.train.probe", "max_opset": MAX_OPSET, "onnx": onnx_version,
              "onnxruntime": _ort_version()}
    head = json.dumps(header, sort_keys=True)[1:-1]
    return "{" + head + ',\n"rows": [\n' + ",\n".join(lines) + "\n]}\n"


def _ort_version() -> str:
    try:
        from importlib.metadata import version

        return version("onnxruntime-training-cpu")
    except Exception:  # pragma: no cover - another onnxruntime build
        import onnxruntime

        return str(onnxruntime.__version__)


# ---------------------------------------------------------------------------------------------
# Probe cases: data
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Diff:
    """A float data input that must receive a gradient: ``input + p`` with ``p`` trainable.

    Values are drawn uniformly with magnitude in ``[away, hi]`` and random sign when ``lo < 0``
    (away from the kinks at 0 that many activations have), else uniformly in ``[lo, hi]``, then
    pushed at least 0.05 away from ``kinks``. With ``spacing``, they are instead a shuffled grid
    ``(k - n/2) * spacing + shift``: no two are closer than ``spacing`` (no ties for max-like ops,
    whose derivative jumps there), and inputs with different shifts never tie with each other.
    """

    shape: tuple[int, ...]
    lo: float = -1.5
    hi: float = 1.5
    away: float = 0.2
    dtype: str = "float32"
    kinks: tuple[float, ...] = ()
    spacing: float = 0.0
    shift: float = 0.0


@dataclasses.dataclass(frozen=True)
class Const:
    """A constant initializer (never trained)."""

    value: Any
    dtype: str = "int64"


ABSENT = None
Slot = Diff | Const | None


@dataclasses.dataclass(frozen=True)
class Case:
    """One probe: an op version with one set of attributes and inputs.

    Attributes:
        op: Op type.
        version: Op version probed (the model opset is the last opset where it is current).
        variant: Row label (``""`` for the op's default row).
        inputs: One slot per input position (trailing absent inputs may be omitted).
        attrs: Node attributes (graph attributes as callables building a GraphProto).
        match: What a node needs for this row to describe it (see :class:`GradientRow`).
        outputs: Number of node outputs (all float ones enter the loss).
        status: A fixed status for rows decided without probing (with ``reason``).
        reason: Why (for fixed statuses).
        check: Compare with finite differences (False for ops without a derivative or with
            float16 outputs, too coarse for them).
        loss_outputs: Node outputs entering the loss (default: every float output).
        scope: Differentiable values visible to subgraphs as ``o0, o1, ...`` (If branches).
    """

    op: str
    version: int
    variant: str = ""
    inputs: tuple[Slot, ...] = ()
    attrs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    match: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    outputs: int = 1
    status: str | None = None
    reason: str = ""
    check: bool = True
    loss_outputs: tuple[int, ...] | None = None
    scope: tuple[Diff, ...] = ()

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.op, self.version, self.variant)


def _d(*shape: int, lo: float = -1.5, hi: float = 1.5, away: float = 0.2, dtype: str = "float32",
       kinks: tuple[float, ...] = ()) -> Diff:
    return Diff(tuple(shape), lo, hi, away, dtype, kinks)


def _grid(*shape: int, k: int = 0) -> Diff:
    """Tie-free values for max-like ops (input ``k`` of several gets its own shift)."""
    return Diff(tuple(shape), spacing=0.05, shift=0.0125 * k + 0.025 / 2)


def _i(*values: Any) -> Const:
    return Const(list(values), "int64")


def _f(value: Any) -> Const:
    return Const(value, "float32")


def _unary(op: str, version: int, lo: float = -1.5, hi: float = 1.5, away: float = 0.2, **attrs: Any) -> Case:
    return Case(op, version, inputs=(_d(2, 3, lo=lo, hi=hi, away=away),), attrs=attrs)


def _reduce_cases(op: str, latest: int, attr_version: int, lo: float = -1.5) -> list[Case]:
    """Reduce ops: axes as input (latest) and as attribute (older), one axis and all axes."""
    x = _grid(2, 3, 4) if op in ("ReduceMax", "ReduceMin") else _d(2, 3, 4, lo=lo)
    cases = [
        Case(op, latest, "axes=[1]", (x, _i(1)), {"keepdims": 1}),
        Case(op, latest, "all,keepdims=0", (x,), {"keepdims": 0}, match={"keepdims": 0, "inputs": "0"}),
    ]
    if attr_version != latest:
        cases.append(Case(op, attr_version, "axes=[1]", (x,), {"axes": [1], "keepdims": 1}))
    return cases


def _resize_cases() -> list[Case]:
    x = _d(1, 2, 3, 4)
    scales = _f([1.0, 1.0, 2.0, 1.5])
    cases: list[Case] = []
    modes = {
        "nearest": {"mode": "nearest"},
        "nearest,asymmetric,floor": {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                     "nearest_mode": "floor"},
        "linear": {"mode": "linear"},
        "linear,align_corners": {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
        "cubic": {"mode": "cubic"},
    }
    for version in (19, 13, 11):
        for name, attrs in modes.items():
            if version == 11 and name == "linear,align_corners":
                continue
            inputs: tuple[Slot, ...] = (x, _f([]), scales) if version < 13 else (x, ABSENT, scales)
            cases.append(Case("Resize", version, f"mode={name}", inputs, attrs, match=dict(attrs)))
    cases.append(Case("Resize", 19, "mode=linear,antialias", (x, ABSENT, _f([1.0, 1.0, 0.5, 0.5])),
                      {"mode": "linear", "antialias": 1}, match={"mode": "linear", "antialias": 1}))
    cases.append(Case("Resize", 19, "mode=nearest,sizes", (x, ABSENT, ABSENT, _i(1, 2, 6, 6)),
                      {"mode": "nearest"}, match={"mode": "nearest", "inputs": "0,3"}))
    for name in ("nearest", "linear"):
        cases.append(Case("Resize", 10, f"mode={name}", (x, scales), {"mode": name}, match={"mode": name}))
        cases.append(Case("Upsample", 9, f"mode={name}", (x, scales), {"mode": name}, match={"mode": name}))
        cases.append(Case("Upsample", 7, f"mode={name}", (x,), {"mode": name, "scales": [1.0, 1.0, 2.0, 1.5]},
                          match={"mode": name}))
    return cases


def _if_graphs() -> dict[str, Any]:
    from onnx import TensorProto, helper

    out = helper.make_tensor_value_info("b", TensorProto.FLOAT, None)
    then = helper.make_graph([helper.make_node("Sin", ["o0"], ["b"])], "then", [], [out])
    other = helper.make_graph([helper.make_node("Neg", ["o0"], ["b"])], "else", [], [out])
    return {"then_branch": then, "else_branch": other}


def _loop_graph() -> dict[str, Any]:
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Sin", ["v_in"], ["s"]),
         helper.make_node("Add", ["v_in", "s"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)],
    )
    return {"body": body}


def _scan_graph() -> dict[str, Any]:
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_t"], ["s_out"]), helper.make_node("Mul", ["s_out", "x_t"], ["y_t"])],
        "body",
        [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [3])],
    )
    return {"body": body, "num_scan_inputs": 1}


def _rnn_inputs(gates: int, hidden: int = 4, features: int = 3, directions: int = 1) -> tuple[Slot, ...]:
    return (_d(2, 1, features), _d(directions, gates * hidden, features, hi=0.5, away=0.0),
            _d(directions, gates * hidden, hidden, hi=0.5, away=0.0), _d(directions, 2 * gates * hidden, hi=0.5, away=0.0))


def _cases() -> list[Case]:
    x = _d(2, 3)
    x4 = _d(1, 2, 5, 5)
    g4 = _grid(1, 2, 5, 5)
    pos = {"lo": 0.2, "hi": 2.0}
    unit = {"lo": -0.9, "hi": 0.9, "away": 0.05}
    cases: list[Case] = []
    add = cases.append
    for op, version in [("Abs", 13), ("Cos", 7), ("Cosh", 9), ("Exp", 13), ("Neg", 13), ("Sin", 7),
                        ("Sinh", 9), ("Tan", 7), ("Tanh", 13), ("Sigmoid", 13), ("Relu", 14), ("Erf", 13),
                        ("Atan", 7), ("Asinh", 9), ("Softsign", 1), ("Softplus", 1), ("Mish", 18),
                        ("Identity", 21), ("HardSwish", 14), ("Reciprocal", 13)]:
        add(_unary(op, version))
    for op, version in [("Acos", 7), ("Asin", 7), ("Atanh", 9)]:
        add(_unary(op, version, **unit))
    add(_unary("Acosh", 9, lo=1.2, hi=3.0))
    add(_unary("Log", 13, **pos))
    add(_unary("Sqrt", 13, **pos))
    for op, version in [("Floor", 13), ("Ceil", 13), ("Round", 11), ("Sign", 13)]:
        add(Case(op, version, inputs=(_d(2, 3, lo=-2.6, hi=2.6, away=0.6),), check=False))
    add(_unary("Elu", 6))
    add(Case("Elu", 6, "alpha=0.5", (x,), {"alpha": 0.5}, match={"alpha": 0.5}))
    add(_unary("Selu", 6))
    add(_unary("Celu", 12))
    add(_unary("LeakyRelu", 16))
    add(Case("LeakyRelu", 6, "", (x,), {"alpha": 0.1}))
    add(_unary("HardSigmoid", 6))
    add(Case("HardSigmoid", 6, "alpha=1/6", (_d(2, 3, hi=2.9),), {"alpha": 1 / 6, "beta": 0.5}, match={"alpha": 1 / 6}))
    add(Case("ThresholdedRelu", 10, "", (_d(2, 3, lo=-3.0, hi=3.0, away=1.2),)))
    add(Case("Shrink", 9, "", (_d(2, 3, lo=-2.0, hi=2.0, away=0.7),), {"lambd": 0.5}))
    add(Case("Gelu", 20, "approximate=none", (x,), {}, match={"approximate": "none"}))
    add(Case("Gelu", 20, "approximate=tanh", (x,), {"approximate": "tanh"}, match={"approximate": "tanh"}))
    add(Case("PRelu", 16, "slope=[C,1,1]", (_d(2, 3, 4, 4), _d(3, 1, 1, lo=0.05, hi=0.5))))
    add(Case("PRelu", 16, "slope=[1]", (_d(2, 3, 4, 4), _d(1, lo=0.05, hi=0.5)), match={"probe": "slope=[1]"}))
    add(Case("PRelu", 9, "slope=[C,1,1]", (_d(2, 3, 4, 4), _d(3, 1, 1, lo=0.05, hi=0.5))))
    # binary and n-ary elementwise
    for op, version in [("Add", 14), ("Sub", 14), ("Mul", 14)]:
        add(Case(op, version, "", (_d(2, 3, 4), _d(2, 3, 4))))
        add(Case(op, version, "broadcast", (_d(2, 3, 4), _d(3, 1)), match={"probe": "broadcast"}))
        add(Case(op, version, "broadcast, lower-rank input 0", (_d(3, 1), _d(2, 3, 4)),
                 match={"probe": "broadcast, lower-rank input 0"}))
    add(Case("Div", 14, "", (_d(2, 3, 4), _d(2, 3, 4, lo=0.5, hi=2.0))))
    add(Case("Div", 14, "broadcast", (_d(2, 3, 4), _d(3, 1, lo=0.5, hi=2.0)), match={"probe": "broadcast"}))
    add(Case("Div", 14, "broadcast, lower-rank input 0", (_d(3, 1), _d(2, 3, 4, lo=0.5, hi=2.0)),
             match={"probe": "broadcast, lower-rank input 0"}))
    add(Case("Pow", 15, "", (_d(2, 3, lo=0.5, hi=2.0), _f(2.0))))
    add(Case("Pow", 15, "exponent trained", (_d(2, 3, lo=0.5, hi=2.0), _d(2, 3, lo=0.5, hi=2.0)),
             match={"probe": "exponent trained"}))
    add(Case("Mod", 13, "fmod=1", (_d(2, 3, lo=1.1, hi=3.0), _f(1.0)), {"fmod": 1}, match={"fmod": 1}))
    for op in ("Sum", "Mean", "Max", "Min"):
        add(Case(op, 13, "", (_grid(2, 3, 4), _grid(3, 4, k=1), _grid(2, 3, 4, k=2))))
        add(Case(op, 13, "1 input", (_grid(2, 3),), match={"inputs": "0"}))
        add(Case(op, 13, "2 inputs", (_grid(2, 3), _grid(2, 3, k=1)), match={"inputs": "0,1"}))
    add(Case("Sum", 8, "", (_grid(2, 3, 4), _grid(3, 4, k=1), _grid(2, 3, 4, k=2))))
    add(Case("Max", 8, "", (_grid(2, 3, 4), _grid(3, 4, k=1), _grid(2, 3, 4, k=2))))
    add(Case("Where", 16, "", (Const([[True, False, True], [False, True, True]], "bool"), x, x)))
    # clip
    lo, hi = _f(-0.5), _f(0.5)
    clip_x = _d(2, 3, 4, lo=-1.0, hi=1.0, away=0.0, kinks=(-0.5, 0.5))
    add(Case("Clip", 13, "min,max", (clip_x, lo, hi), match={"inputs": "0,1,2"}))
    add(Case("Clip", 13, "min", (clip_x, lo), match={"inputs": "0,1"}))
    add(Case("Clip", 13, "max", (clip_x, ABSENT, hi), match={"inputs": "0,2"}))
    add(Case("Clip", 13, "no bounds", (clip_x,), match={"inputs": "0"}))
    add(Case("Clip", 11, "min,max", (clip_x, lo, hi), match={"inputs": "0,1,2"}))
    add(Case("Clip", 11, "max", (clip_x, ABSENT, hi), match={"inputs": "0,2"}))
    add(Case("Clip", 11, "min", (clip_x, lo), match={"inputs": "0,1"}))
    add(Case("Clip", 11, "no bounds", (clip_x,), match={"inputs": "0"}))
    add(Case("Clip", 6, "min,max", (clip_x,), {"min": -0.5, "max": 0.5}))
    add(Case("Clip", 6, "no bounds", (clip_x,), match={"min": -3.4028234663852886e38, "max": 3.4028234663852886e38}))
    # reductions
    for op in ("ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceMean", "ReduceProd", "ReduceSumSquare"):
        cases.extend(_reduce_cases(op, 18, 13))
    cases.extend(_reduce_cases("ReduceLogSum", 18, 13, lo=0.2))
    cases.extend(_reduce_cases("ReduceMax", 20, 13))
    cases.extend(_reduce_cases("ReduceMin", 20, 13))
    cases.extend(_reduce_cases("ReduceSum", 13, 11))
    add(Case("ArgMax", 13, status="non_differentiable", reason="integer output"))
    # normalization
    add(Case("BatchNormalization", 15, "", (_d(2, 3, 4, 4), _d(3, lo=0.5, hi=1.5), _d(3), _f([0.1, -0.2, 0.3]), _f([1.0, 0.5, 2.0]))))
    add(Case("BatchNormalization", 9, "", (_d(2, 3, 4, 4), _d(3, lo=0.5, hi=1.5), _d(3), _f([0.1, -0.2, 0.3]), _f([1.0, 0.5, 2.0]))))
    add(Case("InstanceNormalization", 6, "", (_d(2, 3, 4, 4), _d(3, lo=0.5, hi=1.5), _d(3))))
    add(Case("LayerNormalization", 17, "axis=-1", (_d(2, 3, 4), _d(4, lo=0.5, hi=1.5), _d(4)), {"axis": -1}))
    add(Case("LayerNormalization", 17, "axis=-1,3 outputs", (_d(2, 3, 4), _d(4, lo=0.5, hi=1.5), _d(4)), {"axis": -1}, outputs=3,
             match={"outputs": 3}, loss_outputs=(0,)))
    add(Case("LayerNormalization", 17, "axis=1", (_d(2, 3, 4), _d(3, 4, lo=0.5, hi=1.5), _d(3, 4)), {"axis": 1},
             match={"axis": 1}))
    add(Case("GroupNormalization", 21, "", (_d(2, 4, 3, 3), _d(4, lo=0.5, hi=1.5), _d(4)), {"num_groups": 2}))
    add(Case("GroupNormalization", 18, "", (_d(2, 4, 3, 3), _d(2, lo=0.5, hi=1.5), _d(2)), {"num_groups": 2}))
    add(Case("LpNormalization", 1, "p=2", (x,), {"p": 2}))
    add(Case("LpNormalization", 1, "p=1", (x,), {"p": 1}, match={"p": 1}))
    add(Case("MeanVarianceNormalization", 13, "", (_d(2, 3, 4, 4),)))
    add(Case("LRN", 13, "", (_d(1, 5, 3, 3),), {"size": 3}))
    for op, version in [("Softmax", 13), ("LogSoftmax", 13), ("Hardmax", 13)]:
        add(Case(op, version, "", (_d(2, 3, 4),), check=op != "Hardmax"))
        add(Case(op, 11, "", (_d(2, 3, 4),), {"axis": 1}, check=op != "Hardmax"))
    # linear algebra, convolution, pooling
    add(Case("MatMul", 13, "", (_d(2, 3), _d(3, 4))))
    add(Case("MatMul", 13, "batched,broadcast", (_d(2, 2, 3), _d(3, 4)), match={"probe": "batched"}))
    add(Case("MatMul", 13, "vector", (_d(3), _d(3, 4)), match={"probe": "vector"}))
    add(Case("Gemm", 13, "", (_d(2, 3), _d(4, 3), _d(4)), {"transB": 1}))
    add(Case("Gemm", 13, "transA,alpha,beta,C=[2,4]", (_d(3, 2), _d(3, 4), _d(2, 4)),
             {"transA": 1, "alpha": 0.5, "beta": 2.0}, match={"transA": 1}))
    add(Case("Gemm", 13, "no C", (_d(2, 3), _d(3, 4)), match={"inputs": "0,1"}))
    add(Case("Gemm", 9, "", (_d(2, 3), _d(4, 3), _d(4)), {"transB": 1}))
    w = _d(3, 2, 3, 3, hi=0.5, away=0.0)
    add(Case("Conv", 11, "2d", (x4, w, _d(3)), {"pads": [1, 1, 1, 1]}))
    add(Case("Conv", 11, "2d,strides,dilations,no bias", (x4, w), {"strides": [2, 2], "dilations": [2, 1]},
             match={"inputs": "0,1"}))
    add(Case("Conv", 11, "depthwise", (x4, _d(2, 1, 3, 3, hi=0.5, away=0.0), _d(2)), {"group": 2}, match={"group": 2}))
    add(Case("Conv", 11, "1d", (_d(1, 2, 7), _d(3, 2, 3, hi=0.5, away=0.0), _d(3)), match={"rank": 3}))
    add(Case("Conv", 11, "3d", (_d(1, 2, 4, 4, 4), _d(3, 2, 2, 2, 2, hi=0.5, away=0.0)), match={"rank": 5}))
    add(Case("Conv", 11, "auto_pad=SAME_UPPER", (x4, w, _d(3)), {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
             match={"auto_pad": "SAME_UPPER"}))
    add(Case("ConvTranspose", 11, "2d", (_d(1, 2, 4, 4), _d(2, 3, 3, 3, hi=0.5, away=0.0), _d(3))))
    add(Case("ConvTranspose", 11, "strides=2,output_padding", (_d(1, 2, 4, 4), _d(2, 3, 3, 3, hi=0.5, away=0.0), _d(3)),
             {"strides": [2, 2], "output_padding": [1, 1], "pads": [1, 1, 1, 1]}, match={"strides": (2, 2)}))
    add(Case("ConvTranspose", 11, "group=2", (_d(1, 2, 4, 4), _d(2, 1, 3, 3, hi=0.5, away=0.0)), {"group": 2},
             match={"group": 2}))
    add(Case("ConvTranspose", 11, "1d", (_d(1, 2, 5), _d(2, 3, 3, hi=0.5, away=0.0)), match={"rank": 3}))
    add(Case("AveragePool", 19, "", (x4,), {"kernel_shape": [3, 3]}))
    add(Case("AveragePool", 19, "pads,count_include_pad", (x4,),
             {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}, match={"count_include_pad": 1}))
    add(Case("AveragePool", 19, "ceil_mode,strides=2", (x4,), {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1},
             match={"ceil_mode": 1}))
    add(Case("AveragePool", 11, "", (x4,), {"kernel_shape": [3, 3]}))
    add(Case("AveragePool", 11, "auto_pad=SAME_UPPER", (x4,), {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER"},
             match={"auto_pad": "SAME_UPPER"}))
    add(Case("AveragePool", 11, "auto_pad=SAME_LOWER", (x4,), {"kernel_shape": [2, 2], "auto_pad": "SAME_LOWER"},
             match={"auto_pad": "SAME_LOWER"}))
    add(Case("AveragePool", 19, "auto_pad=SAME_LOWER", (x4,), {"kernel_shape": [2, 2], "auto_pad": "SAME_LOWER"},
             match={"auto_pad": "SAME_LOWER"}))
    add(Case("MaxPool", 12, "auto_pad=SAME_LOWER", (g4,), {"kernel_shape": [2, 2], "auto_pad": "SAME_LOWER"},
             match={"auto_pad": "SAME_LOWER"}))
    add(Case("MaxPool", 12, "", (g4,), {"kernel_shape": [2, 2], "strides": [2, 2]}))
    add(Case("MaxPool", 12, "pads,dilations", (g4,), {"kernel_shape": [2, 2], "pads": [1, 1, 1, 1], "dilations": [2, 2]},
             match={"dilations": (2, 2)}))
    add(Case("MaxPool", 12, "ceil_mode", (g4,), {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1},
             match={"ceil_mode": 1}))
    add(Case("MaxPool", 12, "indices output", (g4,), {"kernel_shape": [2, 2], "strides": [2, 2]}, outputs=2,
             match={"outputs": 2}))
    add(Case("MaxPool", 12, "1d", (_d(1, 2, 7),), {"kernel_shape": [3]}, match={"rank": 3}))
    add(Case("MaxPool", 12, "auto_pad=SAME_UPPER", (g4,), {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER"},
             match={"auto_pad": "SAME_UPPER"}))
    add(Case("AveragePool", 19, "auto_pad=SAME_UPPER", (x4,), {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER"},
             match={"auto_pad": "SAME_UPPER"}))
    add(Case("Conv", 11, "auto_pad=SAME_LOWER", (x4, w, _d(3)), {"auto_pad": "SAME_LOWER"},
             match={"auto_pad": "SAME_LOWER"}))
    add(Case("Conv", 11, "auto_pad=VALID", (x4, w, _d(3)), {"auto_pad": "VALID"}, match={"auto_pad": "VALID"}))
    add(Case("OptionalGetElement", 18, status="unprobed", reason="sequence/optional-typed values (onnxqat lowers tensor graphs only)"))
    add(Case("MaxPool", 8, "", (g4,), {"kernel_shape": [2, 2], "strides": [2, 2]}))
    add(Case("GlobalAveragePool", 1, "", (x4,)))
    add(Case("GlobalMaxPool", 1, "", (g4,)))
    add(Case("GlobalLpPool", 2, "", (x4,)))
    add(Case("LpPool", 18, "", (x4,), {"kernel_shape": [2, 2], "p": 2}))
    add(Case("MaxRoiPool", 1, "", (_d(1, 2, 6, 6), _f([[0, 0, 0, 3, 3]])), {"pooled_shape": [2, 2]}))
    add(Case("RoiAlign", 16, "", (_d(1, 2, 6, 6), _f([[0.5, 0.5, 4.0, 4.0]]), _i(0)),
             {"output_height": 2, "output_width": 2, "sampling_ratio": 2}))
    add(Case("MaxUnpool", 11, "", (_d(1, 1, 2, 2), Const([[[[5, 7], [13, 15]]]], "int64")),
             {"kernel_shape": [2, 2], "strides": [2, 2]}))
    add(Case("Col2Im", 18, "", (_d(1, 4, 9), _i(4, 4), _i(2, 2))))
    add(Case("DeformConv", 19, "", (_d(1, 1, 4, 4), _d(1, 1, 2, 2), _d(1, 8, 3, 3, hi=0.4, away=0.05))))
    add(Case("GridSample", 20, "mode=linear", (_d(1, 1, 4, 4), _d(1, 3, 3, 2, lo=-0.8, hi=0.8, away=0.05)),
             {"mode": "linear"}, match={"mode": "linear"}))
    add(Case("GridSample", 20, "mode=nearest", (_d(1, 1, 4, 4), _d(1, 3, 3, 2, lo=-0.8, hi=0.8, away=0.05)),
             {"mode": "nearest"}, match={"mode": "nearest"}, check=False))
    add(Case("GridSample", 20, "mode=cubic", (_d(1, 1, 4, 4), _d(1, 3, 3, 2, lo=-0.8, hi=0.8, away=0.05)),
             {"mode": "cubic"}, match={"mode": "cubic"}))
    add(Case("GridSample", 16, "mode=bilinear", (_d(1, 1, 4, 4), _d(1, 3, 3, 2, lo=-0.8, hi=0.8, away=0.05))))
    add(Case("AffineGrid", 20, "", (_d(2, 2, 3), _i(2, 1, 4, 5))))
    add(Case("Einsum", 12, "ij,jk->ik", (_d(2, 3), _d(3, 4)), {"equation": "ij,jk->ik"}))
    add(Case("Einsum", 12, "bhid,bhjd->bhij", (_d(2, 2, 3, 4), _d(2, 2, 5, 4)), {"equation": "bhid,bhjd->bhij"},
             match={"equation": "bhid,bhjd->bhij"}))
    add(Case("Einsum", 12, "i,j->ij", (_d(3), _d(4)), {"equation": "i,j->ij"}, match={"equation": "i,j->ij"}))
    add(Case("Einsum", 12, "ij->ji", (_d(2, 3),), {"equation": "ij->ji"}, match={"equation": "ij->ji"}))
    add(Case("Einsum", 12, "ii->i", (_d(3, 3),), {"equation": "ii->i"}, match={"equation": "ii->i"}))
    add(Case("Det", 11, "", (Diff((2, 3, 3), 0.5, 1.5),)))
    # data movement
    add(Case("Reshape", 21, "", (_d(2, 3, 4), _i(6, 4))))
    add(Case("Reshape", 5, "", (_d(2, 3, 4), _i(6, 4))))
    add(Case("Flatten", 21, "", (_d(2, 3, 4),), {"axis": 1}))
    add(Case("Transpose", 21, "", (_d(2, 3, 4),), {"perm": [2, 0, 1]}))
    add(Case("Squeeze", 21, "", (_d(2, 1, 3), _i(1))))
    add(Case("Squeeze", 11, "", (_d(2, 1, 3),), {"axes": [1]}))
    add(Case("Unsqueeze", 21, "", (x, _i(0))))
    add(Case("Unsqueeze", 11, "", (x,), {"axes": [0]}))
    add(Case("Concat", 13, "", (_d(2, 3), _d(2, 2)), {"axis": 1}))
    add(Case("Split", 18, "split input", (_d(2, 6), _i(2, 4)), {"axis": 1}, outputs=2))
    add(Case("Split", 18, "num_outputs", (_d(2, 6),), {"axis": 1, "num_outputs": 2}, outputs=2,
             match={"inputs": "0"}))
    add(Case("Split", 13, "", (_d(2, 6), _i(2, 4)), {"axis": 1}, outputs=2))
    add(Case("Split", 11, "", (_d(2, 6),), {"axis": 1, "split": [2, 4]}, outputs=2))
    add(Case("Slice", 13, "", (_d(3, 4), _i(0, 1), _i(2, 3), _i(0, 1), _i(1, 1))))
    add(Case("Slice", 13, "negative steps", (_d(3, 4), _i(-1), _i(-100), _i(1), _i(-1)), match={"negative_steps": 1}))
    add(Case("Slice", 1, "", (_d(3, 4),), {"starts": [0, 1], "ends": [2, 3], "axes": [0, 1]}))
    add(Case("Gather", 13, "", (_d(3, 4), _i(2, 0)), {"axis": 0}))
    add(Case("Gather", 13, "axis=1", (_d(3, 4), _i(3, 1, 1)), {"axis": 1}, match={"axis": 1}))
    add(Case("GatherElements", 13, "", (_d(3, 4), Const([[0, 2], [1, 3], [3, 3]], "int64")), {"axis": 1}))
    add(Case("GatherND", 13, "", (_d(2, 3, 4), Const([[0, 1], [1, 2]], "int64"))))
    add(Case("ScatterElements", 18, "reduction=none", (_d(3, 3), Const([[1, 0, 2]], "int64"), _d(1, 3)), {"axis": 0}))
    add(Case("ScatterElements", 18, "reduction=add", (_d(3, 3), Const([[1, 0, 2]], "int64"), _d(1, 3)),
             {"axis": 0, "reduction": "add"}, match={"reduction": "add"}))
    add(Case("ScatterND", 18, "reduction=none", (_d(4, 3), Const([[1], [3]], "int64"), _d(2, 3))))
    add(Case("ScatterND", 18, "reduction=add", (_d(4, 3), Const([[1], [3]], "int64"), _d(2, 3)), {"reduction": "add"},
             match={"reduction": "add"}))
    add(Case("Scatter", 9, "", (_d(3, 3), Const([[1, 0, 2]], "int64"), _d(1, 3)), {"axis": 0}))
    add(Case("Expand", 13, "", (_d(3, 1), _i(2, 3, 4))))
    add(Case("Tile", 13, "", (x, _i(2, 1))))
    add(Case("Pad", 21, "mode=constant", (x, _i(0, 1, 1, 0)), {"mode": "constant"}, match={"mode": "constant"}))
    add(Case("Pad", 21, "mode=reflect", (_d(3, 4), _i(0, 1, 1, 2)), {"mode": "reflect"}, match={"mode": "reflect"}))
    add(Case("Pad", 21, "mode=edge", (x, _i(0, 1, 1, 2)), {"mode": "edge"}, match={"mode": "edge"}))
    add(Case("Pad", 21, "mode=wrap", (_d(3, 4), _i(0, 1, 1, 2)), {"mode": "wrap"}, match={"mode": "wrap"}))
    add(Case("Pad", 11, "mode=constant", (x, _i(0, 1, 1, 0), _f(0.5)), {"mode": "constant"}, match={"mode": "constant"}))
    add(Case("Pad", 11, "mode=reflect", (_d(3, 4), _i(0, 1, 1, 2)), {"mode": "reflect"}, match={"mode": "reflect"}))
    add(Case("Pad", 2, "mode=constant", (x,), {"pads": [0, 1, 1, 0]}))
    add(Case("DepthToSpace", 13, "mode=DCR", (_d(1, 8, 2, 3),), {"blocksize": 2}))
    add(Case("DepthToSpace", 13, "mode=CRD", (_d(1, 8, 2, 3),), {"blocksize": 2, "mode": "CRD"}, match={"mode": "CRD"}))
    add(Case("SpaceToDepth", 13, "", (_d(1, 2, 4, 4),), {"blocksize": 2}))
    add(Case("Compress", 11, "", (_d(3, 2), Const([True, False, True], "bool")), {"axis": 0}))
    add(Case("ReverseSequence", 10, "", (_d(3, 2), _i(3, 1)), {"batch_axis": 1, "time_axis": 0}))
    add(Case("Trilu", 14, "upper", (_d(3, 4),)))
    add(Case("Trilu", 14, "lower", (_d(3, 4),), {"upper": 0}, match={"upper": 0}))
    add(Case("CenterCropPad", 18, "", (_d(2, 5, 6), _i(2, 3, 8))))
    add(Case("TopK", 11, "", (_grid(3, 4), _i(2)), outputs=2))
    add(Case("TopK", 11, "largest=0", (_grid(3, 4), _i(2)), {"largest": 0}, outputs=2, match={"largest": 0}))
    add(Case("TopK", 1, "", (_grid(3, 4),), {"k": 2}, outputs=2))
    add(Case("Unique", 11, "", (_d(2, 3),), {"sorted": 1}))
    add(Case("CumSum", 14, "", (x, Const(1, "int64"))))
    add(Case("CumSum", 14, "exclusive,reverse", (x, Const(1, "int64")), {"exclusive": 1, "reverse": 1},
             match={"reverse": 1}))
    add(Case("Range", 11, "", (Diff((), 0.2, 0.4), _f(3.0), Diff((), 0.7, 0.9))))
    add(Case("OneHot", 11, "values trained", (_i(0, 2, 1), _i(3), _d(2))))
    add(Case("Dropout", 13, "inference", (x,)))
    add(Case("Dropout", 10, "inference", (x,)))
    add(Case("Cast", 21, "to=FLOAT16", (x,), {"to": 10}, match={"to": 10}, check=False))
    add(Case("Cast", 21, "to=DOUBLE", (x,), {"to": 11}, match={"to": 11}))
    add(Case("Cast", 21, "to=FLOAT", (x,), {"to": 1}, match={"to": 1}))
    add(Case("Cast", 21, "to=INT64", status="non_differentiable", reason="integer output", match={"to": 7}))
    add(Case("CastLike", 21, "like float16", (x, Const([0.0], "float16"))))
    add(Case("DequantizeLinear", 21, "scale trained", (Const([[1, -3, 5], [7, 0, -2]], "int8"), Diff((), 0.1, 0.3),
                                                        Const(1, "int8"))))
    add(Case("DynamicQuantizeLinear", 11, "", (x,), outputs=3))
    add(Case("NegativeLogLikelihoodLoss", 13, "", (_d(2, 3), _i(2, 0))))
    add(Case("SoftmaxCrossEntropyLoss", 13, "", (_d(2, 3), _i(2, 0))))
    add(Case("SoftmaxCrossEntropyLoss", 13, "log_prob output", (_d(2, 3), _i(2, 0)), outputs=2, match={"outputs": 2},
             loss_outputs=(0,)))
    add(Case("MelWeightMatrix", 17, "edges trained", (Const(4, "int64"), Const(16, "int64"), Const(8000, "int64"),
                                                       Diff((), 100.0, 200.0), Diff((), 3000.0, 3500.0))))
    add(Case("DFT", 20, "", (_d(1, 8, 1), ABSENT, Const(1, "int64")), check=True))
    add(Case("STFT", 17, "", (_d(1, 16, 1), Const(4, "int64"), ABSENT, Const(8, "int64"))))
    # recurrent
    add(Case("RNN", 14, "", _rnn_inputs(1), {"hidden_size": 4}))
    add(Case("GRU", 14, "", _rnn_inputs(3), {"hidden_size": 4}))
    add(Case("GRU", 14, "linear_before_reset", _rnn_inputs(3), {"hidden_size": 4, "linear_before_reset": 1},
             match={"linear_before_reset": 1}))
    add(Case("LSTM", 14, "", _rnn_inputs(4), {"hidden_size": 4}))
    add(Case("LSTM", 14, "bidirectional", _rnn_inputs(4, directions=2), {"hidden_size": 4, "direction": "bidirectional"},
             match={"direction": "bidirectional"}))
    # control flow
    add(Case("If", 21, "", (Const(True, "bool"),), {"__graphs__": _if_graphs}, scope=(x,)))
    add(Case("Loop", 21, "", (Const(2, "int64"), Const(True, "bool"), x), {"__graphs__": _loop_graph}))
    add(Case("Scan", 21, "", (_d(3), _d(4, 3)), {"__graphs__": _scan_graph}, outputs=2))
    # by nature
    for op in ("RandomNormalLike", "RandomUniformLike", "Bernoulli", "EyeLike"):
        add(Case(op, _latest(op), status="non_differentiable", reason="output does not depend on input values"))
    cases.extend(_resize_cases())
    return cases


def _latest(op: str) -> int:
    version = _op_version(op, MAX_OPSET)
    assert version is not None
    return version


def _schema_verdict(schema: Any) -> tuple[str, str] | None:
    """``(status, reason)`` decided from the schema alone, or None when the op must be probed."""

    def allowed(formal: Any) -> list[str]:
        for c in schema.type_constraints:
            if c.type_param_str == formal.type_str:
                return list(c.allowed_type_strs)
        return [formal.type_str]

    ins = [t for f in schema.inputs for t in allowed(f)]
    outs = [t for f in schema.outputs for t in allowed(f)]
    if any(t.startswith(("seq(", "optional(")) for t in ins + outs):
        return "unprobed", "sequence/optional-typed values (onnxqat lowers tensor graphs only)"
    if not schema.inputs:
        return "non_differentiable", "no inputs"
    if not any(t in _FLOAT_TYPES for t in ins):
        return "non_differentiable", "no float input"
    if not any(t in _FLOAT_TYPES for t in outs):
        return "non_differentiable", "no float output"
    return None


def all_cases() -> list[Case]:
    """Every probe row: the written cases plus rows decided from the schemas (sorted by key)."""
    import onnx.defs

    written = _cases()
    have = {c.op for c in written}
    latest: dict[str, Any] = {}
    for schema in onnx.defs.get_all_schemas_with_history():
        if schema.domain not in ("", "ai.onnx") or schema.since_version > MAX_OPSET or schema.deprecated:
            continue
        if schema.name not in latest or schema.since_version > latest[schema.name].since_version:
            latest[schema.name] = schema
    cases = list(written)
    for name, schema in latest.items():
        if name in have:
            continue
        verdict = _schema_verdict(schema)
        status, reason = verdict if verdict else ("unprobed", "no probe case written")
        cases.append(Case(name, int(schema.since_version), status=status, reason=reason))
    for c in written:
        if c.op not in latest:
            raise AssertionError(f"probe case for unknown op {c.op}")
    keys = [c.key for c in cases]
    if len(set(keys)) != len(keys):
        raise AssertionError("duplicate probe rows: " + ", ".join(sorted({str(k) for k in keys if keys.count(k) > 1})))
    return sorted(cases, key=lambda c: c.key)


# ---------------------------------------------------------------------------------------------
# Probing one case (runs in a worker process)
# ---------------------------------------------------------------------------------------------
def _model_opset(op: str, version: int) -> int:
    """The last opset at which ``version`` is the current version of ``op``."""
    import onnx.defs

    later = sorted({int(s.since_version) for s in onnx.defs.get_all_schemas_with_history()
                    if s.name == op and s.domain in ("", "ai.onnx") and s.since_version > version})
    return min(later[0] - 1, MAX_OPSET) if later else MAX_OPSET


def _values(slot: Diff, rng: np.random.Generator) -> np.ndarray:
    size = tuple(slot.shape)
    if slot.spacing:
        n = int(np.prod(size, dtype=np.int64))
        grid = (rng.permutation(n) - n // 2) * slot.spacing + slot.shift
        return np.asarray(grid.reshape(size), dtype=slot.dtype)
    if slot.lo < 0 < slot.hi:
        mag = rng.uniform(slot.away, slot.hi, size)
        sign = np.where(rng.random(size) < 0.5, -1.0, 1.0)
        values = mag * sign
    else:
        values = rng.uniform(slot.lo, slot.hi, size)
    for kink in slot.kinks:
        gap = values - kink
        values = np.where(np.abs(gap) < 0.05, kink + np.where(gap < 0, -0.05, 0.05), values)
    return np.asarray(values, dtype=slot.dtype)


def _build(case: Case, rng: np.random.Generator, dynamic: str = "") -> tuple[Any, dict[str, np.ndarray], list[str]]:
    """The one-node model (outputs: the node's outputs), its feeds and its trainable names.

    ``dynamic``: ``"all"`` or ``"batch"``: those dims of the first differentiable input are
    symbolic, and its parameter has size 1 along them.
    """
    from onnx import helper, numpy_helper

    inits, feeds, trainable, nodes, inputs, names = [], {}, [], [], [], []
    slot: Diff | Const | None
    for j, slot in enumerate(case.scope):
        data = _values(slot, rng)
        feeds[f"xs{j}"] = data
        inputs.append(helper.make_tensor_value_info(f"xs{j}", helper.np_dtype_to_tensor_dtype(data.dtype), data.shape))
        inits.append(numpy_helper.from_array(np.zeros_like(data), f"ps{j}"))
        trainable.append(f"ps{j}")
        nodes.append(helper.make_node("Add", [f"xs{j}", f"ps{j}"], [f"o{j}"], name=f"scope{j}"))
    for i, slot in enumerate(case.inputs):
        if slot is None:
            names.append("")
        elif isinstance(slot, Const):
            inits.append(numpy_helper.from_array(np.asarray(slot.value, dtype=slot.dtype), f"c{i}"))
            names.append(f"c{i}")
        else:
            data = _values(slot, rng)
            feeds[f"x{i}"] = data
            symbolic = bool(dynamic) and i == _first_diff(case) and data.ndim > 0
            dims = (range(data.ndim) if dynamic == "all" else [0]) if symbolic else []
            shape = [f"x{i}_d{k}" if k in dims else n for k, n in enumerate(data.shape)]
            inputs.append(helper.make_tensor_value_info(f"x{i}", helper.np_dtype_to_tensor_dtype(data.dtype), shape))
            param = np.zeros([1 if k in dims else n for k, n in enumerate(data.shape)], data.dtype)
            inits.append(numpy_helper.from_array(param, f"p{i}"))
            trainable.append(f"p{i}")
            nodes.append(helper.make_node("Add", [f"x{i}", f"p{i}"], [f"a{i}"], name=f"add{i}"))
            names.append(f"a{i}")
    attrs = dict(case.attrs)
    graphs = attrs.pop("__graphs__", None)
    if graphs is not None:
        attrs.update(graphs())
    outs = [f"y{k}" for k in range(case.outputs)]
    nodes.append(helper.make_node(case.op, names, outs, name="probe", **attrs))
    graph = helper.make_graph(nodes, "probe", inputs, [helper.make_empty_tensor_value_info(o) for o in outs], inits)
    opset = _model_opset(case.op, case.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10 if opset > 18 else 8)
    return model, feeds, trainable


def _first_diff(case: Case) -> int | None:
    return next((i for i, slot in enumerate(case.inputs) if isinstance(slot, Diff)), None)


def _with_loss(model: Any, outputs: Sequence[np.ndarray], rng: np.random.Generator) -> Any:
    """``loss = sum_k sum(w_k * float(y_k))`` over the float outputs (the model's only output)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    terms = []
    for k, value in enumerate(outputs):
        name = graph.output[k].name
        if value.dtype != np.float32:
            graph.node.append(helper.make_node("Cast", [name], [f"{name}_f"], to=TensorProto.FLOAT))
            name = f"{name}_f"
        graph.initializer.append(numpy_helper.from_array(rng.standard_normal(value.shape).astype(np.float32), f"w{k}"))
        graph.node.append(helper.make_node("Mul", [name, f"w{k}"], [f"m{k}"]))
        graph.node.append(helper.make_node("ReduceSum", [f"m{k}"], [f"s{k}"], keepdims=0))
        terms.append(f"s{k}")
    total = terms[0]
    for k, term in enumerate(terms[1:]):
        graph.node.append(helper.make_node("Add", [total, term], [f"t{k}"]))
        total = f"t{k}"
    if total != "loss":
        graph.node.append(helper.make_node("Identity", [total], ["loss"]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("loss", TensorProto.FLOAT, []))
    return model


_ORT_ERROR = re.compile(r"\[ONNXRuntimeError\] : \d+ : (\w+) : (.*)")
_SOURCE = re.compile(r"^(?:/\S+|\w:\\\S+):\d+ ")
_IN_NODE = re.compile(r"In Node, \(.*?\) : \(.*?\) -> \(.*?\) , Error ")


def _first_line(error: BaseException | str) -> str:
    """The first line of an onnxruntime error without source paths and C++ signatures."""
    text = str(error).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(error).__name__)
    found = _ORT_ERROR.search(line)
    if found:
        line = f"{found.group(1)}: {found.group(2)}"
    else:
        line = _SOURCE.sub("", line)
        head, sep, tail = line.partition(" was false.")
        if sep:
            condition = head[head.rfind(") ") + 2:] if ") " in head else head
            condition = condition.removeprefix("const ").strip()
            line = tail.strip() or f"check failed: {condition}"
    line = _IN_NODE.sub("", line)
    line = re.sub(r"/tmp/\S+", "<tmp>", line)
    line = re.sub(r"'ps?\d+'", "'<parameter>'", line)  # onnxruntime names one of a set, in no fixed order
    return line[:240]


def _session(model: Any) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def probe_case(case: Case) -> GradientRow:
    """Probe one case in this process (see the module docstring); never raises for op failures."""
    match = types.MappingProxyType(dict(case.match))
    if case.status is not None:
        return GradientRow(case.op, case.version, case.variant, match, case.status, case.reason)
    status, error = _probe(case)
    first = _first_diff(case)
    slot = case.inputs[first] if first is not None else None
    if status in ("unprobed", "non_differentiable") or not (isinstance(slot, Diff) and slot.shape):
        return GradientRow(case.op, case.version, case.variant, match, status, error)
    dynamic, dynamic_error = _probe(case, dynamic="all")
    batch, batch_error = _probe(case, dynamic="batch") if len(slot.shape) > 1 else (dynamic, dynamic_error)
    return GradientRow(case.op, case.version, case.variant, match, status, error, dynamic, dynamic_error, batch,
                       batch_error)


def _probe(case: Case, dynamic: str = "") -> tuple[str, str]:
    from onnxqat.train.ort_training import training_modules

    rng = np.random.default_rng(zlib.crc32(repr(case.key).encode()))
    model, feeds, trainable = _build(case, rng, dynamic)
    try:
        outputs = _session(model).run(None, feeds)
    except Exception as e:
        return "unprobed", "forward fails in onnxruntime: " + _first_line(e)
    floats = [k for k, v in enumerate(outputs) if np.asarray(v).dtype.kind == "f"
              and (case.loss_outputs is None or k in case.loss_outputs)]
    if not floats:
        return "non_differentiable", "no float output"
    del model.graph.output[:]
    from onnx import helper

    model.graph.output.extend(helper.make_empty_tensor_value_info(f"y{k}") for k in floats)
    model = _with_loss(model, [np.asarray(outputs[k]) for k in floats], rng)
    artifacts, api = training_modules()
    with tempfile.TemporaryDirectory(prefix="onnxqat-probe-") as folder:
        try:
            artifacts.generate_artifacts(model, requires_grad=trainable, frozen_params=[], loss=None,
                                         optimizer=None, artifact_directory=folder)
        except Exception as e:
            line = _first_line(e)
            if "gradient builder has not been registered" in line:
                return "no_grad_builder", line
            return "build_error", line
        try:
            state = api.CheckpointState.load_checkpoint(os.path.join(folder, "checkpoint"))
            module = api.Module(os.path.join(folder, "training_model.onnx"), state,
                                os.path.join(folder, "eval_model.onnx"))
            module.train()
            ordered = [feeds[i.name] for i in model.graph.input]
            module(*ordered)
            grads = {name: np.array(state.parameters[name].grad, dtype=np.float64) for name in trainable}
        except Exception as e:
            return "runtime_error", _first_line(e)
    finite = all(np.all(np.isfinite(g)) for g in grads.values())
    if not finite or (case.check and not _gradient_agrees(model, feeds, grads, rng)):
        # one message for both: a broken kernel may give either, differently from run to run
        return "wrong_grad", "gradient is not finite or disagrees with central differences of the forward op"
    return "grad", ""


def _gradient_agrees(model: Any, feeds: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray],
                     rng: np.random.Generator, directions: int = 4) -> bool:
    """Compare ``g . v`` with central differences of the loss along random directions ``v``.

    ``v`` is scaled per input by ``max(1, max|x|)`` and the step is ``h = 1e-3``. The loss is a
    float32 sum of terms ``w * y``: its rounding error is about ``eps * sum|w * y|``, so the
    central difference is off by up to ``~eps * sum|w * y| / h`` (plus O(h^2) truncation). The
    tolerance, ``1%`` of the derivative plus ``1e-4 * sum|w * y|``, sits well above that and well
    below what a wrong formula (missing term, wrong sign or padding, zero gradient) gives.
    """
    session = _session(model)
    magnitude_model = _magnitude_model(model)
    magnitude = float(_session(magnitude_model).run(None, dict(feeds))[0])
    h = 1e-3
    for _ in range(directions):
        direction, analytic = {}, 0.0
        for name, value in feeds.items():
            scale = max(1.0, float(np.max(np.abs(value)))) if value.size else 1.0
            grad = grads["p" + name[1:]]  # the parameter may broadcast: step along it, constant over x
            along = rng.standard_normal(grad.shape) * scale
            direction[name] = np.broadcast_to(along, value.shape)
            analytic += float(np.sum(grad * along))

        def loss(sign: float, direction: Mapping[str, np.ndarray] = direction) -> float:
            shifted = {n: (v + sign * h * direction[n]).astype(v.dtype) for n, v in feeds.items()}
            return float(session.run(None, shifted)[0])

        numeric = (loss(1.0) - loss(-1.0)) / (2 * h)
        if not abs(analytic - numeric) <= 1e-2 * max(abs(analytic), abs(numeric)) + 1e-4 * magnitude + 1e-6:
            return False
    return True


def _magnitude_model(model: Any) -> Any:
    """The loss model with ``sum|w * y|`` as its output (the scale of the loss's rounding error)."""
    from onnx import TensorProto, helper

    magnitude = type(model)()
    magnitude.CopyFrom(model)
    graph = magnitude.graph
    terms = []
    for node in list(graph.node):
        if node.op_type == "Mul" and node.output[0].startswith("m") and node.input[1].startswith("w"):
            graph.node.append(helper.make_node("Abs", [node.output[0]], [node.output[0] + "_abs"]))
            graph.node.append(helper.make_node("ReduceSum", [node.output[0] + "_abs"], [node.output[0] + "_sum"], keepdims=0))
            terms.append(node.output[0] + "_sum")
    total = terms[0]
    for k, term in enumerate(terms[1:]):
        graph.node.append(helper.make_node("Add", [total, term], [f"abs_total{k}"]))
        total = f"abs_total{k}"
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(total, TensorProto.FLOAT, []))
    return magnitude


# ---------------------------------------------------------------------------------------------
# Running many cases: worker processes (a crash is recorded, not fatal)
# ---------------------------------------------------------------------------------------------
def _worker() -> None:
    """Serve ``case key`` lines on stdin with result lines on the original stdout."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    import logging

    logging.disable(logging.CRITICAL)
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    by_key = {repr(c.key): c for c in all_cases()}
    crash = os.environ.get(_CRASH_ENV, "")  # test hook: this key crashes the worker
    for line in sys.stdin:
        key = line.strip()
        if not key:
            continue
        if key == crash:
            os.kill(os.getpid(), signal.SIGSEGV)
        row = probe_case(by_key[key])
        protocol.write(json.dumps(row.to_json()) + "\n")


class _Worker:
    def __init__(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "onnxqat.train.probe", "--worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1, env=env,
        )
        self.replies: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.replies.put(line)
        self.replies.put(None)

    def ask(self, case: Case, timeout: float) -> GradientRow:
        assert self.process.stdin is not None
        match = types.MappingProxyType(dict(case.match))
        try:
            self.process.stdin.write(repr(case.key) + "\n")
            self.process.stdin.flush()
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            self.close()
            return GradientRow(case.op, case.version, case.variant, match, "runtime_error", f"timed out after {timeout:.0f} s")
        except (BrokenPipeError, OSError):
            reply = None
        if reply is None:
            code = self.process.wait()
            how = f"signal {-code}" if code < 0 else f"exit status {code}"
            return GradientRow(case.op, case.version, case.variant, match, "runtime_error",
                               f"the training step crashed the process ({how})")
        return GradientRow.from_json(json.loads(reply))

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def probe_cases(cases: Sequence[Case], workers: int = 2, timeout: float = _TIMEOUT_S,
                progress: Callable[[GradientRow], None] | None = None) -> list[GradientRow]:
    """Probe ``cases`` in ``workers`` subprocesses; rows decided without probing skip them."""
    fixed = [probe_case(c) for c in cases if c.status is not None]
    todo: queue.Queue[Case] = queue.Queue()
    for c in cases:
        if c.status is None:
            todo.put(c)
    rows: list[GradientRow] = list(fixed)
    lock = threading.Lock()

    def run() -> None:
        worker: _Worker | None = None
        try:
            while True:
                try:
                    case = todo.get_nowait()
                except queue.Empty:
                    return
                if worker is None or not worker.alive():
                    worker = _Worker()
                row = worker.ask(case, timeout)
                with lock:
                    rows.append(row)
                if progress:
                    progress(row)
        finally:
            if worker is not None:
                worker.close()

    threads = [threading.Thread(target=run) for _ in range(max(1, min(workers, todo.qsize())))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(rows, key=lambda r: r.key)


def summarize(rows: Sequence[GradientRow]) -> str:
    """Counts per status and the ops whose default row lacks a gradient."""
    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    lines = [" ".join(f"{s}={n}" for s, n in counts.items() if n)]
    for status in ("no_grad_builder", "build_error", "runtime_error", "wrong_grad"):
        names = sorted({f"{r.op}-{r.opset}" + (f"[{r.variant}]" if r.variant else "") for r in rows if r.status == status})
        if names:
            lines.append(f"{status}: " + ", ".join(names))
    names = sorted(f"{r.op}-{r.opset}" + (f"[{r.variant}]" if r.variant else "") + f" (batch: {r.batch}, all: {r.dynamic})"
                   for r in rows if r.status == "grad" and (r.dynamic != "grad" or r.batch != "grad"))
    if names:
        lines.append("grad with static shapes only: " + ", ".join(names))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m onnxqat.train.probe [--out PATH] [--ops A,B] [--workers N]``."""
    parser = argparse.ArgumentParser(prog="python -m onnxqat.train.probe", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(TABLE_PATH), help="table file to write (default: the shipped one)")
    parser.add_argument("--ops", default="", help="comma-separated op types to probe (prints, writes nothing)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker()
        return 0
    cases = all_cases()
    if args.ops:
        wanted = set(args.ops.split(","))
        cases = [c for c in cases if c.op in wanted]
    start = time.monotonic()
    rows = probe_cases(cases, workers=args.workers)
    if args.ops:
        for r in rows:
            print(f"{r.op}-{r.opset} [{r.variant}] {r.status} {r.error}")
        return 0
    text = format_table(rows)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    print(summarize(rows))
    print(f"{len(rows)} rows in {time.monotonic() - start:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
