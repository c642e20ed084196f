"""Frozen, validated options of quantization-aware training."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from onnxqat.errors import ConfigError
from onnxqat.spec import Choice

__all__ = ["Loss", "Optimizer", "TrainOptions", "default_epochs", "default_lr", "lowest_activation_bitwidth", "MIN_STEPS"]

# Fewer optimizer steps than this rarely move a quantized model anywhere useful (a small CNN got
# worse than PTQ after 4 steps at lr 1e-4): below it the trainer warns.
MIN_STEPS = 50
# Steps the default number of epochs aims at.
TARGET_STEPS = 300
MAX_DEFAULT_EPOCHS = 20
# AdamW's default learning rate with activations of 8 bits and more, and how it grows per
# activation bit below 8 (see default_lr); BENCHMARKS.md ("QAT on real models", evening run) has the runs these come from.
LR_8BIT = 1e-5
LR_GROWTH_PER_BIT = 2.0


class Loss(Choice):
    """What the training minimises."""

    CROSS_ENTROPY = "cross_entropy"  # integer labels
    MSE = "mse"                      # float targets
    DISTILL = "distill"              # match the float model; no labels needed


class Optimizer(Choice):
    ADAMW = "adamw"
    SGD = "sgd"


def _finite(name: str, value: float, *, positive: bool = False, low: float | None = None,
            high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")
    if low is not None and value < low or high is not None and value > high:
        raise ConfigError(f"{name} must be in [{low}, {high}], got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """How to fine-tune a simulation.

    Attributes:
        loss: See :class:`Loss`.
        optimizer: ``adamw`` or ``sgd``.
        lr: Learning rate; None (default): :func:`default_lr` of the lowest activation bitwidth
            of the simulation (1e-5 at 8 bits, 1.6e-4 at 4 bits).
        weight_decay: AdamW weight decay.
        range_learning: Train activation scales and zero points (LSQ) instead of keeping the
            calibrated ones. Weight encodings always follow the weights.
        encoding_lr_scale: How much faster than the weights encodings move under range learning.
        output_index: Model output the loss reads.
        label_key, target_key: Batch keys of labels (cross-entropy) and targets (MSE).
        temperature: Distillation temperature.
        freeze: Initializer or node names whose parameters are not trained.
        train_last_n: Train only the parameters of the last N layers (nodes with weights).
        threads: onnxruntime intra-op threads (None: onnxruntime's choice).
        quantized: False trains the float model without any quantizer (a baseline for benchmarks).
        device: ``cpu``, or ``cuda`` (onnxruntime-training's CUDA provider, in a GPU build).
        micro_batch: Samples per training run: each optimizer batch runs in pieces of at most this
            many samples whose gradients add up exactly to the batch's (the same steps and updates;
            :mod:`onnxqat.train.micro`). None or 0 (default): chosen from a memory estimate, the
            largest size whose training step stays within :data:`~onnxqat.train.micro.TRAIN_BUDGET`
            times float inference at the batch.
    """

    loss: Loss = Loss.CROSS_ENTROPY
    optimizer: Optimizer = Optimizer.ADAMW
    lr: float | None = None
    weight_decay: float = 0.0
    range_learning: bool = False
    encoding_lr_scale: float = 10.0
    output_index: int = 0
    label_key: str = "label"
    target_key: str = "target"
    temperature: float = 2.0
    freeze: tuple[str, ...] = ()
    train_last_n: int | None = None
    threads: int | None = None
    quantized: bool = True
    device: str = "cpu"
    micro_batch: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "loss", Loss.parse(self.loss, "loss"))
        object.__setattr__(self, "optimizer", Optimizer.parse(self.optimizer, "optimizer"))
        if self.lr is not None:
            object.__setattr__(self, "lr", _finite("learning rate", self.lr, positive=True))
        if self.lr is not None and self.lr > 1.0:
            raise ConfigError(f"learning rate {self.lr:g} is far outside what fine-tuning uses (1e-6 to 1e-2)")
        object.__setattr__(self, "weight_decay", _finite("weight decay", self.weight_decay, low=0.0, high=1.0))
        object.__setattr__(self, "encoding_lr_scale",
                           _finite("encoding_lr_scale", self.encoding_lr_scale, positive=True))
        object.__setattr__(self, "temperature", _finite("distillation temperature", self.temperature, positive=True))
        object.__setattr__(self, "freeze", tuple(self.freeze))
        if not all(isinstance(n, str) for n in self.freeze):
            raise ConfigError("freeze must be a list of initializer or node names")
        if self.micro_batch == 0 and not isinstance(self.micro_batch, bool):
            object.__setattr__(self, "micro_batch", None)  # 0: chosen from memory, as None
        for name, value, low in (("train_last_n", self.train_last_n, 1), ("threads", self.threads, 1),
                                 ("micro_batch", self.micro_batch, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                low_text = "0 (0: automatic)" if name == "micro_batch" else str(low)
                raise ConfigError(f"{name} must be an integer >= {low_text}, got {value!r}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if isinstance(self.output_index, bool) or not isinstance(self.output_index, int):
            raise ConfigError(f"output_index must be an integer, got {self.output_index!r}")


def default_epochs(steps_per_epoch: int) -> int:
    """Epochs that give about :data:`TARGET_STEPS` optimizer steps (1 to 20)."""
    if steps_per_epoch < 1:
        return 1
    return max(1, min(MAX_DEFAULT_EPOCHS, math.ceil(TARGET_STEPS / steps_per_epoch)))


def default_lr(bits: int | None) -> float:
    """AdamW learning rate for a simulation whose lowest activation bitwidth is ``bits`` (None:
    nothing quantized).

    With 8-bit activations PTQ is usually close to float and ``1e-5`` keeps training there (at 4-bit
    weights too: Adam moves every weight by about the rate per step whatever its size, and 1.6e-4
    took a PP-LCNet at W4A8 from 0.99 to 0.81 agreement in two steps). Below 8 bits PTQ loses far
    more and small rates recover little of it in a few hundred steps, so the rate doubles per
    activation bit below 8: 6 bits 4e-5, 4 bits 1.6e-4.

    >>> default_lr(8), default_lr(4)
    (1e-05, 0.00016)
    """
    if bits is None or bits >= 8:
        return LR_8BIT
    return float(f"{LR_8BIT * LR_GROWTH_PER_BIT ** (8 - bits):.3g}")


def lowest_activation_bitwidth(plan: Any, encodings: Mapping[str, Any] | None = None) -> int | None:
    """The smallest bitwidth of a :class:`~onnxqat.plan.QuantPlan`'s activation quantizers; an
    encoding in ``encodings`` (loaded from a file) wins over the plan's spec."""
    bits = []
    for q in plan.activations:
        enc = encodings.get(q.name) if encodings is not None else None
        bits.append(int(enc.bitwidth) if enc is not None else q.spec.bitwidth)
    return min(bits) if bits else None
