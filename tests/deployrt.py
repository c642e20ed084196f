"""Run models in the plain onnxruntime environment from the training environment.

The training runtime (onnxruntime-training 1.19) and the plain current onnxruntime release cannot
share one environment, but what users deploy must be checked with the latter: a second
environment with it (``ONNXQAT_DEPLOY_PYTHON``, or ``.venv-deploy`` beside the repository, which
``.ci/run`` makes). Where there is none, :func:`deploy_interpreter` falls back to this
interpreter, whose runtime is then the one deployed to (one environment). A
:class:`DeployedSession` keeps an ``InferenceSession`` open in a child process of the deploy
interpreter and exchanges arrays over pipes, so ``session.run`` plugs into anything that takes a
``run(feed) -> outputs`` callable (the zoo's ``predict``, ``evaluate.accuracy``)::

    with DeployedSession(python, "out/model_qdq.onnx") as s:
        outputs = zoo.predict(key, s.run, data)
        ms = s.latency(feed, runs=30)

The child imports only numpy and onnxruntime.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["DeployedSession", "DeploymentError", "deploy_interpreter", "optimized_op_counts"]


def deploy_interpreter() -> tuple[str, str | None]:
    """``(python, note)``: the interpreter that runs deployed models; ``note`` says when it is this
    environment's (no separate plain-onnxruntime environment was found)."""
    from onnxqat.backend import check_environment
    from onnxqat.demo import find_deploy_python

    python = find_deploy_python()
    if python is not None:
        return python, None
    name, version = check_environment()
    return sys.executable, (f"no plain-onnxruntime environment (ONNXQAT_DEPLOY_PYTHON or .venv-deploy): deployed "
                            f"models are checked with this environment's {name} {version}")

_CHILD = r"""
import pickle, sys, time
import numpy as np
import onnxruntime as ort
inp, out = sys.stdin.buffer, sys.stdout.buffer
path, reference, threads = pickle.load(inp)
options = ort.SessionOptions()
options.log_severity_level = 3
if reference:
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
if threads:
    options.intra_op_num_threads = threads
try:
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    pickle.dump(("ok", ort.__version__), out)
except Exception as e:
    pickle.dump(("error", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__), out)
    out.flush()
    sys.exit(0)
out.flush()
names = {i.name for i in session.get_inputs()}
while True:
    try:
        command, feed, runs = pickle.load(inp)
    except EOFError:
        break
    feed = {k: v for k, v in feed.items() if k in names}
    try:
        if command == "run":
            reply = ("ok", session.run(None, feed))
        else:
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - t)
            reply = ("ok", times)
    except Exception as e:
        reply = ("error", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    pickle.dump(reply, out, protocol=5)
    out.flush()
"""


class DeploymentError(RuntimeError):
    """The deployed runtime could not load or run the model (the message is its first line)."""


class DeployedSession:
    """An onnxruntime session in another interpreter (see module docstring).

    Args:
        python: Interpreter of the deploy environment.
        model: Path of the model file.
        reference: Graph optimizations off (the unfused op-by-op graph).
        threads: Intra-op threads.
    """

    def __init__(self, python: str, model: str, *, reference: bool = False, threads: int | None = None) -> None:
        self.proc = subprocess.Popen([python, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        pickle.dump((str(model), reference, threads), self.proc.stdin)
        self.proc.stdin.flush()
        status, detail = self._reply()
        if status != "ok":
            self.close()
            raise DeploymentError(detail)
        self.version: str = detail

    def _reply(self) -> Any:
        assert self.proc.stdout is not None
        try:
            return pickle.load(self.proc.stdout)
        except EOFError:
            code = self.proc.wait()
            raise DeploymentError(f"the deploy runtime died (exit status {code})") from None

    def _ask(self, command: str, feed: Mapping[str, np.ndarray], runs: int = 0) -> Any:
        assert self.proc.stdin is not None
        pickle.dump((command, {k: np.asarray(v) for k, v in feed.items()}, runs), self.proc.stdin, protocol=5)
        self.proc.stdin.flush()
        status, detail = self._reply()
        if status != "ok":
            raise DeploymentError(detail)
        return detail

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return list(self._ask("run", feed))

    def times(self, feed: Mapping[str, np.ndarray], runs: int = 20) -> Sequence[float]:
        """Seconds per run of ``feed``, ``runs`` times in a row."""
        return list(self._ask("time", feed, runs))

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self) -> DeployedSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_OPTIMIZE = r"""
import collections, json, sys, tempfile, os
import onnxruntime as ort
options = ort.SessionOptions()
options.log_severity_level = 3
with tempfile.TemporaryDirectory() as d:
    options.optimized_model_filepath = os.path.join(d, "optimized.onnx")
    ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
    sys.stdout.write(open(options.optimized_model_filepath, "rb").read().hex())
"""


def optimized_op_counts(python: str, model: str) -> dict[str, int]:
    """Op types (and counts) of the graph the deploy runtime runs after its optimizations."""
    import collections

    import onnx

    proc = subprocess.run([python, "-c", _OPTIMIZE, str(model)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DeploymentError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
    optimized = onnx.load_from_string(bytes.fromhex(proc.stdout))
    return dict(collections.Counter(n.op_type for n in optimized.graph.node))


if __name__ == "__main__":  # smoke: python tests/deployrt.py DEPLOY_PYTHON MODEL
    with DeployedSession(sys.argv[1], sys.argv[2]) as s:
        print(s.version)
