"""Child process of bench_qat_accuracy.py: one FP32, PTQ or QAT run, in the onnxqat venv.

Modes:

* ``fp32``: test accuracy of the float model file as given (BatchNorm unfolded), run by the
  onnxruntime of this venv;
* ``ptq``: QuantizationSimModel (BN folded) + compute_encodings on the calibration file (batch
  64, minmax), test accuracy of ``sim.run``, export;
* ``qat``: the same calibration, then ``sim.trainer(...).fit`` on the training file (AdamW,
  NpzBatches(batch, shuffle=True, seed=SEED), no evaluation during training), test accuracy of
  ``sim.run``, export.

Prints one JSON line: ``sim_accuracy`` (fraction), ``ptq_accuracy`` (qat mode: before training),
``train_s`` (fit only), ``history`` and, except for fp32, the exported ``qdq`` path.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort

from onnxqat import QuantizationSimModel
from onnxqat.data import NpzBatches, load_npz
from onnxqat.evaluate import accuracy

EVAL_BATCH = 1000
CALIB_BATCH = 64


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("fp32", "ptq", "qat"), required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--out-dir")
    p.add_argument("--param-bw", type=int, default=8)
    p.add_argument("--act-bw", type=int, default=8)
    p.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--loss", default="cross_entropy")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--range-learning", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-limit", type=int, default=0, help="use only the first N training samples; 0 = all")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads of the trainer; 0 = default")
    return p.parse_args()


def fp32_accuracy(args: argparse.Namespace, test: dict[str, np.ndarray]) -> float:
    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    return accuracy(lambda b: session.run(None, {"image": b["image"]}), NpzBatches(test, EVAL_BATCH),
                    progress=False)[0]


def calibrated_sim(args: argparse.Namespace) -> QuantizationSimModel:
    sim = QuantizationSimModel(args.model, param_bw=args.param_bw, activation_bw=args.act_bw,
                               per_channel=args.per_channel)
    sim.compute_encodings(NpzBatches(load_npz(args.calib, ["image"]), CALIB_BATCH), progress=False)
    return sim


def train(args: argparse.Namespace, sim: QuantizationSimModel) -> tuple[float, list[dict]]:
    arrays = load_npz(args.train, ["image", "label"])
    batches = NpzBatches(arrays, args.batch_size, shuffle=True, seed=args.seed,
                         limit=args.train_limit or None)
    start = time.perf_counter()
    with sim.trainer(loss=args.loss, lr=args.lr, range_learning=args.range_learning,
                     threads=args.threads or None) as trainer:
        history = trainer.fit(batches, epochs=args.epochs, progress=False)
    return time.perf_counter() - start, [{"epoch": h.epoch, "loss": h.loss, "seconds": h.seconds} for h in history]


def main() -> None:
    args = parse_args()
    test = load_npz(args.test, ["image", "label"])
    if args.mode == "fp32":
        print(json.dumps({"sim_accuracy": fp32_accuracy(args, test), "n": len(test["label"])}))
        return
    sim = calibrated_sim(args)
    report: dict = {"n": len(test["label"])}
    if args.mode == "qat":
        report["ptq_accuracy"] = accuracy(sim.run, NpzBatches(test, EVAL_BATCH), progress=False)[0]
        report["train_s"], report["history"] = train(args, sim)
    report["sim_accuracy"] = accuracy(sim.run, NpzBatches(test, EVAL_BATCH), progress=False)[0]
    report["qdq"] = sim.export(args.out_dir)["qdq"]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
