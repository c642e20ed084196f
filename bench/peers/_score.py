"""Score QDQ models against their float model in plain onnxruntime (run by the deploy venv's python:
imports only numpy and onnxruntime, as users deploy).

    _score.py --float M.onnx --data HELD.npz --metric top1|mask|timestep [--label-key label]
              [--batch-size 64] [--latency-runs 0] NAME=QDQ.onnx [NAME=QDQ.onnx ...]

For each model, on the held-out inputs (output ``--output-index``, default the first): top-1 agreement with the float model
(``top1``: argmax of the last axis per sample; ``timestep``: per-timestep character decisions;
``mask``: IoU of the > 0.3 text masks, as DB post-processing thresholds them; ``cosine``: mean
per-sample cosine of embeddings; ``sqnr``: none), accuracy against
labels when the npz has ``--label-key``, output SQNR in dB (10·log10(Σref² / Σ(ref−q)²)) and cosine
similarity over all output elements. A model onnxruntime cannot load or run gets its error instead.
``--no-optimize`` disables onnxruntime's graph optimizations (the float
reference is then unoptimized too): Q/DQ run as written, without the fused integer kernels, whose
u8s8 path on CPUs without VNNI can saturate. With ``--latency-runs N``: median ms of N runs of one batch, models interleaved. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort


OPT_LEVEL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
OUTPUT = 0


def session(path: str) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.log_severity_level = 3
    o.graph_optimization_level = OPT_LEVEL
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])


def run_all(s: ort.InferenceSession, feed: dict[str, np.ndarray], bs: int) -> np.ndarray:
    n = len(next(iter(feed.values())))
    outs = [s.run(None, {k: v[i : i + bs] for k, v in feed.items()})[OUTPUT] for i in range(0, n, bs)]
    return np.concatenate(outs, axis=0)


def scores(ref: np.ndarray, got: np.ndarray, metric: str, labels: np.ndarray | None) -> dict:
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    err = float(((ref64 - got64) ** 2).sum())
    sig = float((ref64**2).sum())
    out = {
        "sqnr_db": float(10 * np.log10(sig / err)) if err > 0 else float("inf"),
        "cosine": float((ref64 * got64).sum() / (np.linalg.norm(ref64) * np.linalg.norm(got64) + 1e-30)),
    }
    if metric == "mask":
        a, b = ref > 0.3, got > 0.3
        out["agreement"] = float((a & b).sum() / max((a | b).sum(), 1))
    elif metric == "cosine":  # embeddings: mean per-sample cosine similarity
        r, g = ref64.reshape(len(ref), -1), got64.reshape(len(got), -1)
        out["agreement"] = float(np.mean((r * g).sum(-1) / (np.linalg.norm(r, axis=-1) * np.linalg.norm(g, axis=-1) + 1e-30)))
    elif metric == "sqnr":  # no decision to agree on (e.g. raw detector heads): SQNR/cosine only
        pass
    elif metric == "timestep":
        out["agreement"] = float((ref.argmax(-1) == got.argmax(-1)).mean())
    else:
        r, g = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
        out["agreement"] = float((r.argmax(-1) == g.argmax(-1)).mean())
        if labels is not None:
            out["accuracy"] = float((g.argmax(-1) == labels).mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--float", dest="float_model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--metric", choices=("top1", "mask", "timestep", "cosine", "sqnr"), default="top1")
    p.add_argument("--label-key", default="label")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--latency-runs", type=int, default=0)
    p.add_argument("--output-index", type=int, default=0)
    p.add_argument("--no-optimize", action="store_true",
                   help="ORT_DISABLE_ALL: run Q/DQ as written (reference math, no fused integer kernels)")
    p.add_argument("models", nargs="*", help="NAME=PATH")
    args = p.parse_args()
    global OPT_LEVEL, OUTPUT
    OUTPUT = args.output_index
    if args.no_optimize:
        OPT_LEVEL = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    fs = session(args.float_model)
    names = [i.name for i in fs.get_inputs()]
    with np.load(args.data) as z:
        feed = {n: z[n] for n in names}
        labels = z[args.label_key] if args.label_key in z.files else None
    ref = run_all(fs, feed, args.batch_size)
    result = {"onnxruntime": ort.__version__, "n": int(len(ref)), "optimized": not args.no_optimize,
              "float": {}, "models": {}}
    if labels is not None and args.metric == "top1":
        result["float"]["accuracy"] = float((ref.reshape(len(ref), -1).argmax(-1) == labels).mean())
    sessions = {"float": fs}
    for item in args.models:
        name, _, path = item.partition("=")
        try:
            s = session(path)
            got = run_all(s, feed, args.batch_size)
            if got.shape != ref.shape:
                raise ValueError(f"output shape {got.shape} != float {ref.shape}")
            result["models"][name] = scores(ref, got, args.metric, labels)
            sessions[name] = s
        except Exception as e:  # noqa: BLE001 - reported per model
            result["models"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:500]}"}
    if args.latency_runs:
        batch = {k: v[: args.batch_size] for k, v in feed.items()}
        times = {k: [] for k in sessions}
        for s in sessions.values():
            s.run(None, batch)
        for _ in range(args.latency_runs):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, batch)
                times[k].append(time.perf_counter() - t)
        med = {k: float(np.median(v) * 1000) for k, v in times.items()}
        result["float"]["latency_ms"] = med.pop("float")
        for k, v in med.items():
            result["models"][k]["latency_ms"] = v
        result["latency_batch"] = int(len(next(iter(batch.values()))))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
