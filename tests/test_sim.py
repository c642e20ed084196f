"""QuantizationSimModel end to end on small models: export round trips and encodings I/O."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import random_batches, run_onnx, tiny_cnn, visible
from onnxqat import EncodingsError, QuantizationSimModel
from onnxqat.qparams import Encoding


@pytest.fixture
def calibrated(tiny_model_path):
    sim = QuantizationSimModel(tiny_model_path, per_channel=True)
    sim.compute_encodings(random_batches(), progress=False)
    return sim


def test_uncalibrated_sim_refuses_to_run(tiny_model_path):
    sim = QuantizationSimModel(tiny_model_path)
    with pytest.raises(EncodingsError, match="not calibrated"):
        sim.run(random_batches(1)[0])


def test_sim_output_within_quantization_noise_of_float(calibrated, tiny_model_path):
    x = random_batches()[0]  # calibration data: no saturation
    (ref,) = run_onnx(onnx.load(tiny_model_path), x)
    (got,) = calibrated.run(x)
    lsb = float(calibrated.encodings["y"].scale)
    assert np.abs(got - ref).max() < 4 * lsb
    assert np.abs(got - ref).max() > 0  # it does quantize


def test_export_writes_three_files_and_float_model_equals_input(calibrated, tiny_model_path, tmp_path):
    original_bytes = tiny_model_path.read_bytes()
    paths = calibrated.export(tmp_path / "out")
    assert visible(tmp_path / "out") == ["model.encodings", "model.onnx", "model_qdq.onnx"]
    assert tiny_model_path.read_bytes() == original_bytes
    exported = onnx.load(paths["float"])
    onnx.checker.check_model(exported)
    assert not {n.op_type for n in exported.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    original = onnx.load(tiny_model_path)
    assert [i.name for i in exported.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in exported.graph.output] == [o.name for o in original.graph.output]
    x = random_batches(1, seed=5)[0]
    np.testing.assert_allclose(run_onnx(exported, x)[0], run_onnx(original, x)[0], rtol=1e-5, atol=1e-5)


def test_qdq_export_reproduces_sim(calibrated, tmp_path):
    paths = calibrated.export(tmp_path)
    x = random_batches(1, seed=6)[0]
    (deployed,) = run_onnx(onnx.load(paths["qdq"]), x)
    (sim_plain,) = run_onnx(calibrated.model, x)
    np.testing.assert_array_equal(deployed, sim_plain)


def test_encodings_file_lists_every_quantized_tensor(calibrated, tmp_path):
    paths = calibrated.export(tmp_path)
    doc = json.loads(open(paths["encodings"]).read())
    assert doc["version"] == "1.0.0"
    plan = calibrated.plan
    act_names = {e["name"] for e in doc["activation_encodings"]}
    assert act_names == {t for q in plan.activations for t in q.tensors}
    params = {e["name"]: e for e in doc["param_encodings"]}
    assert set(params) == {p.name for p in plan.params} | {b.name for b in plan.biases}
    exported = onnx.load(paths["float"])
    names = {i.name for i in exported.graph.initializer} | {i.name for i in exported.graph.input}
    names |= {o for n in exported.graph.node for o in n.output}
    assert act_names | set(params) <= names  # keyed by names in <prefix>.onnx
    w1 = params["w1"]
    assert w1["enc_type"] == "PER_CHANNEL" and w1["is_sym"] and w1["offset"] == [-128] * 4
    np.testing.assert_allclose(w1["scale"], calibrated.encodings["w1"].scale, rtol=1e-7)
    r1 = next(e for e in doc["activation_encodings"] if e["name"] == "r1")
    enc = calibrated.encodings["r1"]
    assert r1["offset"] == [int(enc.aimet_offset)] and r1["bw"] == 8 and r1["is_sym"] is False
    assert params["b1"]["bw"] == 32


@pytest.mark.parametrize("version", ["1.0.0", "0.6.1"])
def test_encodings_import_round_trip(calibrated, tiny_model_path, tmp_path, version):
    paths = calibrated.export(tmp_path, encoding_version=version)
    fresh = QuantizationSimModel(tiny_model_path, per_channel=True)
    fresh.load_encodings(paths["encodings"])
    for name, enc in calibrated.encodings.items():
        got = fresh.encodings[name]
        assert got.bitwidth == enc.bitwidth and got.axis == enc.axis and got.signed == enc.signed
        np.testing.assert_array_equal(got.zero_point, enc.zero_point)
        np.testing.assert_allclose(got.scale, enc.scale, rtol=1e-7)
    x = random_batches(1, seed=7)[0]
    np.testing.assert_array_equal(fresh.run(x)[0], calibrated.run(x)[0])


def test_exported_float_model_plus_encodings_rebuild_the_sim(calibrated, tmp_path):
    paths = calibrated.export(tmp_path)
    rebuilt = QuantizationSimModel(paths["float"], per_channel=True).load_encodings(paths["encodings"])
    x = random_batches(1, seed=8)[0]
    np.testing.assert_array_equal(rebuilt.run(x)[0], calibrated.run(x)[0])


def test_encodings_override_bitwidth_from_file(calibrated, tiny_model_path, tmp_path):
    paths = calibrated.export(tmp_path)
    doc = json.loads(open(paths["encodings"]).read())
    entry = next(e for e in doc["activation_encodings"] if e["name"] == "r1")
    entry.update(bw=16, scale=[entry["scale"][0] / 257], offset=[entry["offset"][0] * 257])
    sim = QuantizationSimModel(tiny_model_path, per_channel=True).load_encodings(doc)
    assert sim.encodings["r1"].bitwidth == 16


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["activation_encodings"].append({**d["activation_encodings"][0], "name": "ghost"}), "not in the model"),
        (lambda d: d["activation_encodings"][0].update(scale=[0.0]), "scale"),
        (lambda d: d["activation_encodings"][0].update(scale=[-1.0]), "scale"),
        (lambda d: d["activation_encodings"][0].update(bw=64), "bitwidth"),
        (lambda d: d["activation_encodings"][0].update(bw=0), "bitwidth"),
        (lambda d: d["activation_encodings"][0].update(offset=[300]), "offset outside"),
        (lambda d: d["activation_encodings"][0].update(is_sym="yes"), "is_sym"),
        (lambda d: d["activation_encodings"].pop(0), "no encoding for quantized tensor"),
        (lambda d: d.update(activation_encodings={}), "must be a list"),
        (lambda d: next(e for e in d["param_encodings"] if e["name"] == "w1").update(enc_type="PER_TENSOR", scale=[0.1], offset=[-128]), "per-tensor in the file"),
    ],
)
def test_bad_encodings_are_refused_with_the_tensor_named(calibrated, tiny_model_path, tmp_path, mutate, message):
    paths = calibrated.export(tmp_path)
    doc = json.loads(open(paths["encodings"]).read())
    mutate(doc)
    sim = QuantizationSimModel(tiny_model_path, per_channel=True)
    with pytest.raises(EncodingsError, match=message):
        sim.load_encodings(doc)
    assert not sim.calibrated  # nothing half-loaded


def test_malformed_encodings_files(tiny_model_path, tmp_path):
    sim = QuantizationSimModel(tiny_model_path)
    bad = tmp_path / "bad.encodings"
    bad.write_text("{truncated")
    with pytest.raises(EncodingsError, match="not a readable JSON"):
        sim.load_encodings(bad)
    with pytest.raises(EncodingsError, match="no such file"):
        sim.load_encodings(tmp_path / "missing.encodings")
    bad.write_text("[1, 2]")
    with pytest.raises(EncodingsError, match="JSON object"):
        sim.load_encodings(bad)


@pytest.mark.parametrize("target", ["x86-vnni", "x86-avx2"])
def test_set_weights_updates_param_encodings(tiny_model_path, target):
    sim = QuantizationSimModel(tiny_model_path, per_channel=True, target=target)
    sim.compute_encodings(random_batches(), progress=False)
    w1 = sim.weights()["w1"] * 2
    sim.set_weights({"w1": w1})
    rows = w1.reshape(4, -1).astype(np.float64)
    expected = np.abs(rows).max(1) / 127
    if target == "x86-avx2":  # two largest same-sign magnitudes per channel sum to at most 128 steps
        top2 = np.max([np.sort(np.maximum(sign * rows, 0), axis=1)[:, -2:].sum(1) for sign in (1, -1)], axis=0)
        expected = np.maximum(expected, top2 / 127.5)
    np.testing.assert_allclose(sim.encodings["w1"].scale, expected, rtol=1e-6)


def test_why_not_quantized_report(calibrated):
    report = calibrated.why_not_quantized()
    assert report["bn1"] == "inside supergroup Conv+Relu"


def test_activation_bitwidth_16_end_to_end(tiny_model_path, tmp_path):
    sim = QuantizationSimModel(tiny_model_path, activation_bw=16, param_bw=16)
    sim.compute_encodings(random_batches(), progress=False)
    x = random_batches()[0]  # calibration data: no saturation
    (ref,) = run_onnx(onnx.load(tiny_model_path), x)
    (got,) = sim.run(x)
    assert np.abs(got - ref).max() < 2e-3 * np.abs(ref).max()
    paths = sim.export(tmp_path)
    (deployed,) = run_onnx(onnx.load(paths["qdq"]), x)
    np.testing.assert_allclose(deployed, got, atol=float(sim.encodings["y"].scale))


def test_plan_annotation_is_deterministic(tiny_model_path):
    a = QuantizationSimModel(tiny_model_path).plan
    b = QuantizationSimModel(tiny_model_path).plan
    assert a == b


def test_model_proto_input_is_not_mutated():
    proto = tiny_cnn()
    before = proto.SerializeToString()
    sim = QuantizationSimModel(proto)
    sim.compute_encodings(random_batches(), progress=False)
    sim.set_weights({"w1": np.zeros((4, 3, 3, 3), np.float32)})
    assert proto.SerializeToString() == before
    assert isinstance(sim.encodings["x"], Encoding)


def test_softmax_output_uses_the_fixed_encoding_integer_kernels_expect():
    rng = np.random.default_rng(0)
    from onnx import helper
    from conftest import make_model, tensor

    nodes = [helper.make_node("Gemm", ["x", "w"], ["logits"], name="fc"),
             helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1)]
    model = make_model(nodes, [tensor("x", ["N", 4])], [tensor("probs", ["N", 2])],
                       {"w": rng.normal(size=(4, 2)).astype(np.float32)})
    x = rng.normal(size=(64, 4)).astype(np.float32)
    sim = QuantizationSimModel(model)
    sim.compute_encodings([{"x": x * 0.1}], progress=False)  # probabilities never reach 1 here
    enc = sim.encodings["probs"]
    assert float(enc.scale) == 1 / 256 and int(enc.zero_point) == 0
    # onnxruntime's QLinearSoftmax is then exact, fused or not
    (ref,) = run_onnx(sim.model, {"x": x})
    np.testing.assert_allclose(sim.run({"x": x})[0], ref, atol=1 / 256 + 1e-7)


def test_bias_that_overflows_int32_stays_float(tiny_model_path):
    sim = QuantizationSimModel(tiny_model_path, activation_bw=16, param_bw=16)
    sim.compute_encodings(random_batches(), progress=False)
    w = sim.weights()
    sim.set_weights({"b1": w["b1"] * 0 + 1e4})  # 1e4 / (s_in * s_w) is far beyond int32
    report = sim.why_not_quantized()
    assert "overflows int32" in report["b1"]
    assert [b.name for b in sim.effective_plan.biases] == ["bf"]
    doc = sim.encodings_document()
    assert "b1" not in {e["name"] for e in doc["param_encodings"]}
    x = random_batches()[0]
    (got,) = sim.run(x)
    assert np.isfinite(got).all()


def test_minus_one_dimensions_are_dynamic(tmp_path):
    proto = tiny_cnn()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1  # as PaddlePaddle exports write it
    path = tmp_path / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    sim = QuantizationSimModel(path)
    sim.compute_encodings(random_batches(batch=3), progress=False)
    assert sim.run(random_batches(1, batch=5)[0])[0].shape == (5, 5)


def test_single_channel_weight_round_trips_through_0_6_1(tmp_path):
    from onnx import helper
    from conftest import make_model, tensor

    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], [tensor("x", ["N", 2, 3, 3])],
                       [tensor("y", ["N", 1, 3, 3])], {"w": np.ones((1, 2, 1, 1), np.float32)})
    sim = QuantizationSimModel(model, per_channel=True)
    sim.compute_encodings([{"x": np.ones((1, 2, 3, 3), np.float32)}], progress=False)
    paths = sim.export(tmp_path, encoding_version="0.6.1")
    again = QuantizationSimModel(model, per_channel=True).load_encodings(paths["encodings"])
    assert again.encodings["w"].axis == 0 and again.encodings["w"].equals(sim.encodings["w"])
