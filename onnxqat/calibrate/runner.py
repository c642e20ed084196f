"""Run calibration data through onnxruntime and stream activation statistics.

For min-max calibration the reductions run inside the graph (ReduceMin/ReduceMax per quantized
tensor), so each batch returns two scalars per tensor. Histogram schemes fetch the tensors
themselves; either way a batch's outputs are folded into fixed-size observers and dropped, so
memory does not grow with the number of batches.
"""

from __future__ import annotations

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
    stats_model, fetches, from_inputs = _statistics_model(model, plan, scheme, observers)
    session = Session(stats_model)
    signature = input_signature(model)
    fetch_names = [name for name, _, _ in fetches]
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
        for (_, quantizer, kind), value in zip(fetches, results):
            obs = observers[quantizer]
            if kind == "tensor":
                obs.update(value)
            else:
                assert isinstance(obs, MinMaxObserver)
                obs.update_bound(float(value), upper=kind == "max")
        for tensor, quantizer in from_inputs:
            observers[quantizer].update(feed[tensor])
        seen += 1
    bar.close()
    if seen == 0:
        raise DataError(f"{source}: no batches")
    return observers


def _statistics_model(
    model: ir.Model, plan: QuantPlan, scheme: Scheme, observers: dict[str, Observer]
) -> tuple[ir.Model, list[tuple[str, str, str]], list[tuple[str, str]]]:
    """Clone ``model`` with outputs exposing what each observer needs.

    Returns the model, the fetches ``(output name, quantizer, kind)`` with kind ``min``, ``max``
    or ``tensor``, and the quantized graph inputs read straight from the feed.
    """
    stats = model.clone()
    graph = stats.graph
    names = NameScope(stats)
    values = values_by_name(graph)
    existing_outputs = {v.name for v in graph.outputs}
    fetches: list[tuple[str, str, str]] = []
    from_inputs: list[tuple[str, str]] = []
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
                fetches.append((tensor, q.name, "tensor"))
            else:
                for op, kind in (("ReduceMin", "min"), ("ReduceMax", "max")):
                    node = ir.Node(
                        "", op, [value], attributes=[ir.AttrInt64("keepdims", 0)],
                        name=names.fresh(f"{tensor}_{op}"), num_outputs=1,
                    )
                    out = node.outputs[0]
                    out.name = names.fresh(f"{tensor}_{kind}")
                    out.dtype = value.dtype
                    out.shape = ir.Shape([])
                    graph.append(node)
                    graph.outputs.append(out)
                    fetches.append((out.name, q.name, kind))
    return stats, fetches, from_inputs
