"""Analysis report: numbers against references, mixed precision, the HTML in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import random_batches, run_onnx, tiny_cnn, visible
from onnxqat import QuantizationSimModel, load_config
from onnxqat.analysis import Evaluator, Switchable, analyze, bit_choices, layers, local_sqnr, sensitivity, sqnr_db
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


def test_sensitivity_ranks_every_layer_by_tensor_name(analysed):
    sim, calib, result = analysed
    sens = result["sensitivity"]
    assert sens["float"] == 120.0  # output SQNR of the float model against itself
    for row in sens["layers"]:
        assert row["only_this_quantized"] >= sens["quantized"] - 1e-6
        if row["all_but_this_quantized"] is not None:
            assert row["all_but_this_quantized"] >= sens["quantized"] - 0.5
    assert sorted(sens["ranking"]) == sorted(r["name"] for r in sens["layers"])
    assert {r["name"] for r in sens["layers"]} == {layer.name for layer in layers(sim)}
    assert set(sens["ranking"]) <= {r["tensor"] for r in result["quantizer_sqnr"]} | set(sim.weights())
    scores = [next(r for r in sens["layers"] if r["name"] == n)["only_this_quantized"] for n in sens["ranking"]]
    assert scores == sorted(scores)
    # float, all quantized, each layer once, the worst 10 again with all but them
    assert sens["runs"] == 2 + len(sens["layers"]) + min(10, len(sens["layers"]))
    assert sens["quantized"] == Evaluator(sim.float_model, calib).score(sim.run).value  # the simulation itself


@pytest.mark.parametrize("segments", [1, 3])
def test_switchable_is_the_sim_or_the_float_model(analysed, segments):
    """All quantizers on: the simulation's own session (fused kernels), to the last bit, cut into
    segments or not; all off: the float model."""
    sim, calib, _ = analysed
    switch = Switchable(sim.float_model, sim.effective_plan, bit_choices(sim), segments=segments)
    every = {n: next(iter(c)) for n, c in switch.choices.items()}
    for batch in calib:
        (reference,) = sim.run(batch)
        (got,) = switch.run(batch, every)
        np.testing.assert_array_equal(got, reference)
        (floating,) = run_onnx(tiny_cnn(), batch)
        assert abs(switch.run(batch, {})[0] - floating).max() <= 1e-5 * abs(floating).max()
    if segments > 1:
        assert len(switch._segments) == segments  # the tiny CNN has room for 3 cuts that keep fusions


def test_anchored_runs_start_at_a_cut_and_give_the_same_numbers(analysed):
    """One layer alone from the float model's values at the cut before it: the same outputs as
    a run from the input, with sessions built only for the segments from there on."""
    sim, calib, _ = analysed
    switch = Switchable(sim.float_model, sim.effective_plan, bit_choices(sim), segments=3)
    fresh = Switchable(sim.float_model, sim.effective_plan, bit_choices(sim), segments=3)
    every = {n: next(iter(c)) for n, c in switch.choices.items()}
    switch.anchor({}, calib)
    last = [u for u in layers(sim) if u.node == "fc"][0]
    alone = {q: every[q] for q in last.quantizers if q in every}
    built = switch.builds
    for batch in calib:
        np.testing.assert_array_equal(switch.run(batch, alone)[0], fresh.run(batch, alone)[0])
    assert switch.builds - built == 1  # only the last segment's session is new
    copy = {k: v.copy() for k, v in calib[0].items()}  # not an anchored batch: runs from the input
    np.testing.assert_array_equal(switch.run(copy, alone)[0], fresh.run(calib[0], alone)[0])


def test_one_layer_alone_matches_a_model_with_only_its_quantizers(analysed):
    """Independent reference: the layer's quantizers inserted on their own into the float model."""
    import dataclasses

    import numpy as np
    import onnx_ir as ir

    from onnxqat.analysis import channel_sqnr_db
    from onnxqat.passes.insert_qdq import InsertQDQPass

    sim, calib, result = analysed
    row = next(r for r in result["sensitivity"]["layers"] if r["op_type"] == "Conv")
    mine = set(row["quantizers"])
    plan = sim.effective_plan
    subset = dataclasses.replace(plan, activations=tuple(q for q in plan.activations if q.name in mine),
                                 params=tuple(p for p in plan.params if p.name in mine), biases=())
    model = ir.to_proto(InsertQDQPass(subset, sim.encodings, fold_weights=False)(sim.float_model).model)
    got = np.concatenate([run_onnx(model, b)[0] for b in calib])
    ref = np.concatenate([run_onnx(tiny_cnn(), b)[0] for b in calib])
    assert row["only_this_quantized"] == pytest.approx(channel_sqnr_db(ref, got), abs=0.05)


def test_top_k_stops_early_and_keeps_the_worst_layer(analysed):
    sim, calib, result = analysed
    full = result["sensitivity"]
    evaluator = Evaluator(sim.float_model, calib)
    quick = sensitivity(sim, evaluator, top_k=1, patience=2, proxies=local_sqnr(sim, result["quantizer_sqnr"]),
                        progress=False)
    assert quick["early_stopped"] and quick["scored"] < full["scored"]
    assert quick["ranking"][0] == full["ranking"][0]


def test_progress_is_plain_lines_off_a_terminal(analysed, capsys):
    sim, calib, _ = analysed
    sensitivity(sim, Evaluator(sim.float_model, calib), progress=True)
    err = capsys.readouterr().err
    assert "sensitivity: " in err and "\r" not in err


def test_mixed_precision_config_keeps_the_top_layers_at_16_bits(analysed):
    sim, calib, result = analysed
    doc = result["mixed_precision"]
    rows = {r["name"]: r for r in result["sensitivity"]["layers"]}
    top = [rows[n]["node"] for n in result["sensitivity"]["ranking"] if not rows[n]["node"].startswith("input:")][:3]
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
    proc = cli("analyze", model, "--data", calib, "--eval", test, "--eval-samples", "200", "--output-dir", out,
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


@pytest.mark.long
def test_forced_concat_encoding_of_a_detector_ranks_at_the_top(monkeypatch):
    """nudenet's YOLOv8n ends with Concat(boxes in pixels, class Sigmoid in [0, 1]) -> output0.
    With that Concat's shared encoding forced (calibration would untie it), the class scores
    fall on a grid of ~1.25: the detector is wrecked. The plain SQNR of output0 hardly notices
    (the boxes dominate it, which is how it ranked 141st of 181 before); the channel-averaged
    SQNR must put that layer near the top, and so must the task hook."""
    import zoo

    from onnxqat import pipeline

    try:
        path = zoo.fetch("nudenet")
        data = zoo.make_data("nudenet", n=4, split="calib")
    except zoo.ZooUnavailable as e:
        pytest.skip(f"nudenet: {e}")
    monkeypatch.setattr(pipeline, "SHARED_RANGE_RATIO", float("inf"))
    sim = QuantizationSimModel(str(path), per_channel=True, config="aimet")  # every op output quantized
    calib = [{"images": data["images"]}]
    sim.compute_encodings(calib, progress=False)
    tied = sim.plan.activation_of("/model.22/Sigmoid_output_0")
    assert tied is not None and "output0" in tied.tensors  # the shared encoding is in force

    def holds_the_concat(row):
        return "output0" in [t for q in row["quantizers"] if (a := sim.plan.activation_of(q)) for t in a.tensors]

    evaluator = Evaluator(sim.float_model, calib)
    from onnxqat.analysis import quantizer_sqnr

    proxies = local_sqnr(sim, quantizer_sqnr(sim, calib[0]))
    sens = sensitivity(sim, evaluator, top_k=5, proxies=proxies, progress=False)
    rows = {r["name"]: r for r in sens["layers"]}
    top = [rows[n] for n in sens["ranking"][:3]]
    assert any(holds_the_concat(r) for r in top), [r["name"] for r in top]
    concat = next(r for r in top if holds_the_concat(r))
    assert concat["only_this"]["outputs"]["output0"]["sqnr_db"] > 25.0  # what the old metric saw
    assert concat["only_this_quantized"] < sens["float"] - 40.0  # the score channels are gone

    def kept(outputs, reference):  # the zoo's detection agreement with the float model
        return zoo.agreement("nudenet", reference, outputs)["kept"]

    task = Evaluator(sim.float_model, calib, task=kept, task_name="detections kept")
    hooked = sensitivity(sim, task, top_k=3, proxies=proxies, progress=False)
    hooked_rows = {r["name"]: r for r in hooked["layers"]}
    assert any(holds_the_concat(hooked_rows[n]) for n in hooked["ranking"][:3])


def test_evaluator_scores_equal_the_reference_functions():
    from onnxqat.analysis import channel_sqnr_db, top1_agreement

    rng = np.random.default_rng(3)
    evaluator = Evaluator(QuantizationSimModel(tiny_cnn()).float_model, random_batches(2))
    cases = [list(evaluator.reference), [rng.standard_normal((4, 5, 7)).astype(np.float32)
                                           * np.float32([1.0, 1e-4, 3.0, 0.0, 1.0]).reshape(1, 5, 1)]]
    for reference in cases:
        evaluator.reference, evaluator.output_names, evaluator._sums = reference, ["a"], None
        for scale in (0.0, 1e-3, 0.3):
            got = [r + scale * rng.standard_normal(r.shape).astype(r.dtype) for r in reference]
            got[0][0, 0] = reference[0][0, 0]  # one row exact
            score = evaluator.score_outputs(got)
            ref, out = reference[0], got[0]
            row = score.outputs["a"]
            assert row["sqnr_db"] == pytest.approx(sqnr_db(ref, out), rel=1e-12, abs=1e-9)
            assert row["channel_sqnr_db"] == pytest.approx(channel_sqnr_db(ref, out), rel=1e-12, abs=1e-9)
            assert row["top1_agreement"] == top1_agreement(ref, out)
            assert score.value == pytest.approx(channel_sqnr_db(ref, out), rel=1e-12, abs=1e-9)


def test_ranking_on_the_demo_equals_the_reference_scoring_of_an_uncut_model(demo_assets):
    """Every layer's score from sensitivity (cut, anchored, scored from kept sums) equals
    channel_sqnr_db of the same setting run through one uncut Switchable (the sim's kernels, no
    cuts), so the ranking is the same layer for layer."""
    from onnxqat.analysis import channel_sqnr_db
    from onnxqat.data import NpzBatches, load_npz

    model, calib_path, _ = demo_assets
    calib = list(NpzBatches(load_npz(str(calib_path), ["image"]), 32, limit=64))
    sim = QuantizationSimModel(str(model), per_channel=True, param_bw=4)
    sim.compute_encodings(calib, progress=False)
    evaluator = Evaluator(sim.float_model, calib)
    sens = sensitivity(sim, evaluator, progress=False)
    assert sens["segments"] > 1
    uncut = Switchable(sim.float_model, sim.effective_plan, bit_choices(sim), segments=1)
    every = {n: next(iter(c)) for n, c in uncut.choices.items()}
    reference = np.concatenate([uncut.run(b, {})[0] for b in calib])
    want = {}
    for row in sens["layers"]:
        alone = {q: every[q] for q in row["quantizers"] if q in every}
        got = np.concatenate([uncut.run(b, alone)[0] for b in calib])
        want[row["name"]] = channel_sqnr_db(reference, got)
        # onnxruntime's float fusions differ across cuts (outputs within ~1e-7 relative): the
        # noise-to-signal ratios agree within 1e-8 of the signal (at 58 dB that is 0.003 dB)
        assert abs(10 ** (-row["only_this_quantized"] / 10) - 10 ** (-want[row["name"]] / 10)) < 1e-8
    assert sorted(sens["ranking"]) == sorted(want)
    ranked = [10 ** (-want[n] / 10) for n in sens["ranking"]]  # the same order, up to ties that close
    assert all(a >= b - 1e-8 for a, b in zip(ranked, ranked[1:]))
    assert ranked[0] > max(1e-5, 100 * ranked[-1])  # the layers do differ: the order is a real test
