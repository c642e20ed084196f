"""Calibration schemes: from statistics to a quantization range, then to an encoding.

* ``minmax``: the observed range.
* ``percentile``: the range between the (100 - p)th and pth percentiles of a histogram.
* ``sqnr``: the range minimising expected quantization noise (AIMET's TF-enhanced idea): for each
  candidate range, noise = squared clipping error of values outside it + (count inside) x
  scale^2 / 12; a grid search over shrunk ranges picks the smallest, unless the min-max or
  the percentile range quantizes the histogram with a smaller exact error
  (:func:`histogram_error`), so ``sqnr`` is never worse than either on its own tensor.
* ``meanminmax``: the mean over calibration samples of each sample's min and of its max (NNCF's
  default for activations): a range that ignores the extremes of a few samples; streamed as two
  running sums per tensor (axis 0 taken as the sample axis).
* ``auto`` (the default): the model-level choice among the four above, all computed from the
  same statistics, of the one whose simulation is closest to the float model's outputs on the
  first calibration batches (:func:`onnxqat.pipeline.choose_scheme`). A range that is best for
  its own tensor is not always best for the model (a transformer's extreme attention logits
  cost their tensor's error much when clipped, and the Softmax output little).

Weights are calibrated on their exact values (per channel when the spec says so).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from onnxqat.calibrate.observers import HistogramObserver, MinMaxObserver
from onnxqat.qparams import Encoding, compute_encoding, fake_quantize, pair_safe_scale
from onnxqat.spec import Choice, QuantSpec

__all__ = ["DEFAULT_PERCENTILE", "Scheme", "activation_encoding", "histogram_error", "sqnr_range", "weight_encoding"]

DEFAULT_PERCENTILE = 99.99
_CANDIDATES = 100
_MAX_SUBBINS = 16  # points per histogram bin in histogram_error
_ASYM_CANDIDATES = 40


class Scheme(Choice):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    SQNR = "sqnr"
    MEAN_MINMAX = "meanminmax"
    AUTO = "auto"

    @classmethod
    def describe(cls) -> str:
        return "calibration scheme"

    @property
    def needs_histogram(self) -> bool:
        return self is not Scheme.MINMAX


def activation_encoding(
    observer: MinMaxObserver | HistogramObserver,
    spec: QuantSpec,
    scheme: Scheme,
    percentile: float = DEFAULT_PERCENTILE,
) -> Encoding:
    """Encoding of one activation quantizer from its statistics."""
    if observer.empty:
        raise ValueError("no finite value was observed")
    if scheme is Scheme.MINMAX or not isinstance(observer, HistogramObserver):
        lo, hi = observer.min, observer.max
    elif scheme is Scheme.MEAN_MINMAX:
        lo, hi = observer.sample_mean_range()
    elif scheme in (Scheme.PERCENTILE, Scheme.AUTO):  # auto chooses per model; per tensor its fallback
        lo, hi = observer.percentile_range(percentile)
    else:
        lo, hi = _sqnr_activation_range(observer, spec, percentile)
    return compute_encoding(lo, hi, spec)


def _sqnr_activation_range(observer: HistogramObserver, spec: QuantSpec, percentile: float) -> tuple[float, float]:
    """The noise model's range, unless the min-max or the percentile range has a smaller exact
    :func:`histogram_error` (the model's uniform rounding noise overcharges values that sit on the
    grid, such as a Relu's zeros, and then clips too hard): never worse than either."""
    keep = observer.counts > 0
    values, counts = observer.centers()[keep], observer.counts[keep]
    lo, hi = sqnr_range(values, counts, spec)
    lo, hi = max(lo, observer.min), min(hi, observer.max)
    p_lo, p_hi = observer.percentile_range(percentile)
    candidates = np.array([[lo, hi], [observer.min, observer.max], [p_lo, p_hi]], np.float64)
    candidates[:, 0], candidates[:, 1] = np.minimum(candidates[:, 0], 0.0), np.maximum(candidates[:, 1], 0.0)
    if not np.all(candidates[:, 1] > candidates[:, 0]):
        return lo, hi
    err = histogram_error(values, counts, candidates[:, 0], candidates[:, 1], spec, observer.width)
    best = int(np.argmin(err))
    return float(candidates[best, 0]), float(candidates[best, 1])


def weight_encoding(weight: np.ndarray, spec: QuantSpec, scheme: Scheme = Scheme.MINMAX) -> Encoding:
    """Encoding of a weight tensor, per channel along ``spec.axis`` when set.

    ``sqnr`` shrinks each channel's min-max range by the factor (from 1 down to 0.2) that gives the
    smallest exact quantization error of that channel's values. With ``spec.pair_limit`` the scale
    is then raised where needed so no two same-sign weights of an output channel exceed the limit
    (:func:`~onnxqat.qparams.pair_safe_scale`; per-tensor weights take the largest channel need).
    """
    w = np.asarray(weight, dtype=np.float32)
    if spec.axis is None:
        rows = w.reshape(1, -1)
    else:
        rows = np.moveaxis(w, spec.axis % w.ndim, 0).reshape(w.shape[spec.axis], -1)
    lo, hi = rows.min(axis=1).astype(np.float64), rows.max(axis=1).astype(np.float64)
    if scheme is Scheme.SQNR:
        best_err = np.full(lo.shape, np.inf)
        best = np.ones(lo.shape)
        for factor in np.linspace(1.0, 0.2, _CANDIDATES // 2):
            enc = compute_encoding(lo * factor, hi * factor, spec.with_axis(0))
            err = ((fake_quantize(rows, enc) - rows) ** 2).sum(axis=1)
            better = err < best_err
            best_err[better], best[better] = err[better], factor
        lo, hi = lo * best, hi * best
    if spec.axis is None:
        enc = compute_encoding(float(lo[0]), float(hi[0]), spec)
    else:
        enc = compute_encoding(lo, hi, spec)
    if spec.pair_limit is None or not enc.signed:
        return enc
    assert spec.pair_axis is not None
    channels = np.moveaxis(w, spec.pair_axis % w.ndim, 0).reshape(w.shape[spec.pair_axis], -1)
    need = pair_safe_scale(channels, spec.pair_limit)
    if spec.axis is None:
        need = need.max(initial=np.float32(0)).astype(np.float32)
    scale = np.maximum(enc.scale, need).astype(np.float32)
    return dataclasses.replace(enc, scale=scale)


def histogram_error(values: np.ndarray, counts: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                    spec: QuantSpec, width: float = 0.0) -> np.ndarray:
    """Squared error of fake-quantizing weighted ``values`` on each candidate range.

    ``lo``/``hi`` are 1-d candidate arrays; each candidate's encoding follows
    :func:`~onnxqat.qparams.compute_encoding` (zero on the grid, AIMET's definitions). With
    ``width`` (the histogram's bin width), each bin's count is spread evenly over points across
    the bin, enough of them that the finest candidate grid is resolved: a bin wider than a grid
    step holds values all over that step, not only at its centre.
    """
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    if width > 0:
        finest = float(np.min(compute_encoding(lo, hi, spec.with_axis(0)).scale))
        k = int(min(_MAX_SUBBINS, max(1, math.ceil(4 * width / max(finest, 1e-30)))))
        if k > 1:
            offsets = ((np.arange(k) + 0.5) / k - 0.5) * width
            values = (values[:, None] + offsets[None, :]).reshape(-1)
            counts = np.repeat(counts / k, k)
    out = np.empty(len(lo))
    for start in range(0, len(lo), 64):
        lo_c, hi_c = lo[start:start + 64], hi[start:start + 64]
        enc = compute_encoding(lo_c, hi_c, spec.with_axis(0))
        scale = enc.scale.astype(np.float64)[:, None]
        zp = enc.zero_point.astype(np.float64)[:, None]
        q = np.clip(np.rint(values[None, :] / scale) + zp, enc.qmin, enc.qmax)
        err = values[None, :] - (q - zp) * scale
        out[start:start + 64] = (err * err) @ counts
    return out


def sqnr_range(values: np.ndarray, counts: np.ndarray, spec: QuantSpec) -> tuple[float, float]:
    """Range minimising clipping + rounding noise of a sorted weighted sample.

    ``values`` must be sorted ascending; ``counts`` are their weights (histogram counts, or ones).
    """
    lo_all = min(float(values[0]), 0.0)
    hi_all = max(float(values[-1]), 0.0)
    if hi_all - lo_all <= 0:
        return lo_all, hi_all
    b = spec.bitwidth
    fractions = np.arange(1, _CANDIDATES + 1) / _CANDIDATES
    if spec.symmetric and (lo_all < 0 or not spec.unsigned_symmetric):
        steps = (1 << (b - 1)) - 1
        abs_max = max(-lo_all, hi_all)
        top = abs_max * fractions
        scale = top / steps
        lo = -(steps + (0 if spec.strict_symmetric else 1)) * scale
        hi = top
    elif spec.symmetric:
        hi = hi_all * fractions
        lo = np.zeros_like(hi)
        scale = hi / ((1 << b) - 1)
    else:
        grid = np.arange(1, _ASYM_CANDIDATES + 1) / _ASYM_CANDIDATES
        lo = np.repeat(lo_all * grid, grid.size)
        hi = np.tile(hi_all * grid, grid.size)
        scale = (hi - lo) / ((1 << b) - 1)
    noise = _noise(values, counts, lo, hi, scale)
    best = int(np.argmin(noise))
    return float(lo[best]), float(hi[best])


def _noise(values: np.ndarray, counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Expected squared error for each candidate range (vectorised with prefix sums)."""
    c = np.concatenate([[0.0], np.cumsum(counts)])
    s1 = np.concatenate([[0.0], np.cumsum(counts * values)])
    s2 = np.concatenate([[0.0], np.cumsum(counts * values * values)])
    below = np.searchsorted(values, lo, side="left")
    above = np.searchsorted(values, hi, side="right")
    n_lo, s1_lo, s2_lo = c[below], s1[below], s2[below]
    n_hi, s1_hi, s2_hi = c[-1] - c[above], s1[-1] - s1[above], s2[-1] - s2[above]
    clip_lo = s2_lo - 2 * lo * s1_lo + lo * lo * n_lo
    clip_hi = s2_hi - 2 * hi * s1_hi + hi * hi * n_hi
    inside = c[-1] - n_lo - n_hi
    error: np.ndarray = clip_lo + clip_hi + inside * scale * scale / 12.0
    return error
