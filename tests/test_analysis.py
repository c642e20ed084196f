"""Analysis report: numbers against references, mixed precision, the HTML in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from conftest import random_batches, run_onnx, tiny_cnn, visible
from onnxqat import QuantizationSimModel, load_config
from onnxqat.analysis import analyze, layers, sqnr_db
from onnxqat.qparams import fake_quantize
from onnxqat.report import render_html


@pytest.fixture(scope="module")
def analysed():
    sim = QuantizationSimModel(tiny_cnn(), per_channel=True, param_bw=4)
    calib = random_batches(3)
    sim.compute_encodings(calib, progress=False)
    return sim, calib, analyze(sim, calib, progress=False)


def test_every_quantizer_belongs_to_exactly_one_layer(analysed):
    sim, _, _ = analysed
    names = [q for layer in layers(sim) for q in layer.quantizers]
    assert sorted(names) == sorted(sim.plan.quantizer_names())


def test_local_sqnr_is_the_encoding_alone_on_float_data(analysed):
    sim, calib, result = analysed
    rows = {r["tensor"]: r for r in result["quantizer_sqnr"]}
    x = calib[0]["x"]
    assert rows["x"]["local_sqnr_db"] == pytest.approx(sqnr_db(x, fake_quantize(x, sim.encodings["x"])))
    assert rows["x"]["cumulative_sqnr_db"] == pytest.approx(rows["x"]["local_sqnr_db"])  # nothing before it
    (y,) = run_onnx(tiny_cnn(), calib[0])
    (y_sim,) = run_onnx(sim.model, calib[0])
    assert rows["y"]["cumulative_sqnr_db"] == pytest.approx(sqnr_db(y, y_sim), abs=0.05)
    assert rows["y"]["cumulative_sqnr_db"] < rows["x"]["cumulative_sqnr_db"]


def test_sensitivity_brackets_the_fully_quantized_metric(analysed):
    _, _, result = analysed
    sens = result["sensitivity"]
    assert sens["float"] == 120.0  # output SQNR of the float model against itself
    for row in sens["layers"]:
        assert row["only_this_quantized"] >= sens["quantized"] - 1e-6
        assert row["all_but_this_quantized"] >= sens["quantized"] - 0.5
    assert sorted(sens["ranking"]) == sorted(r["node"] for r in sens["layers"])


def test_mixed_precision_config_keeps_the_top_layers_at_16_bits(analysed):
    sim, calib, result = analysed
    doc = result["mixed_precision"]
    top = [n for n in result["sensitivity"]["ranking"] if not n.startswith("input:")][:3]
    assert {n: (v["activation_bw"], v["param_bw"]) for n, v in doc["nodes"].items()} == {n: (16, 16) for n in top}
    mixed = QuantizationSimModel(tiny_cnn(), per_channel=True, param_bw=4, config=load_config(doc))
    mixed.compute_encodings(calib, progress=False)
    bits = {p.consumers[0]: p.spec.bitwidth for p in mixed.plan.params}
    assert all(bits[n] == 16 for n in top if n in bits)
    (ref,) = run_onnx(tiny_cnn(), calib[0])
    assert sqnr_db(ref, mixed.run(calib[0])[0]) > sqnr_db(ref, sim.run(calib[0])[0])


def test_html_is_self_contained(analysed):
    _, _, result = analysed
    page = render_html(result, model_name="tiny")
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "href=" not in page and "http" not in page
    json.dumps(result)  # the JSON twin holds the same numbers


def test_report_opens_in_headless_chromium(analysed, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    _, _, result = analysed
    page = tmp_path / "report.html"
    page.write_text(render_html(result, model_name="tiny"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert 'data-images="loaded 3"' in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *flags, "--window-size=1200,2400", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 50_000  # the plots really painted


def test_cli_analyze(cli, demo_assets, tmp_path):
    model, calib, test = demo_assets
    out = tmp_path / "analysis"
    proc = cli("analyze", model, "--data", calib, "--eval", test, "--eval-samples", "500", "--output-dir", out,
               "--per-channel", "--param-bw", "4", check=True)
    assert "accuracy: float" in proc.stdout
    assert visible(out) == ["mixed_precision.json", "report.html", "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["metric"] == "accuracy" and len(report["sensitivity"]["layers"]) >= 30
    quantize = cli("quantize", model, "--data", calib, "--output-dir", tmp_path / "mixed", "--per-channel",
                   "--param-bw", "4", "--config", out / "mixed_precision.json", check=True)
    assert "plan:" in quantize.stdout
    doc = json.loads((tmp_path / "mixed" / "model.encodings").read_text())
    assert 16 in {e["bw"] for e in doc["param_encodings"]} and 4 in {e["bw"] for e in doc["param_encodings"]}
