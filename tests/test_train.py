"""Quantization-aware training end to end: accuracy, write-back, export, checkpoints, CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import visible, DEMO_TRAIN, random_batches, run_onnx
from onnxqat import ConfigError, DataError, ModelError, QuantizationSimModel
from onnxqat.data import NpzBatches, load_npz
from onnxqat.evaluate import accuracy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(demo_assets):
    model, calib, test = demo_assets
    return {
        "model": model,
        "calib": load_npz(calib, ["image"]),
        "train": load_npz(DEMO_TRAIN, ["image", "label"]),
        "test": load_npz(test, ["image", "label"]),
    }


def w4_sim(data, **options):
    sim = QuantizationSimModel(data["model"], per_channel=True, param_bw=4, **options)
    sim.compute_encodings(NpzBatches(data["calib"], 64), progress=False)
    return sim


def score(sim, data):
    return accuracy(sim.run, NpzBatches(data["test"], 1000), progress=False)[0]


def test_short_qat_improves_w4a8_over_ptq(data):
    sim = w4_sim(data)
    ptq = score(sim, data)
    with sim.trainer(lr=3e-5) as trainer:
        history = trainer.fit(NpzBatches(data["train"], 32, shuffle=True, limit=3000), epochs=1, progress=False)
    qat = score(sim, data)
    # 3000 samples at 32: 93 full batches; the last 24 samples are left out (fixed-shape graph)
    assert history[0].steps == 93 and history[0].skipped == 24 and np.isfinite(history[0].loss)
    assert qat > ptq + 0.004, (ptq, qat)


def test_default_learning_rate_follows_the_lowest_bitwidth(data):
    """Without ``lr`` the trainer takes default_lr of the lowest activation bitwidth, and that is
    the rate the optimizer steps with (SGD: the step is -lr * gradient)."""
    from onnxqat.train.options import default_lr

    assert [default_lr(b) for b in (None, 16, 8, 6, 4)] == [1e-5, 1e-5, 1e-5, 4e-5, 1.6e-4]
    batch = {k: v[:32] for k, v in data["train"].items()}
    for pbw, abw, want in ((8, 8, 1e-5), (4, 8, 1e-5), (8, 6, 4e-5), (4, 4, 1.6e-4)):
        sim = QuantizationSimModel(data["model"], per_channel=True, param_bw=pbw, activation_bw=abw)
        sim.compute_encodings(NpzBatches(data["calib"], 64), progress=False)
        with sim.trainer(optimizer="sgd") as trainer:
            assert trainer.options.lr == want, (pbw, abw, trainer.options.lr)
            if (pbw, abw) != (4, 4):
                continue
            _, grads = trainer.compute_gradients(batch)
            before = trainer.trained_parameters()
            trainer.step(batch)
            after = trainer.trained_parameters()
            name = max(grads, key=lambda n: float(np.abs(grads[n]).max()))
            np.testing.assert_allclose(after[name] - before[name], -want * grads[name], rtol=1e-3,
                                       atol=1e-3 * want * float(np.abs(grads[name]).max()))
    with sim.trainer(lr=3e-5) as trainer:
        assert trainer.options.lr == 3e-5  # an explicit rate is kept


def test_distillation_needs_no_labels(data):
    sim = w4_sim(data)
    ptq = score(sim, data)
    unlabelled = {"image": data["train"]["image"][:3000]}
    with sim.trainer(loss="distill", lr=1e-4) as trainer:
        trainer.fit(NpzBatches(unlabelled, 32, shuffle=True), epochs=1, progress=False)
    assert score(sim, data) > ptq + 0.004


def test_write_back_and_export_after_training(data, tmp_path):
    sim = w4_sim(data)
    before = sim.weights()
    with sim.trainer(lr=3e-5, range_learning=True) as trainer:
        trainer.fit(NpzBatches(data["train"], 64, limit=640), epochs=1, progress=False)
        trained = trainer.trained_parameters()
    after = sim.weights()
    changed = [n for n in before if not np.array_equal(before[n], after[n])]
    assert len(changed) == len([n for n in trained if n in before]) > 10
    for name in changed:
        np.testing.assert_array_equal(after[name], trained[name])
    paths = sim.export(tmp_path)
    exported = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(paths["float"]).graph.initializer}
    for name in changed:
        np.testing.assert_array_equal(exported[name], after[name])
    # the exported float model + encodings reproduce the sim, and the QDQ model matches it
    x = data["test"]["image"][:256]
    rebuilt = QuantizationSimModel(paths["float"], per_channel=True, param_bw=4).load_encodings(paths["encodings"])
    np.testing.assert_array_equal(rebuilt.run({"image": x})[0], sim.run({"image": x})[0])
    assert rebuilt.encodings["image"].equals(sim.encodings["image"])
    (deployed,) = run_onnx(onnx.load(paths["qdq"]), {"image": x})
    (plain_sim,) = run_onnx(sim.model, {"image": x})
    np.testing.assert_array_equal(deployed, plain_sim)


def test_resume_equals_uninterrupted_run(data, tmp_path):
    batches = lambda: NpzBatches(data["train"], 64, shuffle=True, seed=3, limit=640)  # noqa: E731
    full = w4_sim(data)
    with full.trainer(lr=1e-4) as trainer:
        trainer.fit(batches(), epochs=2, progress=False)
    first = w4_sim(data)
    with first.trainer(lr=1e-4) as trainer:
        trainer.fit(batches(), epochs=1, checkpoint_dir=tmp_path, progress=False)
    assert visible(tmp_path) == ["checkpoint.ckpt"]
    resumed = w4_sim(data)
    with resumed.trainer(lr=1e-4) as trainer:
        history = trainer.fit(batches(), epochs=2, checkpoint_dir=tmp_path, progress=False)
    assert [h.epoch for h in history] == [1, 2]
    for name, value in full.weights().items():
        np.testing.assert_allclose(resumed.weights()[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


class _Interrupting:
    """Batches that raise KeyboardInterrupt in the middle of the second epoch."""

    def __init__(self, inner):
        self.inner, self.epoch = inner, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            if self.epoch == 1 and i == 3:
                raise KeyboardInterrupt
            yield batch


def test_ctrl_c_keeps_the_last_good_checkpoint(data, tmp_path):
    sim = w4_sim(data)
    batches = _Interrupting(NpzBatches(data["train"], 64, limit=640))
    with sim.trainer(lr=1e-4) as trainer:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit(batches, epochs=3, checkpoint_dir=tmp_path, progress=False)
    assert visible(tmp_path) == ["checkpoint.ckpt"]
    resumed = w4_sim(data)
    with resumed.trainer(lr=1e-4) as trainer:
        history = trainer.fit(NpzBatches(data["train"], 64, limit=640), epochs=2, checkpoint_dir=tmp_path, progress=False)
    assert [h.epoch for h in history] == [1, 2]


def test_checkpoint_from_another_setup_is_refused(data, tmp_path):
    sim = w4_sim(data)
    with sim.trainer(lr=1e-4) as trainer:
        trainer.fit(NpzBatches(data["train"], 64, limit=128), epochs=1, checkpoint_dir=tmp_path, progress=False)
    other = w4_sim(data)
    with other.trainer(lr=1e-4, range_learning=True) as trainer:
        with pytest.raises(ConfigError, match="different training setup"):
            trainer.fit(NpzBatches(data["train"], 64, limit=128), epochs=2, checkpoint_dir=tmp_path, progress=False)


def test_freezing(data):
    sim = w4_sim(data)
    before = sim.weights()
    with sim.trainer(lr=1e-3, train_last_n=1) as trainer:
        assert set(trainer.graph.trainable) == {"fc.weight", "fc.bias"}
        trainer.fit(NpzBatches(data["train"], 64, limit=256), epochs=1, progress=False)
    changed = {n for n, v in sim.weights().items() if not np.array_equal(v, before[n])}
    assert changed == {"fc.weight", "fc.bias"}
    with pytest.raises(ConfigError, match="no initializer or node named 'nope'"):
        sim.trainer(freeze=["nope"])


def test_batchnorm_kept_trains_with_frozen_statistics(data):
    sim = QuantizationSimModel(data["model"], per_channel=True, fold_batchnorm=False)
    sim.compute_encodings(NpzBatches(data["calib"], 64), progress=False)
    assert any(n.op_type == "BatchNormalization" for n in sim.float_model.graph)
    before = sim.weights()
    with sim.trainer(lr=1e-4) as trainer:
        trainer.fit(NpzBatches(data["train"], 64, limit=256), epochs=1, progress=False)
    after = sim.weights()
    assert np.array_equal(after["stem.1.running_mean"], before["stem.1.running_mean"])
    assert not np.array_equal(after["stem.1.weight"], before["stem.1.weight"])


def test_bad_training_input(data, tiny_model_path):
    sim = w4_sim(data)
    trainer = sim.trainer()
    images = data["train"]["image"][:8]
    with pytest.raises(DataError, match="no label array 'label'"):
        trainer.compute_gradients({"image": images})
    with pytest.raises(DataError, match="must be integers"):
        trainer.compute_gradients({"image": images, "label": np.zeros(8, np.float32)})
    with pytest.raises(DataError, match=r"shape \[7\], expected \[8\]"):
        trainer.compute_gradients({"image": images, "label": np.zeros(7, np.int64)})
    with pytest.raises(DataError, match="no batches"):
        trainer.fit([], epochs=1, progress=False)
    trainer.close()
    with pytest.raises(ConfigError, match="output index 2 is out of range"):
        sim.trainer(output_index=2)
    with pytest.raises(ConfigError, match="unknown loss"):
        sim.trainer(loss="hinge")
    tiny = QuantizationSimModel(tiny_model_path)
    tiny.compute_encodings(random_batches(), progress=False)
    flat = tiny.float_model.graph.outputs[0]
    flat.shape = None
    with pytest.raises(ModelError, match="rank of 'y' is unknown"):
        tiny.trainer()


def test_cli_train_end_to_end(cli, demo_assets, tmp_path):
    model, calib, test = demo_assets
    out = tmp_path / "out"
    proc = cli("train", model, "--data", DEMO_TRAIN, "--calib", calib, "--output-dir", out, "--param-bw", "4",
               "--per-channel", "--epochs", "2", "--lr", "3e-5", "--max-samples", "1500", "--batch-size", "32",
               "--eval", test, "--checkpoint-dir", tmp_path / "ckpt", check=True)
    lines = proc.stdout.strip().splitlines()
    ptq = float(next(line for line in lines if line.startswith("calibrated")).split("eval_accuracy=")[1].split()[0])
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 2 and all("loss=" in line and "eval_accuracy=" in line for line in epochs)
    final = float(epochs[-1].split("eval_accuracy=")[1].split()[0])
    assert final > ptq
    assert visible(out) == ["model.encodings", "model.onnx", "model_qdq.onnx"]
    doc = json.loads((out / "model.encodings").read_text())
    assert {e["bw"] for e in doc["param_encodings"]} == {4, 32}
    scored = cli("eval", out / "model_qdq.onnx", "--data", test, check=True).stdout.strip().splitlines()[-1]
    assert abs(float(scored.split()[0].split("=")[1]) - final) <= 0.002


def test_cli_train_help_shows_the_learning_rate_defaults(cli):
    """`onnxqat train --help` says what the default learning rate is at 8 and at 4 bits."""
    text = " ".join(cli("train", "--help", check=True).stdout.split())
    assert "default: 1e-5 at 8 bits, doubled per bit --activation-bw is below 8 (4 bits: 1.6e-4)" in text, text
