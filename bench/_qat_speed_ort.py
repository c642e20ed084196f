"""Worker of bench_qat_speed.py: onnxqat's training in onnxruntime-training (onnxqat venv).

Builds ``QuantizationSimModel(model, param_bw=8, activation_bw=8, per_channel=True)`` (BatchNorm
folded), calibrates it on models/fmnist_calib.npz (batch 64, minmax) and opens one trainer per
variant, all with ``loss="cross_entropy"``, AdamW (weight decay 0), ``lr=3e-5`` and
``threads=--threads`` (onnxruntime intra-op threads):

* ``float``: ``sim.plan = QuantPlan()`` before creating the trainer: the same folded graph and
  loss with no fake quantization;
* ``qat-fixed``: ``range_learning=False`` (fixed activation encodings, FakeQuant nodes);
* ``qat-rl``: ``range_learning=True`` (learned activation scales and zero points).

A timed step is ``module(*inputs)`` (forward + backward, returns loss and logits as numpy),
``optimizer.step()`` and ``module.lazy_reset_grad()``; the inputs were built beforehand with the
trainer's own ``_feed`` (validation, label cast), which is not timed.

``--once VARIANT BATCH`` times one variant and prints the median.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import onnxruntime as ort

from onnxqat import QuantizationSimModel
from onnxqat.data import NpzBatches, load_npz
from onnxqat.plan import QuantPlan

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _qat_speed_common import MODELS_DIR, batch_timer, run_worker, worker_parser  # noqa: E402


def calibrated_sim(model: str, calib: str) -> QuantizationSimModel:
    sim = QuantizationSimModel(model, param_bw=8, activation_bw=8, per_channel=True)
    sim.compute_encodings(NpzBatches(load_npz(calib, ["image"]), 64), progress=False)
    return sim


def open_trainer(variant: str, args: argparse.Namespace):
    sim = calibrated_sim(args.model, args.calib)
    if variant == "float":
        sim.plan = QuantPlan()
    trainer = sim.trainer(loss="cross_entropy", lr=args.lr, range_learning=variant == "qat-rl", threads=args.threads)
    trainer._open(trainer._path("checkpoint"))
    trainer._module.train()
    return trainer


def make_step(trainer):
    module, optimizer = trainer._module, trainer._optimizer

    def step(inputs: list[np.ndarray]) -> None:
        module(*inputs)
        optimizer.step()
        module.lazy_reset_grad()

    return step


def parse_args() -> argparse.Namespace:
    p = worker_parser(__doc__)
    p.add_argument("--calib", default=os.path.join(MODELS_DIR, "fmnist_calib.npz"))
    return p.parse_args()


def main() -> None:
    args = parse_args()
    trainers = {v: open_trainer(v, args) for v in args.variants.split(",") if v}
    steps = {v: make_step(t) for v, t in trainers.items()}
    timer = batch_timer(args.train, steps, lambda v, i, b: trainers[v]._feed({"image": b[0], "label": b[1]}, i)[0])
    run_worker(timer, args.once, lambda: {"onnxruntime": ort.__version__, "threads": args.threads,
                                          "trainable": {v: len(t.graph.trainable) for v, t in trainers.items()}})


if __name__ == "__main__":
    main()
