"""Quantization analysis: where the error comes from and which layers hurt most.

* Per-quantizer SQNR at every quantized tensor: *local* (the quantizer alone applied to the float
  model's tensor: how well its encoding fits the data) and *cumulative* (the simulation's tensor
  against the float model's: the error that has built up by that point).
* Per-layer sensitivity with :class:`onnxqat.switch.Switchable` (the model cut into segments,
  sessions per segment and setting, the float model's values at every cut kept, so a layer
  quantized alone re-runs only the model from its segment on): the metric with only that layer
  quantized, for every layer, once; layers are visited worst local SQNR first, and with ``top_k``
  the scan stops once ``patience`` layers in a row do not enter the top ``k``. The top ``k`` are
  also scored with every quantizer but theirs (the gain if left float).
* The metric: accuracy on labelled data, a task score from a user hook, or, without either, the
  output SQNR against the float model averaged over output channels (axis 1), so an output
  that concatenates large box coordinates and small class scores cannot hide a wrecked score
  channel. Every score also carries per-output numbers: SQNR and top-1 agreement with float.
* Activation histograms with the chosen encoding ranges.
* Suggestions with their measured cost (:func:`suggestions`): each variant is built, calibrated
  and evaluated with its own simulation, and optionally timed in plain onnxruntime.

Layers are named by tensor (their output quantizer's tensor, else their weight), as in the SQNR
tables; the node is given beside it. Everything here is plain data (dicts and lists);
:mod:`onnxqat.report` renders it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxqat import distributed
from onnxqat.calibrate.observers import HistogramObserver
from onnxqat.calibrate.runner import collect_statistics
from onnxqat.calibrate.schemes import Scheme
from onnxqat.data import input_signature, validate_feed
from onnxqat.evaluate import check_labels, sqnr_db
from onnxqat.errors import ConfigError, DataError, ModelError
from onnxqat.graph import const_array, name_of
from onnxqat.passes.expose import ExposeValuesPass
from onnxqat.passes.insert_qdq import InsertQDQPass, InsertQDQResult
from onnxqat.progress import Progress
from onnxqat.qparams import Encoding, fake_quantize
from onnxqat.runtime import Session
from onnxqat.sim import QuantizationSimModel
from onnxqat.switch import Switchable

__all__ = ["Evaluator", "Layer", "Score", "Switchable", "analyze", "histograms", "layers", "mixed_precision_config",
           "quantizer_sqnr", "score_units", "sensitivity", "suggestions", "variant_of"]

Batches = Iterable[Mapping[str, np.ndarray]]
Outputs = Sequence[np.ndarray]
TaskMetric = Callable[[Outputs, Outputs], float]
"""A user's task score: ``task(outputs, float_outputs) -> float`` (higher is better), each a list of
the model's outputs concatenated over the evaluation batches."""

_CHANNEL_DB_FLOOR = -10.0


def channel_sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean over axis-1 channels of each channel's SQNR (dB, floored at -10): every channel
    counts alike, however small its values."""
    if reference.ndim < 2 or reference.shape[1] < 2:
        return sqnr_db(reference, test)
    ref = np.moveaxis(reference.astype(np.float64), 1, 0).reshape(reference.shape[1], -1)
    got = np.moveaxis(test.astype(np.float64), 1, 0).reshape(reference.shape[1], -1)
    signal = np.mean(ref * ref, axis=1)
    noise = np.mean((ref - got) ** 2, axis=1)
    db = np.where(noise <= signal * 1e-12, 120.0, 10.0 * np.log10(np.maximum(signal, 1e-30) / np.maximum(noise, 1e-300)))
    return float(np.mean(np.clip(db, _CHANNEL_DB_FLOOR, 120.0)))


def top1_agreement(reference: np.ndarray, test: np.ndarray) -> float | None:
    """Share of positions whose argmax over the last axis agrees (None: fewer than 2 entries there)."""
    if reference.ndim < 1 or reference.shape[-1] < 2:
        return None
    return float(np.mean(reference.argmax(-1) == test.argmax(-1)))


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

    @property
    def name(self) -> str:
        """The layer's tensor: its output quantizer's tensor, else its weight (as in the tables)."""
        return (self.activations or self.params or self.biases or (self.node,))[0]


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
        owner = next(n for n in graph if n.name == b.node)
        group(name_of(owner), owner.op_type)["biases"].append(b.name)
    for q in plan.activations:
        made_by = producer.get(q.name)
        if made_by is None:
            group(f"input:{q.name}", "input")["activations"].append(q.name)
        else:
            group(name_of(made_by), made_by.op_type)["activations"].append(q.name)
    ordered = sorted(groups, key=lambda n: order.get(n, -1))
    return [Layer(n, op_types[n], tuple(groups[n]["params"]), tuple(groups[n]["biases"]),
                  tuple(groups[n]["activations"])) for n in ordered]


def _exposing(model: ir.Model, names: Sequence[str]) -> tuple[Session | None, list[str]]:
    """A plain float-semantics session of ``model`` returning the node outputs among ``names``."""
    produced = {v.name for n in model.graph for v in n.outputs if v.name}
    fetch = list(dict.fromkeys(n for n in names if n in produced))
    if not fetch:
        return None, []
    return Session(ExposeValuesPass(fetch)(model.clone()).model, optimize=False), fetch


def _tensors(model: ir.Model, names: Sequence[str], batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Values of ``names`` (graph inputs, node outputs) for one batch, in float semantics."""
    session, fetch = _exposing(model, names)
    out: dict[str, np.ndarray] = dict(zip(fetch, session.run(batch, fetch))) if session is not None else {}
    out.update({n: batch[n] for n in names if n in batch})
    return out


SQNR_SAMPLES = 8
"""Samples of the batch :func:`quantizer_sqnr` reads."""
SQNR_CHUNK_BYTES = 512 << 20
"""Bound of the tensors :func:`quantizer_sqnr` holds at once (float and quantized)."""


def _db(signal: float, noise: float) -> float:
    """:func:`~onnxqat.evaluate.sqnr_db` from the mean squares of signal and noise."""
    if noise <= signal * 1e-12:
        return 120.0
    return float(10.0 * np.log10(max(signal, 1e-30) / noise))


def quantizer_sqnr(sim: QuantizationSimModel, batch: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Local and cumulative SQNR of every quantized activation tensor, in graph order, on the
    first :data:`SQNR_SAMPLES` samples of ``batch``.

    The tensors are fetched in chunks of at most :data:`SQNR_CHUNK_BYTES` per sample (sizes from
    a one-sample run), each chunk by one float and one quantized session built once, which run
    as many samples at a time as fit that bound (one at a time on a large model; the whole batch
    for a model of fixed batch size), the sums of squares accumulated."""
    feed = validate_feed(batch, input_signature(sim.float_model), where="analysis data")
    feed = {k: v[:SQNR_SAMPLES] if np.ndim(v) >= 1 else v for k, v in feed.items()}
    rows_in_feed = max((len(v) for v in feed.values() if np.ndim(v) >= 1), default=1)
    plan = sim.effective_plan
    tensors = list(dict.fromkeys(t for q in plan.activations for t in q.tensors))
    inserted = InsertQDQPass(plan, sim.encodings, fold_weights=False)(sim.float_model)
    assert isinstance(inserted, InsertQDQResult)
    sites = inserted.sites
    quantized_model = inserted.model
    one = {k: v[:1] if np.ndim(v) >= 1 else v for k, v in feed.items()}
    fixed_batch = False
    try:
        sizes = {t: a.nbytes for t, a in _tensors(sim.float_model, tensors, one).items()}
    except Exception:  # noqa: BLE001 - a fixed batch size: the whole batch at once, one chunk
        sizes, fixed_batch = {}, True
    chunks: list[list[str]] = [[]]
    held = 0.0
    for t in tensors:
        size = 2.0 * sizes.get(t, 0)
        if chunks[-1] and held + size > SQNR_CHUNK_BYTES:
            chunks.append([])
            held = 0.0
        chunks[-1].append(t)
        held += size
    order = {name_of(v): i for i, n in enumerate(sim.float_model.graph) for v in n.outputs}
    quantizer_of = {t: q for q in plan.activations for t in q.tensors}
    # per tensor: [signal, local noise, cumulative noise, min, max, elements] (sums of squares)
    sums: dict[str, list[float]] = {}
    has_site: dict[str, bool] = {}
    for chunk in chunks:
        wanted = [t for t in chunk if t in sites]
        float_session, float_names = _exposing(sim.float_model, wanted)
        quant_session, quant_names = _exposing(quantized_model, [sites[t] for t in wanted])
        per_sample = sum(2.0 * sizes.get(t, 0) for t in wanted)
        step = rows_in_feed if fixed_batch else max(1, min(rows_in_feed, int(SQNR_CHUNK_BYTES // max(per_sample, 1.0))))
        samples = [feed] if step >= rows_in_feed else [
            {k: v[i:i + step] if np.ndim(v) >= 1 else v for k, v in feed.items()} for i in range(0, rows_in_feed, step)]
        for sample in samples:
            floats = dict(zip(float_names, float_session.run(sample, float_names))) if float_session else {}
            floats.update({t: sample[t] for t in wanted if t in sample})
            quantized = dict(zip(quant_names, quant_session.run(sample, quant_names))) if quant_session else {}
            quantized.update({n: sample[n] for n in (sites[t] for t in wanted) if n in sample})
            for t in wanted:
                if t not in floats:
                    continue
                ref = np.asarray(floats[t])
                ref64 = ref.astype(np.float64)
                acc = sums.setdefault(t, [0.0, 0.0, 0.0, float("inf"), float("-inf"), 0.0])
                acc[5] += ref.size
                acc[0] += float(np.sum(np.square(ref64)))
                acc[1] += float(np.sum(np.square(ref64 - fake_quantize(ref, sim.encodings[quantizer_of[t].name])
                                                 .astype(np.float64))))
                # None where the tensor's own DequantizeLinear is gone (every consumer reads a derived scale)
                has_site[t] = sites[t] in quantized
                if has_site[t]:
                    acc[2] += float(np.sum(np.square(ref64 - np.asarray(quantized[sites[t]]).astype(np.float64))))
                if ref.size:
                    acc[3] = min(acc[3], float(ref.min()))
                    acc[4] = max(acc[4], float(ref.max()))
            del floats, quantized
        del float_session, quant_session
    rows: list[dict[str, Any]] = []
    for t, acc in sums.items():
        q = quantizer_of[t]
        enc = sim.encodings[q.name]
        rows.append({
            "tensor": t,
            "quantizer": q.name,
            "bitwidth": enc.bitwidth,
            "local_sqnr_db": _db(acc[0] / max(acc[5], 1.0), acc[1] / max(acc[5], 1.0)),
            "cumulative_sqnr_db": _db(acc[0] / max(acc[5], 1.0), acc[2] / max(acc[5], 1.0)) if has_site[t] else None,
            "range": [acc[3], acc[4]],
            "encoding": [float(enc.min), float(enc.max)],
        })
    rows.sort(key=lambda r: order.get(r["tensor"], -1))
    return rows


# -- scoring ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Score:
    """One configuration's numbers: ``value`` (the metric, higher is better) and, per output,
    ``sqnr_db``, ``channel_sqnr_db`` and ``top1_agreement`` against the float model."""

    value: float
    outputs: Mapping[str, Mapping[str, float | None]]

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "outputs": {k: dict(v) for k, v in self.outputs.items()}}


class Evaluator:
    """Scores runs of one model on fixed batches against the float model's outputs.

    The metric (``kind``): ``accuracy`` (top-1 of output ``output_index`` against
    ``batches[label_key]``) when labels are given, ``task`` when a :data:`TaskMetric` hook is,
    else ``sqnr`` (:func:`channel_sqnr_db` averaged over the float outputs).
    """

    def __init__(self, float_model: ir.Model, batches: Sequence[Mapping[str, Any]], *, labels: bool = False,
                 label_key: str = "label", output_index: int = 0, task: TaskMetric | None = None,
                 task_name: str = "task") -> None:
        if not batches:
            raise DataError("analysis data: no batches")
        signature = input_signature(float_model)
        self.feeds = [validate_feed(b, signature, where=f"analysis data: batch {i}") for i, b in enumerate(batches)]
        self.output_names = [v.name or "" for v in float_model.graph.outputs]
        if not -len(self.output_names) <= output_index < len(self.output_names):
            raise DataError(f"output index {output_index} is out of range: the model has "
                            f"{len(self.output_names)} output(s)")
        self.output_index = output_index
        self.task = task
        reference = Session(float_model)
        per_batch = [reference.run(f) for f in self.feeds]
        self.reference = self._concat(per_batch)
        self.labels: np.ndarray | None = None
        if labels:
            rows = []
            for i, (batch, outs) in enumerate(zip(batches, per_batch)):
                scores = np.asarray(outs[output_index])
                if scores.ndim < 1 or scores.shape[-1] < 2 or scores.dtype.kind != "f":
                    raise DataError(f"output {output_index} has shape {list(scores.shape)}: not a tensor of class scores")
                rows.append(check_labels(batch, label_key, scores.shape[0] if scores.ndim > 1 else 1,
                                         f"evaluation data: batch {i}"))
            self.labels = np.concatenate(rows)
        self.kind = "accuracy" if labels else ("task" if task is not None else "sqnr")
        self.name = {"accuracy": "accuracy", "task": task_name,
                     "sqnr": "output SQNR (dB, mean over channels) vs float"}[self.kind]
        self.runs = 0
        self._sums: list[tuple[np.ndarray, float, np.ndarray | None, np.ndarray | None] | None] | None = None

    @staticmethod
    def _concat(per_batch: list[list[np.ndarray]]) -> list[np.ndarray]:
        outs = []
        for k in range(len(per_batch[0])):
            parts = [np.asarray(b[k]) for b in per_batch]
            outs.append(np.concatenate(parts) if parts[0].ndim >= 1 and len(parts) > 1 else parts[0])
        return outs

    def outputs(self, run: Callable[[Mapping[str, np.ndarray]], Outputs]) -> list[np.ndarray]:
        self.runs += 1
        return self._concat([list(run(f)) for f in self.feeds])

    def score(self, run: Callable[[Mapping[str, np.ndarray]], Outputs]) -> Score:
        """Run every batch through ``run`` and score the outputs."""
        return self.score_outputs(self.outputs(run))

    def _reference_sums(self) -> list[tuple[np.ndarray, float, np.ndarray | None, np.ndarray | None] | None]:
        """Per float output: the reference in float64, its mean square, per axis-1 channel
        (None for fewer than 2 channels) and its argmax over the last axis (None: under 2 entries)."""
        if self._sums is None:
            self._sums = []
            for ref in self.reference:
                if ref.dtype.kind != "f":
                    self._sums.append(None)
                    continue
                ref64 = ref.astype(np.float64)
                channels = (np.mean(np.square(ref64).reshape(ref.shape[0], ref.shape[1], -1), axis=(0, 2))
                            if ref.ndim >= 2 and ref.shape[1] >= 2 else None)
                top = ref.argmax(-1) if ref.ndim >= 1 and ref.shape[-1] >= 2 else None
                self._sums.append((ref64, float(np.mean(np.square(ref64))), channels, top))
        return self._sums

    def score_outputs(self, got: Sequence[np.ndarray]) -> Score:
        """Score outputs against the reference: the same numbers as :func:`sqnr_db`,
        :func:`channel_sqnr_db` and :func:`top1_agreement`, from one difference per output and
        the reference's sums computed once."""
        per: dict[str, dict[str, float | None]] = {}
        channel: list[float] = []
        for name, ref, out, sums in zip(self.output_names, self.reference, got, self._reference_sums()):
            if sums is None:
                continue
            ref64, signal, channel_signal, top = sums
            square = np.square(ref64 - np.asarray(out).astype(np.float64))
            noise = float(np.mean(square))
            whole = _db(signal, noise)
            if channel_signal is None:
                channel_db = whole
            else:
                channel_noise = np.mean(square.reshape(ref.shape[0], ref.shape[1], -1), axis=(0, 2))
                db = np.where(channel_noise <= channel_signal * 1e-12, 120.0,
                              10.0 * np.log10(np.maximum(channel_signal, 1e-30) / np.maximum(channel_noise, 1e-300)))
                channel_db = float(np.mean(np.clip(db, _CHANNEL_DB_FLOOR, 120.0)))
            agree = None if top is None else float(np.mean(top == np.asarray(out).argmax(-1)))
            row: dict[str, float | None] = {"sqnr_db": whole, "channel_sqnr_db": channel_db, "top1_agreement": agree}
            per[name] = row
            channel.append(channel_db)
        if self.kind == "accuracy":
            scores = np.asarray(got[self.output_index])
            assert self.labels is not None
            n = len(self.labels)
            value = float(np.mean(scores.reshape(n, -1).argmax(-1) == self.labels))
        elif self.kind == "task":
            assert self.task is not None
            value = float(self.task(list(got), self.reference))
        else:
            value = float(np.mean(channel)) if channel else 120.0
        return Score(value, per)

    def main_sqnr(self, score: Score) -> float:
        """SQNR of output ``output_index`` (what ``target_sqnr`` bounds)."""
        row = score.outputs.get(self.output_names[self.output_index])
        return float(row["sqnr_db"]) if row is not None and row["sqnr_db"] is not None else 120.0


# -- sensitivity -----------------------------------------------------------------------------------


def bit_choices(sim: QuantizationSimModel) -> dict[str, dict[int, Encoding]]:
    """``{quantizer: {its bitwidth: its encoding}}`` of a calibrated sim (as simulated)."""
    plan = sim.effective_plan
    names = [q.name for q in plan.activations] + [p.name for p in plan.params]
    return {n: {sim.encodings[n].bitwidth: sim.encodings[n]} for n in names if n in sim.encodings}


def local_sqnr(sim: QuantizationSimModel, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Local SQNR per quantizer: activations from :func:`quantizer_sqnr` rows (worst tensor),
    weights from their own encoding on the float weight."""
    out: dict[str, float] = {}
    for r in rows:
        out[r["quantizer"]] = min(out.get(r["quantizer"], 120.0), r["local_sqnr_db"])
    for name, value in sim.float_model.graph.initializers.items():
        if name in sim.encodings and sim.plan.param(name) is not None:
            w = const_array(value)
            if w is not None:
                out[name] = sqnr_db(w, fake_quantize(w, sim.encodings[name]))
    return out


def score_units(evaluator: Evaluator, switch: Switchable, units: Sequence[Sequence[str]],
                bits: Mapping[str, int], *, alone: bool = True) -> list[Score]:
    """The score of each unit (a list of quantizer names): ``alone`` - only its quantizers at
    ``bits``, the rest float; else every quantizer at ``bits`` but the unit's (float).

    A plain function over a list, so the units can be split between processes."""
    scores = []
    for unit in units:
        mine = set(unit)
        setting = {q: b for q, b in bits.items() if (q in mine) == alone}
        vec = switch.vector(setting)
        def run(feed: Mapping[str, np.ndarray], vec: np.ndarray = vec) -> list[np.ndarray]:
            return switch.run(feed, vec)

        scores.append(evaluator.score(run))
    return scores


def sensitivity(sim: QuantizationSimModel, evaluator: Evaluator, *, top_k: int | None = None,
                patience: int | None = None, proxies: Mapping[str, float] | None = None,
                progress: bool | None = None, switch: Switchable | None = None) -> dict[str, Any]:
    """Float, fully quantized, and every layer quantized alone (each scored once) (see :class:`Switchable`).

    Layers are scored worst ``proxies`` (local SQNR) first. With ``top_k``, scoring stops once
    ``patience`` (default ``2 * top_k``, at least 8) layers in a row do not enter the worst
    ``top_k``; the worst ``top_k`` are also scored with every quantizer but theirs.
    """
    start = time.perf_counter()
    own = switch is None
    switch = switch or Switchable(sim.float_model, sim.effective_plan, bit_choices(sim))
    bits = {n: next(iter(c)) for n, c in switch.choices.items()}
    switch.anchor({}, evaluator.feeds)  # each layer alone re-runs the model from its segment on
    float_score = evaluator.score(lambda feed: switch.run(feed, {}))
    quantized = evaluator.score(lambda feed: switch.run(feed, bits))
    # with the sim's own encodings every quantizer on is the simulation's own graph and kernels
    deployed = quantized if own else evaluator.score(sim.runner())
    units = [u for u in layers(sim) if any(q in switch.index for q in u.quantizers)]
    proxies = proxies or {}
    units.sort(key=lambda u: min((proxies.get(q, 120.0) for q in u.quantizers), default=120.0))
    if top_k is not None and patience is None:
        patience = max(8, 2 * top_k)
    rows: list[dict[str, Any]] = []
    calm = 0
    chunk = max(1, distributed.world().size)
    shown = progress if distributed.is_root() else False
    pieces = [units[i:i + chunk] for i in range(0, len(units), chunk)]
    bar = Progress(pieces, total=len(pieces), desc="sensitivity", unit="layer" if chunk == 1 else "step",
                   enabled=shown, postfix=lambda: f"worst {rows and min(r['only_this_quantized'] for r in rows):.4g}")
    stopped = False
    for piece in bar:
        scores = distributed.map_split(lambda u: score_units(evaluator, switch, [u.quantizers], bits)[0], piece)
        for unit, score in zip(piece, scores):
            kth = sorted(r["only_this_quantized"] for r in rows)[top_k - 1] if top_k and len(rows) >= top_k else None
            rows.append({**_layer_fields(unit), "only_this_quantized": score.value, "only_this": score.as_dict(),
                         "drop_if_quantized_alone": float_score.value - score.value,
                         "local_sqnr_db": min((proxies.get(q, 120.0) for q in unit.quantizers), default=None)})
            calm = calm + 1 if kth is not None and score.value >= kth else 0
        if top_k is not None and patience is not None and calm >= patience and len(rows) < len(units):
            stopped = True
            break
    ranked = sorted(rows, key=lambda r: r["only_this_quantized"])
    worst = ranked[:top_k] if top_k is not None else ranked[:10]
    named = {r["name"]: r for r in worst}
    if worst:
        switch.anchor(bits, evaluator.feeds)
    loo = distributed.map_split(
        lambda r: score_units(evaluator, switch, [r["quantizers"]], bits, alone=False)[0], worst)
    for r, score in zip(worst, loo):
        named[r["name"]]["all_but_this_quantized"] = score.value
        named[r["name"]]["gain_if_float"] = score.value - quantized.value
    for r in rows:
        r.setdefault("all_but_this_quantized", None)
        r.setdefault("gain_if_float", None)
    return {
        "metric": evaluator.name, "float": float_score.value, "quantized": quantized.value,
        "quantized_fused_kernels": deployed.value,
        "float_outputs": float_score.as_dict()["outputs"], "quantized_outputs": quantized.as_dict()["outputs"],
        "layers": rows, "ranking": [r["name"] for r in ranked], "scored": len(rows), "total_layers": len(units),
        "early_stopped": stopped, "runs": evaluator.runs, "seconds": time.perf_counter() - start,
        "segments": switch.segments,
    }


def _layer_fields(unit: Layer) -> dict[str, Any]:
    return {"name": unit.name, "node": unit.node, "op_type": unit.op_type, "quantizers": list(unit.quantizers)}


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


def mixed_precision_config(sim: QuantizationSimModel, ranked: Sequence[Mapping[str, Any]], keep: int,
                           bits: int = 16) -> dict[str, Any]:
    """The sim's config with the ``keep`` worst layers of ``ranked`` (sensitivity rows, worst
    first) at ``bits`` (JSON-ready)."""
    doc = sim.config.to_dict()
    nodes = dict(doc.get("nodes", {}))
    for row in [r for r in ranked if not r["node"].startswith("input:")][:keep]:
        nodes[row["node"]] = {**nodes.get(row["node"], {}), "activation_bw": bits, "param_bw": bits}
    doc["nodes"] = nodes
    return doc


# -- suggestions, each measured --------------------------------------------------------------------


def variant_of(sim: QuantizationSimModel, **changes: Any) -> QuantizationSimModel:
    """A new simulation of the sim's float model with ``changes`` to its settings."""
    kw: dict[str, Any] = {"param_bw": sim.param_bw, "activation_bw": sim.activation_bw, "quant_scheme": sim.quant_scheme,
                          "config": sim.config, "percentile": sim.percentile, "param_scheme": sim.param_scheme,
                          "target": sim.target}
    if "quant_scheme" in changes:
        kw["param_scheme"] = None
    kw.update(changes)
    return QuantizationSimModel(sim.float_model, **kw)


def _candidates(sim: QuantizationSimModel, ranked: Sequence[Mapping[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    worst = [r["node"] for r in ranked if not r["node"].startswith("input:")]
    out: list[tuple[str, dict[str, Any]]] = []
    if not sim.config.per_channel_quantization:
        out.append(("per-channel weights", {"config": sim.config.with_overrides(per_channel_quantization=True)}))
    for scheme in ("minmax", "percentile", "sqnr"):
        if scheme != sim.quant_scheme.value:
            out.append((f"--scheme {scheme}", {"quant_scheme": scheme}))
    if sim.param_bw == 8:
        out.append(("7-bit weights", {"param_bw": 7}))
    for k in (1, 3):
        if len(worst) >= k:
            doc = sim.config.to_dict()
            doc["exclude"] = {**doc.get("exclude", {}), "nodes": sorted({*doc.get("exclude", {}).get("nodes", []),
                                                                          *worst[:k]})}
            out.append((f"exclude the worst {k} layer(s) (float): {', '.join(worst[:k])}", {"config": doc}))
    if len(worst) >= 1:
        out.append((f"16-bit worst 3 layers: {', '.join(worst[:3])}",
                    {"config": mixed_precision_config(sim, [r for r in ranked if r["node"] in worst[:3]], 3)}))
    return out


def suggestions(sim: QuantizationSimModel, calib: Sequence[Mapping[str, np.ndarray]], evaluator: Evaluator,
                ranked: Sequence[Mapping[str, Any]], *, deploy_python: str | None = None,
                progress: bool | None = None) -> dict[str, Any]:
    """Measure each suggestion: per-channel weights, the other schemes, 7-bit weights,
    excluding the worst layers, the worst layers at 16 bits. Each variant is built, calibrated on
    ``calib`` and scored with its own simulation (fused kernels); with ``deploy_python`` (a plain
    onnxruntime interpreter) every exported QDQ model and the float model are timed, interleaved."""
    import json
    import os
    import subprocess
    import tempfile

    from onnxqat.io import save_model

    base = evaluator.score(sim.runner())
    rows: list[dict[str, Any]] = [{"suggestion": "as configured", "metric": base.value, "change": 0.0}]
    sims = [sim]
    for label, changes in Progress(_candidates(sim, ranked), total=None, desc="suggestions", unit="variant",
                                   enabled=progress):
        started = time.perf_counter()
        try:
            config = changes.pop("config", None)
            variant = variant_of(sim, **changes, **({"config": config} if config is not None else {}))
            variant.compute_encodings(calib, progress=False)
        except (ConfigError, DataError, ModelError) as e:
            rows.append({"suggestion": label, "error": str(e)})
            continue
        score = evaluator.score(variant.runner())
        rows.append({"suggestion": label, "metric": score.value, "change": score.value - base.value,
                     "seconds": time.perf_counter() - started})
        sims.append(variant)
    result: dict[str, Any] = {"metric": evaluator.name, "rows": rows}
    if deploy_python is None:
        return result
    plain = os.path.join(os.path.dirname(__file__), "tools", "plain_ort.py")
    with tempfile.TemporaryDirectory(prefix="onnxqat-suggest-") as tmp:
        paths = [os.path.join(tmp, "float.onnx")]
        save_model(sim.float_model, paths[0])
        measured = [r for r in rows if "metric" in r]
        for i, variant in enumerate(sims):
            paths.append(variant.export(os.path.join(tmp, f"v{i}"))["qdq"])
        data = os.path.join(tmp, "data.npz")
        np.savez(data, allow_pickle=False, **evaluator.feeds[0])
        batch = len(next(iter(evaluator.feeds[0].values())))
        proc = subprocess.run([deploy_python, plain, "latency", *paths, "--data", data, "--batch-size", str(batch),
                               "--runs", "20"], capture_output=True, text=True)
        if proc.returncode != 0:
            result["timing_error"] = (proc.stderr.strip().splitlines() or ["plain onnxruntime failed"])[-1]
            return result
        timing = json.loads(proc.stdout.strip().splitlines()[-1])
        ms = [timing["median_ms"][p] for p in paths]
        result.update({"float_ms": ms[0], "onnxruntime": timing["onnxruntime"], "batch_size": batch})
        for row, t in zip(measured, ms[1:]):
            row["deployed_ms"] = t
            row["speedup_vs_float"] = ms[0] / t if t > 0 else None
    return result


# -- everything ------------------------------------------------------------------------------------


def analyze(sim: QuantizationSimModel, calib: Sequence[Mapping[str, np.ndarray]],
            evaluation: Sequence[Mapping[str, Any]] | None = None, *, label_key: str = "label",
            output_index: int = 0, keep: int = 3, task: TaskMetric | None = None, task_name: str = "task",
            top_k: int | None = None, patience: int | None = None, suggest: bool = False,
            deploy_python: str | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Everything above for a calibrated sim. The metric is accuracy when ``evaluation`` (with
    labels) is given, ``task`` when given (a :data:`TaskMetric`, on ``evaluation`` or ``calib``),
    else the channel-averaged output SQNR on ``calib``."""
    data = evaluation if evaluation is not None else calib
    evaluator = Evaluator(sim.float_model, data, labels=evaluation is not None and task is None, label_key=label_key,
                          output_index=output_index, task=task, task_name=task_name)
    rows = quantizer_sqnr(sim, calib[0])
    sens = sensitivity(sim, evaluator, top_k=top_k, patience=patience, proxies=local_sqnr(sim, rows),
                       progress=progress)
    ranked = sorted(sens["layers"], key=lambda r: r["only_this_quantized"])
    result = {
        "settings": {"param_bw": sim.param_bw, "activation_bw": sim.activation_bw,
                     "scheme": sim.quant_scheme.value, "per_channel": sim.config.per_channel_quantization,
                     "metric": evaluator.name, "samples": len(evaluator.labels) if evaluator.labels is not None
                     else sum(len(next(iter(f.values()))) for f in evaluator.feeds)},
        "plan": sim.report(),
        "quantizer_sqnr": rows,
        "sensitivity": sens,
        "histograms": histograms(sim, calib),
        "mixed_precision": mixed_precision_config(sim, ranked, keep),
    }
    if suggest:
        result["suggestions"] = suggestions(sim, calib, evaluator, ranked, deploy_python=deploy_python,
                                            progress=progress)
    return result
