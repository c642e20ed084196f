"""Where a deployed QDQ model spends its time against the float model, in plain onnxruntime.

Runs in the deploy environment (numpy + onnxruntime only): both models with
``SessionOptions.enable_profiling``, runs interleaved, the median kernel time of every node; then
the totals per op type and, for convolutions (matched in graph order: onnxruntime keeps one
convolution node per Conv of the model), per kind: depthwise with a channel count that is / is
not a multiple of 16 (onnxruntime's x86 symmetric depthwise kernel needs that; other depthwise
convolutions take its generic kernel), pointwise, and others (e.g. a first layer on 3 channels).

    .venv-deploy/bin/python bench/profile_deploy.py FLOAT.onnx model_qdq.onnx --shape 8,3,48,192 [--runs 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import numpy as np
import onnxruntime as ort


def _session(path: str, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_profiling = True
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _medians(session: ort.InferenceSession) -> tuple[list[tuple[str, str, list]], dict[str, float]]:
    path = session.end_profiling()
    with open(path, encoding="utf-8") as f:
        events = json.load(f)
    os.remove(path)
    durations: dict[str, list[float]] = collections.defaultdict(list)
    order: list[tuple[str, str, list]] = []
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        if name not in durations:
            shapes = [list(d.values())[0] for d in e["args"].get("input_type_shape", [])]
            order.append((name, e["args"]["op_name"], shapes))
        durations[name].append(float(e["dur"]))
    return order, {k: float(np.median(v)) for k, v in durations.items()}


def _conv_kind(shapes: list) -> str:
    if len(shapes) < 2 or len(shapes[1]) != 4:
        return "other"
    out_channels, per_group = shapes[1][0], shapes[1][1]
    if per_group == 1 and out_channels > 1:
        return f"depthwise, channels {'' if out_channels % 16 == 0 else 'not '}a multiple of 16"
    if shapes[1][2:] == [1, 1]:
        return "pointwise"
    return "other (k > 1)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("float_model")
    parser.add_argument("qdq_model")
    parser.add_argument("--shape", required=True, help="input shape, e.g. 8,3,48,192")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    sessions = [_session(args.float_model, args.threads), _session(args.qdq_model, args.threads)]
    name = sessions[0].get_inputs()[0].name
    x = np.random.default_rng(0).random(tuple(int(d) for d in args.shape.split(",")), dtype=np.float32)
    load = os.getloadavg()[0]
    for _ in range(args.runs):
        for s in sessions:
            s.run(None, {name: x})
    (f_order, f_t), (q_order, q_t) = (_medians(s) for s in sessions)
    print(f"# onnxruntime {ort.__version__}, {args.runs} interleaved runs, median kernel time per node, "
          f"threads {args.threads or 'default'}, load {load:.1f} -> {os.getloadavg()[0]:.1f}")
    for label, order, t in (("float", f_order, f_t), ("qdq", q_order, q_t)):
        by_op: collections.Counter[str] = collections.Counter()
        count: collections.Counter[str] = collections.Counter()
        for node, op, _ in order:
            by_op[op] += t[node]
            count[op] += 1
        total = sum(by_op.values())
        print(f"\n{label}: {total / 1000:.2f} ms of kernels")
        for op, us in by_op.most_common(14):
            print(f"  {op:28s} {us / 1000:8.2f} ms {100 * us / total:5.1f}%  ({count[op]} nodes)")
    f_convs = [(n, s) for n, op, s in f_order if op in ("Conv", "FusedConv")]
    q_convs = [n for n, op, _ in q_order if op == "QLinearConv"]
    if f_convs and len(f_convs) == len(q_convs):
        kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
        for (f_node, shapes), q_node in zip(f_convs, q_convs):
            k = kinds[_conv_kind(shapes)]
            k[0] += f_t[f_node]
            k[1] += q_t[q_node]
            k[2] += 1
        print("\nconvolutions (float Conv vs QLinearConv, matched in graph order):")
        for kind, (f_us, q_us, n) in sorted(kinds.items()):
            print(f"  {kind:42s} n={n:3d}  float {f_us / 1000:7.2f} ms  integer {q_us / 1000:7.2f} ms  ({q_us / f_us:.2f}x)")
    else:
        print(f"\n(convolutions not matched: {len(f_convs)} float, {len(q_convs)} integer)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
