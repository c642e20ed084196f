"""Worker of bench_qat_speed.py: QAT of the demo network written in PyTorch eager (torch venv).

The network is models/make_demo.py's ``FashionDSNet`` with the weights of the shipped ONNX model
(read by initializer name) and every BatchNorm folded into its conv (``fuse_conv_bn_eval``), so the
graph is the one onnxqat trains. Fake quantization sits where onnxqat puts it for W8A8
per-channel (25 quantizers on the model, 24 of them before the loss):

* weights of every conv and of the Linear: per-channel (axis 0) symmetric int8, scale
  ``max|w| / 127`` recomputed from the current weights every step and detached,
  ``torch.fake_quantize_per_channel_affine`` (straight-through gradient);
* biases: int32 with scale ``s_in * s_w`` (detached), straight-through round, as onnxqat does;
* activations, asymmetric uint8 per-tensor: the model input, each stem/depthwise ReLU output,
  each pointwise and shortcut conv output, each block's ReLU(Add) output, the pooled features
  and the logits. ``qat-fixed``: ``torch.fake_quantize_per_tensor_affine`` with fixed scale and
  zero point; ``qat-rl``: LSQ-style learnable scale and zero point with PyTorch's fused kernel
  ``torch._fake_quantize_learnable_per_tensor_affine`` (what ``torch.ao``'s
  ``_LearnableFakeQuantize`` calls). Initial scales come from a min/max pass over the first 512
  training images (asymmetric, range widened to include 0) - the values do not matter for speed.
* ``float``: the same folded network without any fake quantization.

Loss: cross-entropy on the logits. Optimizer: ``torch.optim.AdamW(lr=3e-5, weight_decay=0)``
(onnxqat's trainer uses weight decay 0 too). A step is ``zero_grad(set_to_none=True)``, forward,
loss, backward, ``opt.step()``, ``float(loss)``. ``torch.set_num_threads(--threads)``.

``--check`` prints test accuracies (first 2000 test images) of the float and fixed-QAT models
and exits; ``--once VARIANT BATCH`` times one variant and prints the median.

bench/_qat_torch_run.py (the accuracy child of bench_qat_torch.py) trains this same network; the
weight bit width and granularity (``param_bw``, ``per_channel``) and AdamW's ``eps`` are
parameters for it, and default to what is described above.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper
from torch.nn.utils.fusion import fuse_conv_bn_eval

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _qat_speed_common import MODELS_DIR, batch_timer, run_worker, worker_parser  # noqa: E402

REPO_DIR = os.path.dirname(MODELS_DIR)
QMIN, QMAX = 0, 255
MIN_SCALE = float(np.finfo(np.float32).eps)  # onnxqat's (and AIMET's) smallest scale


# -- the folded float network -------------------------------------------------------------------


def folded_network(model_path: str) -> nn.Module:
    """FashionDSNet with the ONNX model's weights, BatchNorm folded into the convs (eval BN)."""
    sys.path.insert(0, MODELS_DIR)
    from make_demo import build_model  # noqa: PLC0415

    net = build_model()
    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in onnx.load(model_path).graph.initializer}
    missing, unexpected = net.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    net.eval()
    for module in list(net.modules()):
        if isinstance(module, nn.Sequential) and len(module) >= 2 and isinstance(module[1], nn.BatchNorm2d):
            module[0] = fuse_conv_bn_eval(module[0], module[1])
            module[1] = nn.Identity()
    return net


# -- quantizers ---------------------------------------------------------------------------------


def minmax_encoding(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric uint8 scale and zero point for [lo, hi] widened to include 0, as onnxqat computes
    them (AIMET's definitions: ``scale = (max - min) / 255`` in float32, ``offset = round(min / scale)``,
    zero point ``-offset``)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = float(np.float32(max((hi - lo) / (QMAX - QMIN), MIN_SCALE)))
    return scale, int(np.clip(np.rint(-lo / scale), QMIN, QMAX))


class FixedFQ(nn.Module):
    def __init__(self, scale: float, zero_point: int):
        super().__init__()
        self.scale, self.zero_point = scale, zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, QMIN, QMAX)


class LearnedFQ(nn.Module):
    """LSQ: learnable scale and zero point, PyTorch's fused kernel (grad_factor 1)."""

    def __init__(self, scale: float, zero_point: int):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([scale], dtype=torch.float32))
        self.zero_point = nn.Parameter(torch.tensor([float(zero_point)], dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch._fake_quantize_learnable_per_tensor_affine(x, self.scale, self.zero_point, QMIN, QMAX, 1.0)


class Observer(nn.Module):
    """Records the running min/max of what passes through (calibration only)."""

    def __init__(self):
        super().__init__()
        self.lo, self.hi = float("inf"), float("-inf")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        return x


def weight_fq(w: torch.Tensor, bitwidth: int = 8, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric signed fake-quant of ``w`` on ``[-2^(b-1), 2^(b-1) - 1]`` with scale
    ``max|w| / (2^(b-1) - 1)`` from the current weights (detached), per output channel (axis 0) or
    per tensor; straight-through gradient. Returns the weights and the scale per output channel."""
    qmax = (1 << (bitwidth - 1)) - 1
    absmax = w.detach().abs().amax(dim=tuple(range(1, w.dim()))) if per_channel else w.detach().abs().amax().expand(w.shape[0])
    scale = (absmax.clamp_min(1e-30) / qmax).clamp_min(MIN_SCALE).contiguous()
    zero = torch.zeros(w.shape[0], dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -qmax - 1, qmax), scale


def bias_fq(b: torch.Tensor, input_scale, weight_scale: torch.Tensor) -> torch.Tensor:
    """int32 bias grid ``s_in * s_w`` with a straight-through round (scale detached)."""
    s = (input_scale.detach() if torch.is_tensor(input_scale) else input_scale) * weight_scale
    return b + (torch.round(b / s) * s - b).detach()


# -- the QAT network ----------------------------------------------------------------------------

QUANT_POINTS = ["image", "stem"] + [f"b{i}.{p}" for i in range(6) for p in ("dw", "pw", "sc", "out")] + ["pool", "fc"]


class QATNet(nn.Module):
    """The folded network with fake-quant at onnxqat's places; ``quant`` None = float."""

    def __init__(self, folded: nn.Module, quant: nn.ModuleDict | None, param_bw: int = 8, per_channel: bool = True):
        super().__init__()
        self.stem = folded.stem[0]
        self.blocks = nn.ModuleList(folded.blocks)
        self.fc = folded.fc
        self.quant = quant
        self.param_bw, self.per_channel = param_bw, per_channel

    def q(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.quant[name.replace(".", "_")](x) if self.quant is not None and name.replace(".", "_") in self.quant else x

    def scale_of(self, name: str):
        fq = self.quant[name.replace(".", "_")]
        return fq.scale

    def conv(self, conv: nn.Conv2d, x: torch.Tensor, input_q: str) -> torch.Tensor:
        w, b = conv.weight, conv.bias
        if self.quant is not None and not isinstance(self.quant[input_q.replace(".", "_")], Observer):
            w, s_w = weight_fq(w, self.param_bw, self.per_channel)
            b = bias_fq(b, self.scale_of(input_q), s_w)
        return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q("image", x)
        x = self.q("stem", F.relu(self.conv(self.stem, x, "image")))
        src = "stem"
        for i, block in enumerate(self.blocks):
            h = self.q(f"b{i}.dw", F.relu(self.conv(block.dw[0], x, src)))
            h = self.q(f"b{i}.pw", self.conv(block.pw[0], h, f"b{i}.dw"))
            s = x if isinstance(block.shortcut, nn.Identity) else self.q(f"b{i}.sc", self.conv(block.shortcut[0], x, src))
            x = self.q(f"b{i}.out", F.relu(h + s))
            src = f"b{i}.out"
        x = self.q("pool", torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        w, b = self.fc.weight, self.fc.bias
        if self.quant is not None and not isinstance(self.quant["pool"], Observer):
            w, s_w = weight_fq(w, self.param_bw, self.per_channel)
            b = bias_fq(b, self.scale_of("pool"), s_w)
        return self.q("fc", F.linear(x, w, b))


def used_points(folded: nn.Module) -> list[str]:
    return [p for p in QUANT_POINTS if not (p.endswith(".sc") and isinstance(folded.blocks[int(p[1])].shortcut, nn.Identity))]


@torch.no_grad()
def calibrate(folded: nn.Module, images: np.ndarray) -> dict[str, tuple[float, int]]:
    points = used_points(folded)
    observers = nn.ModuleDict({p.replace(".", "_"): Observer() for p in points})
    net = QATNet(folded, observers)
    for start in range(0, len(images), 64):
        net.logits(torch.from_numpy(images[start:start + 64]))
    return {p: minmax_encoding(observers[p.replace(".", "_")].lo, observers[p.replace(".", "_")].hi) for p in points}


def calibrated_network(model_path: str, calib_path: str, n: int | None, threads: int
                       ) -> tuple[nn.Module, dict[str, tuple[float, int]]]:
    """Set torch's threads and seed; the folded float network and its activation encodings from the
    first ``n`` images (None: all) of ``calib_path``."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    folded = folded_network(model_path)
    with np.load(calib_path) as data:
        images = data["image"][:n]
    return folded, calibrate(folded, images)


def build(variant: str, folded: nn.Module, encodings: dict[str, tuple[float, int]], param_bw: int = 8,
          per_channel: bool = True) -> QATNet:
    folded = copy.deepcopy(folded)
    if variant == "float":
        return QATNet(folded, None)
    kind = FixedFQ if variant == "qat-fixed" else LearnedFQ
    quant = nn.ModuleDict({p.replace(".", "_"): kind(*enc) for p, enc in encodings.items()})
    return QATNet(folded, quant, param_bw, per_channel)


# -- timing -------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, net: QATNet, lr: float, memory_format: torch.memory_format, optimizer_impl: str = "default",
                 eps: float = 1e-8):
        self.net = net.train()
        self.memory_format = memory_format
        if memory_format is torch.channels_last:
            self.net.to(memory_format=torch.channels_last)
        flags = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}.get(optimizer_impl, {})
        self.opt = torch.optim.AdamW(net.parameters(), lr=lr, eps=eps, weight_decay=0.0, **flags)

    def prepare(self, batch: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(batch[0]).contiguous(memory_format=self.memory_format)
        return x, torch.from_numpy(batch[1])

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.net.logits(batch[0]), batch[1])
        loss.backward()
        self.opt.step()
        return loss.detach().item()


@torch.no_grad()
def test_accuracy(net: QATNet, path: str, n: int | None = 2000, batch: int = 500) -> float:
    """Top-1 accuracy on the first ``n`` images of ``path`` (None: all of them)."""
    with np.load(path) as data:
        x, y = data["image"][:n], data["label"][:n]
    net.eval()
    pred = torch.cat([net.logits(torch.from_numpy(x[i:i + batch])).argmax(1) for i in range(0, len(y), batch)])
    net.train()
    return float((pred.numpy() == y).mean())


def memory_format(name: str) -> torch.memory_format:
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def parse_args() -> argparse.Namespace:
    p = worker_parser(__doc__)
    p.add_argument("--test", default=os.path.join(MODELS_DIR, "fmnist_test.npz"))
    p.add_argument("--memory-format", choices=("channels_last", "contiguous"), default="channels_last")
    p.add_argument("--optimizer-impl", choices=("default", "foreach", "fused", "for-loop"), default="default",
                   help="torch.optim.AdamW implementation (default: torch's own choice)")
    p.add_argument("--check", action="store_true")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    folded, encodings = calibrated_network(args.model, args.train, 512, args.threads)
    fmt = memory_format(args.memory_format)
    variants = [v for v in args.variants.split(",") if v]
    trainers = {v: Trainer(build(v, folded, encodings), args.lr, fmt, args.optimizer_impl) for v in variants}
    if args.check:
        print({v: test_accuracy(t.net, args.test) for v, t in trainers.items()})
        return
    timer = batch_timer(args.train, {v: t.step for v, t in trainers.items()}, lambda v, i, b: trainers[v].prepare(b))
    run_worker(timer, args.once, lambda: {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                          "memory_format": args.memory_format, "optimizer_impl": args.optimizer_impl,
                                          "quantizers": len(encodings), "time": time.time()})


if __name__ == "__main__":
    main()
