"""Run calibration data through onnxruntime and stream activation statistics.

For min-max calibration the reductions run inside the graph (ReduceMin/ReduceMax per quantized
tensor, gathered into one output per dtype and rank), so each batch returns two numbers per
tensor. Histogram schemes fetch the tensors themselves, a batch over :data:`RUN_BUDGET` bytes of
them in pieces; either way a batch's outputs are folded into fixed-size observers and dropped one
by one, so memory does not grow with the number of batches nor, past the budget, with the batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from tqdm.auto import tqdm

from onnxqat.calibrate.observers import HistogramBatch, HistogramObserver, MinMaxObserver
from onnxqat.calibrate.schemes import Scheme
from onnxqat.data import count_batches, input_signature, validate_feed
from onnxqat.errors import DataError
from onnxqat.graph import NameScope, const_array, name_of, values_by_name
from onnxqat.passes.expose import ExposeValuesPass
from onnxqat.plan import QuantPlan
from onnxqat.runtime import Session, fits_in_proto, ort

__all__ = ["collect_statistics"]

Observer = MinMaxObserver | HistogramObserver


def collect_statistics(
    model: ir.Model,
    plan: QuantPlan,
    batches: Iterable[Mapping[str, np.ndarray]],
    scheme: Scheme,
    *,
    progress: bool | None = None,
    source: str = "calibration data",
    device: str = "cpu",
) -> dict[str, Observer]:
    """Observers of every activation quantizer of ``plan``, fed with ``batches`` (run on ``device``)."""
    observers: dict[str, Observer] = {
        q.name: HistogramObserver() if scheme.needs_histogram else MinMaxObserver()
        for q in plan.activations
    }
    stats = _statistics_model(model, plan, scheme, observers)
    session = _statistics_session(model, stats, device)
    signature = input_signature(model)
    fetch_names = [name for name, _ in stats.fetches]
    seen = 0
    bar = tqdm(
        batches,
        total=count_batches(batches),
        desc="calibrating",
        unit="batch",
        disable=None if progress is None else not progress,
    )
    histograms = _HistogramFetcher(model, stats, session, observers, device) if scheme.needs_histogram else None
    for i, batch in enumerate(bar):
        feed = validate_feed(batch, signature, where=f"{source}: batch {i}")
        if histograms is not None:
            if fetch_names:
                histograms.observe(feed)
        elif fetch_names:
            results = session.run(feed, fetch_names)
            for (_, targets), value in zip(stats.fetches, results):
                assert not isinstance(targets, str)
                bounds = value.reshape(-1)
                assert bounds.shape[0] == len(targets)
                for (quantizer, upper), bound in zip(targets, bounds):
                    obs = observers[quantizer]
                    assert isinstance(obs, MinMaxObserver)
                    obs.update_bound(float(bound), upper=upper)
            del results
        for tensor, quantizer in stats.from_inputs:
            observers[quantizer].update(feed[tensor])
        seen += 1
    bar.close()
    if seen == 0:
        raise DataError(f"{source}: no batches")
    return observers


# Histogram schemes fetch the observed tensors themselves: graph outputs, all alive until the end of
# a run (whichever outputs the run asks for) and then kept by onnxruntime's arena for the session's
# life. A batch whose fetches would exceed this many bytes runs in pieces along axis 0, after a
# second session that holds only min-max's reductions has given each tensor's bounds over the
# whole batch (also in pieces), so the histograms are still those of the whole batch (HistogramBatch).
RUN_BUDGET = 64 << 20


def _rows(feed: Mapping[str, np.ndarray]) -> int | None:
    """Samples in the feed, or None when its inputs do not all hold them on axis 0 (a recurrent
    state ``[layers, B, H]``: pieces along axis 0 would pair the wrong rows)."""
    sizes = {len(v) for v in feed.values() if np.ndim(v)}
    return sizes.pop() if len(sizes) == 1 else None


def _pieces(feed: Mapping[str, np.ndarray], n: int, step: int) -> Iterator[tuple[dict[str, np.ndarray], bool]]:
    """``(piece, last)`` along axis 0."""
    for start in range(0, n, step):
        yield {k: (v[start:start + step] if np.ndim(v) else v) for k, v in feed.items()}, start + step >= n


_SHRINK: Any = None


def _run_and_shrink(session: Session, feed: Mapping[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    """``session.run``, then onnxruntime returns the free regions of the session's arena to the
    system: the bounds session and the fetching session take turns, so each gives back its peak
    before the other runs (one of them at a time holds memory, not both)."""
    global _SHRINK
    if _SHRINK is None:
        _SHRINK = ort.RunOptions()
        _SHRINK.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    results: list[np.ndarray] = session.session.run(names, {k: feed[k] for k in session.input_names}, _SHRINK)
    return results


class _HistogramFetcher:
    """Folds batches into histogram observers within :data:`RUN_BUDGET` bytes of fetches a run."""

    def __init__(self, model: ir.Model, stats: _StatisticsModel, session: Session,
                 observers: Mapping[str, Observer], device: str) -> None:
        self.model, self.session, self.observers, self.device = model, session, observers, device
        self.fetches = [(name, target) for name, target in stats.fetches if isinstance(target, str)]
        self.names = [name for name, _ in self.fetches]
        # pieces along axis 0 are valid feeds only where no input fixes that axis (a model exported
        # for batch 4 takes only 4 rows)
        self.splittable = not any(
            v.shape is not None and len(v.shape) > 0 and isinstance(v.shape[0], int) and v.name in session.input_names
            for v in model.graph.inputs
        )
        self.per_sample: float | None = None  # fetched bytes per sample, from the first run
        self.bounds: tuple[_StatisticsModel, Session] | None = None  # built when a batch is first split

    def observe(self, feed: Mapping[str, np.ndarray]) -> None:
        n = _rows(feed)
        if n is None or n <= 1 or not self.splittable:
            self._whole(feed, n)
            return
        if self.per_sample is None:  # one sample's run tells the bytes per sample (its outputs are dropped)
            self._measure(self.session.run(next(_pieces(feed, n, 1))[0], self.names), 1)
        assert self.per_sample is not None
        step = max(1, int(RUN_BUDGET // self.per_sample))
        if n <= step or not self._split(feed, n, step):
            self._whole(feed, n)

    def _measure(self, results: list[np.ndarray], rows: int) -> None:
        if self.per_sample is None:
            self.per_sample = max(1.0, sum(v.nbytes for v in results) / rows)

    def _whole(self, feed: Mapping[str, np.ndarray], n: int | None) -> None:
        results = self.session.run(feed, self.names)
        if n:
            self._measure(results, n)
        results.reverse()
        for _, quantizer in self.fetches:
            self.observers[quantizer].update(results.pop())  # each output dropped once binned

    def _split(self, feed: Mapping[str, np.ndarray], n: int, step: int) -> bool:
        """Fold the batch in pieces of ``step`` samples; False (nothing folded) when the pieces'
        finite ranges are not the in-graph bounds (a NaN or infinity in a tensor)."""
        if self.bounds is None:
            stats = _bounds_model(self.model, self.names)
            self.bounds = stats, _statistics_session(self.model, stats, self.device)
        stats, session = self.bounds
        bound_of: dict[str, list[float]] = {t: [math.inf, -math.inf] for t in self.names}
        outputs = [name for name, _ in stats.fetches]
        for piece, last in _pieces(feed, n, step):
            run = _run_and_shrink(session, piece, outputs) if last else session.run(piece, outputs)
            for (_, targets), value in zip(stats.fetches, run):
                assert not isinstance(targets, str)
                for (tensor, upper), bound in zip(targets, value.reshape(-1).tolist()):
                    lo_hi = bound_of[tensor]
                    lo_hi[int(upper)] = max(lo_hi[1], bound) if upper else min(lo_hi[0], bound)
        if not all(math.isfinite(b) for bounds in bound_of.values() for b in bounds):
            return False
        pending: dict[str, HistogramBatch] = {}
        slots = []
        for tensor, quantizer in self.fetches:
            obs = self.observers[quantizer]
            assert isinstance(obs, HistogramObserver)
            batch = pending.setdefault(quantizer, HistogramBatch(obs))
            slots.append((batch, batch.begin(*bound_of[tensor])))
        for piece, last in _pieces(feed, n, step):
            results = _run_and_shrink(self.session, piece, self.names) if last else self.session.run(piece, self.names)
            results.reverse()
            for batch, index in slots:
                batch.add(index, results.pop())
        if not all(batch.spans_bounds() for batch in pending.values()):
            return False
        for batch in pending.values():
            batch.commit()
        return True


# Fan-in of the Concat trees that gather per-tensor bounds into a few outputs.
_FAN_IN = 16


@dataclasses.dataclass(frozen=True)
class _Op:
    """One node the statistics model adds: ReduceMin/ReduceMax (``keepdims``) or Concat (``axis``)."""

    op_type: str
    inputs: tuple[str, ...]
    output: str
    name: str
    attribute: tuple[str, int]


@dataclasses.dataclass
class _StatisticsModel:
    """What calibration adds to the float model, and how to read the outputs.

    Attributes:
        after: Nodes to place right after the node at each position of the float graph's order.
        tail: Nodes to append at the end of the graph.
        outputs: Graph outputs to add: an existing value (histogram schemes) or a new one
            ``(name, dtype, is_scalar)``.
        fetches: ``(output name, targets)``: targets is a quantizer name when the output is a
            whole tensor (histogram schemes), else the ``(quantizer, upper)`` bounds that the
            output holds in order (``upper`` False for a minimum, True for a maximum).
        from_inputs: ``(graph input, quantizer)`` read straight from the feed.
    """

    after: dict[int, list[_Op]]
    tail: list[_Op]
    outputs: list[ir.Value | tuple[str, ir.DataType, bool]]
    fetches: list[tuple[str, str | list[tuple[str, bool]]]]
    from_inputs: list[tuple[str, str]]


class _BoundGatherer:
    """Gathers ``[1, 1]`` bound tensors of one dtype into one output.

    Bounds are concatenated by trees of ``_FAN_IN``-input Concat nodes, each emitted as soon as
    its inputs exist, so onnxruntime keeps few small tensors alive and sees few graph outputs
    (a graph output or a long-lived tensor per quantized tensor makes session creation and runs
    grow quadratically with the model). The output lists the bounds in the order they were added.
    """

    def __init__(self, names: NameScope, base: str) -> None:
        self.names = names
        self.base = base
        self.levels: list[list[str]] = []
        self.targets: list[tuple[str, bool]] = []

    def add(self, bound: str, target: tuple[str, bool], emitted: list[_Op]) -> None:
        self.targets.append(target)
        self._push(bound, 0, emitted)

    def _push(self, bound: str, level: int, emitted: list[_Op]) -> None:
        if level == len(self.levels):
            self.levels.append([])
        pending = self.levels[level]
        pending.append(bound)
        if len(pending) == _FAN_IN:
            self.levels[level] = []
            self._push(self._concat(pending, emitted), level + 1, emitted)

    def _concat(self, inputs: list[str], emitted: list[_Op]) -> str:
        output = self.names.fresh(self.base)
        emitted.append(_Op("Concat", tuple(inputs), output, self.names.fresh(f"{self.base}_Concat"), ("axis", 0)))
        return output

    def finish(self, emitted: list[_Op]) -> str:
        """The output holding every bound (higher levels hold the earlier bounds)."""
        rest = [v for level in reversed(self.levels) for v in level]
        while len(rest) > _FAN_IN:  # up to _FAN_IN - 1 left per level: gather them in order, _FAN_IN at a time
            rest = [self._concat(rest[i:i + _FAN_IN], emitted) if len(rest[i:i + _FAN_IN]) > 1 else rest[i]
                    for i in range(0, len(rest), _FAN_IN)]
        return rest[0] if len(rest) == 1 else self._concat(rest, emitted)


def _statistics_model(
    model: ir.Model, plan: QuantPlan, scheme: Scheme, observers: dict[str, Observer]
) -> _StatisticsModel:
    """What to add to ``model`` so that its outputs expose what each observer needs.

    Histogram schemes fetch each quantized tensor. Min-max reduces each tensor in the graph with
    ReduceMin/ReduceMax (then Flatten to ``[1, 1]``), placed right after the tensor's producer,
    and gathers the bounds of tensors of one dtype into one output. Constants are observed here, graph inputs from the feed.
    """
    graph = model.graph
    values = values_by_name(graph)
    existing_outputs = {v.name for v in graph.outputs}
    stats = _StatisticsModel({}, [], [], [], [])
    reduced: dict[int, list[tuple[ir.Value, str]]] = {}  # id(producer) -> (tensor, quantizer)
    for q in plan.activations:
        for tensor in q.tensors:
            value = values[tensor]
            constant = const_array(value)  # None unless is_constant(value)
            if constant is not None:
                observers[q.name].update(constant)
            elif value.is_graph_input():
                stats.from_inputs.append((tensor, q.name))
            elif scheme.needs_histogram:
                if tensor not in existing_outputs:
                    stats.outputs.append(value)
                    existing_outputs.add(tensor)
                stats.fetches.append((tensor, q.name))
            else:
                producer = value.producer()
                assert producer is not None
                reduced.setdefault(id(producer), []).append((value, q.name))
    _add_reductions(model, reduced, stats)
    return stats


def _bounds_model(model: ir.Model, tensors: Iterable[str]) -> _StatisticsModel:
    """Min-max's in-graph reductions of ``tensors``, keyed by tensor name (a histogram batch
    split into pieces needs each tensor's bounds first). Float16 and bfloat16 tensors are reduced
    after an exact Cast to float (onnxruntime has no bfloat16 ReduceMin)."""
    values = values_by_name(model.graph)
    stats = _StatisticsModel({}, [], [], [], [])
    reduced: dict[int, list[tuple[ir.Value, str]]] = {}
    for tensor in dict.fromkeys(tensors):
        producer = values[tensor].producer()
        assert producer is not None
        reduced.setdefault(id(producer), []).append((values[tensor], tensor))
    _add_reductions(model, reduced, stats, cast=True)
    return stats


def _add_reductions(model: ir.Model, reduced: Mapping[int, list[tuple[ir.Value, str]]], stats: _StatisticsModel,
                    cast: bool = False) -> None:
    """ReduceMin/ReduceMax of each ``(tensor, key)`` right after its producer (``reduced`` by
    ``id(producer)``), gathered into one output per dtype; adds them to ``stats`` (outputs, fetches)."""
    if not reduced:
        return
    names = NameScope(model)
    gatherers: dict[ir.DataType | None, _BoundGatherer] = {}
    for position, node in enumerate(model.graph):
        pending = reduced.get(id(node))
        if pending is None:
            continue
        emitted: list[_Op] = []
        for value, key in pending:
            source, dtype = name_of(value), value.dtype
            if cast and dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE):
                source, dtype = names.fresh(f"{value.name}_float"), ir.DataType.FLOAT
                emitted.append(_Op("Cast", (name_of(value),), source, names.fresh(f"{value.name}_Cast"),
                                   ("to", int(ir.DataType.FLOAT))))
            for op, upper in (("ReduceMin", False), ("ReduceMax", True)):
                kind = "max" if upper else "min"
                reduced_out = names.fresh(f"{value.name}_{kind}")
                emitted.append(_Op(op, (source,), reduced_out,
                                   names.fresh(f"{value.name}_{op}"), ("keepdims", 1)))
                # Flatten(axis=0) makes every bound [1, 1] whatever the tensor's actual rank
                # (a recorded shape can be stale), so one Concat per dtype gathers them all.
                out = names.fresh(f"{value.name}_{kind}_flat")
                emitted.append(_Op("Flatten", (reduced_out,), out, names.fresh(f"{value.name}_{kind}_Flatten"),
                                   ("axis", 0)))
                if dtype not in gatherers:
                    gatherers[dtype] = _BoundGatherer(names, f"calibration_bounds_{len(gatherers)}")
                gatherers[dtype].add(out, (key, upper), emitted)
        stats.after[position] = emitted
    for dtype, gatherer in gatherers.items():
        out = gatherer.finish(stats.tail)
        assert dtype is not None  # quantized activations are float tensors
        stats.outputs.append((out, dtype, False))
        stats.fetches.append((out, gatherer.targets))


# onnxruntime graph optimizers the statistics session goes without, each with why. The session
# runs once per batch on the float model plus its reductions; an optimizer whose build time grows
# faster than the graph costs more there than it saves. None of them changes what is observed:
# each tensor is reduced as the float model computes it.
SKIPPED_OPTIMIZERS: tuple[tuple[str, str], ...] = (
    ("ConstantSharing", "merges initializers holding one equal value (changes no value); its time grows about "
                        "quadratically with the graph: 48 of 104 s of a 30k-node statistics session build"),
    ("MatMulAddFusion", "MatMul + Add -> Gemm: its time grows about quadratically with the graph (0.04 / 0.56 / "
                        "7.7 s at 3k / 10k / 30k nodes of a MatMul+Add+Relu chain, with GemmActivationFusion on the "
                        "Gemms it makes another 6.6 s); unfused, MatMul then Add rounds as the float model"),
)


def _statistics_session(model: ir.Model, stats: _StatisticsModel, device: str = "cpu") -> Session:
    """An onnxruntime session of ``model`` with the additions of ``stats``.

    The additions go into the model's protobuf (no copy of the IR graph); a model too big for
    one protobuf gets them on an IR clone instead, which the session saves with external data.
    """
    options: dict[str, Any] = {"follow_node_order": True, "device": device,
                               "skip_optimizers": [name for name, _ in SKIPPED_OPTIMIZERS]}
    if fits_in_proto(model):
        return Session(_with_additions_proto(ir.to_proto(model), stats), **options)
    return Session(_with_additions_ir(model.clone(), stats), **options)


def _with_additions_proto(proto: onnx.ModelProto, stats: _StatisticsModel) -> onnx.ModelProto:
    graph = proto.graph
    if stats.after or stats.tail:
        nodes: list[onnx.NodeProto] = []
        for position, node in enumerate(graph.node):
            nodes.append(node)
            nodes.extend(_node_proto(op) for op in stats.after.get(position, ()))
        nodes.extend(_node_proto(op) for op in stats.tail)
        del graph.node[:]
        graph.node.extend(nodes)
    new_outputs = set()
    for output in stats.outputs:
        if isinstance(output, ir.Value):
            graph.output.append(ir.serde.serialize_value(output))
            new_outputs.add(output.name)
        else:
            name, dtype, scalar = output
            graph.output.append(onnx.helper.make_tensor_value_info(name, int(dtype), [] if scalar else None))
    if new_outputs:  # graph outputs carry their type in the outputs, not in value_info
        kept = [info for info in graph.value_info if info.name not in new_outputs]
        del graph.value_info[:]
        graph.value_info.extend(kept)
    return proto


def _node_proto(op: _Op) -> onnx.NodeProto:
    """``onnx.helper.make_node`` for an :class:`_Op`, at half its cost."""
    node = onnx.NodeProto(op_type=op.op_type, input=op.inputs, output=[op.output], name=op.name)
    node.attribute.add(name=op.attribute[0], type=onnx.AttributeProto.INT, i=op.attribute[1])
    return node


def _with_additions_ir(model: ir.Model, stats: _StatisticsModel) -> ir.Model:
    graph = model.graph
    values = values_by_name(graph)
    nodes = list(graph)

    def build(ops: list[_Op]) -> list[ir.Node]:
        built = []
        for op in ops:
            node = ir.Node("", op.op_type, [values[name] for name in op.inputs],
                           attributes=[ir.AttrInt64(*op.attribute)], name=op.name, num_outputs=1)
            node.outputs[0].name = op.output
            values[op.output] = node.outputs[0]
            built.append(node)
        return built

    for position, ops in stats.after.items():
        graph.insert_after(nodes[position], build(ops))
    graph.extend(build(stats.tail))
    names = [name_of(o) if isinstance(o, ir.Value) else o[0] for o in stats.outputs]
    types = {o[0]: (o[1], ir.Shape([]) if o[2] else None) for o in stats.outputs if not isinstance(o, ir.Value)}
    return ExposeValuesPass(names, types)(model).model
