"""Micro-batches: one optimizer batch run as several smaller training runs, gradients exact.

The training graph's loss is ``sum_i w_i * loss_i`` over the samples ``i`` of a run, with the
weights fed per run (:class:`~onnxqat.train.lower.TrainingGraph` ``weight_input``). An optimizer
batch of ``N`` samples runs as pieces of ``m`` samples, every real sample weighted ``1/N``; the
training runtime adds the gradients of the runs of one step into its gradient buffers, so after the
last piece they hold the gradient of the mean loss over the ``N`` samples (exact up to float
summation order), and the step's loss is the sum of the pieces' losses (the mean over the batch).

The training graph has static shapes (:mod:`onnxqat.train.trainer`), so every piece has ``m``
rows: ``N`` is cut into ``k = ceil(N / m)`` pieces of ``ceil(N / k)`` rows (as even as one shape
allows), and the last piece is filled up with copies of its own rows weighted 0 (they add nothing
to the loss or the gradients; they cost their compute).

The default size comes from a memory estimate (:func:`choose_micro_batch`): the largest ``m``
whose training step is estimated within :data:`TRAIN_BUDGET` times float inference at the
user's batch (or within :data:`MIN_BUDGET`, so small models are not split). Both estimates are
static, per sample, from the graphs with the shapes of one sample:

* inference: the float model's weights plus ``N`` times the peak of its live activations (every
  value freed after its last consumer, in graph order; :func:`inference_bytes`);
* training: the forward values the backward pass reads, found in the training graph onnxruntime
  generates (values of forward nodes consumed by gradient nodes; :func:`saved_bytes`): those
  computed from the data scale with ``m``, those computed from weights alone (fake-quantized
  weights) do not. The activations a backward reads are what makes training cost several
  inferences (open-nsfw at batch 16: 41 MiB a sample, against 6 MiB of live activations a sample
  in inference).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["MIN_BUDGET", "MemoryEstimate", "TRAIN_BUDGET", "choose_micro_batch", "inference_bytes", "pad_rows",
           "forward_bytes", "piece_sizes", "saved_bytes", "take_rows"]

# The kept activations of a training run may take this many times the float inference estimate
# at the user's batch. The training process holds more than them: Python and onnxruntime, the
# simulation, the float model's session, weights with gradients and optimizer moments (measured
# on open-nsfw W4A8: 462 MiB at no samples, 1.7x its float inference process at batch 16), and the
# backward's temporaries (each sample cost 45 MiB, 2.7x its kept estimate). 1.2 keeps the process
# under 3x float inference at the same batch on open-nsfw and the PP-OCR recognizer (BENCHMARKS.md,
# "Micro-batches"); 1.5 gave open-nsfw 8 samples a run and 3.1x.
TRAIN_BUDGET = 1.2

# A step estimated under this is not split whatever the budget: on small models the process's
# fixed memory (Python, onnxruntime, the sessions) dominates and smaller runs only cost time.
MIN_BUDGET = 128 << 20

def _bytes(value: ir.Value) -> int:
    shape, dtype = value.shape, value.dtype
    dims = [d for d in shape if isinstance(d, int) and d >= 0] if shape is not None else []
    if shape is None or dtype is None or len(dims) != len(shape):
        return 0  # unknown: not counted (the estimate is then low)
    size = 1
    for d in dims:
        size *= d
    return size * int(dtype.itemsize)


def _initializer_bytes(graph: ir.Graph) -> int:
    return sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)


def inference_bytes(model: ir.Model, batch: int = 1) -> int:
    """Weights plus ``batch`` times the peak bytes of live activations of one run of ``model``
    (concrete shapes of one sample), every value freed after its last consumer in graph order
    (graph outputs kept)."""
    graph = model.graph
    last: dict[int, int] = {}
    nodes = list(graph)
    for i, node in enumerate(nodes):
        for v in node.inputs:
            if v is not None:
                last[id(v)] = i
    keep = {id(v) for v in graph.outputs}
    live = sum(_bytes(v) for v in graph.inputs)
    peak = live
    for i, node in enumerate(nodes):
        live += sum(_bytes(v) for v in node.outputs)
        peak = max(peak, live)
        for v in {id(v): v for v in node.inputs if v is not None and not v.is_initializer()}.values():
            if last.get(id(v)) == i and id(v) not in keep:
                live -= _bytes(v)
        live -= sum(_bytes(v) for v in node.outputs if id(v) not in last and id(v) not in keep)
    return _initializer_bytes(graph) + batch * peak


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of the forward values a training step keeps for its backward pass.

    Attributes:
        data: Per sample: values computed from the inputs.
        fixed: Values computed from weights alone (they do not grow with the batch).
    """

    data: int
    fixed: int

    def at(self, rows: int) -> int:
        """Estimated bytes at ``rows`` samples per run."""
        return self.fixed + self.data * rows


def forward_bytes(forward: ir.Model) -> MemoryEstimate:
    """Every value the forward graph (shapes of one sample) computes: a bound of what a training
    step keeps (:func:`saved_bytes`) that needs no gradient graph."""
    return saved_bytes(forward, [("", [v.name or "" for node in forward.graph for v in node.outputs])])


def saved_bytes(forward: ir.Model, gradient_nodes: Iterable[tuple[str, Sequence[str]]]) -> MemoryEstimate:
    """:class:`MemoryEstimate` of a training graph: ``forward`` is the forward graph with the
    shapes of one sample, ``gradient_nodes`` the ``(name, input names)`` of every node of the
    generated training graph; values of forward nodes read by other nodes are kept for the
    backward pass."""
    graph = forward.graph
    produced: dict[str, ir.Value] = {}
    from_data = {id(v) for v in graph.inputs}
    for node in graph:
        derived = any(v is not None and id(v) in from_data for v in node.inputs)
        for v in node.outputs:
            produced[v.name or ""] = v
            if derived:
                from_data.add(id(v))
    forward_nodes = {node.name for node in graph}
    kept: dict[str, ir.Value] = {}
    for name, inputs in gradient_nodes:
        if name in forward_nodes:
            continue
        kept.update((i, produced[i]) for i in inputs if i in produced)
    data = sum(_bytes(v) for v in kept.values() if id(v) in from_data)
    return MemoryEstimate(data, sum(_bytes(v) for v in kept.values() if id(v) not in from_data))


def choose_micro_batch(batch: int, inference: int, kept: MemoryEstimate, budget: float = TRAIN_BUDGET) -> int:
    """Rows per training run for an optimizer batch of ``batch``: the largest ``m`` whose
    ``kept.at(m)`` is within ``budget * inference`` or :data:`MIN_BUDGET` bytes, whichever is
    more (at least 1), evened out over the pieces (:func:`piece_sizes`).

    >>> MiB = 1 << 20
    >>> choose_micro_batch(16, 100 * MiB, MemoryEstimate(data=20 * MiB, fixed=50 * MiB), budget=1.5)  # 50 + 20 m <= 150: 5, evened to 4 x 4
    4
    >>> choose_micro_batch(16, 100 * MiB, MemoryEstimate(data=2 * MiB, fixed=50 * MiB))
    16
    >>> choose_micro_batch(16, 10 * MiB, MemoryEstimate(data=4 * MiB, fixed=10 * MiB))  # under MIN_BUDGET
    16
    """
    room = max(budget * inference, MIN_BUDGET) - kept.fixed
    rows = batch if kept.data <= 0 else int(max(1.0, min(float(batch), math.floor(room / kept.data))))
    return piece_sizes(batch, rows)[0]


def piece_sizes(rows: int, micro: int) -> list[int]:
    """Real rows of each piece of ``rows`` run at most ``micro`` at a time: ``k = ceil(rows /
    micro)`` pieces of ``ceil(rows / k)`` rows, the last one shorter when they do not divide.

    >>> piece_sizes(16, 5), piece_sizes(16, 6), piece_sizes(10, 3), piece_sizes(4, 8)
    ([4, 4, 4, 4], [6, 6, 4], [3, 3, 3, 1], [4])
    """
    k = -(-rows // max(1, micro))
    size = -(-rows // k)
    return [min(size, rows - i * size) for i in range(k)]


def take_rows(batch: Mapping[str, Any], rows: int, start: int, stop: int) -> dict[str, Any]:
    """Rows ``[start, stop)`` along axis 0 of every array of ``batch`` with ``rows`` rows there;
    other values are passed whole."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        array = np.asarray(value)
        out[key] = array[start:stop] if array.ndim and array.shape[0] == rows else value
    return out


def pad_rows(batch: Mapping[str, Any], rows: int, size: int) -> dict[str, Any]:
    """``batch`` (``rows`` rows on axis 0) filled up to ``size`` rows with copies of its rows."""
    if rows == size:
        return dict(batch)
    index = np.arange(size) % rows
    out: dict[str, Any] = {}
    for key, value in batch.items():
        array = np.asarray(value)
        out[key] = array[index] if array.ndim and array.shape[0] == rows else value
    return out
