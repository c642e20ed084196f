"""onnxruntime sessions of a training process, sharing one memory arena.

A trainer runs up to four sessions: the training module, the float model (teacher for
distillation and the reference of evaluation) and the simulation (evaluated after each epoch).
Each would keep its own arena at its own peak; the activations of a training step are free while
an evaluation runs, so all of them allocate from one arena registered with onnxruntime's
environment (``session.use_env_allocators``): evaluation then costs no memory beyond the training
step's (PP-LCNet orientation classifier, batch 32, evaluation at 64: peak 3.37 -> 2.92 GiB).
:func:`release_free_memory` returns the arena's free regions to the system (after training, so
the process does not keep the training peak).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxqat.backend import providers
from onnxqat.runtime import NotImplementedError_, fits_in_proto, ort, save_with_external_data

__all__ = ["EvalSession", "release_free_memory", "session_options"]

_LOCK = threading.Lock()
_SHARED: bool | None = None  # None: not tried yet; False: this onnxruntime refused


def _shared_arena() -> bool:
    """Register one CPU arena in onnxruntime's environment (once per process)."""
    global _SHARED
    with _LOCK:
        if _SHARED is None:
            try:
                info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
                _SHARED = True
            except Exception as e:  # already registered by the user's code, or not supported
                _SHARED = "already" in str(e).lower() or "exists" in str(e).lower()
        return bool(_SHARED)


def session_options(threads: int | None = None) -> Any:
    """Options of every session of the trainer: the shared arena, no spinning, quiet."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    if os.environ.get("ONNXQAT_SHARED_ARENA", "1") != "0" and _shared_arena():
        options.add_session_config_entry("session.use_env_allocators", "1")
    return options


class EvalSession:
    """An inference session over an ``ir.Model`` with :func:`session_options` (graph optimizations
    on, as :class:`onnxqat.runtime.Session`, including its fallback for fused kernels onnxruntime
    1.19 lacks), on ``device`` ("cpu" or "cuda")."""

    def __init__(self, model: ir.Model, *, threads: int | None = None, outputs: Sequence[str] | None = None,
                 device: str = "cpu") -> None:
        execution = providers(device)
        options = session_options(threads)
        tmpdir = None
        if fits_in_proto(model):
            payload: Any = ir.to_proto(model).SerializeToString()
        else:
            tmpdir = tempfile.mkdtemp(prefix="onnxqat-session-")
            payload = os.path.join(tmpdir, "model.onnx")
            save_with_external_data(model, payload, "model.onnx.data")
        try:
            try:
                self.session = ort.InferenceSession(payload, options, providers=execution)
            except NotImplementedError_ as e:
                warnings.warn(
                    f"onnxruntime {ort.__version__} cannot run this model's fused integer kernels "
                    f"({str(e).splitlines()[0][:200]}); running it with float semantics, which can differ "
                    "from onnxruntime's integer kernels by a few quantization steps", RuntimeWarning, stacklevel=2)
                self.session = ort.InferenceSession(payload, options, providers=execution,
                                                    disabled_optimizers=["QDQSelectorActionTransformer"])
        finally:
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = list(outputs) if outputs is not None else [o.name for o in self.session.get_outputs()]

    def run(self, feed: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        names = list(outputs) if outputs is not None else self.output_names
        results: list[np.ndarray] = self.session.run(names, {k: feed[k] for k in self.input_names})
        return results


def release_free_memory() -> None:
    """Return the shared arena's free regions to the system (a one-node run with arena shrinkage)."""
    if not _SHARED:
        return
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "shrink",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
    run_options = ort.RunOptions()
    run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    session.run(None, {"x": np.zeros(1, np.float32)}, run_options)
