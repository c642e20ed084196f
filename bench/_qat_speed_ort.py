"""Worker of bench_qat_speed.py: onnxqat's training in onnxruntime-training (onnxqat venv).

Builds ``QuantizationSimModel(model, param_bw=8, activation_bw=8, per_channel=True)`` (BatchNorm
folded), calibrates it on models/fmnist_calib.npz (batch 64, minmax) and opens trainers per
variant through the public API (``sim.trainer(...)``), all with ``loss="cross_entropy"``, AdamW
(weight decay 0), ``lr=3e-5`` and ``threads=--threads`` (onnxruntime intra-op threads):

* ``float``: ``quantized=False``: the same folded graph and loss with no fake quantization;
* ``qat-fixed``: ``range_learning=False`` (fixed activation encodings, FakeQuant nodes);
* ``qat-rl``: ``range_learning=True`` (learned activation scales and zero points).

The training graph takes the shapes of the first batch a trainer sees, so each variant has one
trainer per batch size, built (``trainer.predict`` on the first batch: graph, artifacts, the
canary step) before any timing. A timed step is ``trainer.step(batch)``: forward + backward
(returns loss and logits as numpy), ``optimizer.step()`` and the gradient reset, plus the
trainer's check of the batch against the model inputs (validation, labels as int64): 0.28 ms
of a 626 ms step at batch 32 when measured on a loaded machine (BENCHMARKS.md, section 4). The
batches are dicts of arrays built beforehand, which is not timed.

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
from onnxqat.train.trainer import QATTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _qat_speed_common import MODELS_DIR, batch_timer, run_worker, worker_parser  # noqa: E402


def calibrated_sim(model: str, calib: str) -> QuantizationSimModel:
    sim = QuantizationSimModel(model, param_bw=8, activation_bw=8, per_channel=True)
    sim.compute_encodings(NpzBatches(load_npz(calib, ["image"]), 64), progress=False)
    return sim


class VariantTrainers:
    """One variant: its calibrated sim and a built trainer per batch size."""

    def __init__(self, variant: str, args: argparse.Namespace) -> None:
        self.sim = calibrated_sim(args.model, args.calib)
        self.options = {"loss": "cross_entropy", "lr": args.lr, "range_learning": variant == "qat-rl",
                        "quantized": variant != "float", "threads": args.threads}
        self.spare: QATTrainer | None = self.sim.trainer(**self.options)  # lowered, not built yet
        self.trainable = len(self.spare.graph.trainable)
        self.by_batch: dict[int, QATTrainer] = {}

    def prepare(self, images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        """The batch as the trainer takes it; the first of a batch size builds that size's trainer."""
        batch = {"image": images, "label": labels}
        if len(images) not in self.by_batch:
            trainer, self.spare = self.spare or self.sim.trainer(**self.options), None
            trainer.predict(batch)  # builds the training graph with this batch's shapes (no update)
            self.by_batch[len(images)] = trainer
        return batch

    def step(self, batch: dict[str, np.ndarray]) -> None:
        self.by_batch[len(batch["image"])].step(batch)

    def close(self) -> None:
        for trainer in [*self.by_batch.values(), *([self.spare] if self.spare else [])]:
            trainer.close()


def parse_args() -> argparse.Namespace:
    p = worker_parser(__doc__)
    p.add_argument("--calib", default=os.path.join(MODELS_DIR, "fmnist_calib.npz"))
    return p.parse_args()


def main() -> None:
    args = parse_args()
    variants = {v: VariantTrainers(v, args) for v in args.variants.split(",") if v}
    steps = {v: t.step for v, t in variants.items()}
    timer = batch_timer(args.train, steps, lambda v, i, b: variants[v].prepare(*b))
    try:
        run_worker(timer, args.once, lambda: {"onnxruntime": ort.__version__, "threads": args.threads,
                                              "trainable": {v: t.trainable for v, t in variants.items()}})
    finally:
        for t in variants.values():
            t.close()


if __name__ == "__main__":
    main()
