"""The mean-of-per-sample min/max range (``meanminmax``, NNCF's default), forced by ``--scheme meanminmax``."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_batches, tiny_cnn
from onnxqat import QuantizationSimModel
from onnxqat.calibrate.observers import HistogramObserver
from onnxqat.calibrate.schemes import Scheme, activation_encoding
from onnxqat.qparams import compute_encoding
from onnxqat.spec import QuantSpec


def _numpy_mean_range(batches):
    rows = np.concatenate([b.reshape(len(b), -1) for b in batches]).astype(np.float64)
    rows = np.where(np.isfinite(rows), rows, np.nan)
    rows = rows[~np.all(np.isnan(rows), axis=1)]
    return float(np.nanmin(rows, axis=1).mean()), float(np.nanmax(rows, axis=1).mean())


def test_sample_mean_range_is_numpy_over_every_sample_streamed_split_or_merged():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 3, 5)).astype(np.float32) * (1 + i) for i, n in enumerate((4, 1, 7))]
    batches[1][0, 0, 0] = np.inf  # a non-finite value is left out of its sample
    batches[2][3] = np.nan  # an all-non-finite sample is no sample
    want = _numpy_mean_range(batches)
    whole = HistogramObserver()
    for b in batches:
        whole.update(b)
    assert whole.sample_mean_range() == pytest.approx(want, rel=1e-12)
    assert whole.samples == 11
    split, other = HistogramObserver(), HistogramObserver()
    for b in batches[:2]:
        for row in b:  # sample by sample
            split.update(row[None])
    other.update(batches[2])
    split.merge(other)
    assert split.sample_mean_range() == pytest.approx(want, rel=1e-12)
    assert want[0] > whole.min and want[1] < whole.max  # narrower than min-max: the test tells them apart


def test_rank_below_two_is_one_sample():
    obs = HistogramObserver()
    obs.update(np.array([-1.0, 2.0], np.float32))
    obs.update(np.array([-3.0, 0.5], np.float32))
    assert obs.sample_mean_range() == pytest.approx((-2.0, 1.25))


def test_forced_meanminmax_encodes_the_input_from_its_per_sample_ranges():
    calib = random_batches(3, 8, seed=4)
    calib[0]["x"][2] *= 30.0  # one wide sample: its extremes weigh 1/24 of the range
    sim = QuantizationSimModel(tiny_cnn(), quant_scheme="meanminmax").compute_encodings(calib, progress=False)
    lo, hi = _numpy_mean_range([b["x"] for b in calib])
    spec = next(q.spec for q in sim.plan.activations if q.name == "x")
    assert sim.encodings["x"].equals(compute_encoding(lo, hi, spec))
    minmax = QuantizationSimModel(tiny_cnn(), quant_scheme="minmax").compute_encodings(calib, progress=False)
    assert float(sim.encodings["x"].scale) < 0.5 * float(minmax.encodings["x"].scale)


def test_activation_encoding_meanminmax():
    obs = HistogramObserver()
    obs.update(np.array([[0.0, 1.0], [-2.0, 3.0]], np.float32))
    spec = QuantSpec(bitwidth=8)
    assert activation_encoding(obs, spec, Scheme.MEAN_MINMAX).equals(compute_encoding(-1.0, 2.0, spec))


def test_a_batch_in_pieces_has_the_whole_batchs_sample_mean_range():
    """Calibration in pieces (HistogramBatch, the samples split) keeps the per-sample sums too."""
    from onnxqat.calibrate.observers import HistogramBatch

    rng = np.random.default_rng(1)
    first, batch = rng.standard_normal((3, 4, 6)).astype(np.float32), rng.standard_normal((9, 4, 6)).astype(np.float32) * 5
    batch[4, 1, 1] = np.nan
    whole, pieces = HistogramObserver(), HistogramObserver()
    for obs in (whole, pieces):
        obs.update(first)
    whole.update(batch)
    fed = HistogramBatch(pieces)
    finite = batch[np.isfinite(batch)]
    index = fed.begin(float(finite.min()), float(finite.max()))
    for part in (batch[:2], batch[2:5], batch[5:]):
        fed.add(index, part)
    fed.commit()
    assert pieces.samples == whole.samples == 12
    assert pieces.sample_mean_range() == pytest.approx(whole.sample_mean_range(), rel=1e-12)
    assert pieces.sample_mean_range() == pytest.approx(_numpy_mean_range([first, batch]), rel=1e-12)
    assert np.array_equal(pieces.counts, whole.counts) and pieces.nonfinite == whole.nonfinite == 1
