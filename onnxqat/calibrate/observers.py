"""Streaming statistics of activation tensors, in constant memory.

An observer sees one batch at a time and keeps a fixed-size summary: a running min/max, or a
histogram of fixed bin count whose range grows by merging whole bins (never re-binning with
interpolation), so the summary after N batches equals the histogram of all N batches at the final
resolution.
A batch can also be folded in piece by piece (:class:`HistogramBatch`) once its range is known,
with the same result as folding it whole.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["HistogramBatch", "HistogramObserver", "MinMaxObserver"]

# Values binned per numpy call: bounds the float64/int64 temporaries of one update.
_CHUNK = 1 << 20


class MinMaxObserver:
    """Running min and max of finite values."""

    def __init__(self) -> None:
        self.min = math.inf
        self.max = -math.inf
        self.nonfinite = 0

    def update_bound(self, value: float, *, upper: bool) -> None:
        """Fold in a batch minimum (``upper=False``) or maximum computed elsewhere."""
        if not math.isfinite(value):
            self.nonfinite += 1
        elif upper:
            self.max = max(self.max, value)
        else:
            self.min = min(self.min, value)

    def update_range(self, lo: float, hi: float) -> None:
        self.update_bound(lo, upper=False)
        self.update_bound(hi, upper=True)

    def update(self, x: np.ndarray) -> None:
        x = _finite(np.asarray(x), self)
        if x.size:
            self.update_range(float(x.min()), float(x.max()))

    @property
    def empty(self) -> bool:
        return self.min > self.max

    def merge(self, other: MinMaxObserver) -> None:
        """Fold in another observer's statistics (exact)."""
        if not other.empty:
            self.update_range(other.min, other.max)
        self.nonfinite += other.nonfinite


class HistogramObserver:
    """Histogram with ``bins`` equal bins over a range that grows as data arrives.

    >>> h = HistogramObserver(bins=4)
    >>> h.update(np.array([0.0, 1.0, 2.0, 3.0, 4.0]))
    >>> h.update(np.array([-4.0]))
    >>> float(h.lo), float(h.width), h.counts.tolist()
    (-4.0, 2.0, [1.0, 0.0, 2.0, 3.0])
    """

    def __init__(self, bins: int = 2048) -> None:
        self.bins = bins
        self.counts: np.ndarray = np.zeros(bins, dtype=np.float64)
        self.lo = 0.0
        self.width = 0.0
        self.minmax = MinMaxObserver()
        # sums of each sample's min and max (axis 0 = samples; a tensor of rank < 2 is one sample)
        self.sample_sums = np.zeros(2, dtype=np.float64)
        self.samples = 0

    @property
    def min(self) -> float:
        return self.minmax.min

    @property
    def max(self) -> float:
        return self.minmax.max

    @property
    def empty(self) -> bool:
        return self.minmax.empty

    @property
    def nonfinite(self) -> int:
        return self.minmax.nonfinite

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if not x.size:
            return
        lo, hi, flat = _sample_bounds(x, self.minmax)
        if not flat.size:
            return
        self.sample_sums += (float(lo.sum(dtype=np.float64)), float(hi.sum(dtype=np.float64)))
        self.samples += len(lo)
        self.extend(float(lo.min()), float(hi.max()))
        self.counts += _binned(flat, self.lo, self.width, self.bins)

    def extend(self, xmin: float, xmax: float) -> None:
        """Make the grid cover ``[xmin, xmax]``, as :meth:`update` does for a batch with these
        finite bounds before binning it."""
        first = self.empty
        self.minmax.update_range(xmin, xmax)
        if first:
            span = xmax - xmin
            if span <= 0:
                span = max(abs(xmin), 1.0) * 1e-6
            self.lo = xmin
            self.width = span / self.bins
        else:
            self._grow(xmin, xmax)

    def sample_mean_range(self) -> tuple[float, float]:
        """Mean over the samples seen of each sample's min and max (NNCF's default range)."""
        if not self.samples:
            return self.min, self.max
        lo, hi = self.sample_sums / self.samples
        return float(lo), float(hi)

    def _grow(self, xmin: float, xmax: float) -> None:
        step = self._grow_step(xmin, xmax)
        if step is not None:
            self._regrid(*step)

    def _grow_step(self, xmin: float, xmax: float) -> tuple[int, int] | None:
        """``(shift, factor)`` that makes the grid cover ``[xmin, xmax]`` (None: it does)."""
        hi = self.lo + self.bins * self.width
        if xmin >= self.lo and xmax <= hi:
            return None
        shift = math.ceil((self.lo - xmin) / self.width) if xmin < self.lo else 0
        needed = shift + max(math.ceil((xmax - self.lo) / self.width), self.bins)
        factor = 1
        while self.bins * factor < needed:
            factor *= 2
        return shift, factor

    def _regrid(self, shift: int, factor: int) -> None:
        """Move ``shift`` bins down and merge every ``factor`` bins into one."""
        self.counts = _merged(self.counts, shift, factor)
        self.lo -= shift * self.width
        self.width *= factor

    def merge(self, other: HistogramObserver) -> None:
        """Fold in another histogram: its counts go to this grid's bins by their centres (exact
        when the grids agree, else within one bin of the coarser grid)."""
        self.minmax.nonfinite += other.nonfinite
        self.sample_sums += other.sample_sums
        self.samples += other.samples
        if other.empty:
            return
        if self.empty:
            self.counts, self.lo, self.width = other.counts.copy(), other.lo, other.width
            self.minmax.update_range(other.min, other.max)
            return
        self.minmax.update_range(other.min, other.max)
        self._grow(other.min, other.max)
        keep = other.counts > 0
        idx = np.floor((other.centers()[keep] - self.lo) / self.width).astype(np.int64)
        np.clip(idx, 0, self.bins - 1, out=idx)
        self.counts += np.bincount(idx, weights=other.counts[keep], minlength=self.bins)

    def centers(self) -> np.ndarray:
        return self.lo + (np.arange(self.bins) + 0.5) * self.width

    def percentile_range(self, percentile: float) -> tuple[float, float]:
        """Range between the ``100 - p`` and ``p`` percentiles (bin edges, clamped to data)."""
        total = self.counts.sum()
        cdf = np.cumsum(self.counts) / total
        tail = (100.0 - percentile) / 100.0
        lo_bin = int(np.searchsorted(cdf, tail, side="right"))
        hi_bin = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
        lo = max(self.lo + lo_bin * self.width, self.min)
        hi = min(self.lo + (hi_bin + 1) * self.width, self.max)
        return lo, hi


def _binned(x: np.ndarray, lo: float, width: float, bins: int) -> np.ndarray:
    """Counts of the finite values ``x`` on the grid ``lo + i * width`` (values past it go to the end bins),
    binned :data:`_CHUNK` values at a time."""
    flat = np.asarray(x).ravel()
    counts = np.zeros(bins, dtype=np.float64)
    for start in range(0, flat.size, _CHUNK):
        idx = np.floor((flat[start:start + _CHUNK].astype(np.float64) - lo) / width).astype(np.int64)
        np.clip(idx, 0, bins - 1, out=idx)
        counts += np.bincount(idx, minlength=bins)
    return counts


def _merged(counts: np.ndarray, shift: int, factor: int) -> np.ndarray:
    old_index = (np.arange(counts.size, dtype=np.int64) + shift) // factor
    merged: np.ndarray = np.bincount(old_index, weights=counts, minlength=counts.size)[: counts.size]
    return merged


class HistogramBatch:
    """One batch of ``observer.update(t)`` over tensors ``t_1 .. t_k`` in order, fed piece by piece.

    The finite bounds of every whole tensor are given first (:meth:`begin`); each tensor's pieces
    are binned on the grid the observer would have when that tensor's turn came, into a count
    array of its own, and :meth:`commit` folds them in order (the same regrids, then the same
    sums of whole counts): the observer ends as it would after the whole tensors' updates. The
    finite range the pieces actually held is checked against the bounds (:meth:`spans_bounds`),
    so a caller can update whole instead when they differ.
    """

    def __init__(self, observer: HistogramObserver) -> None:
        self.observer = observer
        self.bounds: list[tuple[float, float]] = []
        self.grids: list[tuple[float, float, tuple[int, int] | None]] = []  # lo, width, regrid before it
        self.counts: list[np.ndarray] = []
        self.seen: list[MinMaxObserver] = []
        self.sample_sums: list[np.ndarray] = []  # the pieces' per-sample bounds (pieces split the samples)
        self.samples: list[int] = []

    def begin(self, xmin: float, xmax: float) -> int:
        """Announce the next tensor's finite bounds; returns its index for :meth:`add`."""
        obs = self.observer
        probe = HistogramObserver(obs.bins)  # the grid as the observer would have it now
        if self.grids:
            probe.lo, probe.width = self.grids[-1][0], self.grids[-1][1]
        step = None
        if not self.grids and obs.empty:
            probe.extend(xmin, xmax)
        else:
            if not self.grids:
                probe.lo, probe.width = obs.lo, obs.width
            step = probe._grow_step(xmin, xmax)
            if step is not None:
                probe.lo -= step[0] * probe.width
                probe.width *= step[1]
        self.bounds.append((xmin, xmax))
        self.grids.append((probe.lo, probe.width, step))
        self.counts.append(np.zeros(self.observer.bins, dtype=np.float64))
        self.seen.append(MinMaxObserver())
        self.sample_sums.append(np.zeros(2, dtype=np.float64))
        self.samples.append(0)
        return len(self.grids) - 1

    def add(self, index: int, x: np.ndarray) -> None:
        """Bin a piece of tensor ``index``."""
        seen = self.seen[index]
        x = np.asarray(x)
        if not x.size:
            return
        low, high, flat = _sample_bounds(x, seen)
        if not flat.size:
            return
        seen.update_range(float(low.min()), float(high.max()))
        self.sample_sums[index] += (float(low.sum(dtype=np.float64)), float(high.sum(dtype=np.float64)))
        self.samples[index] += len(low)
        lo, width, _ = self.grids[index]
        self.counts[index] += _binned(flat, lo, width, self.observer.bins)

    def spans_bounds(self) -> bool:
        """Whether every tensor's pieces held finite values spanning exactly its announced bounds."""
        return all(not seen.empty and (seen.min, seen.max) == bound for seen, bound in zip(self.seen, self.bounds))

    def commit(self) -> None:
        """Fold the batch into the observer (only when :meth:`spans_bounds`)."""
        if not self.spans_bounds():
            raise ValueError("the pieces did not span the announced bounds")
        obs = self.observer
        for (lo, width, step), counts, seen in zip(self.grids, self.counts, self.seen):
            if obs.empty:
                obs.lo, obs.width = lo, width
            elif step is not None:
                obs._regrid(*step)
            assert (obs.lo, obs.width) == (lo, width)
            obs.minmax.update_range(seen.min, seen.max)
            obs.counts = obs.counts + counts
        for seen, sums, samples in zip(self.seen, self.sample_sums, self.samples):
            obs.minmax.nonfinite += seen.nonfinite
            obs.sample_sums += sums
            obs.samples += samples


def _sample_bounds(x: np.ndarray, observer: MinMaxObserver) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each sample's finite min and max (axis 0 = samples; a tensor of rank < 2 is one sample, and
    samples without a finite value are left out) and the finite values, flat, in one pass; the
    non-finite values are counted on ``observer``."""
    rows = x.reshape(len(x), -1) if x.ndim >= 2 else x.reshape(1, -1)
    finite = np.isfinite(rows) if rows.dtype.kind == "f" else None
    if finite is None or finite.all():
        return rows.min(axis=1), rows.max(axis=1), x.ravel()
    observer.nonfinite += int(finite.size - finite.sum())
    masked = np.where(finite, rows, np.nan)[finite.any(axis=1)]
    if not masked.size:
        empty = np.zeros(0, dtype=rows.dtype)
        return empty, empty, empty
    return np.nanmin(masked, axis=1), np.nanmax(masked, axis=1), rows[finite]


def _finite(x: np.ndarray, observer: MinMaxObserver) -> np.ndarray:
    if x.dtype.kind != "f":
        return x
    mask = np.isfinite(x)
    if mask.all():
        return x
    observer.nonfinite += int(x.size - mask.sum())
    finite: np.ndarray = x[mask]
    return finite
