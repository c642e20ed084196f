"""Data in: validation of feeds against a model's inputs, npz files, batching.

Batches are plain ``{input_name: ndarray}`` dicts, so any iterable of them works (a list, a
generator, a PyTorch DataLoader whose collate function returns numpy arrays, a tf.data iterator
mapped to numpy); onnxqat never imports a framework.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
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
    "OUTLIER_RATIO",
    "check_label_range",
    "data_memory_limit",
    "input_signature",
    "load_model_inputs",
    "load_npz",
    "output_classes",
    "parse_batch_axes",
    "validate_feed",
    "warn_range_outliers",
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


def data_memory_limit() -> int | None:
    """Bytes the arrays of one npz file may expand to: ``ONNXQAT_MAX_DATA_BYTES``, else 80% of
    the memory available now (None where that is unknown)."""
    env = os.environ.get("ONNXQAT_MAX_DATA_BYTES")
    if env:
        try:
            value = int(float(env))
        except ValueError:
            raise DataError(f"ONNXQAT_MAX_DATA_BYTES={env!r}: expected a number of bytes") from None
        if value < 1:
            raise DataError(f"ONNXQAT_MAX_DATA_BYTES={env!r}: must be positive")
        return value
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * 0.8)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.8)
    except (OSError, ValueError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.3g} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.3g} MiB" if n >= 1 << 20 else f"{n} bytes"


def _npy_bytes(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: str, key: str) -> int:
    """Bytes the npy member ``info`` expands to, from its header; refuses members that are no
    numpy array (raw bytes, a pickle), hold Python objects, or whose header claims more data than
    the member holds (which would allocate that much before failing)."""
    fmt = np.lib.format
    with zf.open(info) as fp:
        try:
            version = fmt.read_magic(fp)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(fp)
            else:
                shape, _, dtype = fmt.read_array_header_2_0(fp)
        except (ValueError, EOFError) as e:
            raise DataError(f"{path}: '{key}' is not a numpy array (raw bytes or a pickle?): {e}") from None
        start = fp.tell()
    if dtype.hasobject:
        raise DataError(f"{path}: '{key}' holds Python objects, which only load through pickle; onnxqat refuses them")
    need = math.prod(shape) * dtype.itemsize
    if need > info.file_size - start:
        raise DataError(f"{path}: '{key}': its header claims shape {list(shape)} {dtype} ({_gib(need)}) but the "
                        f"member holds {_gib(max(info.file_size - start, 0))}; the file is damaged")
    return need


def load_npz(path: str | os.PathLike[str], keys: Sequence[str], optional: Sequence[str] = (),
             batch_axes: BatchAxes | None = None, *, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Load ``keys`` (and those of ``optional`` that are present) from an npz file: one array per
    key, samples along axis 0 unless ``batch_axes`` says another axis (or None: not batched, the
    same array with every batch, e.g. a sample rate).

    The arrays must fit ``max_bytes`` (default :func:`data_memory_limit`), checked from the
    members' headers before anything is read. Raises :class:`DataError` for unreadable files,
    special files (a FIFO would block), missing keys, members that are no arrays or lie about
    their size, empty or mismatched sample counts.
    """
    from onnxqat.io import check_input_file

    path = check_input_file(path, DataError)
    sizes: dict[str, int] = {}
    try:
        with open(path, "rb") as raw:
            if raw.read(6) == b"\x93NUMPY":
                raise DataError(f"{path}: not an npz archive (a single .npy array?)")
        with zipfile.ZipFile(path) as zf:
            members = {(i.filename[:-4] if i.filename.endswith(".npy") else i.filename): i for i in zf.infolist()}
            missing = [k for k in keys if k not in members]
            if missing:
                raise DataError(
                    f"{path}: missing key(s) {missing}; the file holds {sorted(members) or 'nothing'}"
                )
            wanted = [*keys, *(o for o in optional if o in members and o not in keys)]
            sizes = {k: _npy_bytes(zf, members[k], path, k) for k in wanted}
        limit = max_bytes if max_bytes is not None else data_memory_limit()
        if limit is not None and sum(sizes.values()) > limit:
            biggest = max(sizes, key=lambda k: sizes[k])
            raise DataError(f"{path}: the arrays need {_gib(sum(sizes.values()))} in memory ('{biggest}': "
                            f"{_gib(sizes[biggest])}), more than the limit of {_gib(limit)} (80% of the available "
                            "memory, or ONNXQAT_MAX_DATA_BYTES); use fewer samples per file")
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in wanted}
    except MemoryError:
        raise DataError(f"{path}: out of memory reading the arrays ({_gib(sum(sizes.values()))})") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, ValueError, EOFError, KeyError) as e:
        raise DataError(f"{path}: cannot read npz data: {e}") from None
    axes = dict(batch_axes or {})
    counts: dict[str, int] = {}
    for k, a in arrays.items():
        if not isinstance(a, np.ndarray):
            raise DataError(f"{path}: '{k}' is not a numpy array")
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


def output_classes(model: ir.Model, output_index: int = 0) -> int | None:
    """The class count of output ``output_index``: its last dimension, when static and >= 2."""
    outputs = list(model.graph.outputs)
    if not -len(outputs) <= output_index < len(outputs):
        raise DataError(f"output index {output_index} is out of range: the model has {len(outputs)} output(s)")
    shape = outputs[output_index].shape
    if shape is None or len(shape) < 1:
        return None
    last = shape[-1]
    return last if isinstance(last, int) and last >= 2 else None


def check_label_range(labels: Any, classes: int, *, where: str, key: str = "label") -> None:
    """Class labels must be integers in ``[0, classes)``: out-of-range labels give an accuracy of
    0 and, in training, a loss that teaches nothing (or nonsense)."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise DataError(f"{where}: labels '{key}' must be integers, got {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = int(np.count_nonzero((labels < 0) | (labels >= classes)))
        raise DataError(f"{where}: labels '{key}' range over [{int(labels.min())}, {int(labels.max())}] but the "
                        f"model output has {classes} classes (0 to {classes - 1}); {bad} label(s) are outside")


# A sample whose peak magnitude exceeds the typical sample's by this factor sets a calibration
# range in which the typical sample keeps less than about 1% of the grid.
OUTLIER_RATIO = 100.0


def warn_range_outliers(arrays: Mapping[str, np.ndarray], signature: Sequence[InputSpec], *, where: str,
                        batch_axes: BatchAxes | None = None) -> list[str]:
    """Warn where a few samples dominate an input's range (e.g. two corrupt samples at 3e38 make
    every real value quantize to 0): legal data, almost surely a wrong calibration set.

    Returns the names of the inputs warned about.
    """
    warned = []
    for spec in signature:
        a = arrays.get(spec.name)
        axis = (batch_axes or {}).get(spec.name, 0)
        if a is None or a.dtype.kind != "f" or axis is None or a.ndim == 0 or a.shape[axis] < 8:
            continue
        others = tuple(i for i in range(a.ndim) if i != axis % a.ndim)
        if others:
            peaks = np.maximum(np.max(a, axis=others), -np.min(a, axis=others)).astype(np.float64)
        else:
            peaks = np.abs(a).astype(np.float64)
        typical = float(np.median(peaks))
        if not typical > 0:
            continue
        high = np.flatnonzero(peaks > OUTLIER_RATIO * typical)
        if 0 < len(high) <= max(2, len(peaks) // 10):  # a few: two of a small set count
            top = float(peaks.max())
            warnings.warn(
                f"{where}: input '{spec.name}': {len(high)} of {len(peaks)} samples (e.g. sample {int(high[0])}) "
                f"reach |x| = {top:.3g}, {top / typical:.3g}x the typical sample's peak ({typical:.3g}); they set "
                "the calibration range and the other samples keep almost none of the grid", RuntimeWarning,
                stacklevel=2)
            warned.append(spec.name)
    return warned


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
        self.n: int = min(sizes.pop(), limit) if limit is not None else sizes.pop()
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
    if not isinstance(batches, Sized):
        return None
    try:
        return len(batches)
    except TypeError:
        return None
