"""Training on graphs as real exporters write them: symbolic shapes, ops without gradients, crashes
of the training runtime, and the trainer's feedback (warnings, agreement, fixed batch shapes)."""

from __future__ import annotations

import tempfile
import warnings

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_model, tensor
from onnxqat import QuantizationSimModel
from onnxqat.errors import DataError, ModelError
from onnxqat.passes.shapes import ConcreteShapesPass, is_static
from onnxqat.train.canary import locate_crash, run_canary

f32 = np.float32


def pooled_conv(n: str | int = "N"):
    """Conv -> AveragePool: onnxruntime-training sizes AveragePoolGrad from the static input shape."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("AveragePool", ["r"], ["p"], name="pool", kernel_shape=[7, 7]),
             helper.make_node("Flatten", ["p"], ["y"], name="flat")]
    return make_model(nodes, [tensor("x", [n, 4, 7, 7])], [tensor("y", [n, 8])],
                      {"w": (rng.normal(size=(8, 4, 1, 1)) * 0.5).astype(f32), "b": rng.normal(size=8).astype(f32)})


def test_canary_turns_a_runtime_crash_into_the_crashing_node():
    """The graph that killed training on the tf2onnx open-nsfw model, before shapes were made
    concrete: a symbolic batch gives AveragePoolGrad an empty output and ConvGrad divides by 0."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("AveragePool", ["c"], ["p"], name="pool", kernel_shape=[7, 7]),
             helper.make_node("Mul", ["p", "p"], ["sq"], name="sq"),
             helper.make_node("ReduceSum", ["sq"], ["loss"], name="sum", keepdims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 7, 7])],
                              [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
                              [numpy_helper.from_array(rng.normal(size=(8, 4, 1, 1)).astype(f32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    with tempfile.TemporaryDirectory() as work:
        result = run_canary(work, model.SerializeToString(), ["w"], "sgd", 0.0,
                            {"x": rng.normal(size=(4, 4, 7, 7)).astype(f32)})
        assert not result["ok"] and result["signal"] == "SIGFPE" and result["stage"] == "step"
        index, name, op_type = locate_crash(work)
    assert op_type == "ConvGrad" and name.startswith("conv")


def test_the_same_graph_trains_with_concrete_shapes():
    sim = QuantizationSimModel(pooled_conv(), per_channel=True)
    rng = np.random.default_rng(1)
    sim.compute_encodings([{"x": rng.uniform(0, 1, size=(8, 4, 7, 7)).astype(f32)}], progress=False)
    trainer = sim.trainer(loss="distill", lr=1e-3)
    before = trainer.predict({"x": rng.uniform(0, 1, size=(8, 4, 7, 7)).astype(f32)})
    assert before.shape == (8, 8)
    losses = [trainer.step({"x": rng.uniform(0, 1, size=(8, 4, 7, 7)).astype(f32)}).loss for _ in range(3)]
    assert all(np.isfinite(losses))
    # every value of the training graph has a static shape, the exported model keeps its own
    assert all(is_static(v.shape) for n in trainer.graph.model.graph for v in n.outputs if v.shape is not None)
    assert sim.float_model.graph.inputs[0].shape[0] == "N"


def test_concrete_shapes_from_inference_and_from_a_profiled_run():
    """``Shape -> Range -> Expand`` shapes are only known at run time."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "one"], ["n"], name="gather", axis=0),
             helper.make_node("Range", ["zero", "n", "step"], ["idx"], name="range"),
             helper.make_node("Cast", ["idx"], ["idxf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "idxf"], ["y"], name="add")]
    model = make_model(nodes, [tensor("x", ["B", "T"])], [tensor("y", ["B", "T"])],
                       {"one": np.array(1, np.int64), "zero": np.array(0, np.int64), "step": np.array(1, np.int64)})
    ir_model = ir.from_proto(model)
    result = ConcreteShapesPass({"x": np.zeros((3, 5), f32)})(ir_model)
    shapes = {v.name: tuple(v.shape) for n in ir_model.graph for v in n.outputs}
    assert shapes["idx"] == (5,) and shapes["y"] == (3, 5) and shapes["s"] == (2,)
    assert result.from_run >= 1 and not result.unresolved


def hard_act_model():
    """Conv -> HardSwish -> Conv -> PRelu -> HardSigmoid: three ops without a gradient builder."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("HardSwish", ["c1"], ["h"], name="hswish"),
             helper.make_node("Conv", ["h", "w2"], ["c2"], name="conv2"),
             helper.make_node("PRelu", ["c2", "slope"], ["pr"], name="prelu"),
             helper.make_node("HardSigmoid", ["pr"], ["y"], name="hsig", alpha=0.2, beta=0.5)]
    return make_model(nodes, [tensor("x", ["N", 3, 6, 6])], [tensor("y", ["N", 4, 6, 6])],
                      {"w1": (rng.normal(size=(4, 3, 3, 3)) * 0.4).astype(f32),
                       "w2": (rng.normal(size=(4, 4, 1, 1)) * 0.4).astype(f32),
                       "slope": np.full((4, 1, 1), 0.25, f32)}, opset=14)


def test_ops_without_gradients_are_decomposed_and_train():
    # 16-bit activations: no integer form for HardSwish/HardSigmoid, so the decompositions apply
    sim = QuantizationSimModel(hard_act_model(), per_channel=True, activation_bw=16)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 3, 6, 6)).astype(f32)
    sim.compute_encodings([{"x": x}], progress=False)
    trainer = sim.trainer(loss="mse", target_key="t", lr=1e-3)
    assert set(trainer.graph.decomposed.values()) == {"HardSwish", "PRelu", "HardSigmoid"}
    # the model output's HardSigmoid was rewritten: the prediction is named by the graph output
    assert trainer.graph.prediction == trainer.graph.model.graph.outputs[1].name is not None
    target = {"x": x, "t": np.zeros((8, 4, 6, 6), f32)}
    first = trainer.step(target).loss
    for _ in range(20):
        last = trainer.step(target).loss
    assert last < first  # gradients flow through the decomposed ops to both convolutions


def test_an_op_nothing_decomposes_is_refused_before_any_work(monkeypatch):
    import onnxqat.train.decompose as decompose

    rules = dict(decompose.DECOMPOSITIONS)
    del rules["HardSwish"]
    monkeypatch.setattr(decompose, "DECOMPOSITIONS", rules)
    sim = QuantizationSimModel(hard_act_model(), activation_bw=16)
    sim.compute_encodings([{"x": np.ones((2, 3, 6, 6), f32)}], progress=False)
    with pytest.raises(ModelError) as e:
        sim.trainer(loss="distill")
    message = str(e.value)
    assert "'hswish'" in message and "HardSwish" in message and "freeze" in message and "\n" not in message
    assert message.count("freeze the parameters") == 1


def test_cross_entropy_over_the_last_axis_of_a_sequence_after_the_opset_upgrade():
    """A Softmax(axis=2) of [N, T, C] logits below opset 13 (PaddleOCR's recognizers) comes out of
    the opset upgrade as Reshape(Softmax(Flatten(x, axis=2)), Shape(x)) when the logits' shape is
    unknown: the loss still takes classes on the last axis, and equals numpy's cross-entropy of the
    logits it reports, averaged over every frame."""
    rng = np.random.default_rng(7)
    t, c, d = 5, 7, 4
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Shape", ["a"], ["s"]), helper.make_node("Flatten", ["a"], ["f"], axis=2),
             helper.make_node("Softmax", ["f"], ["p"], axis=-1), helper.make_node("Reshape", ["p", "s"], ["y"])]
    model = make_model(nodes, [tensor("x", ["N", "T", d])], [tensor("y", ["N", "T", c])],
                       {"w": rng.normal(size=(d, c)).astype(f32), "b": rng.normal(size=(c,)).astype(f32)})
    sim = QuantizationSimModel(model)
    x = rng.normal(size=(8, t, d)).astype(f32)
    sim.compute_encodings([{"x": x}], progress=False)
    assert [n.op_type for n in sim.float_model.graph][-2:] == ["Softmax", "Reshape"]
    labels = rng.integers(0, c, size=(8, t))
    with sim.trainer(loss="cross_entropy", lr=1e-4) as trainer:
        result = trainer.step({"x": x, "label": labels})
        assert trainer.graph.class_axis == 2
    logits = result.prediction.astype(np.float64)
    assert logits.shape == (8, t, c)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_p, labels[..., None], -1).mean()
    assert result.loss == pytest.approx(expected, rel=1e-5)


def test_batches_of_another_shape():
    sim = QuantizationSimModel(pooled_conv(), per_channel=True)
    rng = np.random.default_rng(4)
    sim.compute_encodings([{"x": rng.uniform(0, 1, size=(8, 4, 7, 7)).astype(f32)}], progress=False)
    batches = [{"x": rng.uniform(0, 1, size=(n, 4, 7, 7)).astype(f32)} for n in (8, 8, 8, 3)]
    with sim.trainer(loss="distill", lr=1e-4) as trainer:
        with pytest.warns(RuntimeWarning, match="only 4 optimizer steps"):
            (stats,) = trainer.fit(batches, epochs=1, progress=False)
        assert stats.steps == 3 and stats.skipped == 3
        with pytest.raises(DataError, match="built for \\[8, 4, 7, 7\\]"):
            trainer.fit([{"x": np.ones((16, 4, 7, 7), f32)}], epochs=2, progress=False)


def test_evaluation_with_distillation_reports_agreement_with_the_float_model():
    sim = QuantizationSimModel(pooled_conv(), param_bw=4, per_channel=True)
    rng = np.random.default_rng(5)
    data = [{"x": rng.uniform(0, 1, size=(8, 4, 7, 7)).astype(f32)} for _ in range(4)]
    sim.compute_encodings(data, progress=False)
    with sim.trainer(loss="distill", lr=1e-3) as trainer:
        metrics = trainer.evaluate(data)
        float_model = QuantizationSimModel(pooled_conv(), config={"defaults": {"ops": {"is_output_quantized": False},
                                                                            "params": {"is_quantized": False}},
                                                                "model_input": {"is_input_quantized": False},
                                                                "model_output": {"is_output_quantized": False}})
        ref = np.concatenate([float_model.run(b)[0] for b in data])
        got = np.concatenate([sim.run(b)[0] for b in data])
        expected = (ref.argmax(-1) == got.argmax(-1)).mean()
        noise = np.mean((ref.astype(np.float64) - got) ** 2)
        assert metrics["top1_agreement"] == pytest.approx(expected)
        assert metrics["sqnr_db"] == pytest.approx(10 * np.log10(np.mean(ref.astype(np.float64) ** 2) / noise), rel=1e-6)
        assert "accuracy" not in metrics  # no labels


def test_plain_progress_lines_when_not_a_terminal(capsys):
    sim = QuantizationSimModel(pooled_conv(), per_channel=True)
    rng = np.random.default_rng(6)
    sim.compute_encodings([{"x": rng.uniform(0, 1, size=(4, 4, 7, 7)).astype(f32)}], progress=False)
    batches = [{"x": rng.uniform(0, 1, size=(4, 4, 7, 7)).astype(f32)} for _ in range(10)]
    with sim.trainer(loss="distill") as trainer, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(batches, epochs=1)  # progress=None: pytest's stderr is not a TTY
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch 1:")]
    assert len(lines) == 10 and lines[-1].startswith("epoch 1: 10/10 batches") and "loss" in lines[-1]


def test_range_learning_graph_has_static_shapes_and_no_foldable_full_size_constants():
    """The LSQ terms of range learning: no ConstantOfShape/Expand of a static shape, which
    onnxruntime folds into one full-size constant per quantizer (+1 GiB on the PP-LCNet orientation
    classifier at batch 32), and static shapes on the activation-sized values (onnx shape inference
    stops at FakeQuant)."""
    sim = QuantizationSimModel(pooled_conv(), per_channel=True)
    rng = np.random.default_rng(7)
    sim.compute_encodings([{"x": rng.uniform(-1, 1, size=(8, 4, 7, 7)).astype(f32)}], progress=False)
    with sim.trainer(loss="distill", range_learning=True, lr=1e-3) as trainer:
        assert any(p.zero_point_param for p in trainer.graph.range_params)  # the zero-point term is there
        trainer.step({"x": rng.uniform(-1, 1, size=(8, 4, 7, 7)).astype(f32)})
        graph = trainer.graph.model.graph
        assert not [n.name for n in graph if n.op_type in ("ConstantOfShape", "Expand")]
        activation_fq = [n for n in graph if n.op_type == "FakeQuant" and n.attributes["quant_max"].as_int() < 2**16]
        assert activation_fq
        downstream = [u.node for n in activation_fq for v in n.outputs for u in v.uses()]
        assert all(is_static(v.shape) for n in activation_fq + downstream for v in n.outputs)


_MEMORY_CHILD = r"""
import json, resource, sys, warnings
import numpy as np
from onnx import TensorProto, helper, numpy_helper
from onnxqat import QuantizationSimModel

def rss():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024

rng = np.random.default_rng(0)
nodes, inits, x = [], [], "x"
for i, act in enumerate(["Sigmoid", "Tanh", "Sigmoid", "Tanh"]):
    inits.append(numpy_helper.from_array((rng.normal(size=(16, 8 if i == 0 else 16, 3, 3)) * 0.3).astype(np.float32), f"w{i}"))
    nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
              helper.make_node(act, [f"c{i}"], [f"a{i}"], name=f"act{i}")]
    x = f"a{i}"
nodes += [helper.make_node("GlobalAveragePool", [x], ["p"], name="pool"), helper.make_node("Flatten", ["p"], ["y"], name="flat")]
graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 64, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], inits)
sim = QuantizationSimModel(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
sim.compute_encodings([{"x": rng.normal(size=(8, 8, 64, 64)).astype(np.float32)}], progress=False)
batch = {"x": rng.normal(size=(32, 8, 64, 64)).astype(np.float32)}
evaluate = sys.argv[1] == "evaluate"
before = rss()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    trainer = sim.trainer(loss="distill", threads=1)
    for _ in range(3):
        trainer.step(batch)
        if evaluate:
            trainer.evaluate([batch, batch])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainer.close()
print(json.dumps({"before": before, "peak": peak, "closed": rss()}))
"""


def _memory_run(mode: str) -> dict:
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, mode], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_evaluation_shares_the_training_arena_and_close_returns_the_memory():
    """The float reference (also the distillation teacher) and the evaluated simulation allocate
    from the training step's arena, whose activations are free between steps; ``close`` gives the
    arena's free memory back to the system."""
    train_only, with_eval = _memory_run("train"), _memory_run("evaluate")
    training = train_only["peak"] - train_only["before"]
    assert training > 100  # activations dominate this model at batch 32
    # before: +19% for the evaluation, 38% of the training memory kept after close
    assert with_eval["peak"] - train_only["peak"] < 0.1 * training
    assert with_eval["closed"] - with_eval["before"] < 0.3 * training


@pytest.mark.parametrize("loss", ["cross_entropy", "distill"])
def test_a_softmax_behind_identity_is_still_the_loss_source(loss):
    """PaddlePaddle's text-direction classifier ends in Identity(Softmax(logits)): cross-entropy
    and distillation must read the logits, not take the probabilities for logits (a second
    softmax: on two classes the loss cannot go below log(1 + e^-1) = 0.313)."""
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["logits"], name="fc"),
             helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
             helper.make_node("Identity", ["probs"], ["out"], name="scale")]
    model = make_model(nodes, [tensor("x", ["N", 5])], [tensor("out", ["N", 2])],
                       {"w": (rng.normal(size=(5, 2)) * 4).astype(f32)})
    x = rng.normal(size=(8, 5)).astype(f32)
    sim = QuantizationSimModel(model)
    sim.compute_encodings([{"x": x}], progress=False)
    with sim.trainer(loss=loss, lr=1e-4) as trainer:
        assert "Softmax" not in [n.op_type for n in trainer.graph.model.graph] or loss == "distill"
        assert trainer.graph.teacher_source in (None, "logits")
        labels = sim.run({"x": x})[0].argmax(-1)  # the model's own top class: a near-zero loss
        result = trainer.step({"x": x, "label": labels})
    assert result.prediction.shape == (8, 2)
    logits = result.prediction.astype(np.float64)
    assert np.abs(logits).max() > 1.5  # logits, not probabilities
    if loss == "cross_entropy":
        shifted = logits - logits.max(-1, keepdims=True)
        want = np.mean(np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(8), labels])
        assert result.loss == pytest.approx(want, rel=1e-5) and result.loss < 0.313


@pytest.mark.parametrize("identity", [False, True])
@pytest.mark.parametrize("loss", ["cross_entropy", "distill"])
def test_the_flattened_softmax_is_found_when_inference_left_the_logits_without_shape(loss, identity):
    """PaddleOCR's recognizer in the sim: shape inference gives the logits of Reshape(Softmax(Flatten(x,
    axis=2)), Shape(x)) no type or shape, the concrete-shape lowering does. Both must pick the same
    loss source (the first once took the output itself on axis 1, so distillation asked the float
    session for a teacher tensor it had not exposed: 'Invalid output name'). PaddlePaddle's cls:
    an Identity after the Reshape, and only the graph output has a shape."""
    from onnxqat.train.lower import LossSpec, loss_source

    c, d = 7, 4
    rng = np.random.default_rng(9)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Shape", ["a"], ["s"]), helper.make_node("Flatten", ["a"], ["f"], axis=2),
             helper.make_node("Softmax", ["f"], ["p"], axis=-1), helper.make_node("Reshape", ["p", "s"], ["y"])]
    if identity:
        nodes.append(helper.make_node("Identity", ["y"], ["out"]))
    out = "out" if identity else "y"
    model = ir.serde.deserialize_model(make_model(nodes, [tensor("x", ["N", "T", d])], [tensor(out, ["N", "T", c])],
                                                  {"w": rng.normal(size=(d, c)).astype(f32),
                                                   "b": rng.normal(size=(c,)).astype(f32)}))
    a = next(v for n in model.graph for v in n.outputs if v.name == "a")
    reshaped = next(v for n in model.graph for v in n.outputs if v.name == "y")
    assert a.shape is None and a.dtype is None and (reshaped.shape is None) == identity  # no value_info
    source = loss_source(model, LossSpec(loss))
    assert (source.tensor, source.class_axis, source.softmax, source.rank) == ("a", 2, True, 3)
