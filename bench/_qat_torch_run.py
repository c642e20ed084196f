"""Child process of bench_qat_torch.py: PTQ and QAT accuracy of the demo network in PyTorch (torch venv).

The network, quantizers and step are bench/_qat_speed_torch.py's (see its docstring): models/
make_demo.py's ``FashionDSNet`` with the shipped weights, BatchNorm folded, fake quantization at
onnxqat's places. What this run does, mirroring bench/_qat_accuracy_run.py's ``qat`` mode:

* calibration: min/max of every quantized activation of the float (folded) network over the
  calibration file (batch 64, no fake quantization on the way, as onnxqat calibrates), widened to
  include 0; asymmetric uint8 with AIMET's scale / offset definitions;
* weights: symmetric signed ``--param-bw``-bit, per output channel (``--per-channel``) or per
  tensor, scale ``max|w| / (2^(b-1) - 1)`` recomputed from the current weights at every step,
  straight-through gradient; biases int32 on the grid ``s_in * s_w``;
* PTQ accuracy: the calibrated fake-quant network before training;
* QAT: ``--epochs`` passes over the training file in batches of ``--batch-size``, pass ``k`` in the
  order ``numpy.random.default_rng([SEED, k]).permutation(n)`` (exactly the batches of onnxqat's
  ``NpzBatches(shuffle=True, seed=SEED)``), cross-entropy on the fake-quantized logits,
  ``torch.optim.AdamW(lr, eps=--eps, weight_decay=0)``; ``--variant qat-fixed`` keeps the
  calibrated activation encodings, ``qat-rl`` learns them (LSQ, PyTorch's fused kernel);
* test accuracy (all images of the test file) of the float network, and of the fake-quant network
  before (PTQ) and after training.

With ``--reference-encodings`` (an onnxqat ``model.encodings`` file of the same configuration,
written by its PTQ export) the calibrated activation encodings and the weight scales of the
folded weights are compared with onnxqat's, as a check that both start from the same point.

Prints one JSON line: ``float_accuracy``, ``ptq_accuracy``, ``sim_accuracy`` (after training;
fractions), ``train_s``, ``history`` (per epoch: mean training loss, seconds), ``n`` and, with a
reference, ``reference_check``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _qat_speed_common import MODELS_DIR  # noqa: E402
from _qat_speed_torch import (  # noqa: E402
    QATNet, Trainer, build, calibrated_network, memory_format, test_accuracy, weight_fq,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.join(MODELS_DIR, "fmnist_dsconv.onnx"))
    p.add_argument("--calib", default=os.path.join(MODELS_DIR, "fmnist_calib.npz"))
    p.add_argument("--train", default=os.path.join(MODELS_DIR, "fmnist_train.npz"))
    p.add_argument("--test", default=os.path.join(MODELS_DIR, "fmnist_test.npz"))
    p.add_argument("--variant", choices=("qat-fixed", "qat-rl"), default="qat-fixed")
    p.add_argument("--param-bw", type=int, default=8)
    p.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--eps", type=float, default=1e-6, help="AdamW eps (default 1e-6, onnxruntime-training's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=2, help="0 = PTQ only")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-limit", type=int, default=0, help="use only the first N training samples; 0 = all")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--memory-format", choices=("channels_last", "contiguous"), default="channels_last")
    p.add_argument("--reference-encodings", help="onnxqat model.encodings to compare the calibration with")
    return p.parse_args()


ONNX_TENSORS = {
    "image": "image", "stem": "/stem/stem.2/Relu_output_0", "pool": "/pool/GlobalAveragePool_output_0",
    "fc": "/fc/Gemm_output_0", "dw": "/blocks/blocks.{}/dw/dw.2/Relu_output_0",
    "pw": "/blocks/blocks.{}/pw/pw.1/BatchNormalization_output_0",
    "sc": "/blocks/blocks.{}/shortcut/shortcut.1/BatchNormalization_output_0", "out": "/blocks/blocks.{}/relu/Relu_output_0",
}


def onnx_tensor(point: str) -> str:
    """Name in the ONNX model of the tensor that a quantization point of QATNet (``b3.pw``) quantizes."""
    block, _, part = point.partition(".")
    return ONNX_TENSORS[part].format(block[1:]) if part else ONNX_TENSORS[point]


def compare_with_reference(path: str, folded: torch.nn.Module, encodings: dict[str, tuple[float, int]],
                           args: argparse.Namespace) -> dict:
    with open(path) as f:
        ref = json.load(f)
    acts = {e["name"]: e for e in ref["activation_encodings"]}
    scale_diffs, zp_mismatch, missing = [], [], []
    for point, (scale, zero_point) in encodings.items():
        e = acts.get(onnx_tensor(point))
        if e is None:
            missing.append(point)
            continue
        scale_diffs.append(abs(scale - e["scale"][0]) / e["scale"][0])
        if zero_point != -e["offset"][0]:
            zp_mismatch.append(f"{point}: {zero_point} vs {-e['offset'][0]}")
    params = {e["name"]: e for e in ref["param_encodings"]}
    weight_diffs, weights = [], 0
    for name, w in folded.state_dict().items():
        if name in params and name.endswith("weight"):
            _, scale = weight_fq(w, args.param_bw, args.per_channel)
            theirs = torch.tensor(params[name]["scale"], dtype=torch.float32)
            weight_diffs.append(float(((scale - theirs).abs() / theirs).max()))
            weights += 1
    return {
        "activations": len(scale_diffs), "missing": missing, "max_rel_scale_diff": max(scale_diffs, default=None),
        "zero_point_mismatches": zp_mismatch, "weights": weights,
        "max_rel_weight_scale_diff": max(weight_diffs, default=None),
    }


def shuffled_batches(images: np.ndarray, labels: np.ndarray, batch: int, seed: int, epoch: int):
    """The batches of onnxqat's NpzBatches(shuffle=True, seed=seed) in pass ``epoch``."""
    order = np.random.default_rng([seed, epoch]).permutation(len(labels))
    for start in range(0, len(labels), batch):
        sel = order[start:start + batch]
        yield images[sel], labels[sel]


def train(trainer: Trainer, args: argparse.Namespace) -> tuple[float, list[dict]]:
    with np.load(args.train) as data:
        images, labels = data["image"], data["label"].astype(np.int64)
    if args.train_limit:
        images, labels = images[:args.train_limit], labels[:args.train_limit]
    history = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        begin, total, count = time.perf_counter(), 0.0, 0
        for x, y in shuffled_batches(images, labels, args.batch_size, args.seed, epoch):
            loss = trainer.step(trainer.prepare((np.ascontiguousarray(x), y)))
            if not np.isfinite(loss):
                raise SystemExit(f"training diverged: loss {loss} in epoch {epoch + 1}")
            total += loss * len(y)
            count += len(y)
        history.append({"epoch": epoch + 1, "loss": total / count, "seconds": time.perf_counter() - begin})
    return time.perf_counter() - start, history


def main() -> None:
    args = parse_args()
    folded, encodings = calibrated_network(args.model, args.calib, None, args.threads)
    report: dict = {"n": int(np.load(args.test)["label"].shape[0]), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "quantizers": len(encodings)}
    if args.reference_encodings:
        report["reference_check"] = compare_with_reference(args.reference_encodings, folded, encodings, args)
    report["float_accuracy"] = test_accuracy(QATNet(folded, None), args.test, None)
    net = build(args.variant, folded, encodings, args.param_bw, args.per_channel)
    trainer = Trainer(net, args.lr, memory_format(args.memory_format), eps=args.eps)
    report["ptq_accuracy"] = test_accuracy(trainer.net, args.test, None)
    report["train_s"], report["history"] = train(trainer, args) if args.epochs else (None, [])
    report["sim_accuracy"] = test_accuracy(trainer.net, args.test, None)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
