"""Many quantizer settings of one float model, evaluated fast: the engine of analysis and mixed precision.

:class:`Switchable` runs the float model with any subset of its quantizers on, each at any of its
candidate bitwidths, as the simulation runs it (:class:`~onnxqat.passes.insert_qdq.InsertQDQPass`
graphs in onnxruntime with its fused integer kernels): a setting is not selected at run time (no
``If``, no selector input), it is built. The model is cut into segments at narrow points (few
live bytes per sample); a session is built per (segment, bits of the quantizers that segment
holds) and cached. For an *anchored* setting (:meth:`Switchable.anchor`) the values crossing
every cut are kept for the anchored batches, so a setting that equals an anchor on the segments
before ``j`` starts at cut ``j``: one layer quantized alone re-runs only the model from that
layer's segment on, and its session is one segment's.

A quantized tensor that crosses a cut leaves its segment dequantized and is quantized again on
the same grid where it is read (the integers do not change), so integer kernels form on both
sides. A derived quantizer whose source is off, or whose tensor crosses a cut, is applied as a
plain quantizer with its derived encoding; an int32 bias is applied when its input and weight
quantizers are on and it fits; an integer form when its output quantizer is on.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxqat.errors import ConfigError
from onnxqat.graph import const_array
from onnxqat.passes.expose import ExposeValuesPass
from onnxqat.passes.insert_qdq import InsertQDQPass, bias_encoding, bias_fits
from onnxqat.plan import QuantPlan
from onnxqat.qparams import Encoding
from onnxqat.runtime import Session

__all__ = ["Switchable"]

Bits = Mapping[str, int]
Feed = Mapping[str, np.ndarray]

CACHE_BYTES = 1 << 30
"""Default ``cache_bytes``: each anchored setting keeps at most half of it."""


@dataclasses.dataclass
class _Segment:
    """Nodes ``[start, stop)`` of the sorted float model, as a model of their own."""

    start: int
    stop: int
    inputs: tuple[str, ...]  # read here: produced by earlier segments, or model inputs
    outputs: tuple[str, ...]  # produced here and read later, or model outputs
    quantizers: tuple[str, ...]  # whose bits change this segment's graph
    model: ir.Model | None = None


def _session(model: ir.Model, device: str) -> Any:
    """An onnxruntime session of ``model`` (every optimization, fused integer kernels) whose
    threads do not spin between runs: segments run one after the other, and the idle threads of
    one session would spin against the next one's."""
    return Session(model, spin=False, device=device).session


# ops onnxruntime fuses into the node before them (Conv + Add + Relu ...): never cut in between
_FUSED_INTO_PRODUCER = frozenset({"Add", "BatchNormalization", "Clip", "Gelu", "HardSigmoid", "HardSwish",
                                  "LeakyRelu", "Mul", "Relu", "Sigmoid", "Sum", "Tanh"})


def _may_cut(before: ir.Node, after: ir.Node) -> bool:
    """Whether a cut between consecutive nodes keeps onnxruntime's fusions."""
    return not (after.op_type in _FUSED_INTO_PRODUCER and any(v in before.outputs for v in after.inputs))


def _reads(node: ir.Node, main: set[int]) -> list[ir.Value]:
    """Values of the main graph ``node`` reads, its subgraphs' outer-scope references included."""
    out = [v for v in node.inputs if v is not None]
    for attr in node.attributes.values():
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
            list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
        for g in graphs:
            for inner in ir.traversal.RecursiveGraphIterator(g):
                out.extend(v for v in inner.inputs if v is not None and id(v) in main)
    return out


class Switchable:
    """The float model with every quantizer switchable per run (see the module docstring).

    Args:
        model: The float model.
        plan: The quantizers.
        choices: ``{quantizer: {bitwidth: encoding}}``; a quantizer without entries stays float.
        segments: How many segments to cut the model into at most (None: about one per 8 nodes,
            at most 12, placed so that each does about the same work; 1: no cuts).
        device: "cpu" or "cuda" (see :class:`onnxqat.runtime.Session`).
        cache_bytes: Each anchored setting keeps at most half of this many bytes of values
            (estimated from a one-sample probe run); cuts are dropped until they fit.
    """

    def __init__(self, model: ir.Model, plan: QuantPlan, choices: Mapping[str, Mapping[int, Encoding]], *,
                 segments: int | None = None, cache_bytes: int = CACHE_BYTES, device: str = "cpu") -> None:
        self.plan = plan
        self.choices = {q: dict(c) for q, c in choices.items() if c}
        self.names = [q.name for q in plan.activations if q.name in self.choices]
        self.names += [p.name for p in plan.params if p.name in self.choices]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.derived = {q.name: q.derived_from[0] for q in plan.activations if q.derived_from is not None}
        self.output_names = [v.name or "" for v in model.graph.outputs]
        self.cache_bytes = cache_bytes
        self.device = device
        self.builds = 0
        self._model = model.clone()
        self._model.graph.sort()
        self._wanted_segments = segments
        self._segments: list[_Segment] | None = None
        self._sessions: collections.OrderedDict[tuple[int, tuple[int, ...]], Any] = collections.OrderedDict()
        self._pinned: set[tuple[int, tuple[int, ...]]] = set()
        self._anchors: list[tuple[tuple[tuple[int, ...], ...], list[dict[int, dict[str, np.ndarray]]]]] = []
        self._feeds: list[Feed] = []
        self._batch_of: dict[int, int] = {}
        self._bytes_per_value: dict[str, float] = {}
        self._probe_batch = 1

    @property
    def segments(self) -> int:
        """How many segments the model is cut into (0 before the first run)."""
        return len(self._segments or ())

    # -- settings --------------------------------------------------------------------------------

    def vector(self, bits: Bits) -> np.ndarray:
        """The bitwidth per quantizer of ``names`` for ``{quantizer: bitwidth}`` (missing: 0, float).

        A derived quantizer that is on takes its source's bitwidth when the source is on."""
        vec = np.zeros(len(self.names), np.int64)
        for name, i in self.index.items():
            b = int(bits.get(name, 0))
            source = self.derived.get(name)
            if b and source is not None and bits.get(source, 0) in self.choices[name]:
                b = int(bits[source])
            if b and b not in self.choices[name]:
                raise ConfigError(f"quantizer {name}: no {b}-bit encoding among {sorted(self.choices[name])}")
            vec[i] = b
        return vec

    def _resolve(self, bits: Bits | np.ndarray) -> dict[str, int]:
        vec = bits if isinstance(bits, np.ndarray) else self.vector(bits)
        return {n: int(b) for n, b in zip(self.names, vec.tolist()) if b}

    def _keys(self, resolved: Mapping[str, int]) -> tuple[tuple[int, ...], ...]:
        assert self._segments is not None
        return tuple(tuple(resolved.get(q, 0) for q in s.quantizers) for s in self._segments)

    # -- running ---------------------------------------------------------------------------------

    def run(self, feed: Feed, bits: Bits | np.ndarray) -> list[np.ndarray]:
        """The model's outputs for ``feed`` with the quantizers at ``bits`` (a mapping or a
        :meth:`vector`). On a batch passed to :meth:`anchor`, the run starts at the latest cut
        before which the setting equals an anchored one."""
        resolved = self._resolve(bits)
        self._prepare(feed)
        keys = self._keys(resolved)
        i = self._batch_of.get(id(feed))
        env: dict[str, np.ndarray] = dict(feed)
        start = 0
        if i is not None and self._feeds[i] is feed:
            start, cached = self._best_anchor(keys, i)
            env.update(cached)
        return self._run_from(start, keys, resolved, env)

    def anchor(self, bits: Bits | np.ndarray, feeds: Sequence[Feed]) -> None:
        """Keep, for each of ``feeds``, the values at every cut under setting ``bits``; later
        runs of these very batch objects start from them (bounded by ``cache_bytes``)."""
        if not feeds:
            return
        self._prepare(feeds[0])
        assert self._segments is not None
        if len(feeds) != len(self._feeds) or any(a is not b for a, b in zip(feeds, self._feeds)):
            self._anchors.clear()
            self._pinned.clear()
            self._feeds = list(feeds)
            self._batch_of = {id(f): i for i, f in enumerate(self._feeds)}
        resolved = self._resolve(bits)
        keys = self._keys(resolved)
        if any(k == keys for k, _ in self._anchors):
            return
        cuts = self._affordable_cuts(sum(max((len(v) for v in f.values() if np.ndim(v) >= 1), default=1)
                                         for f in feeds))
        stored: list[dict[int, dict[str, np.ndarray]]] = []
        for feed in feeds:
            record: dict[int, dict[str, np.ndarray]] = {}
            self._run_from(0, keys, resolved, dict(feed), record=record, cuts=cuts)
            stored.append(record)
        self._anchors.append((keys, stored))
        self._pinned.update((s, k) for s, k in enumerate(keys))

    def _best_anchor(self, keys: tuple[tuple[int, ...], ...], batch: int) -> tuple[int, dict[str, np.ndarray]]:
        best, values = 0, {}
        for anchor_keys, stored in self._anchors:
            same = next((s for s, (a, b) in enumerate(zip(anchor_keys, keys)) if a != b), len(keys))
            record = stored[batch]
            start = max((c for c in record if c <= same), default=0)
            if start > best:
                best, values = start, record[start]
        return best, values

    def _run_from(self, start: int, keys: tuple[tuple[int, ...], ...], resolved: Mapping[str, int],
                  env: dict[str, np.ndarray], *, record: dict[int, dict[str, np.ndarray]] | None = None,
                  cuts: Sequence[int] = ()) -> list[np.ndarray]:
        assert self._segments is not None
        segments = self._segments
        for s in range(start, len(segments)):
            if record is not None and s in cuts:
                record[s] = {n: env[n] for n in self._needed[s]}
            seg = segments[s]
            session = self._session_for(s, keys[s], resolved)
            env.update(zip(seg.outputs, session.run(list(seg.outputs), {n: env[n] for n in seg.inputs})))
        if record is not None:
            record[len(segments)] = {n: env[n] for n in self._needed[len(segments)]}
        return [env[n] for n in self.output_names]

    def _session_for(self, s: int, key: tuple[int, ...], resolved: Mapping[str, int]) -> Any:
        entry = (s, key)
        session = self._sessions.get(entry)
        if session is not None:
            self._sessions.move_to_end(entry)
            return session
        assert self._segments is not None
        seg = self._segments[s]
        mine = {q: resolved[q] for q in seg.quantizers if q in resolved}
        assert seg.model is not None
        session = _session(self._quantized(seg.model, mine) if mine else seg.model, self.device)
        self.builds += 1
        self._sessions[entry] = session
        spare = [e for e in self._sessions if e not in self._pinned]
        for e in spare[:max(0, len(spare) - len(self._segments) - 4)]:
            del self._sessions[e]
        return session

    # -- cutting the model -----------------------------------------------------------------------

    def _prepare(self, feed: Feed) -> None:
        if self._segments is not None:
            return
        graph = self._model.graph
        nodes = list(graph)
        main = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
        main |= {id(v) for n in nodes for v in n.outputs}
        position = {id(v): i for i, n in enumerate(nodes) for v in n.outputs}
        last_use: dict[str, int] = {}
        reads: list[list[ir.Value]] = []
        for i, n in enumerate(nodes):
            reads.append(_reads(n, main))
            for v in reads[-1]:
                if v.name is not None:
                    last_use[v.name] = i
        model_inputs = {v.name for v in graph.inputs if v.name}
        outputs = set(self.output_names)
        has_subgraphs = any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                            for n in nodes for a in n.attributes.values())
        self._probe(feed, [v.name for n in nodes for v in n.outputs if v.name])
        count = len(nodes)
        wanted = self._wanted_segments or min(12, max(1, count // 8))
        cuts = [0]
        if wanted > 1 and count > 1:
            # bytes per sample live across the cut before node i (produced before i, read at or after i)
            live = np.zeros(count + 1)
            for n_i, n in enumerate(nodes):
                for v in n.outputs:
                    if v.name and v.name in last_use and last_use[v.name] > n_i:
                        live[n_i + 1:last_use[v.name] + 1] += self._bytes_per_value.get(v.name, 0.0)
            # targets spread the work evenly: a node's work taken as the bytes it writes
            work = np.cumsum([sum(self._bytes_per_value.get(v.name or "", 0.0) for v in n.outputs) + 1.0
                              for n in nodes])
            window = max(1, count // (2 * wanted))
            for k in range(1, wanted):
                target = int(np.searchsorted(work, work[-1] * k / wanted)) + 1
                lo, hi = max(cuts[-1] + 2, target - window), min(count - 1, target + window)
                allowed = [i for i in range(lo, hi + 1) if _may_cut(nodes[i - 1], nodes[i])]
                if allowed:
                    least = min(live[i] for i in allowed)
                    cuts.append(min(allowed, key=lambda i: (live[i] > least * 1.01, abs(i - target))))
        bounds = [*cuts, count]
        producer_segment = {}
        for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
            for n in nodes[a:b]:
                for v in n.outputs:
                    if v.name:
                        producer_segment[v.name] = s
        segments = []
        for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
            ins: dict[str, None] = {}
            for r in reads[a:b]:
                for v in r:
                    name = v.name or ""
                    if (id(v) in position and position[id(v)] < a) or name in model_inputs:
                        ins[name] = None
            outs = [v.name for n in nodes[a:b] for v in n.outputs
                    if v.name and (last_use.get(v.name, -1) >= b or v.name in outputs)]
            segments.append(_Segment(a, b, tuple(ins), tuple(outs), ()))
        if has_subgraphs and len(segments) > 1:  # keep it simple: subgraphs read outer values
            segments = [_Segment(0, count, tuple(n for n in model_inputs if n in last_use),
                                 tuple(self.output_names), ())]
        self._segments = segments
        self._assign_quantizers(nodes, bounds, model_inputs)
        # what a run from cut s needs from before it: segment inputs of s and later, model outputs before s
        self._needed: list[tuple[str, ...]] = []
        for s in range(len(segments) + 1):
            before = {n for seg in segments[:s] for n in seg.outputs}
            later = {n for seg in segments[s:] for n in seg.inputs}
            self._needed.append(tuple(sorted((later | outputs) & before)))
        for seg in segments:
            seg.model = self._segment_model(seg, nodes)

    def _probe(self, feed: Feed, names: list[str]) -> None:
        """Bytes per sample and dtype of every node output, from a one-sample float run."""
        batch = {k: np.asarray(v) for k, v in feed.items()}
        sizes = {len(v) for v in batch.values() if v.ndim >= 1}
        rows = min(sizes) if sizes else 1
        small = {k: v[:1] if v.ndim >= 1 else v for k, v in batch.items()}
        probe = ExposeValuesPass(names)(self._model.clone()).model
        session = _session(probe, self.device)
        wanted = [o.name for o in session.get_outputs()]
        inputs = [i.name for i in session.get_inputs()]
        try:
            got = session.run(wanted, {k: small[k] for k in inputs})
            self._probe_batch = 1
        except Exception:  # noqa: BLE001 - a fixed batch size: probe with the batch itself
            got = session.run(wanted, {k: batch[k] for k in inputs})
            self._probe_batch = rows
        self._dtypes = {n: a.dtype for n, a in zip(wanted, got)}
        self._ranks = {n: a.ndim for n, a in zip(wanted, got)}
        self._bytes_per_value = {n: a.nbytes / self._probe_batch for n, a in zip(wanted, got)}

    def _assign_quantizers(self, nodes: list[ir.Node], bounds: list[int], model_inputs: set[str]) -> None:
        assert self._segments is not None
        segment_of_node = {}
        produced = {}
        for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
            for n in nodes[a:b]:
                segment_of_node[n.name] = s
                for out in n.outputs:
                    produced[out.name] = s
        readers: dict[str, set[int]] = collections.defaultdict(set)
        for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
            for n in nodes[a:b]:
                for v in n.inputs:
                    if v is not None and v.name:
                        readers[v.name].add(s)
        if len(self._segments) == 1:
            self._segments[0].quantizers = tuple(self.names)
            return
        per: list[dict[str, None]] = [{} for _ in self._segments]
        for q in self.plan.activations:
            if q.name not in self.choices:
                continue
            for t in q.tensors:  # where it is produced and everywhere it is read (quantized again there)
                for s in {*([produced[t]] if t in produced else []), *readers.get(t, ())}:
                    per[s][q.name] = None
        for p in self.plan.params:
            if p.name in self.choices:
                for c in p.consumers:
                    if c in segment_of_node:
                        per[segment_of_node[c]][p.name] = None
        for bq in self.plan.biases:
            if bq.node in segment_of_node:
                s = segment_of_node[bq.node]
                for name in (bq.input_quantizer, bq.weight_quantizer):
                    if name in self.choices:
                        per[s][name] = None
        for seg, names in zip(self._segments, per):
            seg.quantizers = tuple(names)

    def _affordable_cuts(self, samples: int) -> list[int]:
        """Cuts whose values fit in half of ``cache_bytes`` (every other one dropped until they do)."""
        assert self._segments is not None
        share = self.cache_bytes / 2
        cuts = list(range(1, len(self._segments)))
        while cuts:
            names = {n for c in cuts for n in self._needed[c]}
            if sum(self._bytes_per_value.get(n, 0.0) for n in names) * samples <= share:
                break
            cuts = cuts[1::2]
        return [0, *cuts]

    def _segment_model(self, seg: _Segment, nodes: list[ir.Node]) -> ir.Model:
        """Nodes ``[seg.start, seg.stop)`` as a model: inputs ``seg.inputs``, outputs ``seg.outputs``."""
        if seg.start == 0 and seg.stop == len(nodes):
            return self._model
        model = self._model.clone()
        graph = model.graph
        cloned = list(graph)
        values = {v.name: v for n in cloned for v in n.outputs if v.name}
        values.update({v.name: v for v in graph.inputs if v.name})
        graph.outputs.clear()
        inputs = []
        for name in seg.inputs:
            value = values[name]
            if value.producer() is None:  # a model input
                inputs.append(value)
                continue
            fresh = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(self._dtypes[name])),
                             shape=ir.Shape([None] * self._ranks[name]))
            value.name = f"{name}__onnxqat_produced_earlier"
            value.replace_all_uses_with(fresh)
            inputs.append(fresh)
        graph.outputs.extend(values[n] for n in seg.outputs)
        graph.inputs.clear()
        graph.inputs.extend(inputs)
        graph.remove([*cloned[:seg.start], *cloned[seg.stop:]], safe=True)
        for name, value in list(graph.initializers.items()):
            if not value.uses():
                graph.initializers.pop(name)
        return model

    # -- one segment's graph for a setting -------------------------------------------------------

    def _quantized(self, segment: ir.Model, bits: Mapping[str, int]) -> ir.Model:
        """``segment`` with the quantizers of ``bits`` inserted (:class:`InsertQDQPass`).

        A quantized tensor that crosses a cut is quantized again where it is read (the same
        grid: the integers are unchanged), so the consumer's integer kernels still form there."""
        graph = segment.graph
        present = {v.name for n in graph for v in n.outputs if v.name}
        present |= {v.name for v in graph.inputs if v.name} | set(graph.initializers)
        nodes = {n.name: n for n in graph if n.name}
        produced_here = {v.name for n in graph for v in n.outputs if v.name}
        renamed: dict[str, str] = {}
        encodings: dict[str, Encoding] = {}
        activations = []
        for q in self.plan.activations:
            b = bits.get(q.name, 0)
            tensors = tuple(t for t in q.tensors if t in present)
            if not b or not tensors:
                continue
            derived = q.derived_from
            if derived is not None and (q.name not in produced_here or derived[0] not in renamed):
                derived = None  # its source is float here, or it crosses a cut: a plain quantizer
            name = tensors[0]
            renamed[q.name] = name
            activations.append(dataclasses.replace(q, name=name, tensors=tensors, derived_from=None if derived is None
                                                   else (renamed[derived[0]], derived[1])))
            encodings[name] = self.choices[q.name][b]
        params = []
        for p in self.plan.params:
            b = bits.get(p.name, 0)
            consumers = tuple(c for c in p.consumers if c in nodes)
            if b and consumers and p.name in graph.initializers:
                params.append(dataclasses.replace(p, consumers=consumers))
                encodings[p.name] = self.choices[p.name][b]
        biases = []
        for bq in self.plan.biases:
            if bq.node not in nodes or bq.input_quantizer not in renamed or bq.weight_quantizer not in encodings:
                continue
            bias = const_array(graph.initializers.get(bq.name))
            scale, _ = bias_encoding(encodings[renamed[bq.input_quantizer]], encodings[bq.weight_quantizer])
            if bias is not None and bias_fits(bias, scale):
                biases.append(dataclasses.replace(bq, input_quantizer=renamed[bq.input_quantizer]))
        forms = tuple(f for f in self.plan.integer_forms if f.node in nodes and self.plan.activation_of(f.output)
                      is not None and bits.get(self.plan.activation_of(f.output).name, 0))  # type: ignore[union-attr]
        plan = QuantPlan(activations=tuple(activations), params=tuple(params), biases=tuple(biases),
                         integer_forms=forms)
        result = InsertQDQPass(plan, encodings, fold_weights=False)(segment)
        return result.model
