"""Quantization analysis: where the error comes from and which layers hurt most.

* Per-quantizer SQNR at every quantized tensor: *local* (the quantizer alone applied to the float
  model's tensor: how well its encoding fits the data) and *cumulative* (the simulation's tensor
  against the float model's: the error that has built up by that point).
* Per-layer sensitivity: the metric (accuracy on labelled data, or output SQNR against the float
  model) with only that layer's quantizers enabled, and with all quantizers but that layer's. A
  layer is a node with its weight, int32 bias and output quantizers.
* Activation histograms with the chosen encoding ranges.
* A mixed-precision config that keeps the most sensitive layers at 16 bits.

Everything here is plain data (dicts and lists); :mod:`onnxqat.report` renders it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from onnxqat import distributed
from onnxqat.calibrate.observers import HistogramObserver
from onnxqat.calibrate.runner import collect_statistics
from onnxqat.calibrate.schemes import Scheme
from onnxqat.data import input_signature, validate_feed
from onnxqat.evaluate import accuracy
from onnxqat.graph import values_by_name
from onnxqat.passes.insert_qdq import InsertQDQPass
from onnxqat.plan import QuantPlan
from onnxqat.qparams import fake_quantize
from onnxqat.runtime import Session
from onnxqat.sim import QuantizationSimModel

__all__ = ["Layer", "analyze", "histograms", "layers", "mixed_precision_config", "quantizer_sqnr", "sensitivity"]

Batches = Iterable[Mapping[str, np.ndarray]]


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (capped at 120 for exact matches)."""
    signal = float(np.mean(np.square(reference, dtype=np.float64)))
    noise = float(np.mean(np.square(reference.astype(np.float64) - test.astype(np.float64))))
    if noise <= signal * 1e-12:
        return 120.0
    return 10.0 * np.log10(max(signal, 1e-30) / noise)


@dataclasses.dataclass(frozen=True)
class Layer:
    """The quantizers that belong to one node: its weight, int32 bias and output quantizers."""

    node: str
    op_type: str
    params: tuple[str, ...]
    biases: tuple[str, ...]
    activations: tuple[str, ...]

    @property
    def quantizers(self) -> tuple[str, ...]:
        return self.params + self.biases + self.activations


def layers(sim: QuantizationSimModel) -> list[Layer]:
    """Group the plan's quantizers by node, in graph order."""
    plan = sim.plan
    graph = sim.float_model.graph
    producer = {v.name: n for n in graph for v in n.outputs}
    order = {n.name: i for i, n in enumerate(graph)}
    groups: dict[str, dict[str, list[str]]] = {}
    op_types: dict[str, str] = {}

    def group(node: str, op_type: str) -> dict[str, list[str]]:
        op_types[node] = op_type
        return groups.setdefault(node, {"params": [], "biases": [], "activations": []})

    for p in plan.params:
        node = p.consumers[0]
        group(node, next(n.op_type for n in graph if n.name == node))["params"].append(p.name)
    for b in plan.biases:
        node = next(n for n in graph if n.name == b.node)
        group(node.name, node.op_type)["biases"].append(b.name)
    for q in plan.activations:
        node = producer.get(q.name)
        if node is None:
            group(f"input:{q.name}", "input")["activations"].append(q.name)
        else:
            group(node.name, node.op_type)["activations"].append(q.name)  # type: ignore[arg-type]
    ordered = sorted(groups, key=lambda n: order.get(n, -1))
    return [Layer(n, op_types[n], tuple(groups[n]["params"]), tuple(groups[n]["biases"]),
                  tuple(groups[n]["activations"])) for n in ordered]


def _subset_plan(plan: QuantPlan, enabled: set[str]) -> QuantPlan:
    activations = tuple(q for q in plan.activations if q.name in enabled)
    params = tuple(p for p in plan.params if p.name in enabled)
    active = {q.name for q in activations} | {p.name for p in params}
    biases = tuple(b for b in plan.biases if b.name in enabled
                   and b.input_quantizer in active and b.weight_quantizer in active)
    return dataclasses.replace(plan, activations=activations, params=params, biases=biases)


def _tensors(model: ir.Model, names: Sequence[str], batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Values of ``names`` (graph inputs, node outputs) for one batch, in float semantics."""
    probe = model.clone()
    values = {n: v for n, v in values_by_name(probe.graph).items() if v.producer() is not None}
    existing = {v.name for v in probe.graph.outputs}
    fetch = [n for n in names if n in values]
    for n in fetch:
        if n not in existing:
            probe.graph.outputs.append(values[n])
            existing.add(n)
    out = dict(zip(fetch, Session(probe, optimize=False).run(batch, fetch))) if fetch else {}
    out.update({n: batch[n] for n in names if n in batch})
    return out


def quantizer_sqnr(sim: QuantizationSimModel, batch: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Local and cumulative SQNR of every quantized activation tensor, in graph order."""
    feed = validate_feed(batch, input_signature(sim.float_model), where="analysis data")
    plan = sim.effective_plan
    tensors = [t for q in plan.activations for t in q.tensors]
    floats = _tensors(sim.float_model, tensors, feed)
    insert = InsertQDQPass(plan, sim.encodings, fold_weights=False)
    quantized_model = insert(sim.float_model).model
    sites = insert.sites
    quantized = _tensors(quantized_model, [sites[t] for t in tensors if t in sites], feed)
    order = {v.name: i for i, n in enumerate(sim.float_model.graph) for v in n.outputs}
    rows = []
    for q in plan.activations:
        enc = sim.encodings[q.name]
        for t in q.tensors:
            if t not in floats or t not in sites:
                continue
            ref = floats[t]
            rows.append({
                "tensor": t,
                "quantizer": q.name,
                "bitwidth": enc.bitwidth,
                "local_sqnr_db": sqnr_db(ref, fake_quantize(ref, enc)),
                "cumulative_sqnr_db": sqnr_db(ref, quantized[sites[t]]),
                "range": [float(ref.min()), float(ref.max())],
                "encoding": [float(enc.min), float(enc.max)],
            })
    rows.sort(key=lambda r: order.get(r["tensor"], -1))
    return rows


Metric = Callable[[Callable[[Mapping[str, np.ndarray]], Sequence[np.ndarray]]], float]


def output_sqnr_metric(sim: QuantizationSimModel, batches: Sequence[Mapping[str, np.ndarray]]) -> Metric:
    """Metric without labels: SQNR of the first output against the float model (dB)."""
    signature = input_signature(sim.float_model)
    feeds = [validate_feed(b, signature, where="analysis data") for b in batches]
    reference = Session(sim.float_model, optimize=False)
    expected = [reference.run(f)[0] for f in feeds]

    def metric(run: Callable[[Mapping[str, np.ndarray]], Sequence[np.ndarray]]) -> float:
        got = np.concatenate([np.asarray(run(f)[0]).ravel() for f in feeds])
        return sqnr_db(np.concatenate([e.ravel() for e in expected]), got)

    return metric


def accuracy_metric(sim: QuantizationSimModel, batches: Sequence[Mapping[str, np.ndarray]],
                    label_key: str = "label", output_index: int = 0) -> Metric:
    """Metric with labels: top-1 accuracy."""
    signature = input_signature(sim.float_model)

    def metric(run: Callable[[Mapping[str, np.ndarray]], Sequence[np.ndarray]]) -> float:
        def checked(batch: Mapping[str, np.ndarray]) -> Sequence[np.ndarray]:
            return run(validate_feed(batch, signature, where="evaluation data"))

        return accuracy(checked, batches, label_key=label_key, output_index=output_index, progress=False)[0]

    return metric


def sensitivity(sim: QuantizationSimModel, metric: Metric, *, progress: bool | None = None) -> dict[str, Any]:
    """The metric for float, fully quantized, and each layer alone / each layer left float."""
    plan = sim.effective_plan
    every = set(plan.quantizer_names())

    def score(enabled: set[str]) -> float:
        model = InsertQDQPass(_subset_plan(plan, enabled), sim.encodings, fold_weights=False)(sim.float_model).model
        return metric(Session(model).run)

    def layer_row(layer: Layer) -> dict[str, Any]:
        mine = set(layer.quantizers)
        return {"node": layer.node, "op_type": layer.op_type, "quantizers": list(layer.quantizers),
                "only_this_quantized": score(mine), "all_but_this_quantized": score(every - mine)}

    def bar(units: Iterable[Layer]) -> Iterable[Layer]:
        shown = progress if distributed.is_root() else False
        return tqdm(units, desc="sensitivity", unit="layer", disable=None if shown is None else not shown)

    result: dict[str, Any] = {"float": metric(Session(sim.float_model).run), "quantized": score(every)}
    result["layers"] = distributed.map_split(layer_row, layers(sim), bar)  # under MPI: layers split across ranks
    for row in result["layers"]:
        row["gain_if_float"] = row["all_but_this_quantized"] - result["quantized"]
    result["ranking"] = [r["node"] for r in sorted(result["layers"], key=lambda r: -r["gain_if_float"])]
    return result


def histograms(sim: QuantizationSimModel, batches: Batches, bins: int = 128) -> list[dict[str, Any]]:
    """Histogram (``bins`` bins) of every activation quantizer's data, with its encoding range."""
    observers = collect_statistics(sim.float_model, sim.plan, batches, Scheme.PERCENTILE, progress=False)
    rows = []
    for q in sim.plan.activations:
        obs = observers[q.name]
        if not isinstance(obs, HistogramObserver) or obs.empty:
            continue
        factor = obs.bins // bins
        counts = obs.counts.reshape(bins, factor).sum(axis=1) if factor >= 1 and obs.bins % bins == 0 else obs.counts
        width = obs.width * (obs.bins / len(counts))
        enc = sim.encodings[q.name]
        rows.append({"quantizer": q.name, "lo": float(obs.lo), "width": float(width), "counts": counts.tolist(),
                     "min": obs.min, "max": obs.max, "encoding": [float(enc.min), float(enc.max)],
                     "bitwidth": enc.bitwidth})
    return rows


def mixed_precision_config(sim: QuantizationSimModel, ranking: Sequence[str], keep: int,
                           bits: int = 16) -> dict[str, Any]:
    """The sim's config with the ``keep`` most sensitive layers at ``bits`` (JSON-ready)."""
    doc = sim.config.to_dict()
    nodes = dict(doc.get("nodes", {}))
    for node in [n for n in ranking if not n.startswith("input:")][:keep]:
        nodes[node] = {**nodes.get(node, {}), "activation_bw": bits, "param_bw": bits}
    doc["nodes"] = nodes
    return doc


def analyze(sim: QuantizationSimModel, calib: Sequence[Mapping[str, np.ndarray]],
            evaluation: Sequence[Mapping[str, Any]] | None = None, *, label_key: str = "label",
            output_index: int = 0, keep: int = 3, progress: bool | None = None) -> dict[str, Any]:
    """Everything above for a calibrated sim; ``evaluation`` (with labels) switches the
    sensitivity metric from output SQNR to accuracy."""
    if evaluation is not None:
        metric = accuracy_metric(sim, evaluation, label_key, output_index)
        metric_name = "accuracy"
    else:
        metric = output_sqnr_metric(sim, calib)
        metric_name = "output SQNR (dB) vs float"
    sens = sensitivity(sim, metric, progress=progress)
    return {
        "settings": {"param_bw": sim.param_bw, "activation_bw": sim.activation_bw,
                     "scheme": sim.quant_scheme.value, "per_channel": sim.config.per_channel_quantization,
                     "metric": metric_name},
        "plan": sim.report(),
        "quantizer_sqnr": quantizer_sqnr(sim, calib[0]),
        "sensitivity": sens,
        "histograms": histograms(sim, calib),
        "mixed_precision": mixed_precision_config(sim, sens["ranking"], keep),
    }
