"""onnxruntime sessions for in-memory models, including ones over the 2 GB protobuf limit."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxqat.backend import onnxruntime as _onnxruntime
from onnxqat.backend import providers

__all__ = ["PROTO_LIMIT", "SEGMENT_NODES", "NotImplementedError_", "Session", "fits_in_proto", "model_bytes_size",
           "release_if_mapped", "save_with_external_data", "segment_model", "serialized_once"]

# Serialize in memory below this size; above it, save with external data and load by path.
PROTO_LIMIT = 1_800_000_000

# Nodes per session of a segmented ``Session`` (``max_nodes``). onnxruntime 1.19's session build
# grows about quadratically with the graph on QDQ chains, even with every optimization off (each
# graph transformer and the partitioner re-resolve the whole graph: 6k nodes 0.7 s, 12k nodes 6 s
# CPU); segments of this size build in ~0.2 s each, so the whole grows linearly.
SEGMENT_NODES = 2000

# The one runtime of this environment (onnxqat.backend refuses none, or two); every module
# of onnxqat takes its onnxruntime from here.
ort = _onnxruntime()

try:
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as NotImplementedError_
except ImportError:  # pragma: no cover - the class is part of every onnxruntime build
    NotImplementedError_ = RuntimeError


def release_if_mapped(tensor: object) -> None:
    """Unmap a memory-mapped external tensor (it is re-read on next use), so weights already
    processed do not stay resident while the next ones are read."""
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()


def save_with_external_data(model: ir.Model, path: str, data_name: str) -> None:
    """``ir.save`` with external data, unmapping each source tensor once it is written."""
    previous: list[object] = []

    def written(tensor: object, _info: object) -> None:
        while previous:
            release_if_mapped(previous.pop())
        previous.append(tensor)

    ir.save(model, path, external_data=data_name, callback=written, max_workers=1)
    while previous:
        release_if_mapped(previous.pop())


def model_bytes_size(model: ir.Model) -> int:
    """Bytes held by the model's initializers (a lower bound of its serialized size)."""
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        raw = getattr(tensor, "raw", None)  # an ir.Tensor's numpy array: its nbytes (half ir's time, from the shape)
        if isinstance(raw, np.ndarray) and raw.itemsize * 8 == tensor.dtype.bitwidth:  # not packed 4-bit
            total += raw.nbytes
        else:
            total += tensor.nbytes
    return total


def fits_in_proto(model: ir.Model) -> bool:
    """Whether the model goes through one protobuf (else through external data files).

    Every stage asks this one function, so they all take the same path for one model.
    """
    return model_bytes_size(model) < PROTO_LIMIT


@dataclasses.dataclass(frozen=True)
class Segment:
    """Nodes ``[start, stop)`` of a model as a model of their own (see :func:`segment_model`).

    Attributes:
        model: The segment: its nodes, the initializers they read, as inputs every other tensor
            they read, as outputs what later segments read and the graph outputs it makes.
        inputs: Its input names (graph inputs, or outputs of earlier segments).
        outputs: Its output names.
        release: Tensors no later segment reads (dropped once this segment ran).
    """

    start: int
    stop: int
    model: onnx.ModelProto
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    release: tuple[str, ...]


_SUBGRAPH_ATTRIBUTES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def segment_model(proto: onnx.ModelProto, max_nodes: int) -> list[Segment] | None:
    """``proto``'s graph cut into consecutive segments of at least ``max_nodes`` nodes each (the
    last of at least half as many), or None when it has at most ``max_nodes`` nodes or cannot be cut.

    A cut is only made where every tensor crossing it is the output of a QuantizeLinear (an
    integer tensor read by DequantizeLinear nodes): each DequantizeLinear -> op -> QuantizeLinear
    unit that onnxruntime fuses into an integer kernel, and every float fusion (Gemm + Relu ...),
    stays inside one segment, so running the segments one after another computes what one session
    of the whole graph computes. Graphs with subgraphs (If, Loop, Scan), sparse initializers or
    tensors of unknown type are not cut. One walk over the nodes; each segment copies its own
    nodes and the initializers it reads.
    """
    graph = proto.graph
    nodes = graph.node
    count = len(nodes)
    if count <= max_nodes or len(graph.sparse_initializer):
        return None
    if any(a.type in _SUBGRAPH_ATTRIBUTES for node in nodes for a in node.attribute):
        return None
    initializers = {t.name: t for t in graph.initializer}
    model_outputs = {o.name for o in graph.output}
    last: dict[str, int] = {}  # tensor -> index of the last node reading it
    for index, node in enumerate(nodes):
        for name in node.input:
            if name:
                last[name] = index
    produced: set[str] = set()
    cuts = [0]
    live: dict[str, bool] = {}  # produced, read later -> whether it forbids a cut (not a QuantizeLinear output)
    blocking = 0
    for index, node in enumerate(nodes):
        for name in node.input:
            if last.get(name) == index and name in live:
                blocking -= live.pop(name)
        quantize = node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx")
        for name in node.output:
            if name:
                produced.add(name)
                if last.get(name, -1) > index:
                    live[name] = not quantize
                    blocking += not quantize
        if index + 1 - cuts[-1] >= max_nodes and not blocking and count - index - 1 >= max_nodes // 2:
            cuts.append(index + 1)
    if len(cuts) == 1 or not model_outputs <= produced:
        return None
    cuts.append(count)
    spans = []
    for start, stop in zip(cuts, cuts[1:]):
        part = nodes[start:stop]
        made = {name for node in part for name in node.output if name}
        reads = list(dict.fromkeys(name for node in part for name in node.input if name))
        inputs = tuple(name for name in reads if name not in made and name not in initializers)
        outputs = tuple(name for node in part for name in node.output
                        if name and (last.get(name, -1) >= stop or name in model_outputs))
        if not outputs:
            return None
        spans.append((start, stop, reads, inputs, outputs))
    types = {v.name: v for v in (*graph.input, *graph.value_info, *graph.output)}

    def typed(name: str) -> bool:
        return name in types and types[name].type.HasField("tensor_type")

    needed = {name for _, _, _, inputs, outputs in spans for name in (*inputs, *outputs)}
    for node in nodes:  # a QuantizeLinear output: its zero point's type, its input's shape
        name = node.output[0] if node.output else ""
        if name in needed and not typed(name) and node.op_type == "QuantizeLinear" and len(node.input) == 3 \
                and node.input[2] in initializers and not any(a.name == "output_dtype" for a in node.attribute):
            shape = types[node.input[0]].type.tensor_type.shape if typed(node.input[0]) else None
            made = onnx.helper.make_tensor_value_info(name, initializers[node.input[2]].data_type, None)
            if shape is not None and types[node.input[0]].type.tensor_type.HasField("shape"):
                made.type.tensor_type.shape.CopyFrom(shape)
            types[name] = made
    if not all(typed(name) for name in needed):
        types.update({v.name: v for v in onnx.shape_inference.infer_shapes(proto).graph.value_info})
        if not all(typed(name) for name in needed):
            return None
    segments = []
    for start, stop, reads, inputs, outputs in spans:
        model = onnx.ModelProto(ir_version=proto.ir_version, producer_name=proto.producer_name)
        model.opset_import.extend(proto.opset_import)
        model.functions.extend(proto.functions)
        model.graph.name = f"{graph.name}_{start}"
        model.graph.node.extend(nodes[start:stop])
        model.graph.initializer.extend(initializers[name] for name in reads if name in initializers)
        model.graph.input.extend(types[name] for name in inputs)
        model.graph.output.extend(types[name] for name in outputs)
        release = tuple(name for name in inputs if last[name] < stop and name not in model_outputs)
        segments.append(Segment(start, stop, model, inputs, outputs, release))
    return segments


# id(model) -> (model, its protobuf, its segments by max_nodes) while serialized_once() holds it
_PINNED: dict[int, tuple[ir.Model, onnx.ModelProto, dict[int, list[Segment] | None]]] = {}


@contextlib.contextmanager
def serialized_once(model: ir.Model) -> Iterator[None]:
    """Within the block, every :class:`Session` of ``model`` (the object itself, which the block
    must not change) reuses one protobuf of it and one cut into segments, instead of serializing
    it per session (the export check builds a fused and a reference session of one model)."""
    if not fits_in_proto(model) or id(model) in _PINNED:
        yield
        return
    _PINNED[id(model)] = (model, ir.to_proto(model), {})
    try:
        yield
    finally:
        del _PINNED[id(model)]


class Session:
    """An ``InferenceSession`` over an ``ir.Model``.

    Args:
        model: The model to run (a ``ModelProto`` must be under the 2 GB protobuf limit).
        optimize: Apply onnxruntime's graph optimizations (constant folding, fusions, integer
            QDQ kernels). Off gives a plain op-by-op float evaluation.
        threads: Intra-op threads (None: onnxruntime's default).
        follow_node_order: Run nodes in the model's node order wherever the data flow allows
            (onnxruntime's priority-based order) instead of its default depth-first order from
            the graph's leaves. Side branches placed right after the tensor they read (such as
            calibration reductions) then run at once, so the tensors they read die young; in the
            default order every such tensor lives to the end of the run, and onnxruntime's
            memory planning on the first run grows quadratically with their number. Results
            are the same in either order.
        skip_optimizers: Names of onnxruntime graph optimizers not to apply (its
            ``disabled_optimizers``). For sessions run a few times whose build would cost more
            than the optimizers save, such as calibration's (see its reasons there).
        device: "cpu", or "cuda" for onnxruntime's CUDA provider (an error when the installed
            runtime has none; see :func:`onnxqat.backend.providers`).
        spin: Let idle intra-op threads spin between runs (onnxruntime's default). Off for
            sessions run one after another (segments): one session's spinning threads would
            compete with the next one's.
        max_nodes: Above this many nodes, run the graph as consecutive segments of about this
            many nodes, one session each, cut only between a QuantizeLinear and its readers
            (:func:`segment_model`: every fusion stays whole, the outputs are those of one
            session). onnxruntime's session build grows about quadratically with the graph
            (:data:`SEGMENT_NODES`); segmented, it grows linearly. None (default): one session.
            Segmented sessions have no ``session`` (None) and need every graph input fed.
    """

    def __init__(
        self,
        model: ir.Model | onnx.ModelProto,
        *,
        optimize: bool = True,
        threads: int | None = None,
        follow_node_order: bool = False,
        skip_optimizers: Sequence[str] = (),
        device: str = "cpu",
        spin: bool = True,
        max_nodes: int | None = None,
    ) -> None:
        self._execution = providers(device)
        options = ort.SessionOptions()
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
        if follow_node_order:
            options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._options = options
        self._optimize = optimize
        self._disabled = list(skip_optimizers)
        self.fused_qdq = optimize
        self._tmpdir: str | None = None
        self.segments: list[tuple[Segment, Any]] = []
        proto: onnx.ModelProto | None = None
        pinned = _PINNED.get(id(model))
        if pinned is not None and pinned[0] is model:
            proto = pinned[1]
        elif isinstance(model, onnx.ModelProto):
            proto = model
        elif fits_in_proto(model):
            proto = ir.to_proto(model)
        parts = None
        if proto is not None and max_nodes is not None:
            if pinned is not None and pinned[0] is model:
                if max_nodes not in pinned[2]:
                    pinned[2][max_nodes] = segment_model(proto, max_nodes)
                parts = pinned[2][max_nodes]
            else:
                parts = segment_model(proto, max_nodes)
        if parts is not None:
            built = [self._build(part.model.SerializeToString()) for part in parts]
            if not self.fused_qdq and self._optimize:  # a segment fell back: all of them run so, as one session would
                built = [self._build(part.model.SerializeToString()) for part in parts]
            self.segments = list(zip(parts, built))
            self.session: Any = None
            graph = proto.graph if proto is not None else None
            assert graph is not None
            known = {t.name for t in graph.initializer}
            self.input_names = [i.name for i in graph.input if i.name not in known]
            self.output_names = [o.name for o in graph.output]
            return
        if proto is not None:
            payload: Any = proto.SerializeToString()
        else:
            self._tmpdir = tempfile.mkdtemp(prefix="onnxqat-session-")
            payload = os.path.join(self._tmpdir, "model.onnx")
            save_with_external_data(model, payload, "model.onnx.data")
        try:
            self.session = self._build(payload)
        finally:
            self._cleanup()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _build(self, payload: Any) -> Any:
        """An ``InferenceSession`` of ``payload`` (bytes or a path) with this session's options."""
        if not self.fused_qdq and self._optimize:  # an earlier segment needed the fallback below
            return ort.InferenceSession(payload, self._options, providers=self._execution,
                                        disabled_optimizers=[*self._disabled, "QDQSelectorActionTransformer"])
        try:
            return ort.InferenceSession(payload, self._options, providers=self._execution,
                                        disabled_optimizers=self._disabled)
        except NotImplementedError_ as e:
            if not self._optimize:
                raise
            # onnxruntime 1.19 fuses opset-21 QDQ MatMul into a QLinearMatMul version it has no
            # kernel for; run such models without the integer-kernel fusions (float semantics).
            self.fused_qdq = False
            warnings.warn(
                f"onnxruntime {ort.__version__} cannot run this model's fused integer kernels "
                f"({str(e).splitlines()[0][:200]}); running it with float semantics, which can differ "
                "from onnxruntime's integer kernels by a few quantization steps",
                RuntimeWarning, stacklevel=3,
            )
            return ort.InferenceSession(payload, self._options, providers=self._execution,
                                        disabled_optimizers=[*self._disabled, "QDQSelectorActionTransformer"])

    def _cleanup(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def run(self, feed: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        names = list(outputs) if outputs is not None else self.output_names
        if self.segments:
            values = {k: feed[k] for k in self.input_names}
            for part, session in self.segments:
                values.update(zip(part.outputs, session.run(list(part.outputs), {k: values[k] for k in part.inputs})))
                for k in part.release:
                    values.pop(k, None)
            return [values[k] for k in names]
        results: list[np.ndarray] = self.session.run(names, {k: feed[k] for k in self.input_names})
        return results
