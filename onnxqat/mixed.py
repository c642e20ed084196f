"""Mixed precision to a target: the cheapest 4/8/16-bit assignment that keeps a metric.

``target_accuracy_drop`` (top-1 on labelled evaluation data may fall at most that far below the
float model's) or ``target_sqnr`` (output ``output_index`` at least that many dB against float).

The search:

1. *Knobs*: what a config can set, ``nodes.<name>.activation_bw`` for an output quantizer and
   ``nodes.<name>.param_bw`` for a weight; found by planning once with a marker bitwidth, so a
   quantizer the config cannot reach (a model input, a derived scale) keeps the sim's bits.
2. *Sensitivity*: with every knob at its highest candidate, each knob lowered alone to each lower
   candidate: one evaluation per (knob, candidate).
3. *Pareto curve*: greedily, the next lowering with the least metric loss per unit of cost saved
   (AIMET's AMP idea), until everything is at its lowest candidate.
4. *Choice*: the cheapest point of a fixed coarse grid along the curve that meets the target,
   scanned from the cheap end, then the cheapest that meets it on a fine grid between that point
   and the next coarse one. The answer is the cheapest grid point that meets the target, so a
   tighter target never picks a cheaper point (the curve need not be monotone).
5. *Verification*: the chosen config is built as a real simulation, calibrated and scored with
   onnxruntime's fused kernels; if it misses the target, the next cheaper grid point that meets
   it is tried.

Every evaluation in 2-4 is the simulation itself (:class:`onnxqat.switch.Switchable`: the graphs
:class:`~onnxqat.passes.insert_qdq.InsertQDQPass` builds, with the fused kernels), with the top
setting anchored: a knob lowered alone re-runs only the model from its segment on.

Cost: bit operations, ``MACs x weight bits x input-activation bits`` for every weighted layer
(MACs per sample from one float run) plus ``elements x bits`` for every activation quantizer,
reported relative to the same model at W8A8.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from onnxqat.analysis import Evaluator, Score, Switchable, _tensors, variant_of
from onnxqat.config import load_config
from onnxqat.errors import ConfigError, DataError
from onnxqat.graph import name_of
from onnxqat.progress import Progress
from onnxqat.qparams import Encoding
from onnxqat.sim import QuantizationSimModel

__all__ = ["MixedPrecision", "search"]

_MARK = 13  # a bitwidth no preset uses: marks which quantizers a config entry reaches


@dataclasses.dataclass(frozen=True)
class Knob:
    """One config entry: ``nodes.<node>.<field>`` and the quantizers it sets."""

    node: str
    field: str  # "activation_bw" or "param_bw"
    quantizers: tuple[str, ...]
    candidates: tuple[int, ...]  # descending


@dataclasses.dataclass(frozen=True)
class MixedPrecision:
    """The search's answer.

    Attributes:
        config: QuantSimConfig JSON (the sim's config with per-node bitwidths): reload it with
            ``--config`` / ``QuantizationSimModel(..., config=...)`` for the same quantizers.
        bits: Bitwidth per quantizer.
        metric: The metric of the chosen config, as verified by a real simulation (fused kernels).
        search_metric: The same in the switchable session.
        float_metric: The float model's.
        target: The bound the metric had to meet (``metric >= target``).
        relative_cost: Bit operations relative to the W8A8 model.
        curve: Evaluated points of the Pareto curve: ``moves``, ``relative_cost``, ``metric``.
        evaluations: Model evaluations in the switchable session.
        seconds: Wall time of the search (verification included).
    """

    config: dict[str, Any]
    bits: dict[str, int]
    metric: float
    search_metric: float
    float_metric: float
    target: float
    metric_name: str
    relative_cost: float
    curve: list[dict[str, float]]
    evaluations: int
    seconds: float
    sim: QuantizationSimModel | None = dataclasses.field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (without ``sim``, the verified simulation)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sim"}


def _knobs(sim: QuantizationSimModel, param_bits: Sequence[int], activation_bits: Sequence[int]) -> list[Knob]:
    plan = sim.effective_plan
    producer = {v.name: n.name for n in sim.float_model.graph for v in n.outputs}
    entries: dict[str, dict[str, int]] = {}
    natural: dict[tuple[str, str], list[str]] = {}
    for q in plan.activations:
        node = producer.get(q.name)
        if node and q.derived_from is None:
            entries.setdefault(node, {})["activation_bw"] = _MARK
            natural.setdefault((node, "activation_bw"), []).append(q.name)
    for p in plan.params:
        entries.setdefault(p.consumers[0], {})["param_bw"] = _MARK
        natural.setdefault((p.consumers[0], "param_bw"), []).append(p.name)
    doc = sim.config.to_dict()
    doc["nodes"] = {**doc.get("nodes", {}), **{n: {**doc.get("nodes", {}).get(n, {}), **e} for n, e in entries.items()}}
    marked = variant_of(sim, config=load_config(doc)).plan
    reached = {q.name for q in marked.activations if q.spec.bitwidth == _MARK}
    reached |= {p.name for p in marked.params if p.spec.bitwidth == _MARK}
    knobs = []
    for (node, field), names in natural.items():
        names = [n for n in names if n in reached]
        if names:
            bits = param_bits if field == "param_bw" else activation_bits
            knobs.append(Knob(node, field, tuple(names), tuple(sorted(set(bits), reverse=True))))
    return knobs


def _choices(sim: QuantizationSimModel, calib: Sequence[Mapping[str, np.ndarray]], knobs: Sequence[Knob],
             progress: bool | None) -> dict[str, dict[int, Encoding]]:
    """Encodings per quantizer and candidate bitwidth: the sim's own at its bits; activations
    calibrated at the other bits (one calibration per bitwidth, with the scheme the sim's own
    calibration used), weights encoded at them."""
    plan = sim.effective_plan
    choices: dict[str, dict[int, Encoding]] = {}
    for name in [q.name for q in plan.activations] + [p.name for p in plan.params]:
        if name in sim.encodings:
            choices[name] = {sim.encodings[name].bitwidth: sim.encodings[name]}
    act_bits = sorted({b for k in knobs if k.field == "activation_bw" for b in k.candidates} - {sim.activation_bw})
    par_bits = sorted({b for k in knobs if k.field == "param_bw" for b in k.candidates} - {sim.param_bw})
    wanted: dict[str, set[str]] = {k.field: set() for k in knobs}
    for k in knobs:
        wanted[k.field].update(k.quantizers)
    # the scheme the sim's calibration used (the auto scheme's choice): not chosen again per bitwidth
    scheme = sim.scheme_choice.chosen if sim.scheme_choice is not None else sim.quant_scheme
    for bits in act_bits:
        variant = variant_of(sim, activation_bw=bits, quant_scheme=scheme, param_scheme=sim.param_scheme)
        variant.compute_encodings(calib, progress=progress)
        for name in wanted.get("activation_bw", ()):
            enc = variant.encodings.get(name)
            if enc is not None and enc.bitwidth == bits:
                choices[name][bits] = enc
    for bits in par_bits:
        variant = variant_of(sim, param_bw=bits)
        for name in wanted.get("param_bw", ()):
            enc = variant.encodings.get(name)
            if enc is not None and enc.bitwidth == bits:
                choices[name][bits] = enc
    # derived quantizers follow their source: the same bitwidths, scales times the factor
    for q in plan.activations:
        if q.derived_from is not None and q.derived_from[0] in choices and q.name in choices:
            source, factor = q.derived_from
            for bits, enc in choices[source].items():
                choices[q.name].setdefault(bits, dataclasses.replace(
                    enc, scale=(enc.scale.astype(np.float64) * factor).astype(np.float32)))
    return choices


class _Cost:
    """Bit operations of an assignment (see the module docstring)."""

    def __init__(self, sim: QuantizationSimModel, feed: Mapping[str, np.ndarray]) -> None:
        plan = sim.effective_plan
        graph = sim.float_model.graph
        nodes = {n.name: n for n in graph}
        one = {k: v[:1] for k, v in feed.items()}
        consumers = [nodes[p.consumers[0]] for p in plan.params]
        wanted = [name_of(n.outputs[0]) for n in consumers] + [q.name for q in plan.activations]
        shapes = {k: v.shape for k, v in _tensors(sim.float_model, list(dict.fromkeys(wanted)), one).items()}
        self.weights: list[tuple[str, str | None, float]] = []
        for p, node in zip(plan.params, consumers):
            w = graph.initializers[p.name].const_value
            out = shapes.get(name_of(node.outputs[0]))
            size = float(np.prod(w.shape.numpy())) if w is not None else 0.0
            if out is not None and len(out) >= 2:
                features = out[1] if node.op_type.startswith("Conv") else out[-1]
                macs = float(np.prod(out[1:])) * size / max(int(features), 1)
            else:
                macs = size
            source = node.inputs[0].name if node.inputs and node.inputs[0] is not None else None
            act = plan.activation_of(source) if source else None
            self.weights.append((p.name, act.name if act else None, macs))
        self.activations = [(q.name, float(np.prod(shapes[q.name][1:])) if q.name in shapes else 0.0)
                            for q in plan.activations]

    def __call__(self, bits: Mapping[str, int]) -> float:
        total = sum(macs * bits.get(w, 32) * (bits.get(a, 32) if a else 32) for w, a, macs in self.weights)
        return total + sum(n * bits.get(a, 32) for a, n in self.activations)

    def uniform(self, param_bw: int, activation_bw: int) -> float:
        bits = {w: param_bw for w, _, _ in self.weights}
        bits.update({a: activation_bw for a, _ in self.activations})
        return self(bits)


def _assignment(knobs: Sequence[Knob], levels: Sequence[int], fixed: Mapping[str, int]) -> dict[str, int]:
    bits = dict(fixed)
    for knob, level in zip(knobs, levels):
        for q in knob.quantizers:
            bits[q] = knob.candidates[level]
    return bits


def _config(sim: QuantizationSimModel, knobs: Sequence[Knob], levels: Sequence[int]) -> dict[str, Any]:
    doc = sim.config.to_dict()
    nodes = {n: dict(v) for n, v in doc.get("nodes", {}).items()}
    for knob, level in zip(knobs, levels):
        nodes.setdefault(knob.node, {})[knob.field] = knob.candidates[level]
    doc["nodes"] = nodes
    return doc


def search(sim: QuantizationSimModel, calib: Sequence[Mapping[str, np.ndarray]],
           evaluation: Sequence[Mapping[str, Any]] | None = None, *, target_accuracy_drop: float | None = None,
           target_sqnr: float | None = None, label_key: str = "label", output_index: int = 0,
           param_bits: Sequence[int] = (4, 8, 16), activation_bits: Sequence[int] = (8, 16),
           grid: int = 16, progress: bool | None = None) -> MixedPrecision:
    """The cheapest assignment of ``param_bits`` x ``activation_bits`` per node that meets the
    target (see the module docstring). ``sim`` must be calibrated; ``calib`` calibrates the
    other bitwidths; the metric is computed on ``evaluation`` (``calib`` for ``target_sqnr``
    without it)."""
    start = time.perf_counter()
    if (target_accuracy_drop is None) == (target_sqnr is None):
        raise ConfigError("mixed precision: give one of target_accuracy_drop (with labelled evaluation data) "
                          "or target_sqnr")
    if target_accuracy_drop is not None and (evaluation is None or not target_accuracy_drop >= 0):
        raise ConfigError("mixed precision: target_accuracy_drop needs labelled evaluation data and a drop >= 0")
    if any(not 4 <= b <= 16 for b in (*param_bits, *activation_bits)):
        raise ConfigError("mixed precision: candidate bitwidths must be between 4 and 16")
    sim.state.require_calibrated()
    data = evaluation if evaluation is not None else calib
    evaluator = Evaluator(sim.float_model, data, labels=target_accuracy_drop is not None, label_key=label_key,
                          output_index=output_index)

    def value(score: Score) -> float:
        return score.value if target_accuracy_drop is not None else evaluator.main_sqnr(score)

    knobs = _knobs(sim, param_bits, activation_bits)
    choices = _choices(sim, calib, knobs, progress)
    knobs = [dataclasses.replace(k, candidates=tuple(b for b in k.candidates if all(b in choices[q] for q in k.quantizers)))
             for k in knobs]
    knobs = [k for k in knobs if k.candidates]
    switch = Switchable(sim.float_model, sim.effective_plan, choices)
    fixed = {n: sim.encodings[n].bitwidth for n in switch.names if n in sim.encodings}
    cost = _Cost(sim, evaluator.feeds[0])
    w8a8 = cost.uniform(8, 8)

    def score(levels: Sequence[int]) -> Score:
        vec = switch.vector(_assignment(knobs, levels, fixed))
        return evaluator.score(lambda feed: switch.run(feed, vec))

    float_metric = value(evaluator.score_outputs(evaluator.reference))
    if target_accuracy_drop is not None:
        target = float_metric - target_accuracy_drop
    else:
        assert target_sqnr is not None
        target = float(target_sqnr)
    top = [0] * len(knobs)
    switch.anchor(_assignment(knobs, top, fixed), evaluator.feeds)  # phase 1 re-runs from the lowered knob on
    top_score = score(top)
    if value(top_score) < target:
        raise ConfigError(f"mixed precision: the target ({target:.4g}) is out of reach: with every choosable quantizer "
                          f"at its highest candidate the {evaluator.name} is {value(top_score):.4g}")
    # phase 1: each knob lowered alone to each lower candidate
    drops: list[list[tuple[float, float]]] = []
    base_cost = cost(_assignment(knobs, top, fixed))
    for i, knob in Progress(list(enumerate(knobs)), total=len(knobs), desc="mixed precision: sensitivity",
                            unit="knob", enabled=progress):
        row = [(0.0, 0.0)]
        for level in range(1, len(knob.candidates)):
            levels = list(top)
            levels[i] = level
            s = score(levels)
            row.append((value(top_score) - value(s), evaluator.main_sqnr(top_score) - evaluator.main_sqnr(s)))
        drops.append(row)
    # phase 2: the greedy Pareto curve (least loss per cost saved first)
    saving: list[list[float]] = []
    for i, knob in enumerate(knobs):
        costs: list[float] = []
        for level in range(len(knob.candidates)):
            levels = list(top)
            levels[i] = level
            costs.append(base_cost - cost(_assignment(knobs, levels, fixed)))
        saving.append(costs)

    def key(i: int, level: int) -> tuple[float, float, int]:
        ds = max(saving[i][level] - saving[i][level - 1], 1e-12)
        dm = max(drops[i][level][0] - drops[i][level - 1][0], 0.0)
        dq = max(drops[i][level][1] - drops[i][level - 1][1], 0.0)
        return (dm / ds, dq / ds, i)

    heap = [(*key(i, 1), 1) for i, k in enumerate(knobs) if len(k.candidates) > 1]
    heapq.heapify(heap)
    moves: list[tuple[int, int]] = []
    while heap:
        *_, i, level = heapq.heappop(heap)
        moves.append((i, level))
        if level + 1 < len(knobs[i].candidates):
            heapq.heappush(heap, (*key(i, level + 1), level + 1))

    def levels_at(position: int) -> list[int]:
        levels = list(top)
        for i, level in moves[:position]:
            levels[i] = level
        return levels

    evaluated: dict[int, float] = {0: value(top_score)}

    def meets(position: int) -> bool:
        if position not in evaluated:
            evaluated[position] = value(score(levels_at(position)))
        return evaluated[position] >= target

    def cheapest(points: Sequence[int]) -> int | None:
        """The cheapest of ``points`` that meets the target, scanning from the cheap end."""
        return next((p for p in sorted(points, reverse=True) if meets(p)), None)

    coarse = sorted({round(len(moves) * k / grid) for k in range(grid + 1)})
    chosen = cheapest(coarse)
    assert chosen is not None  # the top point meets the target
    grid_points = set(coarse)
    after = next((p for p in coarse if p > chosen), None)
    if after is not None and after - chosen > 1:
        fine = {chosen + round((after - chosen) * k / grid) for k in range(grid)} - {after}
        grid_points |= fine
        found = cheapest(sorted(fine))  # ``fine`` holds ``chosen``: never None
        chosen = chosen if found is None else found
    # verification with a real simulation; on a miss, the next cheaper grid point that meets the target
    metric = float("nan")
    for position in sorted((p for p in grid_points if p <= chosen), reverse=True):
        if not meets(position):
            continue
        doc = _config(sim, knobs, levels_at(position))
        real = variant_of(sim, config=load_config(doc))
        real.compute_encodings(calib, progress=False)
        metric = value(evaluator.score(real.runner()))
        if metric >= target:
            chosen = position
            break
    else:
        raise DataError(f"mixed precision: no evaluated assignment meets the target ({target:.4g}) in the real "
                        f"simulation (the highest precision gives {metric:.4g})")
    levels = levels_at(chosen)
    bits = _assignment(knobs, levels, fixed)
    curve = [{"moves": p, "relative_cost": cost(_assignment(knobs, levels_at(p), fixed)) / w8a8, "metric": m}
             for p, m in sorted(evaluated.items())]
    return MixedPrecision(config=_config(sim, knobs, levels), bits=bits, metric=metric, search_metric=evaluated[chosen],
                          float_metric=float_metric, target=target, metric_name=evaluator.name if target_sqnr is None
                          else f"output {evaluator.output_names[output_index]} SQNR (dB)",
                          relative_cost=cost(bits) / w8a8, curve=curve, evaluations=evaluator.runs,
                          seconds=time.perf_counter() - start, sim=real)
