"""onnxruntime sessions for in-memory models, including ones over the 2 GB protobuf limit."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxqat.backend import onnxruntime as _onnxruntime
from onnxqat.backend import providers

__all__ = ["PROTO_LIMIT", "NotImplementedError_", "Session", "fits_in_proto", "model_bytes_size", "release_if_mapped", "save_with_external_data"]

# Serialize in memory below this size; above it, save with external data and load by path.
PROTO_LIMIT = 1_800_000_000

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
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def fits_in_proto(model: ir.Model) -> bool:
    """Whether the model goes through one protobuf (else through external data files).

    Every stage asks this one function, so they all take the same path for one model.
    """
    return model_bytes_size(model) < PROTO_LIMIT


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
        share_constants: Keep onnxruntime's ConstantSharing optimization, which merges
            initializers holding the same single value. It changes no value, and its time grows
            about quadratically with the graph (half the session build of a 30k-node chain);
            sessions run once, such as calibration's, can go without it.
        device: "cpu", or "cuda" for onnxruntime's CUDA provider (an error when the installed
            runtime has none; see :func:`onnxqat.backend.providers`).
        spin: Let idle intra-op threads spin between runs (onnxruntime's default). Off for
            sessions run one after another (segments): one session's spinning threads would
            compete with the next one's.
    """

    def __init__(
        self,
        model: ir.Model | onnx.ModelProto,
        *,
        optimize: bool = True,
        threads: int | None = None,
        follow_node_order: bool = False,
        share_constants: bool = True,
        device: str = "cpu",
        spin: bool = True,
    ) -> None:
        execution = providers(device)
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
        self._tmpdir: str | None = None
        if isinstance(model, onnx.ModelProto):
            payload: Any = model.SerializeToString()
        elif fits_in_proto(model):
            payload = ir.to_proto(model).SerializeToString()
        else:
            self._tmpdir = tempfile.mkdtemp(prefix="onnxqat-session-")
            payload = os.path.join(self._tmpdir, "model.onnx")
            save_with_external_data(model, payload, "model.onnx.data")
        self.fused_qdq = optimize
        disabled = [] if share_constants else ["ConstantSharing"]
        try:
            try:
                self.session = ort.InferenceSession(payload, options, providers=execution,
                                                    disabled_optimizers=disabled)
            except NotImplementedError_ as e:
                if not optimize:
                    raise
                # onnxruntime 1.19 fuses opset-21 QDQ MatMul into a QLinearMatMul version it has no
                # kernel for; run such models without the integer-kernel fusions (float semantics).
                self.fused_qdq = False
                warnings.warn(
                    f"onnxruntime {ort.__version__} cannot run this model's fused integer kernels "
                    f"({str(e).splitlines()[0][:200]}); running it with float semantics, which can differ "
                    "from onnxruntime's integer kernels by a few quantization steps",
                    RuntimeWarning, stacklevel=2,
                )
                self.session = ort.InferenceSession(payload, options, providers=execution,
                                                    disabled_optimizers=[*disabled, "QDQSelectorActionTransformer"])
        finally:
            self._cleanup()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _cleanup(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def run(self, feed: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        names = list(outputs) if outputs is not None else self.output_names
        results: list[np.ndarray] = self.session.run(names, {k: feed[k] for k in self.input_names})
        return results
