"""Run exported models in a *plain* onnxruntime environment (no onnxqat, no training build).

This file imports only numpy and onnxruntime, so any interpreter with the current onnxruntime
release runs it by path, e.g. ``.venv-deploy/bin/python onnxqat/tools/plain_ort.py ...``. It is how
onnxqat checks what a user deploys: the training runtime and plain onnxruntime cannot share one
environment.

    plain_ort.py outputs MODEL IN.npz OUT.npz          all outputs for the inputs in IN.npz
    plain_ort.py accuracy MODEL DATA.npz [--label-key label] [--output-index 0]
    plain_ort.py latency MODEL [MODEL ...] --data DATA.npz [--batch-size 64] [--runs 30]

``--reference`` (before the command) runs with graph optimizations off: the QDQ graph evaluated op
by op in float, without onnxruntime's fused integer kernels.

``latency`` times the models interleaved (round-robin), so machine noise hits all alike, and
prints one JSON line: median milliseconds per batch for each model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import onnxruntime as ort


_REFERENCE = False  # --reference: graph optimizations off (op-by-op float semantics, no fused kernels)


def _session(path: str, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if _REFERENCE:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _inputs(session: ort.InferenceSession, data: np.lib.npyio.NpzFile) -> dict[str, np.ndarray]:
    return {i.name: data[i.name] for i in session.get_inputs()}


def outputs(args: argparse.Namespace) -> dict[str, Any]:
    session = _session(args.model, args.threads)
    with np.load(args.inputs) as data:
        feed = _inputs(session, data)
    results = session.run(None, feed)
    names = [o.name for o in session.get_outputs()]
    np.savez(args.out, **dict(zip(names, results)))
    return {"outputs": names, "onnxruntime": ort.__version__}


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    session = _session(args.model, args.threads)
    with np.load(args.data) as data:
        feed = _inputs(session, data)
        labels = data[args.label_key]
    correct = 0
    n = len(labels)
    for start in range(0, n, args.batch_size):
        batch = {k: v[start : start + args.batch_size] for k, v in feed.items()}
        scores = session.run(None, batch)[args.output_index]
        correct += int((scores.reshape(len(scores), -1).argmax(-1) == labels[start : start + args.batch_size]).sum())
    return {"accuracy": correct / n, "n": n, "onnxruntime": ort.__version__}


def latency(args: argparse.Namespace) -> dict[str, Any]:
    sessions = [_session(m, args.threads) for m in args.models]
    with np.load(args.data) as data:
        feeds = [{k: v[: args.batch_size] for k, v in _inputs(s, data).items()} for s in sessions]
    times: list[list[float]] = [[] for _ in sessions]
    for s, feed in zip(sessions, feeds):
        for _ in range(args.warmup):
            s.run(None, feed)
    for _ in range(args.runs):
        for i, (s, feed) in enumerate(zip(sessions, feeds)):
            t = time.perf_counter()
            s.run(None, feed)
            times[i].append(time.perf_counter() - t)
    return {
        "median_ms": {m: float(np.median(t) * 1000) for m, t in zip(args.models, times)},
        "batch_size": args.batch_size,
        "runs": args.runs,
        "onnxruntime": ort.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plain_ort.py", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reference", action="store_true",
                        help="run with graph optimizations off: the unfused op-by-op reference")
    sub = parser.add_subparsers(dest="command", required=True)
    o = sub.add_parser("outputs")
    o.add_argument("model")
    o.add_argument("inputs")
    o.add_argument("out")
    a = sub.add_parser("accuracy")
    a.add_argument("model")
    a.add_argument("data")
    a.add_argument("--label-key", default="label")
    a.add_argument("--output-index", type=int, default=0)
    a.add_argument("--batch-size", type=int, default=256)
    lat = sub.add_parser("latency")
    lat.add_argument("models", nargs="+")
    lat.add_argument("--data", required=True)
    lat.add_argument("--batch-size", type=int, default=64)
    lat.add_argument("--runs", type=int, default=30)
    lat.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    global _REFERENCE
    _REFERENCE = args.reference
    result = {"outputs": outputs, "accuracy": accuracy, "latency": latency}[args.command](args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
