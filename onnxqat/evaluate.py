"""Evaluation driven by the user's data: top-1 accuracy, or any metric over model outputs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from onnxqat.data import check_label_range, count_batches
from onnxqat.errors import DataError

__all__ = ["accuracy", "agreement", "check_labels", "sqnr_db"]

RunFn = Callable[[Mapping[str, np.ndarray]], Sequence[np.ndarray]]


def check_labels(batch: Mapping[str, Any], label_key: str, n: int, where: str) -> np.ndarray:
    """The integer class labels of a batch, validated against its size ``n``."""
    if label_key not in batch:
        raise DataError(f"{where}: no label array '{label_key}' (got {sorted(map(str, batch))})")
    labels = np.asarray(batch[label_key])
    if labels.dtype.kind not in "iu":
        raise DataError(f"{where}: labels '{label_key}' must be integers, got {labels.dtype}")
    if labels.shape != (n,):
        raise DataError(f"{where}: labels '{label_key}' have shape {list(labels.shape)}, expected [{n}]")
    return labels


def accuracy(
    run: RunFn,
    batches: Iterable[Mapping[str, Any]],
    *,
    label_key: str = "label",
    output_index: int = 0,
    progress: bool | None = None,
    desc: str = "evaluating",
) -> tuple[float, int]:
    """Top-1 accuracy of ``argmax(outputs[output_index], axis=-1)`` against integer labels.

    ``run`` maps a batch to the model outputs (e.g. ``sim.run`` or a session's run). Returns
    ``(accuracy, number of samples)``.
    """
    correct = 0
    total = 0
    bar = tqdm(batches, total=count_batches(batches), desc=desc, unit="batch",
               disable=None if progress is None else not progress)
    for i, batch in enumerate(bar):
        outputs = run(batch)
        if not -len(outputs) <= output_index < len(outputs):
            raise DataError(f"output index {output_index} is out of range: the model has {len(outputs)} output(s)")
        scores = np.asarray(outputs[output_index])
        if scores.ndim < 1 or scores.shape[-1] < 2 or scores.dtype.kind != "f":
            raise DataError(
                f"output {output_index} has shape {list(scores.shape)} and dtype {scores.dtype}: "
                "not a tensor of class scores"
            )
        n = scores.shape[0] if scores.ndim > 1 else 1
        labels = check_labels(batch, label_key, n, f"batch {i}")
        check_label_range(labels, scores.shape[-1], where=f"batch {i}", key=label_key)  # else accuracy is 0
        correct += int((scores.reshape(n, -1).argmax(axis=-1) == labels).sum())
        total += n
    bar.close()
    if total == 0:
        raise DataError("no samples to evaluate")
    return correct / total, total


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (capped at 120 for exact matches)."""
    signal = float(np.mean(np.square(reference, dtype=np.float64)))
    noise = float(np.mean(np.square(reference.astype(np.float64) - test.astype(np.float64))))
    if noise <= signal * 1e-12:
        return 120.0
    return float(10.0 * np.log10(max(signal, 1e-30) / noise))


def agreement(
    reference: RunFn,
    run: RunFn,
    batches: Iterable[Mapping[str, Any]],
    *,
    output_index: int = 0,
    progress: bool | None = None,
    desc: str = "comparing",
) -> dict[str, float]:
    """How closely ``run`` follows ``reference`` (e.g. the float model) on one output.

    Returns ``sqnr_db`` (over all batches), ``top1_agreement`` (argmax over the last axis agrees;
    only for outputs with a class axis of 2 or more) and ``n`` (samples).
    """
    from onnxqat.progress import Progress

    signal = noise = 0.0
    agree = total = 0
    classes = True
    for batch in Progress(batches, total=count_batches(batches), desc=desc, enabled=progress):
        ref = np.asarray(reference(batch)[output_index], dtype=np.float64)
        out = np.asarray(run(batch)[output_index], dtype=np.float64)
        if ref.shape != out.shape:
            raise DataError(f"output {output_index}: shapes {list(ref.shape)} and {list(out.shape)} differ")
        signal += float(np.sum(ref * ref))
        noise += float(np.sum((ref - out) ** 2))
        if ref.ndim >= 1 and ref.shape[-1] >= 2:
            agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
            total += int(np.prod(ref.shape[:-1]))
        else:
            classes = False
    result = {"sqnr_db": 120.0 if noise <= signal * 1e-12 else float(10 * np.log10(max(signal, 1e-30) / max(noise, 1e-300)))}
    if classes and total:
        result["top1_agreement"] = agree / total
    result["n"] = float(total)
    return result
