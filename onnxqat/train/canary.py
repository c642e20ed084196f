"""Build the training artifacts and run one training step in a child process first.

onnxruntime-training can die inside its C++ kernels (a segfault, or SIGFPE from a division by a
zero dimension) instead of raising. The trainer therefore generates the artifacts and runs one
full step (forward, backward, optimizer) in a child process; only when that worked does the
parent open the same artifacts. When the child dies, :func:`locate_crash` runs prefixes of the
training graph, each in its own child, to find the first node whose execution kills the runtime,
so the user gets one line naming it instead of a dead process.

The child needs only numpy and onnxruntime-training: ``python -m onnxqat.train.canary run DIR``
reads ``DIR/forward.onnx``, ``DIR/canary.json`` and ``DIR/batch.npz`` and writes
``DIR/canary-result.json``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["CanaryResult", "gradient_nodes", "locate_crash", "run_canary"]

_SPEC = "canary.json"
_BATCH = "batch.npz"
_RESULT = "canary-result.json"
_FORWARD = "forward.onnx"


class CanaryResult(dict[str, Any]):
    """``{"ok": bool, "loss": float | None, "error": str | None, "signal": str | None}``."""


def run_canary(
    work_dir: str,
    forward: bytes,
    requires_grad: Sequence[str],
    optimizer: str,
    weight_decay: float,
    batch: Mapping[str, np.ndarray],
    threads: int | None = None,
    *,
    step: bool = True,
) -> CanaryResult:
    """Generate the artifacts in ``work_dir`` and run one step on ``batch`` (``step=False``: the
    artifacts only), in a child process."""
    with open(os.path.join(work_dir, _FORWARD), "wb") as f:
        f.write(forward)
    with open(os.path.join(work_dir, _SPEC), "w", encoding="utf-8") as f:
        json.dump({"requires_grad": list(requires_grad), "optimizer": optimizer, "weight_decay": weight_decay,
                   "threads": threads, "step": step}, f)
    np.savez(os.path.join(work_dir, _BATCH), **{k: np.asarray(v) for k, v in batch.items()})  # type: ignore[arg-type]  # numpy's stub: **arrays might fill allow_pickle
    proc = _child("run", work_dir)
    result = _read_result(work_dir)
    if proc.returncode < 0:
        return CanaryResult(ok=False, loss=None, error=None, signal=_signal_name(-proc.returncode),
                            stage=result.get("stage") if result else None)
    if result is None or not result.get("ok"):
        error = (result or {}).get("error") or _last_line(proc.stderr) or f"exit status {proc.returncode}"
        return CanaryResult(ok=False, loss=None, error=error, signal=None,
                            stage=(result or {}).get("stage"))
    return CanaryResult(ok=True, loss=result.get("loss"), error=None, signal=None, stage="done")


def locate_crash(work_dir: str) -> tuple[int, str, str] | None:
    """``(index, name, op_type)`` of the first node of the training graph whose execution crashes,
    or None when no prefix crashes (the crash is then outside node execution)."""
    proc = _child("count", work_dir)
    try:
        n = int(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    lo, hi = 0, n  # prefix of lo nodes runs; prefix of hi nodes is assumed to crash
    if _child("prefix", work_dir, str(n)).returncode >= 0:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _child("prefix", work_dir, str(mid)).returncode < 0:
            hi = mid
        else:
            lo = mid
    info = _child("describe", work_dir, str(hi - 1)).stdout.strip().splitlines()
    name, op_type = (info[-1].split("\t") + ["?", "?"])[:2] if info else ("?", "?")
    return hi - 1, name, op_type


def gradient_nodes(work_dir: str) -> list[tuple[str, list[str]]]:
    """``(name, input names)`` of every node of the training graph generated in ``work_dir``."""
    import onnx

    model = onnx.load(os.path.join(work_dir, "training_model.onnx"), load_external_data=False)
    return [(node.name, list(node.input)) for node in model.graph.node]


# -- parent helpers ----------------------------------------------------------------------------
def _child(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnxqat.train.canary", *args], capture_output=True, text=True)


def _read_result(work_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(work_dir, _RESULT), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# -- the child ---------------------------------------------------------------------------------
def _write_result(work_dir: str, **data: Any) -> None:
    path = os.path.join(work_dir, _RESULT)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


def _session_options(threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _child_run(work_dir: str) -> int:
    import onnx

    from onnxqat.train.ort_training import quiet, training_modules

    with open(os.path.join(work_dir, _SPEC), encoding="utf-8") as f:
        spec = json.load(f)
    _write_result(work_dir, ok=False, stage="artifacts")
    artifacts, api = training_modules()
    from onnxruntime.training import onnxblock

    optimizer = (onnxblock.optim.AdamW(weight_decay=spec["weight_decay"]) if spec["optimizer"] == "adamw"
                 else onnxblock.optim.SGD())
    try:
        with quiet():
            artifacts.generate_artifacts(onnx.load(os.path.join(work_dir, _FORWARD)),
                                         requires_grad=spec["requires_grad"], frozen_params=[], loss=None,
                                         optimizer=optimizer, artifact_directory=work_dir)
    except Exception as e:  # onnxruntime raises plain RuntimeErrors/ValidationErrors here
        _write_result(work_dir, ok=False, stage="artifacts", error=_ort_message(e))
        return 3
    if not spec.get("step", True):
        _write_result(work_dir, ok=True, stage="done", loss=None)
        return 0
    _write_result(work_dir, ok=False, stage="step")
    try:
        state = api.CheckpointState.load_checkpoint(os.path.join(work_dir, "checkpoint"))
        module = api.Module(os.path.join(work_dir, "training_model.onnx"), state,
                            os.path.join(work_dir, "eval_model.onnx"), session_options=_session_options(spec["threads"]))
        opt = api.Optimizer(os.path.join(work_dir, "optimizer_model.onnx"), module)
        with np.load(os.path.join(work_dir, _BATCH)) as data:
            inputs = [data[name] for name in module.input_names()]
        module.train()
        loss = module(*inputs)[0]
        opt.step()
    except Exception as e:
        _write_result(work_dir, ok=False, stage="step", error=_ort_message(e))
        return 3
    _write_result(work_dir, ok=True, stage="done", loss=float(np.asarray(loss)))
    return 0


def _ort_message(e: BaseException) -> str:
    """The informative line of an onnxruntime exception (they carry C++ signatures and paths)."""
    text = str(e).strip()
    for marker in ("The gradient builder has not been registered:", "Can broadcast", "failed to find NodeArg"):
        at = text.find(marker)
        if at >= 0:
            return text[at:].splitlines()[0].strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    line = lines[-1] if len(lines[-1]) < 300 else lines[0]
    if "] : " in line:
        line = line.split("] : ", 1)[1]
    return line.strip()[:300]


def _standalone(work_dir: str) -> tuple[Any, dict[str, np.ndarray]]:
    """The training graph with parameters as initializers, and a complete feed for it."""
    import onnx
    from onnx import numpy_helper

    from onnxqat.train.ort_training import training_modules

    _, api = training_modules()
    model = onnx.load(os.path.join(work_dir, "training_model.onnx"))
    state = api.CheckpointState.load_checkpoint(os.path.join(work_dir, "checkpoint"))
    with np.load(os.path.join(work_dir, _BATCH)) as data:
        feed = {k: data[k] for k in data.files}
    keep = []
    params = {}
    for value in model.graph.input:
        if value.name in feed:
            keep.append(value)
            continue
        try:
            params[value.name] = np.array(state.parameters[value.name].data)
        except Exception:
            keep.append(value)
    for name, array in params.items():
        model.graph.initializer.append(numpy_helper.from_array(array, name))
    del model.graph.input[:]
    model.graph.input.extend(keep)
    suffix = "_grad.accumulation.buffer"
    for value in keep:
        if value.name.endswith(suffix) and value.name[: -len(suffix)] in params:
            feed[value.name] = np.zeros_like(params[value.name[: -len(suffix)]])
        elif value.name == "lazy_reset_grad":
            feed[value.name] = np.array([True])
    return model, feed


def _child_prefix(work_dir: str, k: int) -> int:
    import onnx
    import onnxruntime as ort

    model, feed = _standalone(work_dir)
    nodes = list(model.graph.node)[:k]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in nodes[-1].output if o)
    options = _session_options(None)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}
        session.run(None, {name: v for name, v in feed.items() if name in wanted})
    except Exception:
        return 1  # an error, not a crash: the bisection looks for crashes only
    return 0


def main(argv: Sequence[str]) -> int:
    command, work_dir = argv[0], argv[1]
    if command == "run":
        return _child_run(work_dir)
    if command == "count":
        import onnx

        print(len(onnx.load(os.path.join(work_dir, "training_model.onnx")).graph.node))
        return 0
    if command == "prefix":
        return _child_prefix(work_dir, int(argv[2]))
    if command == "describe":
        import onnx

        node = onnx.load(os.path.join(work_dir, "training_model.onnx")).graph.node[int(argv[2])]
        print(f"{node.name}\t{node.op_type}")
        return 0
    raise SystemExit(f"unknown canary command {command!r}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
