"""Weight rounding (onnxqat.rounding): the layer quadratic against onnxruntime, SeqMSE/AdaRound
against nearest rounding, bias correction against the measured mean error, export and QAT on
the grids they choose."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import make_model, random_batches, run_onnx, tensor, tiny_cnn
from onnxqat import QuantizationSimModel
from onnxqat.errors import ConfigError
from onnxqat.rounding import collect_layer_stats, round_weights


def _one_layer(kind: str, seed: int = 0) -> tuple[onnx.ModelProto, tuple[int, ...], str]:
    """A model of one weighted node fed by the (unquantized) graph input: its input statistics
    are those of the data itself, so the quadratic can be checked against onnxruntime."""
    rng = np.random.default_rng(seed)
    f = np.float32
    if kind in ("conv", "depthwise", "conv_stride"):
        group = 6 if kind == "depthwise" else 1
        w = (rng.normal(size=(6, 6 // group, 3, 3)) * 0.3).astype(f)
        attrs = {"pads": [1, 1, 1, 1], "group": group}
        if kind == "conv_stride":
            attrs.update(strides=[2, 2], dilations=[1, 1])
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="layer", **attrs)
        inits = {"w": w, "b": rng.normal(size=6).astype(f)}
        return make_model([node], [tensor("x", ["N", 6, 8, 8])], [tensor("y", ["N", 6, "H", "W"])], inits), (6, 8, 8), "w"
    if kind == "gemm":
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="layer", transB=1)
        inits = {"w": (rng.normal(size=(7, 12)) * 0.3).astype(f), "b": rng.normal(size=7).astype(f)}
        return make_model([node], [tensor("x", ["N", 12])], [tensor("y", ["N", 7])], inits), (12,), "w"
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")
    inits = {"w": (rng.normal(size=(12, 7)) * 0.3).astype(f)}
    return make_model([node], [tensor("x", ["N", 12])], [tensor("y", ["N", 7])], inits), (12,), "w"


def _quantized_weight(sim: QuantizationSimModel, name: str) -> np.ndarray:
    """Numpy reference: the weight on its grid, from the encoding alone."""
    enc = sim.encodings[name]
    w = sim.float_model.graph.initializers[name].const_value.numpy().astype(np.float64)
    shape = [1] * w.ndim
    if enc.axis is not None:
        shape[enc.axis] = -1
    scale = np.asarray(enc.scale, np.float64).reshape(shape)
    zp = np.asarray(enc.zero_point, np.float64).reshape(shape)
    return (np.clip(np.rint(w / scale) + zp, enc.qmin, enc.qmax) - zp) * scale


def _as_the_layer_sees_it(sim: QuantizationSimModel, feed: dict) -> dict:
    """The input after its quantizer, if it has one (numpy reference)."""
    q = sim.plan.activation_of("x")
    if q is None:
        return feed
    enc = sim.encodings[q.name]
    scale, zp = float(enc.scale), float(enc.zero_point)
    x = feed["x"].astype(np.float64)
    return {"x": ((np.clip(np.rint(x / scale) + zp, enc.qmin, enc.qmax) - zp) * scale).astype(np.float32)}


def _with_weight(model: onnx.ModelProto, name: str, array: np.ndarray) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name == name:
            init.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), name))
    return out


@pytest.mark.parametrize("kind", ["conv", "depthwise", "conv_stride", "gemm", "matmul"])
def test_layer_quadratic_equals_the_output_error_onnxruntime_measures(kind):
    """sum_m d_m^T H d_m from the streamed statistics = the mean (over output positions) squared
    output error summed over channels, with onnxruntime running the layer on w and on w + d."""
    model, shape, name = _one_layer(kind)
    # arm64: x86 targets keep the 6-channel depthwise weight float (kernel.depthwise_unaligned)
    sim = QuantizationSimModel(model, param_bw=4, per_channel=True, target="arm64")
    data = random_batches(3, 4, shape)
    sim.compute_encodings(data, progress=False)
    stats = collect_layer_stats(sim.state, data, progress=False)
    _, report = round_weights(sim.state, stats, "none", bias_correction=False, target="quantized", progress=False)
    quadratic, _ = report.layers[name]
    _, report = round_weights(sim.state, stats, "none", bias_correction=False, target="float", progress=False)
    against_float, _ = report.layers[name]

    quantized = _with_weight(model, name, _quantized_weight(sim, name))

    def channels_last(y):
        y = np.moveaxis(y, 1, -1) if y.ndim == 4 else y
        return y.reshape(-1, y.shape[-1]).astype(np.float64)

    errors, excess = [], []
    for feed in data:
        seen = _as_the_layer_sees_it(sim, feed)
        (ref,) = run_onnx(model, seen)
        (got,) = run_onnx(quantized, seen)
        (exact,) = run_onnx(model, feed)
        errors.append(channels_last(got - ref))
        # float target: the error against the float layer on the float input, in excess of the
        # float weights' own error on the quantized input
        excess.append(channels_last(got - exact) ** 2 - channels_last(ref - exact) ** 2)
    measured = float((np.concatenate(errors) ** 2).mean(axis=0).sum())
    assert measured > 0
    assert quadratic == pytest.approx(measured, rel=1e-5)
    assert sim.plan.activation_of("x") is not None  # the input is quantized, so the two targets differ
    assert abs(against_float - quadratic) > 1e-4 * measured
    assert against_float == pytest.approx(float(np.concatenate(excess).mean(axis=0).sum()), rel=1e-5, abs=1e-7 * measured)


@pytest.mark.parametrize("kind", ["conv", "depthwise", "gemm", "matmul"])
def test_seqmse_and_adaround_lower_the_layer_error_below_nearest_rounding(kind):
    model, shape, name = _one_layer(kind, seed=3)
    sim = QuantizationSimModel(model, param_bw=4, per_channel=True, target="arm64")  # see above
    # correlated inputs (a per-sample common component), as real activations are: with i.i.d.
    # inputs H is about the identity and nearest rounding is already optimal
    rng = np.random.default_rng(2)
    data = [{"x": (rng.normal(size=(8, *shape)) + rng.normal(size=(8,) + (1,) * len(shape)) * 1.5).astype(np.float32)}
            for _ in range(3)]
    sim.compute_encodings(data, progress=False)
    stats = collect_layer_stats(sim.state, data, progress=False)
    _, seq = round_weights(sim.state, stats, "seqmse", bias_correction=False, progress=False)
    _, ada = round_weights(sim.state, stats, "adaround", bias_correction=False, progress=False)
    nearest, seqmse_error = seq.layers[name]
    _, adaround_error = ada.layers[name]
    assert seqmse_error <= nearest  # the calibrated scale is one of SeqMSE's candidates
    # per output channel AdaRound keeps nearest rounding where it learns nothing better
    assert adaround_error <= seqmse_error
    if kind != "depthwise":  # with many weights per channel it finds better roundings
        assert adaround_error < 0.995 * seqmse_error


def test_bias_correction_removes_the_mean_output_error():
    model, shape, name = _one_layer("conv", seed=5)
    rng = np.random.default_rng(0)
    # inputs with a strong mean make the weights' rounding error shift the layer's mean output
    data = [{"x": (rng.normal(size=(8, *shape)) + 2.0).astype(np.float32)} for _ in range(3)]

    def mean_error(sim):
        diffs = [sim.run(feed)[0] - run_onnx(model, feed)[0] for feed in data]
        return np.abs(np.concatenate(diffs).mean(axis=(0, 2, 3)))

    plain = QuantizationSimModel(model, param_bw=4, per_channel=True).compute_encodings(data, progress=False)
    corrected = QuantizationSimModel(model, param_bw=4, per_channel=True).compute_encodings(
        data, progress=False, bias_correction=True)
    before, after = mean_error(plain), mean_error(corrected)
    lsb = float(np.max(corrected.encodings[corrected.plan.activation_of("y").name].scale)) \
        if corrected.plan.activation_of("y") is not None else 0.0
    assert before.max() > 10 * max(after.max(), lsb / 2)
    assert name not in corrected.state.fixed  # bias correction alone keeps the grid following the weights


@pytest.mark.parametrize("kind", ["conv", "gemm"])
def test_centred_objective_is_the_output_error_left_after_bias_correction(kind):
    """With bias correction, the methods minimise the error's variance (its mean is corrected
    afterwards): the reported error equals the squared output error onnxruntime measures with the
    rounded weights and the corrected bias, and is below the uncentred second moment."""
    model, shape, name = _one_layer(kind, seed=5)
    rng = np.random.default_rng(0)
    data = [{"x": (rng.normal(size=(8, *shape)) + 2.0).astype(np.float32)} for _ in range(3)]
    sim = QuantizationSimModel(model, param_bw=4, per_channel=True)
    sim.compute_encodings(data, progress=False)
    stats = collect_layer_stats(sim.state, data, progress=False)
    state, centred = round_weights(sim.state, stats, "seqmse", bias_correction=True, progress=False)
    _, uncentred = round_weights(sim.state, stats, "seqmse", bias_correction=True, centered=False, progress=False)
    corrected = QuantizationSimModel(model, param_bw=4, per_channel=True)
    corrected._state = state
    bias = state.float_model.graph.initializers["b"].const_value.numpy()
    rounded = _with_weight(_with_weight(model, name, _quantized_weight(corrected, name)), "b", bias)
    errors = []
    for feed in data:
        seen = _as_the_layer_sees_it(sim, feed)
        diff = run_onnx(rounded, seen)[0] - run_onnx(model, seen)[0]
        diff = np.moveaxis(diff, 1, -1) if diff.ndim == 4 else diff
        errors.append(diff.reshape(-1, diff.shape[-1]).astype(np.float64))
    errors = np.concatenate(errors)
    assert np.abs(errors.mean(axis=0)).max() < 1e-4 * np.abs(errors).max()  # the mean error is gone
    measured = float((errors**2).mean(axis=0).sum())
    assert centred.layers[name][1] == pytest.approx(measured, rel=1e-4)
    assert centred.layers[name][0] < uncentred.layers[name][0]  # the mean no longer counts


def test_adaround_weights_sit_on_their_grid_and_the_export_matches_the_sim(tmp_path):
    sim = QuantizationSimModel(tiny_cnn(), param_bw=4, per_channel=True)
    data = random_batches()
    sim.compute_encodings(data, progress=False, weight_rounding="adaround")
    assert sim.state.fixed  # the grids no longer follow the weights
    for name in sim.state.fixed:
        w = sim.float_model.graph.initializers[name].const_value.numpy().astype(np.float64)
        np.testing.assert_allclose(w, _quantized_weight(sim, name), rtol=0, atol=1e-6 * np.abs(w).max())
    deploy = sim.sim_ir(fold_weights=True)
    from onnxqat.runtime import Session

    (deployed,) = Session(deploy).run(data[0])
    (simulated,) = sim.run(data[0])
    out = sim.plan.activation_of(sim.output_names[0])
    lsb = float(sim.encodings[out.name].scale) if out is not None else 1e-5 * np.abs(simulated).max()
    assert np.abs(deployed - simulated).max() <= lsb * 1.0001
    paths = sim.export(tmp_path / "out")
    assert all((tmp_path / "out" / p).exists() for p in map(lambda x: x.split("/")[-1], paths.values()))


def test_rounding_improves_a_four_bit_model_against_float_on_held_out_data():
    model = tiny_cnn(seed=4)
    calib, held_out = random_batches(4, 16, seed=1), random_batches(2, 16, seed=9)

    def error(sim):
        return float(np.mean([np.mean((sim.run(f)[0] - run_onnx(model, f)[0]) ** 2) for f in held_out]))

    errors = {}
    for method in ("none", "seqmse", "adaround"):
        sim = QuantizationSimModel(model, param_bw=4, per_channel=True)
        errors[method] = error(sim.compute_encodings(calib, progress=False, weight_rounding=method))
    assert errors["seqmse"] < errors["none"]
    assert errors["adaround"] < errors["none"]


def test_unknown_weight_rounding_is_a_config_error():
    sim = QuantizationSimModel(tiny_cnn())
    with pytest.raises(ConfigError, match="unknown weight rounding 'best'"):
        sim.compute_encodings(random_batches(1), progress=False, weight_rounding="best")


def test_cli_weight_rounding(cli, demo_assets, tmp_path):
    model, calib, test = demo_assets
    out = tmp_path / "out"
    cli("quantize", model, "--data", calib, "--output-dir", out, "--param-bw", "4", "--per-channel",
        "--weight-rounding", "seqmse", check=True)
    acc = cli("eval", out / "model_qdq.onnx", "--data", test, check=True).stdout
    assert "accuracy" in acc.lower()
    bad = cli("quantize", model, "--data", calib, "--output-dir", out, "--weight-rounding", "best")
    assert bad.returncode == 2 and "invalid choice: 'best'" in bad.stderr and "Traceback" not in bad.stderr


def test_qat_keeps_the_grids_a_rounding_search_chose():
    from onnxqat.train.options import TrainOptions
    from onnxqat.train.trainer import QATTrainer

    sim = QuantizationSimModel(tiny_cnn(), param_bw=4, per_channel=True)
    data = random_batches()
    sim.compute_encodings(data, progress=False, weight_rounding="seqmse")
    chosen = {name: np.asarray(sim.encodings[name].scale).copy() for name in sim.state.fixed}
    rng = np.random.default_rng(0)
    train = [{**feed, "label": rng.integers(0, 5, len(feed["x"]))} for feed in data]
    trainer = QATTrainer(sim.state, TrainOptions(loss="cross_entropy", lr=1e-2))
    try:
        trainer.fit(train, epochs=1, progress=False)
        after = trainer.state
    finally:
        trainer.close()
    moved = 0
    for name, scale in chosen.items():
        np.testing.assert_array_equal(np.asarray(after.encodings[name].scale), scale)
        w0 = sim.float_model.graph.initializers[name].const_value.numpy()
        moved += int(not np.array_equal(after.float_model.graph.initializers[name].const_value.numpy(), w0))
    assert moved  # the weights trained; their grids stayed


@pytest.mark.parametrize("opset", [13, 21])
def test_packed_four_bit_weights_halve_the_file_and_keep_every_value(tmp_path, deploy_python, opset):
    """W4 weights stored as INT4: the QDQ file shrinks towards half, and onnxruntime (the training
    build here, the newest plain release in .venv-deploy) computes the same outputs as from the
    int8 containers."""
    rng = np.random.default_rng(0)
    f = np.float32
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    inits = {"w1": (rng.normal(size=(32, 8, 3, 3)) * 0.2).astype(f), "w2": (rng.normal(size=(32, 32, 3, 3)) * 0.1).astype(f)}
    model = make_model(nodes, [tensor("x", ["N", 8, 8, 8])], [tensor("y", ["N", 32, 8, 8])], inits, opset=opset,
                       ir_version=10 if opset >= 21 else 8)
    data = random_batches(2, 4, (8, 8, 8))
    sim = QuantizationSimModel(model, param_bw=4, per_channel=True).compute_encodings(data, progress=False)
    plain = sim.export(tmp_path / "int8")["qdq"]
    packed = sim.export(tmp_path / "int4", pack_4bit=True)["qdq"]
    proto = onnx.load(packed)
    weights = [i for i in proto.graph.initializer if i.data_type == TensorProto.INT4]
    domains = {n.domain for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in
               {i.name for i in weights}}
    assert domains == ({""} if opset >= 21 else {"com.microsoft"})  # DequantizeLinear reads INT4 from opset 21
    assert len(weights) >= 2 and all(len(i.raw_data) == (int(np.prod(i.dims)) + 1) // 2 for i in weights)
    size4, size8 = (tmp_path / "int4" / "model_qdq.onnx").stat().st_size, (tmp_path / "int8" / "model_qdq.onnx").stat().st_size
    assert size4 < 0.6 * size8
    feed = data[0]
    np.testing.assert_array_equal(run_onnx(onnx.load(packed), feed)[0], run_onnx(onnx.load(plain), feed)[0])
    from deployrt import DeployedSession

    with DeployedSession(deploy_python, packed) as s4, DeployedSession(deploy_python, plain) as s8:
        np.testing.assert_array_equal(s4.run(feed)[0], s8.run(feed)[0])


def test_weight_rounding_on_a_used_up_generator_is_an_error_not_a_silent_no_op():
    sim = QuantizationSimModel(tiny_cnn(), param_bw=4, per_channel=True)
    with pytest.raises(ConfigError, match="weight rounding saw no calibration batch"):
        sim.compute_encodings((b for b in random_batches()), progress=False, weight_rounding="seqmse")


def test_numerics_run_on_one_blas_thread_and_restore_the_count():
    from onnxqat import rounding

    found = rounding._openblas()
    if found is None:
        pytest.skip("numpy's BLAS is not an OpenBLAS found in /proc/self/maps")
    get, _ = found
    before = int(get())
    with rounding._one_blas_thread():
        assert int(get()) == 1
    assert int(get()) == before
    with pytest.raises(RuntimeError), rounding._one_blas_thread():
        raise RuntimeError("restored on error too")
    assert int(get()) == before
