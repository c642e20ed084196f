"""Mixed precision to a target: the chosen assignment meets it on held-out data, reloads from its
config to the same quantizers, and a tighter target never costs less."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import random_batches, tiny_cnn
from onnxqat import QuantizationSimModel, load_config
from onnxqat.data import NpzBatches, load_npz
from onnxqat.errors import ConfigError
from onnxqat.evaluate import accuracy, sqnr_db
from onnxqat.mixed import search
from onnxqat.runtime import Session


def _bits(sim):
    plan = sim.plan
    return {**{q.name: q.spec.bitwidth for q in plan.activations}, **{p.name: p.spec.bitwidth for p in plan.params}}


@pytest.fixture(scope="module")
def tiny():
    sim = QuantizationSimModel(tiny_cnn(), per_channel=True)
    calib = random_batches(3)
    sim.compute_encodings(calib, progress=False)
    return sim, calib


def test_tighter_sqnr_target_never_costs_less(tiny):
    sim, calib = tiny
    loose = search(sim, calib, target_sqnr=20.0, progress=False)
    tight = search(sim, calib, target_sqnr=35.0, progress=False)
    assert loose.metric >= 20.0 and tight.metric >= 35.0
    assert tight.relative_cost >= loose.relative_cost
    held_out = random_batches(2, seed=7)
    for found, target in ((loose, 20.0), (tight, 35.0)):
        mixed = QuantizationSimModel(tiny_cnn(), per_channel=True, config=load_config(found.config))
        mixed.compute_encodings(calib, progress=False)
        assert {k: v for k, v in _bits(mixed).items() if k in found.bits} == found.bits  # the config reloads
        ref = np.concatenate([Session(mixed.float_model).run(b)[0] for b in held_out])
        got = np.concatenate([mixed.run(b)[0] for b in held_out])
        assert sqnr_db(ref, got) >= target - 1.0  # held-out data: random, so within 1 dB


def test_bad_targets_are_one_line_errors(tiny):
    sim, calib = tiny
    with pytest.raises(ConfigError, match="give one of"):
        search(sim, calib, progress=False)
    with pytest.raises(ConfigError, match="needs labelled"):
        search(sim, calib, target_accuracy_drop=0.01, progress=False)
    with pytest.raises(ConfigError, match="out of reach"):
        search(sim, calib, target_sqnr=119.0, progress=False)


@pytest.fixture(scope="module")
def demo(demo_assets):
    model, calib_path, test_path = demo_assets
    calib = list(NpzBatches(load_npz(str(calib_path), ["image"]), 64, limit=256))
    arrays = load_npz(str(test_path), ["image", "label"])
    search_part = list(NpzBatches({k: v[:300] for k, v in arrays.items()}, 300))
    held_out = list(NpzBatches({k: v[400:2400] for k, v in arrays.items()}, 500))
    sim = QuantizationSimModel(str(model), per_channel=True, param_bw=4)
    sim.compute_encodings(calib, progress=False)
    return str(model), sim, calib, search_part, held_out


def test_accuracy_target_holds_on_held_out_data(demo):
    model, sim, calib, search_part, held_out = demo
    found = search(sim, calib, search_part, target_accuracy_drop=0.02, param_bits=(4, 8), progress=False)
    assert found.metric >= found.float_metric - 0.02
    assert 4 in found.bits.values() and found.relative_cost < 1.0  # cheaper than W8A8, not all 16 bits
    mixed = QuantizationSimModel(model, per_channel=True, param_bw=4, config=load_config(json.loads(json.dumps(found.config))))
    mixed.compute_encodings(calib, progress=False)
    assert {k: v for k, v in _bits(mixed).items() if k in found.bits} == found.bits
    float_acc, _ = accuracy(Session(mixed.float_model).run, held_out, progress=False)
    acc, n = accuracy(mixed.run, held_out, progress=False)
    assert n == 2000 and acc >= float_acc - 0.02 - 0.01  # 0.01: sampling error of 300 vs 2000 images


@pytest.mark.long
def test_cli_quantize_to_a_target_writes_a_config_that_reloads(cli, demo_assets, tmp_path):
    model, calib, test = demo_assets
    out = tmp_path / "mixed"
    proc = cli("quantize", model, "--data", calib, "--output-dir", out, "--per-channel", "--param-bw", "4",
               "--target-accuracy-drop", "0.03", "--eval", test, "--eval-samples", "200", check=True)
    assert "mixed precision: accuracy" in proc.stdout
    config = out / "mixed_precision.json"
    again = cli("quantize", model, "--data", calib, "--output-dir", tmp_path / "again", "--per-channel",
                "--param-bw", "4", "--config", config, check=True)
    assert "plan:" in again.stdout
    first = json.loads((out / "model.encodings").read_text())
    second = json.loads((tmp_path / "again" / "model.encodings").read_text())
    assert {e["name"]: e["bw"] for e in first["param_encodings"]} == {e["name"]: e["bw"] for e in second["param_encodings"]}
    assert {e["name"]: e["bw"] for e in first["activation_encodings"]} == \
        {e["name"]: e["bw"] for e in second["activation_encodings"]}
    bad = cli("quantize", model, "--data", calib, "--output-dir", tmp_path / "bad", "--target-accuracy-drop", "0.01")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--eval" in bad.stderr
    assert not (tmp_path / "bad").exists()
