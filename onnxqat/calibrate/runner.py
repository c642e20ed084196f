"""Run calibration data through onnxruntime and stream activation statistics.

For min-max calibration the reductions run inside the graph (ReduceMin/ReduceMax per quantized
tensor, gathered into one output per dtype and rank), so each batch returns two numbers per
tensor. Histogram schemes fetch the tensors themselves; either way a batch's outputs are folded
into fixed-size observers and dropped, so memory does not grow with the number of batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from onnxqat.calibrate.observers import HistogramObserver, MinMaxObserver
from onnxqat.calibrate.schemes import Scheme
from onnxqat.data import count_batches, input_signature, validate_feed
from onnxqat.errors import DataError
from onnxqat.graph import NameScope, const_array, is_constant, values_by_name
from onnxqat.plan import QuantPlan
from onnxqat.runtime import Session

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
) -> dict[str, Observer]:
    """Observers of every activation quantizer of ``plan``, fed with ``batches``."""
    observers: dict[str, Observer] = {
        q.name: HistogramObserver() if scheme.needs_histogram else MinMaxObserver()
        for q in plan.activations
    }
    stats = _statistics_model(model, plan, scheme, observers)
    session = Session(stats.model, follow_node_order=True)
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
    for i, batch in enumerate(bar):
        feed = validate_feed(batch, signature, where=f"{source}: batch {i}")
        results = session.run(feed, fetch_names) if fetch_names else []
        for (_, targets), value in zip(stats.fetches, results):
            if isinstance(targets, str):
                observers[targets].update(value)
                continue
            bounds = value.reshape(-1)
            assert bounds.shape[0] == len(targets)
            for (quantizer, upper), bound in zip(targets, bounds):
                obs = observers[quantizer]
                assert isinstance(obs, MinMaxObserver)
                obs.update_bound(float(bound), upper=upper)
        for tensor, quantizer in stats.from_inputs:
            observers[quantizer].update(feed[tensor])
        seen += 1
    bar.close()
    if seen == 0:
        raise DataError(f"{source}: no batches")
    return observers


# Fan-in of the Concat trees that gather per-tensor bounds into a few outputs.
_FAN_IN = 16


@dataclasses.dataclass
class _StatisticsModel:
    """The model run on calibration data and how to read its outputs.

    Attributes:
        model: A clone of the float model with extra outputs.
        fetches: ``(output name, targets)``: targets is a quantizer name when the output is a
            whole tensor (histogram schemes), else the ``(quantizer, upper)`` bounds that the
            output holds in order (``upper`` False for a minimum, True for a maximum).
        from_inputs: ``(graph input, quantizer)`` read straight from the feed.
    """

    model: ir.Model
    fetches: list[tuple[str, str | list[tuple[str, bool]]]]
    from_inputs: list[tuple[str, str]]


class _BoundGatherer:
    """Gathers ``[1, ..., 1]`` bound tensors of one dtype and rank into one output.

    Bounds are concatenated by trees of ``_FAN_IN``-input Concat nodes, each emitted as soon as
    its inputs exist, so onnxruntime keeps few small tensors alive and sees few graph outputs
    (a graph output or a long-lived tensor per quantized tensor makes session creation and runs
    grow quadratically with the model). The output lists the bounds in the order they were added.
    """

    def __init__(self, names: NameScope, base: str) -> None:
        self.names = names
        self.base = base
        self.levels: list[list[ir.Value]] = []
        self.targets: list[tuple[str, bool]] = []

    def add(self, value: ir.Value, target: tuple[str, bool], emitted: list[ir.Node]) -> None:
        self.targets.append(target)
        self._push(value, 0, emitted)

    def _push(self, value: ir.Value, level: int, emitted: list[ir.Node]) -> None:
        if level == len(self.levels):
            self.levels.append([])
        pending = self.levels[level]
        pending.append(value)
        if len(pending) == _FAN_IN:
            self.levels[level] = []
            self._push(self._concat(pending, emitted), level + 1, emitted)

    def _concat(self, inputs: list[ir.Value], emitted: list[ir.Node]) -> ir.Value:
        node = ir.Node("", "Concat", inputs, attributes=[ir.AttrInt64("axis", 0)],
                       name=self.names.fresh(f"{self.base}_Concat"), num_outputs=1)
        node.outputs[0].name = self.names.fresh(self.base)
        node.outputs[0].dtype = inputs[0].dtype
        emitted.append(node)
        return node.outputs[0]

    def finish(self, emitted: list[ir.Node]) -> ir.Value:
        """The output holding every bound (higher levels hold the earlier bounds)."""
        rest = [v for level in reversed(self.levels) for v in level]
        return rest[0] if len(rest) == 1 else self._concat(rest, emitted)


def _statistics_model(
    model: ir.Model, plan: QuantPlan, scheme: Scheme, observers: dict[str, Observer]
) -> _StatisticsModel:
    """Clone ``model`` with outputs exposing what each observer needs.

    Histogram schemes fetch each quantized tensor. Min-max reduces each tensor in the graph with
    ReduceMin/ReduceMax, placed right after the tensor's producer, and gathers the bounds of
    tensors of one dtype and rank into one output (tensors of unknown or zero rank each get
    their own scalar outputs). Constants are observed here, graph inputs from the feed.
    """
    stats = model.clone()
    graph = stats.graph
    names = NameScope(stats)
    values = values_by_name(graph)
    existing_outputs = {v.name for v in graph.outputs}
    fetches: list[tuple[str, str | list[tuple[str, bool]]]] = []
    from_inputs: list[tuple[str, str]] = []
    reduced: dict[int, list[tuple[ir.Value, str]]] = {}  # id(producer) -> (tensor, quantizer)
    for q in plan.activations:
        for tensor in q.tensors:
            value = values[tensor]
            if is_constant(value):
                observers[q.name].update(const_array(value))  # type: ignore[arg-type]
            elif value.is_graph_input():
                from_inputs.append((tensor, q.name))
            elif scheme.needs_histogram:
                if tensor not in existing_outputs:
                    graph.outputs.append(value)
                    existing_outputs.add(tensor)
                fetches.append((tensor, q.name))
            else:
                producer = value.producer()
                assert producer is not None
                reduced.setdefault(id(producer), []).append((value, q.name))
    if not reduced:
        return _StatisticsModel(stats, fetches, from_inputs)

    gatherers: dict[tuple[ir.DataType | None, int], _BoundGatherer] = {}
    for node in list(graph):
        pending = reduced.get(id(node))
        if pending is None:
            continue
        emitted: list[ir.Node] = []
        for value, quantizer in pending:
            rank = len(value.shape) if value.shape is not None else 0
            for op, upper in (("ReduceMin", False), ("ReduceMax", True)):
                kind = "max" if upper else "min"
                reduce = ir.Node(
                    "", op, [value], attributes=[ir.AttrInt64("keepdims", 1 if rank else 0)],
                    name=names.fresh(f"{value.name}_{op}"), num_outputs=1,
                )
                out = reduce.outputs[0]
                out.name = names.fresh(f"{value.name}_{kind}")
                out.dtype = value.dtype
                emitted.append(reduce)
                if rank:
                    key = (value.dtype, rank)
                    if key not in gatherers:
                        gatherers[key] = _BoundGatherer(names, f"calibration_bounds_{len(gatherers)}")
                    gatherers[key].add(out, (quantizer, upper), emitted)
                else:
                    out.shape = ir.Shape([])
                    graph.outputs.append(out)
                    fetches.append((out.name, [(quantizer, upper)]))  # type: ignore[list-item]
        graph.insert_after(node, emitted)
    for gatherer in gatherers.values():
        emitted = []
        out = gatherer.finish(emitted)
        graph.extend(emitted)
        graph.outputs.append(out)
        fetches.append((out.name, gatherer.targets))  # type: ignore[arg-type]
    return _StatisticsModel(stats, fetches, from_inputs)
