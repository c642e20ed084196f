"""The command line end to end on the shipped model, and its error contract."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import visible

pytestmark = pytest.mark.slow


def last_accuracy(proc):
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("accuracy=") and " n=" in line, line
    acc, n = line.split()
    return float(acc.split("=")[1]), int(n.split("=")[1])


def test_quantize_then_eval(cli, demo_assets, tmp_path):
    model, calib, test = demo_assets
    out = tmp_path / "out"
    cli("quantize", model, "--data", calib, "--output-dir", out, "--per-channel", "--report", tmp_path / "r.json",
        check=True)
    assert visible(out) == ["model.encodings", "model.onnx", "model_qdq.onnx"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["not_quantized"]["/blocks/blocks.0/Add_output_0"] == "inside supergroup Add+Relu"
    assert len(report["params"]) == 16 and all(p["per_channel_axis"] is not None for p in report["params"])
    doc = json.loads((out / "model.encodings").read_text())
    assert doc["version"] == "1.0.0" and doc["quantizer_args"]["per_channel_quantization"] is True
    fp32, n = last_accuracy(cli("eval", model, "--data", test, check=True))
    assert n == 10000 and fp32 > 0.88
    qdq, _ = last_accuracy(cli("eval", out / "model_qdq.onnx", "--data", test, check=True))
    exported, _ = last_accuracy(cli("eval", out / "model.onnx", "--data", test, check=True))
    assert exported == fp32  # the exported float model is the input model, BatchNorm folded
    assert abs(qdq - fp32) < 0.005


def test_quantize_options(cli, demo_assets, tmp_path):
    model, calib, _ = demo_assets
    out = tmp_path / "o"
    cli("quantize", model, "--data", calib, "--output-dir", out, "--param-bw", "4", "--activation-bw", "8",
        "--scheme", "sqnr", "--config", "aimet", "--encoding-version", "0.6.1", check=True)
    doc = json.loads((out / "model.encodings").read_text())
    assert doc["version"] == "0.6.1"
    assert {e[0]["bitwidth"] for e in doc["param_encodings"].values()} == {4}


def _error_line(proc):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_cli_errors_are_one_clear_line_and_write_nothing(cli, demo_assets, tmp_path):
    model, calib, test = demo_assets
    out = tmp_path / "out"
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"definitely not onnx")
    assert "junk.onnx: not an ONNX model" in _error_line(cli("quantize", junk, "--data", calib, "--output-dir", out))

    images = np.load(calib)["image"]
    cases = {
        "missing.npz": ({"pixels": images}, "missing key(s) ['image']"),
        "dtype.npz": ({"image": images.astype(np.float64)}, "dtype float64"),
        "shape.npz": ({"image": images[:, :, :20]}, "has shape [512, 1, 20, 28]"),
        "nan.npz": ({"image": np.where(np.arange(images.size).reshape(images.shape) == 5, np.nan, images)}, "NaN"),
        "empty.npz": ({"image": images[:0]}, "holds no samples"),
    }
    for name, (arrays, message) in cases.items():
        path = tmp_path / name
        np.savez(path, **arrays)
        line = _error_line(cli("quantize", model, "--data", path, "--output-dir", out))
        assert message in line and name in line, line
    assert not out.exists() or os.listdir(out) == []

    blocker = tmp_path / "blocker"
    blocker.write_text("")
    assert "not a directory" in _error_line(cli("quantize", model, "--data", calib, "--output-dir", blocker))
    assert "missing key(s) ['target']" in _error_line(cli("eval", model, "--data", test, "--label-key", "target"))
    assert "output index 3 is out of range" in _error_line(cli("eval", model, "--data", test, "--output-index", "3"))
    assert "param_bw must be an integer from 4 to 16" in _error_line(
        cli("quantize", model, "--data", calib, "--output-dir", out, "--param-bw", "3"))


def test_demo_prints_the_table(cli, tmp_path):
    proc = cli("demo", "--output-dir", tmp_path / "demo", "--epochs", "1", check=True)
    lines = proc.stdout.splitlines()
    rows = {row.split("  ")[0]: row for row in lines if "%" in row}
    assert any(k.startswith("FP32") for k in rows) and any(k.startswith("QAT W4A8") for k in rows)
    assert any(k.startswith("deployed model_qdq.onnx") for k in rows)
    accuracy = {k.split(" (")[0]: float(v.split("%")[0].split()[-1]) for k, v in rows.items()}
    assert accuracy["QAT W4A8 per-channel"] > accuracy["PTQ W4A8 per-channel"]
    assert visible(tmp_path / "demo") == ["model.encodings", "model.onnx", "model_qdq.onnx"]


def test_usage_errors_are_one_line_too(cli):
    line = _error_line(cli("quantize", "m.onnx", "--scheme", "best"))
    assert "invalid choice: 'best'" in line
    assert "the following arguments are required: --data" in _error_line(cli("eval", "m.onnx"))


def test_compare_reports_every_output_against_float_and_fused_against_reference(cli, demo_assets, tmp_path):
    model, calib, test = demo_assets
    out = tmp_path / "out"
    cli("quantize", model, "--data", calib, "--output-dir", out, "--per-channel", check=True)
    proc = cli("compare", model, out / "model_qdq.onnx", "--data", test, "--json", tmp_path / "c.json", check=True)
    (line,) = [text for text in proc.stdout.splitlines() if text.startswith("output probs:")]
    doc = json.loads((tmp_path / "c.json").read_text())
    (row,) = doc
    assert row["output"] == "probs" and 0.98 < row["top1_agreement"] <= 1.0 and row["cosine"] > 0.99
    # QLinearSoftmax's lookup table against the reference's float exp: a few steps of 1/256
    assert row["sqnr_db"] > 15 and row["fused_vs_reference_lsb"] <= 8
    # independent check of the agreement: eval both models' predictions
    import numpy as np
    import onnxruntime as ort

    data = np.load(test)["image"][:2000]
    a = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"image": data})[0]
    b = ort.InferenceSession(str(out / "model_qdq.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": data})[0]
    assert abs((a.argmax(1) == b.argmax(1)).mean() - row["top1_agreement"]) < 0.01
    bad = cli("compare", model, tmp_path / "missing.onnx", "--data", test)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "missing.onnx" in bad.stderr
