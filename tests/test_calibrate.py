"""Observers, range schemes and the streaming calibration runner."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import random_batches, run_onnx, tiny_cnn
from hypothesis import given, settings
from hypothesis import strategies as st
from onnxqat.calibrate.observers import HistogramBatch, HistogramObserver, MinMaxObserver
from onnxqat.calibrate.runner import collect_statistics
from onnxqat.calibrate.schemes import Scheme, activation_encoding, sqnr_range, weight_encoding
from onnxqat.config import load_config
from onnxqat.errors import DataError
from onnxqat.passes.annotate import annotate
from onnxqat.qparams import compute_encoding, fake_quantize
from onnxqat.sim import prepare_model
from onnxqat.spec import QuantSpec


def test_streaming_histogram_equals_histogram_of_all_data():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(loc=i, scale=1 + i, size=5000) for i in range(6)] + [rng.uniform(-40, -30, 100)]
    h = HistogramObserver(bins=512)
    for c in chunks:
        h.update(c.astype(np.float32))
    data = np.concatenate(chunks).astype(np.float32).astype(np.float64)
    edges = h.lo + np.arange(h.bins + 1) * h.width
    assert edges[0] <= data.min() and edges[-1] >= data.max()
    ref, _ = np.histogram(data, bins=edges)
    np.testing.assert_array_equal(h.counts, ref)
    assert (h.min, h.max) == (data.min(), data.max())


def test_observers_ignore_and_count_non_finite():
    h = HistogramObserver()
    h.update(np.array([1.0, np.inf, -2.0, np.nan], np.float32))
    assert (h.min, h.max, h.nonfinite) == (-2.0, 1.0, 2)
    m = MinMaxObserver()
    m.update(np.array([np.nan, 3.0]))
    assert (m.min, m.max, m.nonfinite) == (3.0, 3.0, 1)


def test_percentile_range_close_to_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_t(3, size=200_000)
    h = HistogramObserver()
    for chunk in np.array_split(x, 10):
        h.update(chunk)
    lo, hi = h.percentile_range(99.9)
    ref_lo, ref_hi = np.percentile(x, [0.1, 99.9])
    assert abs(lo - ref_lo) <= 2 * h.width and abs(hi - ref_hi) <= 2 * h.width


def _mse(x, enc):
    return float(np.mean((fake_quantize(x, enc) - x) ** 2))


@pytest.mark.parametrize("spec", [QuantSpec(bitwidth=4), QuantSpec(bitwidth=8, symmetric=True), QuantSpec(bitwidth=6)])
def test_sqnr_range_beats_minmax_with_outliers(spec):
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(size=100_000), [40.0, -35.0]]).astype(np.float32)
    h = HistogramObserver()
    h.update(x)
    sq = activation_encoding(h, spec, Scheme.SQNR)
    mm = activation_encoding(h, spec, Scheme.MINMAX)
    assert sq.max < mm.max
    assert _mse(x, sq) < _mse(x, mm)
    # near the best range found by brute force on the true fake-quant error
    brute = min(_mse(x, compute_encoding(-t * 35 / 40, t, spec)) for t in np.linspace(0.5, 40, 400))
    assert _mse(x, sq) <= 1.15 * brute


def test_sqnr_keeps_full_range_for_uniform_data():
    x = np.linspace(-1, 1, 10001)
    lo, hi = sqnr_range(x, np.ones_like(x), QuantSpec(bitwidth=8))
    assert lo <= -0.95 and hi >= 0.95


def test_weight_encodings_per_channel():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    enc = weight_encoding(w, QuantSpec(symmetric=True, axis=0, unsigned_symmetric=False))
    np.testing.assert_allclose(enc.scale, np.abs(w).reshape(8, -1).max(axis=1) / 127, rtol=1e-6)
    w[0] *= 1e-3  # a near-dead channel keeps a fine grid of its own
    sq = weight_encoding(w, QuantSpec(bitwidth=4, symmetric=True, axis=0, unsigned_symmetric=False), Scheme.SQNR)
    mm = weight_encoding(w, QuantSpec(bitwidth=4, symmetric=True, axis=0, unsigned_symmetric=False))
    assert _mse(w, sq) < _mse(w, mm)
    assert sq.scale[0] < 1e-3 * sq.scale[1:].min() * 10


def _intermediates(proto, tensors, feed):
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    del model.graph.output[:]
    for t in tensors:
        model.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    return dict(zip(tensors, run_onnx(model, feed)))


def test_in_graph_minmax_equals_numpy_on_intermediates():
    model = prepare_model(ir.from_proto(tiny_cnn()))
    plan = annotate(model, load_config("onnxruntime"))
    batches = random_batches(3)
    observers = collect_statistics(model, plan, batches, Scheme.MINMAX, progress=False)
    tensors = [t for q in plan.activations for t in q.tensors if t != "x"]
    proto = ir.to_proto(model)
    outs = [_intermediates(proto, tensors, b) for b in batches]
    for q in plan.activations:
        values = np.concatenate([b[t].ravel() if t == "x" else o[t].ravel()
                                 for b, o in zip(batches, outs) for t in q.tensors])
        assert observers[q.name].min == pytest.approx(values.min(), rel=1e-5, abs=1e-6)
        assert observers[q.name].max == pytest.approx(values.max(), rel=1e-5, abs=1e-6)


def test_calibration_memory_does_not_grow_with_batches():
    model = prepare_model(ir.from_proto(tiny_cnn()))
    plan = annotate(model, load_config("onnxruntime"))

    def peak(n, scheme):
        batches = (b for b in random_batches(n, batch=64))  # generated lazily
        tracemalloc.start()
        collect_statistics(model, plan, batches, scheme, progress=False)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    for scheme in (Scheme.MINMAX, Scheme.SQNR):
        small, large = peak(4, scheme), peak(40, scheme)
        assert large < small * 1.3 + 200_000, (scheme, small, large)


def test_calibration_data_errors_name_the_batch_and_input():
    model = prepare_model(ir.from_proto(tiny_cnn()))
    plan = annotate(model, load_config("onnxruntime"))
    good = random_batches(2)
    bad = [good[0], {"x": np.full((2, 3, 8, 8), np.nan, np.float32)}]
    with pytest.raises(DataError, match=r"batch 1: input 'x' contains .* NaN"):
        collect_statistics(model, plan, bad, Scheme.MINMAX, progress=False)
    with pytest.raises(DataError, match=r"batch 0: input 'x' has dtype float64"):
        collect_statistics(model, plan, [{"x": good[0]["x"].astype(np.float64)}], Scheme.MINMAX, progress=False)
    with pytest.raises(DataError, match=r"has shape \[8, 3, 9, 9\]"):
        collect_statistics(model, plan, [{"x": np.zeros((8, 3, 9, 9), np.float32)}], Scheme.MINMAX, progress=False)
    with pytest.raises(DataError, match="missing model input 'x'"):
        collect_statistics(model, plan, [{"image": good[0]["x"]}], Scheme.MINMAX, progress=False)
    with pytest.raises(DataError, match="no batches"):
        collect_statistics(model, plan, [], Scheme.MINMAX, progress=False)


def test_encoding_from_observer_follows_spec():
    h = HistogramObserver()
    h.update(np.linspace(0, 6, 1000))
    enc = activation_encoding(h, QuantSpec(), Scheme.MINMAX)
    assert enc.equals(compute_encoding(0.0, 6.0, QuantSpec()))


def test_histogram_calibration_splits_batches_to_its_memory_budget(monkeypatch):
    """Histogram schemes fetch every observed tensor of a run: through the sim, batches run in
    pieces so the fetched bytes stay within the budget, and the encodings stay within two
    histogram bins (the runner's pieces give exactly the whole batch's histograms)."""
    import onnxqat.calibrate.runner as runner_module
    from conftest import random_batches, tiny_cnn
    from onnxqat import QuantizationSimModel

    data = random_batches(n_batches=2, batch=16)
    whole = QuantizationSimModel(tiny_cnn(), quant_scheme="percentile")
    whole.compute_encodings(data, progress=False)
    seen = []
    original = runner_module.Session.run

    def counting(self, feed, outputs=None):
        seen.append(len(next(iter(feed.values()))))
        return original(self, feed, outputs)

    monkeypatch.setattr(runner_module.Session, "run", counting)
    monkeypatch.setattr(runner_module, "RUN_BUDGET", 4 * 8 * 8 * 30)  # a few samples' tensors
    split = QuantizationSimModel(tiny_cnn(), quant_scheme="percentile")
    split.compute_encodings(data, progress=False)
    assert len(seen) > 2 and max(seen) < 16
    for q in whole.plan.activations:
        a, b = whole.encodings[q.name], split.encodings[q.name]
        span = float(a.max - a.min)
        assert abs(float(b.max - b.min) - span) <= 2 * span / 2048 + 1e-6, q.name


def _sample(kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = 20_000
    if kind == "relu":  # exact zeros: values on the grid
        return np.maximum(rng.normal(size=n), 0.0).astype(np.float32)
    if kind == "outliers":
        return np.concatenate([rng.normal(size=n), rng.normal(size=5) * 60]).astype(np.float32)
    if kind == "bimodal":
        return np.concatenate([rng.normal(-3, 0.3, n // 2), rng.normal(5, 1.0, n // 2)]).astype(np.float32)
    if kind == "heavy":
        return rng.standard_t(2, size=n).astype(np.float32)
    return rng.uniform(-1, 3, size=n).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["relu", "outliers", "bimodal", "heavy", "uniform"]), seed=st.integers(0, 10_000),
       bits=st.sampled_from([4, 6, 8]), symmetric=st.booleans())
def test_sqnr_is_never_worse_than_minmax_or_percentile(kind, seed, bits, symmetric):
    """On the same histogram, the sqnr range quantizes the data with no more squared error
    than the min-max and percentile ranges (measured on the sample itself; 2% slack because the
    search sees only the histogram's bins)."""
    x = _sample(kind, seed)
    spec = QuantSpec(bitwidth=bits, symmetric=symmetric)
    h = HistogramObserver()
    h.update(x)
    errors = {scheme: _mse(x, activation_encoding(h, spec, scheme))
              for scheme in (Scheme.MINMAX, Scheme.PERCENTILE, Scheme.SQNR)}
    assert errors[Scheme.SQNR] <= 1.02 * min(errors[Scheme.MINMAX], errors[Scheme.PERCENTILE]) + 1e-12, errors


def test_auto_scheme_picks_the_candidate_closest_to_the_float_outputs():
    """auto's choice is the candidate whose simulation has the best output SQNR, measured here
    independently by running each forced scheme's simulation against onnxruntime's float model."""
    from conftest import random_batches, run_onnx, tiny_cnn

    from onnxqat import QuantizationSimModel
    from onnxqat.pipeline import AUTO_CANDIDATES, output_sqnr_db

    model = tiny_cnn(seed=2)
    calib = random_batches(4, 16, seed=3)
    calib[1]["x"][0, 0, 0, 0] = 40.0  # an outlier: min-max and percentile ranges differ
    auto = QuantizationSimModel(model).compute_encodings(calib, progress=False)
    assert auto.scheme_choice is not None and auto.scheme_choice.chosen in AUTO_CANDIDATES
    measured = {}
    for scheme in AUTO_CANDIDATES:
        forced = QuantizationSimModel(model, quant_scheme=scheme.value, param_scheme="minmax")
        forced.compute_encodings(calib, progress=False)
        assert forced.scheme_choice is None
        measured[scheme] = np.mean([output_sqnr_db(run_onnx(model, f), forced.run(f)) for f in calib])
        assert abs(measured[scheme] - auto.scheme_choice.sqnr_db[scheme]) < 1e-3  # dB; float kernels differ slightly
        if scheme is auto.scheme_choice.chosen:
            for f in calib:
                np.testing.assert_array_equal(auto.run(f)[0], forced.run(f)[0])
    assert measured[auto.scheme_choice.chosen] == max(measured.values())


def test_auto_scheme_ranks_softmax_outputs_by_top1_agreement(demo_assets):
    """With a Softmax output (the demo classifier), auto ranks candidates by their top-1
    agreement with the float model on the samples it kept (the first 256), then by SQNR;
    checked against each forced scheme's simulation run here."""
    from conftest import run_onnx

    from onnxqat import QuantizationSimModel
    from onnxqat.data import NpzBatches, load_npz
    from onnxqat.pipeline import AUTO_CANDIDATES

    model, calib, _ = demo_assets
    batches = NpzBatches(load_npz(calib, ["image"]), 64)
    auto = QuantizationSimModel(model, param_bw=4, per_channel=True).compute_encodings(batches, progress=False)
    choice = auto.scheme_choice
    assert choice is not None and set(choice.agreement) == set(AUTO_CANDIDATES)
    kept = [b for _, b in zip(range(4), batches)]  # 4 x 64 = the 256 samples auto scores on
    measured = {}
    for scheme in AUTO_CANDIDATES:
        forced = QuantizationSimModel(model, param_bw=4, per_channel=True, quant_scheme=scheme.value,
                                      param_scheme="minmax")  # auto's weights: min-max whatever it picks
        forced.compute_encodings(batches, progress=False)
        hits = [np.argmax(run_onnx(model, b)[0], -1) == np.argmax(forced.run(b)[0], -1) for b in kept]
        measured[scheme] = float(np.mean(np.concatenate(hits)))
        assert abs(measured[scheme] - choice.agreement[scheme]) <= 1 / 256
    best = max(measured.values())
    assert measured[choice.chosen] >= best - 1 / 256


def test_auto_on_a_graph_with_very_many_tensors_calibrates_with_minmax(monkeypatch):
    """Past AUTO_MAX_TENSORS observed tensors auto says so and uses min-max (linear in the graph),
    giving the encodings a forced minmax calibration gives."""
    import onnxqat.pipeline as pipeline_module
    from conftest import random_batches, tiny_cnn

    from onnxqat import QuantizationSimModel

    monkeypatch.setattr(pipeline_module, "AUTO_MAX_TENSORS", 2)
    calib = random_batches(2, 8, seed=5)
    with pytest.warns(RuntimeWarning, match="above 2 the histograms the auto scheme needs"):
        auto = QuantizationSimModel(tiny_cnn()).compute_encodings(calib, progress=False)
    assert auto.scheme_choice is None
    forced = QuantizationSimModel(tiny_cnn(), quant_scheme="minmax").compute_encodings(calib, progress=False)
    assert all(auto.encodings[n].equals(forced.encodings[n]) for n in forced.encodings)


def _histogram_state(obs):
    return obs.counts.tolist(), obs.lo, obs.width, obs.min, obs.max, obs.nonfinite


def test_histogram_batch_in_pieces_equals_whole_updates():
    """One observer over several tensors per batch, ranges growing left and right (regrids), a
    NaN/inf in a piece: binned in pieces then committed, the histogram equals whole updates'."""
    rng = np.random.default_rng(3)
    whole, pieces = HistogramObserver(bins=64), HistogramObserver(bins=64)
    for batch in range(4):
        tensors = [rng.normal(loc=batch * 3 - 4 * k, scale=1 + batch, size=(8, 50)).astype(np.float32) for k in range(3)]
        tensors[1][2, 7], tensors[2][5, 1] = np.nan, np.inf
        for t in tensors:
            whole.update(t)
        split = HistogramBatch(pieces)
        finite = [t[np.isfinite(t)] for t in tensors]
        slots = [split.begin(float(f.min()), float(f.max())) for f in finite]
        for start in (0, 3, 4):  # pieces of 3, 1 and 4 rows, every tensor's piece per run
            for slot, t in zip(slots, tensors):
                split.add(slot, t[start:start + (3 if start == 0 else 1 if start == 3 else 4)])
        assert split.spans_bounds()
        split.commit()
        assert _histogram_state(pieces) == _histogram_state(whole), batch
    assert whole.nonfinite == 8 and whole.width > 0


def test_histogram_batch_refuses_bounds_its_pieces_did_not_span():
    obs = HistogramObserver(bins=16)
    split = HistogramBatch(obs)
    slot = split.begin(0.0, 2.0)  # a reduction that missed the largest value
    split.add(slot, np.array([0.0, 1.0, 3.0], np.float32))
    assert not split.spans_bounds()
    with pytest.raises(ValueError, match="did not span"):
        split.commit()
    assert obs.empty and not obs.counts.any()


@pytest.mark.parametrize("scheme", [Scheme.PERCENTILE, Scheme.SQNR])
def test_histogram_calibration_in_pieces_equals_the_whole_batch(monkeypatch, scheme):
    """Batches over the run budget run in pieces (after one sample's run that measures the bytes per
    sample), bounds first in a second session, then the fetches: every
    observer ends exactly as the whole-batch run's, and close to a histogram of the intermediates
    that an unoptimized onnxruntime session returns (the independent reference; its fused-free
    kernels round a few values differently)."""
    import onnxqat.calibrate.runner as runner_module

    model = prepare_model(ir.from_proto(tiny_cnn()))
    plan = annotate(model, load_config("onnxruntime"))
    batches = random_batches(3, batch=16)
    whole = collect_statistics(model, plan, batches, scheme, progress=False)
    runs = []
    original_run = runner_module.Session.run

    def counting(self, feed, outputs=None):
        runs.append(len(next(iter(feed.values()))))
        return original_run(self, feed, outputs)

    original_shrink = runner_module._run_and_shrink

    def counting_shrink(session, feed, outputs):
        runs.append(len(next(iter(feed.values()))))
        return original_shrink(session, feed, outputs)

    monkeypatch.setattr(runner_module.Session, "run", counting)
    monkeypatch.setattr(runner_module, "_run_and_shrink", counting_shrink)
    tensors = [t for q in plan.activations for t in q.tensors if t != "x"]
    outs = [_intermediates(ir.to_proto(model), tensors, b) for b in batches]
    per_sample = sum(v.nbytes for v in outs[0].values()) / 16
    monkeypatch.setattr(runner_module, "RUN_BUDGET", int(per_sample * 5))  # 5 samples a run
    split = collect_statistics(model, plan, batches, scheme, progress=False)
    # one sample (bytes per sample), then per batch: bounds in pieces of 5, 5, 5, 1, fetches in the same
    assert runs == [1] + [5, 5, 5, 1] * 6, runs
    for q in plan.activations:
        assert _histogram_state(split[q.name]) == _histogram_state(whole[q.name]), q.name
        ref = HistogramObserver()
        for b, o in zip(batches, outs):
            for t in q.tensors:
                ref.update(b[t] if t == "x" else o[t])
        got = split[q.name]
        assert (got.lo, got.width, got.min, got.max) == pytest.approx((ref.lo, ref.width, ref.min, ref.max),
                                                                      rel=1e-5, abs=1e-6), q.name
        assert got.counts.sum() == ref.counts.sum()
        assert np.abs(got.counts - ref.counts).sum() <= 2e-3 * ref.counts.sum(), q.name
