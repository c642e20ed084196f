"""Streaming statistics of activation tensors, in constant memory.

An observer sees one batch at a time and keeps a fixed-size summary: a running min/max, or a
histogram of fixed bin count whose range grows by merging whole bins (never re-binning with
interpolation), so the summary after N batches equals the histogram of all N batches at the final
resolution.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["HistogramObserver", "MinMaxObserver"]


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
        # one pass for each sample's finite min and max (axis 0 = samples); the batch's are theirs
        rows = x.reshape(len(x), -1) if x.ndim >= 2 else x.reshape(1, -1)
        finite = np.isfinite(rows) if rows.dtype.kind == "f" else None
        if finite is None or finite.all():
            lo, hi, flat = rows.min(axis=1), rows.max(axis=1), x.ravel()
        else:
            self.minmax.nonfinite += int(finite.size - finite.sum())
            flat = rows[finite]
            masked = np.where(finite, rows, np.nan)[finite.any(axis=1)]
            lo, hi = np.nanmin(masked, axis=1), np.nanmax(masked, axis=1)
        if not flat.size:
            return
        self.sample_sums += (float(lo.sum(dtype=np.float64)), float(hi.sum(dtype=np.float64)))
        self.samples += len(lo)
        xmin, xmax = float(lo.min()), float(hi.max())
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
        idx = np.floor((flat.astype(np.float64) - self.lo) / self.width).astype(np.int64)
        np.clip(idx, 0, self.bins - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.bins)

    def sample_mean_range(self) -> tuple[float, float]:
        """Mean over the samples seen of each sample's min and max (NNCF's default range)."""
        if not self.samples:
            return self.min, self.max
        lo, hi = self.sample_sums / self.samples
        return float(lo), float(hi)

    def _grow(self, xmin: float, xmax: float) -> None:
        hi = self.lo + self.bins * self.width
        if xmin >= self.lo and xmax <= hi:
            return
        shift = math.ceil((self.lo - xmin) / self.width) if xmin < self.lo else 0
        needed = shift + max(math.ceil((xmax - self.lo) / self.width), self.bins)
        factor = 1
        while self.bins * factor < needed:
            factor *= 2
        old_index = (np.arange(self.bins, dtype=np.int64) + shift) // factor
        self.counts = np.bincount(old_index, weights=self.counts, minlength=self.bins)[: self.bins]
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


def _finite(x: np.ndarray, observer: MinMaxObserver) -> np.ndarray:
    if x.dtype.kind != "f":
        return x
    mask = np.isfinite(x)
    if mask.all():
        return x
    observer.nonfinite += int(x.size - mask.sum())
    finite: np.ndarray = x[mask]
    return finite
