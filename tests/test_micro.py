"""Training in micro-batches: the same gradients, steps and losses as whole optimizer batches."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import tiny_cnn
from onnxqat import ConfigError, QuantizationSimModel
from onnxqat.train import micro
from onnxqat.train.options import TrainOptions

pytestmark = pytest.mark.slow

ROWS = 10
# Float32 sums of the same terms in another order: a gradient element is a sum over the batch (and
# over pixels: up to ~10^3 terms here), so it may move by ~n * 2^-24 of the sum of the terms'
# magnitudes; 3e-5 of the tensor's largest gradient covers that with margin.
SUM_TOL = 3e-5


def fresh_sim() -> QuantizationSimModel:
    """A calibrated sim (training makes a sim adopt the trained state: every run starts afresh)."""
    rng = np.random.default_rng(0)
    s = QuantizationSimModel(tiny_cnn(), per_channel=True, param_bw=4)
    s.compute_encodings([{"x": rng.normal(size=(16, 3, 8, 8)).astype(np.float32)}], progress=False)
    return s


@pytest.fixture()
def sim():
    return fresh_sim()


def batch(seed: int, rows: int = ROWS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(rows, 3, 8, 8)).astype(np.float32), "label": rng.integers(0, 5, rows)}


def gradients(sim, data, **options):  # type: ignore[no-untyped-def]
    with fresh_sim().trainer(optimizer="sgd", lr=0.1, **options) as trainer:
        loss, grads = trainer.compute_gradients(data)
        return loss, grads, trainer.micro_batch


def assert_close(got, want, tol=SUM_TOL):  # type: ignore[no-untyped-def]
    assert got.keys() == want.keys()
    for name, g in want.items():
        np.testing.assert_allclose(got[name], g, rtol=0, atol=tol * float(np.abs(g).max()) + 1e-12, err_msg=name)


@pytest.mark.parametrize("loss", ["cross_entropy", "distill"])
@pytest.mark.parametrize("range_learning", [False, True])
def test_micro_batched_steps_give_the_weights_of_whole_batch_steps(loss, range_learning):
    """Two epochs of three SGD steps at a large rate: micro-batches of 3 (pieces 3, 3, 3, 1 with two
    padding rows) end at the weights (and scales) of whole batches of 10, and report the same
    losses. Weights differ by the float summation order of their gradients only."""
    batches = [batch(seed) for seed in range(3)]
    results = {}
    for micro_batch in (None, 3):
        with fresh_sim().trainer(loss=loss, optimizer="sgd", lr=0.05, range_learning=range_learning,
                                 micro_batch=micro_batch) as trainer:
            start = trainer.initial
            history = trainer.fit(batches, epochs=2, progress=False)
            results[micro_batch] = (trainer.trained_parameters(), [h.loss for h in history], trainer.micro_batch,
                                    [h.train_accuracy for h in history])
            assert [h.steps for h in history] == [3, 3]
    (whole, whole_loss, whole_m, whole_acc), (pieces, pieces_loss, m, acc) = results[None], results[3]
    assert (whole_m, m) == (ROWS, 3)  # the tiny model is under the memory budget: not split by default
    initial = start.float_model.graph.initializers
    moved = max(float(np.abs(w - initial[n].const_value.numpy()).max()) for n, w in whole.items() if n in initial)
    assert moved > 1e-2, moved
    for name, w in whole.items():  # 6 steps of lr * gradient, each within SUM_TOL of the gradient
        np.testing.assert_allclose(pieces[name], w, rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(pieces_loss, whole_loss, rtol=1e-5)
    assert acc == whole_acc  # predictions of the real rows only, the padding left out


def test_uneven_pieces_are_weighted_by_their_share_of_the_batch(sim):
    """Pieces of 4, 4 and 2 samples: the accumulated gradient is sum_i (n_i / N) g_i of the
    pieces' own mean gradients (each from a trainer of the piece's size), the whole batch's
    gradient; weighting the pieces alike (1/3 each) is far off (the test can tell)."""
    data = batch(7)
    loss, whole, _ = gradients(sim, data)
    m_loss, pieces, m = gradients(sim, data, micro_batch=4)
    assert m == 4
    parts = [(0, 4), (4, 8), (8, 10)]
    own = [gradients(sim, {k: v[a:b] for k, v in data.items()}) for a, b in parts]
    weighted = {name: sum((b - a) / ROWS * g[1][name] for (a, b), g in zip(parts, own)) for name in whole}
    alike = {name: sum(g[1][name] for g in own) / len(own) for name in whole}
    assert_close(weighted, whole)  # the reference: independent runs, combined in numpy
    assert_close(pieces, whole)
    assert m_loss == pytest.approx(loss, rel=1e-6)
    assert m_loss == pytest.approx(sum((b - a) / ROWS * g[0] for (a, b), g in zip(parts, own)), rel=1e-6)
    off = max(float(np.abs(alike[n] - whole[n]).max() / np.abs(whole[n]).max()) for n in whole)
    assert off > 100 * SUM_TOL, off


def test_automatic_size_splits_within_the_budget_and_the_canary_runs_it(sim, monkeypatch):
    """With a budget the tiny model exceeds, the default size is the largest that fits the kept
    activations (estimated from onnxruntime's gradient graph of one sample); the canary child ran
    the training graph at that size; the gradients are the whole batch's."""
    data = batch(3, rows=12)
    _, whole, whole_m = gradients(sim, data)
    assert whole_m == 12
    monkeypatch.setattr(micro, "MIN_BUDGET", 0)
    seen = {}
    choose = micro.choose_micro_batch

    def spy(rows, inference, kept, budget=micro.TRAIN_BUDGET):  # type: ignore[no-untyped-def]
        budget = 2.5 * kept.data / inference + kept.fixed / inference  # room for 2.5 samples
        seen.update(kept=kept, inference=inference, m=choose(rows, inference, kept, budget))
        return seen["m"]

    monkeypatch.setattr("onnxqat.train.trainer.choose_micro_batch", spy)
    with sim.trainer(optimizer="sgd", lr=0.1) as trainer:
        _, grads = trainer.compute_gradients(data)
        assert trainer.micro_batch == seen["m"] == 2  # 2.5 samples fit: 2, six even pieces of 2
        with np.load(os.path.join(trainer.work_dir, "batch.npz")) as canary:
            assert canary["x"].shape[0] == 2  # the child's step ran at the micro size
        assert not os.path.exists(os.path.join(trainer.work_dir, "estimate"))
    assert seen["kept"].data > 0 and seen["inference"] > 0
    assert_close(grads, whole)


def test_micro_batch_option_is_validated():
    assert TrainOptions(micro_batch=0).micro_batch is None  # 0: automatic
    assert TrainOptions(micro_batch=8).micro_batch == 8
    for bad in (-1, 2.5, True, "4"):
        with pytest.raises(ConfigError, match="micro_batch must be an integer >= 0"):
            TrainOptions(micro_batch=bad)


def test_micro_batch_larger_than_the_batch_runs_whole_batches(sim):
    data = batch(5)
    _, whole, _ = gradients(sim, data)
    _, same, m = gradients(sim, data, micro_batch=64)
    assert m == ROWS
    for name, g in whole.items():
        np.testing.assert_array_equal(same[name], g)  # the same single run


def test_cli_micro_batch_is_checked_before_any_work(cli, tiny_model_path, tmp_path):
    path = str(tiny_model_path)
    proc = cli("train", path, "--data", "missing.npz", "--calib", "missing.npz", "--output-dir", str(tmp_path / "o"),
               "--micro-batch", "-2")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--micro-batch" in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()
    help_text = cli("train", "--help").stdout
    assert "--micro-batch" in help_text


def test_pieces_and_padding():
    assert micro.piece_sizes(10, 3) == [3, 3, 3, 1]
    assert micro.piece_sizes(16, 6) == [6, 6, 4]
    assert micro.piece_sizes(5, 5) == [5]
    b = {"x": np.arange(5), "k": np.arange(3), "s": 7}
    piece = micro.take_rows(b, 5, 3, 5)
    assert piece["x"].tolist() == [3, 4] and piece["k"] is b["k"] and piece["s"] == 7
    padded = micro.pad_rows(piece, 2, 5)
    assert padded["x"].tolist() == [3, 4, 3, 4, 3]


def test_cli_trains_in_micro_batches_and_says_so(cli, tiny_model_path, tmp_path):
    rng = np.random.default_rng(2)
    data, calib = tmp_path / "train.npz", tmp_path / "calib.npz"
    np.savez(data, x=rng.normal(size=(24, 3, 8, 8)).astype(np.float32), label=rng.integers(0, 5, 24))
    np.savez(calib, x=rng.normal(size=(16, 3, 8, 8)).astype(np.float32))
    proc = cli("train", tiny_model_path, "--data", data, "--calib", calib, "--output-dir", tmp_path / "out",
               "--epochs", "1", "--batch-size", "8", "--micro-batch", "3", check=True)
    lines = proc.stdout.strip().splitlines()
    assert "micro-batches: 3 samples a run, gradients of each --batch-size 8 step added up (--micro-batch)" in lines
    assert any(line.startswith("epoch 1 ") and "steps=3" in line for line in lines), proc.stdout
