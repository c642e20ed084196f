"""Inputs fixed to constants, control flow folded, data with the batch on another axis, and the
warning when most of the compute stays float."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_onnx
from onnxqat import QuantizationSimModel
from onnxqat.data import NpzBatches, load_npz, parse_batch_axes
from onnxqat.errors import ConfigError, DataError

f32 = np.float32
rng = np.random.default_rng(0)


def switch_model():
    """``y = Conv_a(x)`` if sr == 16000 else ``Conv_b(x)``, weights as Constants inside the
    branches (silero-vad's layout); ``state`` carries the batch on axis 1."""
    def branch(name, w):
        const = helper.make_node("Constant", [], [f"{name}_w"], value=numpy_helper.from_array(w, f"{name}_w"))
        conv = helper.make_node("Conv", ["x", f"{name}_w"], [f"{name}_y"], name=f"{name}_conv", pads=[1, 1])
        return helper.make_graph([const, conv], name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)])

    nodes = [helper.make_node("Equal", ["sr", "k16"], ["is16"], name="is16"),
             helper.make_node("If", ["is16"], ["conv"], name="switch",
                              then_branch=branch("a", (rng.normal(size=(4, 2, 3)) * 0.5).astype(f32)),
                              else_branch=branch("b", (rng.normal(size=(4, 2, 3)) * 0.5).astype(f32))),
             helper.make_node("ReduceMean", ["state"], ["s"], name="smean", axes=[0, 2], keepdims=0),
             helper.make_node("Unsqueeze", ["s"], ["s2"], name="unsq", axes=[1, 2]),
             helper.make_node("Add", ["conv", "s2"], ["y"], name="add")]
    graph = helper.make_graph(
        nodes, "switch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 16]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 8]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16])],
        [numpy_helper.from_array(np.array(16000, np.int64), "k16")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)], ir_version=7)
    onnx.checker.check_model(model)
    return model


def feeds(n=8, sr=16000):
    return {"x": rng.normal(size=(n, 2, 16)).astype(f32), "state": rng.normal(size=(2, n, 8)).astype(f32),
            "sr": np.array(sr, np.int64)}


def test_without_fixing_the_input_everything_stays_float_and_says_where():
    with pytest.warns(RuntimeWarning, match="most of the compute stays float.*If 'switch' \\(control flow\\).*--fix-input"):
        sim = QuantizationSimModel(switch_model())
    assert not sim.plan.params


@pytest.mark.parametrize("sr", [16000, 8000])
def test_fixing_the_input_folds_the_branch_and_keeps_the_values(sr):
    model = switch_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no coverage warning once the branch is folded
        sim = QuantizationSimModel(model, fix_inputs={"sr": sr}, per_channel=True)
    assert [p.name for p in sim.plan.params] == [f"{'a' if sr == 16000 else 'b'}_w"]
    assert [v.name for v in sim.float_model.graph.inputs] == ["x", "state"]
    assert not [n for n in sim.float_model.graph if n.op_type == "If"]
    batch = feeds(sr=sr)
    sim.compute_encodings([batch], progress=False)
    (ref,) = run_onnx(model, batch)
    (got,) = sim.run(batch)  # 'sr' is an extra key now, ignored
    assert sim.plan.activation_of("y") is None  # Add of a float input: runs in float
    lsb = float(sim.encodings["conv"].scale)  # its rounding (0.5) plus input/weight quantization through it
    assert np.abs(got - ref).max() <= 2.0 * lsb


def test_fixed_input_errors_name_the_input():
    with pytest.raises(ConfigError, match="no input 'rate'"):
        QuantizationSimModel(switch_model(), fix_inputs={"rate": 1})
    with pytest.raises(ConfigError, match="2 value\\(s\\) for an input of shape \\[\\]"):
        QuantizationSimModel(switch_model(), fix_inputs={"sr": [1, 2]})


def test_batches_on_another_axis_and_unbatched_inputs(tmp_path):
    data = {"x": rng.normal(size=(10, 2, 16)).astype(f32), "state": rng.normal(size=(2, 10, 8)).astype(f32),
            "sr": np.array(16000, np.int64)}
    np.savez(tmp_path / "d.npz", **data)
    axes = parse_batch_axes(["state=1", "sr=none"])
    arrays = load_npz(tmp_path / "d.npz", ["x", "state", "sr"], batch_axes=axes)
    batches = list(NpzBatches(arrays, 4, batch_axes=axes))
    assert [b["state"].shape for b in batches] == [(2, 4, 8), (2, 4, 8), (2, 2, 8)]
    np.testing.assert_array_equal(np.concatenate([b["state"] for b in batches], axis=1), data["state"])
    assert all(b["sr"].shape == () for b in batches)
    with pytest.raises(DataError, match="'sr' has 0 axes, no batch axis 0 .*--batch-axis sr=none"):
        load_npz(tmp_path / "d.npz", ["x", "sr"])
    with pytest.raises(DataError, match="sample counts differ|different sample counts"):
        load_npz(tmp_path / "d.npz", ["x", "state"])  # state's axis 0 has 2 entries, x has 10
    with pytest.raises(DataError, match="expected NAME=AXIS"):
        parse_batch_axes(["state"])


def test_cli_quantizes_a_switch_model_with_fixed_input_and_batch_axis(cli, tmp_path):
    onnx.save(switch_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", **feeds(12))
    proc = cli("quantize", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--output-dir", tmp_path / "out",
               "--fix-input", "sr=16000", "--batch-axis", "state=1", "--batch-axis", "sr=none", check=True)
    assert "1 weight quantizers" in proc.stdout and "warning" not in proc.stderr
    exported = onnx.load(tmp_path / "out" / "model_qdq.onnx")
    assert [i.name for i in exported.graph.input] == ["x", "state"]


@pytest.mark.slow
def test_silero_vad_quantizes_once_its_sample_rate_is_fixed():
    import zoo

    try:  # the model from its wheel, the speech from espeak-ng
        path = zoo.fetch("silero-vad")
        calib = zoo.make_data("silero-vad", 6, split="calib")
    except zoo.ZooUnavailable as e:
        pytest.skip(str(e))
    sim = QuantizationSimModel(path, fix_inputs={"sr": 16000}, per_channel=True)
    assert len(sim.plan.params) >= 6  # the encoder convolutions were all inside If branches
    sim.compute_encodings(list(zoo.feeds("silero-vad", calib, run=zoo.ort_runner(path))), progress=False)
    test = zoo.make_data("silero-vad", 6, split="test")
    float_out = zoo.predict("silero-vad", zoo.ort_runner(path), test)
    quant_out = zoo.predict("silero-vad", sim.run, test)
    metric = zoo.task_metric("silero-vad", quant_out, test)["frame_accuracy"]
    assert metric >= zoo.task_metric("silero-vad", float_out, test)["frame_accuracy"] - 0.03, metric
    assert zoo.agreement("silero-vad", float_out, quant_out, test)["decision"] >= 0.95
