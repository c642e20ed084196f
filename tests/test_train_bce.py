"""Cross-entropy on a Sigmoid output (or a one-channel class axis) is binary cross-entropy on the
logits: a text detector's one-channel probability map trained on 0/1 masks (PaddleOCR's det)."""

from __future__ import annotations

import tempfile

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from conftest import make_model, tensor
from onnxqat import QuantizationSimModel
from onnxqat.errors import DataError
from onnxqat.graph import NameScope
from onnxqat.train.builder import Builder
from onnxqat.train.lower import _binary_cross_entropy
from onnxqat.train.ort_training import training_modules

f32 = np.float32


def np_bce(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Elementwise binary cross-entropy of logits ``z`` in float64: ``log(1 + e^z) - z y``."""
    z = np.asarray(z, np.float64)
    return np.logaddexp(0.0, z) - z * np.asarray(y, np.float64)


def bce_model(n: int) -> ir.Model:
    """``mean(bce(z, y))`` with ``z`` an initializer (trained) and ``y`` an input."""
    z = ir.Value(name="z", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([n]),
                 const_value=ir.tensor(np.zeros(n, f32), name="z"))
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([n]))
    graph = ir.Graph([y], [], nodes=[], initializers=[z], opset_imports={"": 17}, name="bce")
    model = ir.Model(graph, ir_version=8)
    b = Builder(model, NameScope(model))
    loss = b.op("ReduceMean", [_binary_cross_entropy(b, z, y)], "loss", keepdims=0)
    loss.dtype, loss.shape = ir.DataType.FLOAT, ir.Shape([])
    graph.outputs.append(loss)
    return model


def test_binary_cross_entropy_graph_equals_numpy_and_its_gradient_the_numeric_one():
    """Forward against numpy's float64 BCE, gradient (onnxruntime-training) against central
    differences of it, at logits where the naive forms fail: 0 exactly (a quantized logit; the
    ``max(z, 0)`` form's gradient there is ``-y``, not ``1/2 - y``), tiny, moderate and +-100
    (``log(sigmoid(z))`` is -inf there, ``exp(z)`` overflows at 89)."""
    z = np.array([0.0, 0.0, 0.0, 1e-3, -1e-3, 2.5, -2.5, 7.0, -7.0, 30.0, -30.0, 100.0, -100.0, 100.0, -100.0], f32)
    y = np.array([0.0, 1.0, 0.3, 1.0, 0.0, 0.0, 1.0, 0.6, 0.6, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0], f32)
    model = bce_model(len(z))
    model.graph.initializers["z"].const_value = ir.tensor(z, name="z")
    artifacts, api = training_modules()
    with tempfile.TemporaryDirectory() as folder:
        artifacts.generate_artifacts(ir.to_proto(model), requires_grad=["z"], frozen_params=[], loss=None,
                                     optimizer=None, artifact_directory=folder)
        state = api.CheckpointState.load_checkpoint(f"{folder}/checkpoint")
        module = api.Module(f"{folder}/training_model.onnx", state, f"{folder}/eval_model.onnx")
        module.train()
        loss = float(module(y))
        grad = np.array(state.parameters["z"].grad, np.float64)
    want = np_bce(z, y).mean()
    assert np.isfinite(loss) and loss == pytest.approx(want, rel=1e-6, abs=1e-7)
    h = 1e-4
    zd = z.astype(np.float64)
    numeric = np.array([(np_bce(zd + h * e, y).mean() - np_bce(zd - h * e, y).mean()) / (2 * h)
                        for e in np.eye(len(z))])
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8 / len(z))
    assert grad[0] == pytest.approx(0.5 / len(z), rel=1e-6)  # sigmoid(0) - 0, not 0


def sigmoid_map(seed: int = 0, channels: int = 1):
    """Conv -> Sigmoid: a one-channel probability map ``[N, 1, 6, 6]`` like a text detector's."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["logits"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["logits"], ["prob"], name="sigmoid")]
    return make_model(nodes, [tensor("x", ["N", 3, 6, 6])], [tensor("prob", ["N", channels, 6, 6])],
                      {"w": (rng.normal(size=(channels, 3, 3, 3)) * 0.5).astype(f32),
                       "b": rng.normal(size=channels).astype(f32)})


def calibrated(model, x, **options):
    sim = QuantizationSimModel(model, per_channel=True, **options)
    sim.compute_encodings([{"x": x}], progress=False)
    return sim


@pytest.mark.parametrize("labels_kind", ["int_mask", "soft_map"])
def test_cross_entropy_on_a_sigmoid_map_is_binary_cross_entropy_of_its_logits(labels_kind):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3, 6, 6)).astype(f32)
    sim = calibrated(sigmoid_map(), x)
    if labels_kind == "int_mask":  # [N, H, W] masks of a [N, 1, H, W] map, as 0/1 integers
        labels = rng.integers(0, 2, size=(4, 6, 6))
        y = labels[:, None].astype(np.float64)
    else:
        labels = rng.uniform(0, 1, size=(4, 1, 6, 6)).astype(f32)
        y = labels.astype(np.float64)
    with sim.trainer(loss="cross_entropy", lr=1e-3) as trainer:
        assert trainer.graph.binary and trainer.graph.sigmoid
        ops = [n.op_type for n in trainer.graph.model.graph]
        assert "Sigmoid" not in ops and "SoftmaxCrossEntropyLoss" not in ops
        result = trainer.step({"x": x, "label": labels})
        # the prediction is the quantized logits: the Sigmoid output's FakeQuant is not trained through
        assert trainer.graph.model.graph.outputs[1].producer().inputs[0].name == "logits"
    z = result.prediction
    assert z.shape == (4, 1, 6, 6)
    np.testing.assert_allclose(1 / (1 + np.exp(-z.astype(np.float64))), sim.run({"x": x})[0], atol=1 / 255 + 1e-6)
    assert result.loss == pytest.approx(np_bce(z, y).mean(), rel=1e-5)


def test_binary_cross_entropy_trains_and_reports_accuracy_of_the_thresholded_map():
    rng = np.random.default_rng(2)
    batches = [{"x": rng.normal(size=(4, 3, 6, 6)).astype(f32)} for _ in range(6)]
    teacher = QuantizationSimModel(sigmoid_map(seed=5), config={"defaults": {"ops": {"is_output_quantized": False},
                                                                            "params": {"is_quantized": False}},
                                                               "model_input": {"is_input_quantized": False},
                                                               "model_output": {"is_output_quantized": False}})
    for b in batches:  # a learnable mask: another conv's thresholded map
        b["label"] = (teacher.run(b)[0][:, 0] > 0.5).astype(np.int64)
    sim = calibrated(sigmoid_map(), np.concatenate([b["x"] for b in batches]))
    with sim.trainer(loss="cross_entropy", lr=3e-2) as trainer:
        before = trainer.evaluate(batches)
        out = np.concatenate([sim.run(b)[0] for b in batches])
        labels = np.concatenate([b["label"] for b in batches])[:, None]
        assert before["accuracy"] == pytest.approx(np.mean((out > 0.5) == (labels >= 0.5)))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            history = trainer.fit(batches, epochs=8, progress=False)
        after = trainer.evaluate(batches)
    assert 0 <= history[0].train_accuracy <= 1
    assert history[-1].loss < history[0].loss
    assert after["accuracy"] > before["accuracy"]


def test_binary_cross_entropy_refuses_labels_outside_0_1_and_other_shapes():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 3, 6, 6)).astype(f32)
    sim = calibrated(sigmoid_map(), x)
    with sim.trainer(loss="cross_entropy") as trainer:
        for bad, lo, hi in ((np.full((4, 6, 6), 2), "0", "2"), (np.full((4, 1, 6, 6), -0.5, f32), "-0.5", "0")):
            bad[0, 0, 0] = 0
            with pytest.raises(DataError) as e:
                trainer.step({"x": x, "label": bad})
            message = str(e.value)
            assert f"range over [{lo}, {hi}]" in message and "'prob' is a Sigmoid" in message and "[0, 1]" in message
            assert "\n" not in message
        with pytest.raises(DataError, match=r"labels 'label' have shape \[4, 6\].*\[4, 1, 6, 6\] or \[4, 6, 6\]"):
            trainer.step({"x": x, "label": np.zeros((4, 6), np.int64)})
        with pytest.raises(DataError, match="numbers in \\[0, 1\\]"):
            trainer.step({"x": x, "label": np.full((4, 6, 6), "a")})


def one_logit():
    """Gemm to one logit per sample, no Sigmoid: a binary classifier's ``[N, 1]`` output."""
    rng = np.random.default_rng(4)
    return make_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")],
                      [tensor("x", ["N", 5])], [tensor("y", ["N", 1])],
                      {"w": rng.normal(size=(5, 1)).astype(f32), "b": np.zeros(1, f32)})


def test_a_one_channel_logit_output_is_binary_cross_entropy_on_the_output_itself():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(16, 5)).astype(f32)
    sim = QuantizationSimModel(one_logit())
    sim.compute_encodings([{"x": x}], progress=False)
    labels = rng.integers(0, 2, size=16)  # [N] labels of an [N, 1] output
    with sim.trainer(loss="cross_entropy", lr=1e-3) as trainer:
        assert trainer.graph.binary and not trainer.graph.sigmoid
        result = trainer.step({"x": x, "label": labels})
        out = sim.run({"x": x})[0]
        metrics = trainer.evaluate([{"x": x, "label": labels}])
    assert result.loss == pytest.approx(np_bce(result.prediction[:, 0], labels).mean(), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(np.mean((out[:, 0] > 0) == (labels == 1)))


def test_the_cli_trains_a_sigmoid_map_on_masks_and_refuses_labels_beyond_1(tmp_path, capsys):
    import onnx

    from onnxqat.cli import main

    rng = np.random.default_rng(6)
    model = tmp_path / "det.onnx"
    onnx.save(sigmoid_map(), model)
    x = rng.normal(size=(16, 3, 6, 6)).astype(f32)
    data, bad = tmp_path / "d.npz", tmp_path / "bad.npz"
    np.savez(data, x=x, label=rng.integers(0, 2, size=(16, 6, 6)))
    np.savez(bad, x=x, label=rng.integers(0, 3, size=(16, 6, 6)))
    code = main([str(a) for a in ("train", model, "--data", data, "--calib", data, "--output-dir", tmp_path / "o",
                                  "--loss", "cross_entropy", "--epochs", "1", "--batch-size", "8", "--eval", data)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert (tmp_path / "o" / "model_qdq.onnx").exists()
    assert "eval_accuracy=" in out and "train_accuracy=" in out
    code = main([str(a) for a in ("train", model, "--data", bad, "--calib", data, "--output-dir", tmp_path / "o2",
                                  "--loss", "cross_entropy", "--epochs", "1", "--batch-size", "8")])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {bad}: labels 'label' range over [0, 2] but output 'prob' is a Sigmoid")
    assert "binary cross-entropy needs labels in [0, 1]" in last and "plan:" not in out  # before any work
    assert not (tmp_path / "o2").exists()


def test_distillation_on_a_sigmoid_map_is_the_bernoulli_kl_on_the_logits():
    """``distill`` on a Sigmoid output: ``T^2 mean(KL(Bernoulli(sigmoid(t / T)) || Bernoulli(sigmoid(s / T))))``
    on the float model's logits ``t`` and the quantized logits ``s`` (numpy float64 reference), and
    training on it lowers it."""
    import onnxruntime as ort

    rng = np.random.default_rng(7)
    batches = [{"x": rng.normal(size=(4, 3, 6, 6)).astype(f32)} for _ in range(4)]
    model = sigmoid_map()
    logits_model = make_model([model.graph.node[0]], [tensor("x", ["N", 3, 6, 6])], [tensor("logits", ["N", 1, 6, 6])],
                              {i.name: onnx_array(i) for i in model.graph.initializer})
    float_logits = ort.InferenceSession(logits_model.SerializeToString(), providers=["CPUExecutionProvider"])
    sim = QuantizationSimModel(model, param_bw=4, activation_bw=4)
    sim.compute_encodings(batches, progress=False)
    temperature = 2.0

    def reference(s, t):
        p = 1 / (1 + np.exp(-np.asarray(t, np.float64) / temperature))
        return temperature ** 2 * (np_bce(np.asarray(s, np.float64) / temperature, p)
                                   - np_bce(np.asarray(t, np.float64) / temperature, p)).mean()

    with sim.trainer(loss="distill", lr=3e-2, temperature=temperature) as trainer:
        assert trainer.graph.sigmoid and not trainer.graph.binary
        assert trainer.graph.teacher_source == "logits"
        result = trainer.step(batches[0])
        t = float_logits.run(None, batches[0])[0]
        assert result.loss == pytest.approx(reference(result.prediction, t), rel=1e-5, abs=1e-7)
        assert result.loss > 0
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            history = trainer.fit(batches, epochs=6, progress=False)
    assert history[-1].loss < history[0].loss
    # in micro-batches of 3 (a piece of 3, then 1 row padded to 3 at weight 0), from the same start:
    # the same first step
    fresh = QuantizationSimModel(model, param_bw=4, activation_bw=4)
    fresh.compute_encodings(batches, progress=False)
    with fresh.trainer(loss="distill", lr=3e-2, temperature=temperature, micro_batch=3) as trainer:
        assert trainer.step(batches[0]).loss == pytest.approx(result.loss, rel=1e-5)


def onnx_array(initializer):
    from onnx import numpy_helper

    return numpy_helper.to_array(initializer)
