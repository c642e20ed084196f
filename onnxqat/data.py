"""Data in: validation of feeds against a model's inputs, npz files, batching.

Batches are plain ``{input_name: ndarray}`` dicts, so any iterable of them works (a list, a
generator, a PyTorch DataLoader whose collate function returns numpy arrays, a tf.data iterator
mapped to numpy); onnxqat never imports a framework.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxqat.errors import DataError
from onnxqat.graph import is_constant
from onnxqat.passes.float16 import DECLARED_DTYPE

__all__ = [
    "Batches",
    "InputSpec",
    "NpzBatches",
    "input_signature",
    "load_model_inputs",
    "load_npz",
    "parse_batch_axes",
    "validate_feed",
]

Batches = Iterable[Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """Name, dtype and shape (None for symbolic dims) of one model input.

    ``dtype`` is what callers feed (the model as given); ``runtime_dtype`` what the working model
    runs on (float32 for a float16 model simulated in float32).
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None
    runtime_dtype: np.dtype | None = None

    def describe(self) -> str:
        dims = "?" if self.shape is None else "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"
        return f"{self.name}: {self.dtype} {dims}"


def input_signature(model: ir.Model) -> list[InputSpec]:
    """The inputs a caller must feed (initializers listed as inputs are excluded)."""
    specs = []
    for value in model.graph.inputs:
        if is_constant(value):
            continue
        assert value.dtype is not None and value.name is not None
        shape = None
        if value.shape is not None:
            # symbolic dims and the -1 some exporters write for "any" are both free
            shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in value.shape)
        runtime = np.dtype(value.dtype.numpy())
        declared = value.meta.get(DECLARED_DTYPE)
        dtype = np.dtype(declared.numpy()) if declared is not None else runtime
        specs.append(InputSpec(value.name, dtype, shape, runtime))
    return specs


def validate_feed(
    feed: Mapping[str, Any],
    signature: Sequence[InputSpec],
    *,
    where: str,
    batch_dim: bool = True,
    batch_axes: BatchAxes | None = None,
) -> dict[str, np.ndarray]:
    """Check one batch against the model's inputs; return the arrays to feed.

    Raises :class:`DataError` naming ``where`` (file and batch) and the input at fault. Extra keys
    (labels, ids) are ignored.
    """
    if not isinstance(feed, Mapping):
        raise DataError(f"{where}: a batch must be a dict of arrays, got {type(feed).__name__}")
    out: dict[str, np.ndarray] = {}
    for spec in signature:
        if spec.name not in feed:
            have = ", ".join(sorted(map(str, feed))) or "nothing"
            raise DataError(f"{where}: missing model input '{spec.name}' (got {have})")
        arr = np.asarray(feed[spec.name])
        if arr.dtype != spec.dtype:
            raise DataError(
                f"{where}: input '{spec.name}' has dtype {arr.dtype}, the model expects {spec.dtype}"
            )
        if spec.shape is not None:
            if arr.ndim != len(spec.shape) or any(
                d is not None and d != a for d, a in zip(spec.shape, arr.shape)
            ):
                raise DataError(
                    f"{where}: input '{spec.name}' has shape {list(arr.shape)}, the model expects "
                    f"{spec.describe().split(' ', 2)[-1]}"
                )
        axis = (batch_axes or {}).get(spec.name, 0)
        if batch_dim and axis is not None and arr.ndim > axis and arr.shape[axis] == 0:
            raise DataError(f"{where}: input '{spec.name}' is an empty batch")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise DataError(f"{where}: input '{spec.name}' contains {bad} NaN/Inf value(s)")
        if spec.runtime_dtype is not None and spec.runtime_dtype != arr.dtype:
            arr = arr.astype(spec.runtime_dtype)
        out[spec.name] = arr
    return out


BatchAxes = Mapping[str, "int | None"]


def load_npz(path: str | os.PathLike[str], keys: Sequence[str], optional: Sequence[str] = (),
             batch_axes: BatchAxes | None = None) -> dict[str, np.ndarray]:
    """Load ``keys`` (and those of ``optional`` that are present) from an npz file: one array per
    key, samples along axis 0 unless ``batch_axes`` says another axis (or None: not batched, the
    same array with every batch, e.g. a sample rate).

    Raises :class:`DataError` for unreadable files, missing keys, empty or mismatched sample counts.
    """
    path = os.fspath(path)
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: not an npz archive (a single .npy array?)")
        with f:
            missing = [k for k in keys if k not in f.files]
            if missing:
                raise DataError(
                    f"{path}: missing key(s) {missing}; the file holds {sorted(f.files) or 'nothing'}"
                )
            arrays = {k: f[k] for k in [*keys, *(o for o in optional if o in f.files and o not in keys)]}
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read npz data: {e}") from None
    axes = dict(batch_axes or {})
    counts: dict[str, int] = {}
    for k, a in arrays.items():
        axis = axes.get(k, 0)
        if axis is None:
            continue
        if not -a.ndim <= axis < a.ndim:
            hint = "" if a.ndim else f" (a scalar: --batch-axis {k}=none passes it whole)"
            raise DataError(f"{path}: '{k}' has {a.ndim} axes, no batch axis {axis}{hint}")
        counts[k] = a.shape[axis]
        if counts[k] == 0:
            raise DataError(f"{path}: '{k}' holds no samples")
    if len(set(counts.values())) > 1:
        raise DataError(f"{path}: sample counts differ between keys: {counts}")
    return arrays


def load_model_inputs(
    path: str | os.PathLike[str], signature: Sequence[InputSpec], extra_keys: Sequence[str] = (),
    optional_keys: Sequence[str] = (), batch_axes: BatchAxes | None = None,
) -> dict[str, np.ndarray]:
    """Load one array per model input (plus ``extra_keys``, e.g. labels, and ``optional_keys``
    where present) and validate them all.

    Errors name the file and the input: missing keys, dtype, shape, NaN/Inf, empty arrays.
    """
    names = {s.name for s in signature}
    arrays = load_npz(path, [s.name for s in signature] + [k for k in extra_keys if k not in names],
                      optional=[k for k in optional_keys if k not in names], batch_axes=batch_axes)
    validate_feed(arrays, signature, where=os.fspath(path), batch_axes=batch_axes)
    return arrays


class NpzBatches:
    """Re-iterable batches over arrays with a common first axis.

    With ``shuffle``, pass ``k`` uses the permutation drawn from ``(seed, k)``; ``set_epoch``
    picks the pass, so a resumed training run sees the same order as an uninterrupted one.

    >>> b = NpzBatches({"x": np.arange(5.0)}, batch_size=2)
    >>> len(b), [batch["x"].tolist() for batch in b]
    (3, [[0.0, 1.0], [2.0, 3.0], [4.0]])
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        limit: int | None = None,
        batch_axes: BatchAxes | None = None,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        self.axes = {k: (batch_axes or {}).get(k, 0) for k in arrays}
        counts = {k: a.shape[axis] for k, a in arrays.items() if (axis := self.axes[k]) is not None}
        sizes = set(counts.values())
        if len(sizes) != 1:
            raise DataError(f"arrays have different sample counts: {counts or 'no batched array'}")
        self.arrays = dict(arrays)
        self.n = min(sizes.pop(), limit) if limit is not None else sizes.pop()
        if self.n == 0:
            raise DataError("the dataset is empty")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        if self.drop_last:
            return max(self.n // self.batch_size, 1)
        return math.ceil(self.n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle order of ``epoch`` (a pure function of seed and epoch)."""
        self.epoch = epoch

    def order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        idx = self.order()
        self.epoch += 1
        stop = (self.n // self.batch_size) * self.batch_size if self.drop_last else self.n
        if stop == 0:
            stop = self.n
        for start in range(0, stop, self.batch_size):
            sel = idx[start : start + self.batch_size]
            batch = {}
            for k, a in self.arrays.items():
                axis = self.axes[k]
                if axis is None:
                    batch[k] = a
                elif self.shuffle:
                    batch[k] = np.take(a, sel, axis=axis)
                else:
                    index = [slice(None)] * a.ndim
                    index[axis] = slice(start, start + len(sel))
                    batch[k] = a[tuple(index)]
            yield batch


def parse_batch_axes(items: Sequence[str]) -> dict[str, int | None]:
    """``["state=1", "sr=none"]`` -> ``{"state": 1, "sr": None}`` (CLI ``--batch-axis``)."""
    out: dict[str, int | None] = {}
    for item in items:
        name, sep, axis = item.partition("=")
        if not sep or not name:
            raise DataError(f"--batch-axis {item!r}: expected NAME=AXIS (an integer, or none)")
        if axis.strip().lower() == "none":
            out[name] = None
            continue
        try:
            out[name] = int(axis)
        except ValueError:
            raise DataError(f"--batch-axis {item!r}: the axis must be an integer or none") from None
    return out


def count_batches(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None
