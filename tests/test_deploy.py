"""The deployable QDQ model in plain onnxruntime (separate environment) against the sim."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from conftest import ROOT
from deployrt import deploy_interpreter
from onnxqat import QuantizationSimModel
from onnxqat.data import NpzBatches, load_npz

PLAIN_ORT = ROOT / "onnxqat" / "tools" / "plain_ort.py"

pytestmark = pytest.mark.deploy


def plain_ort(python, *args):
    proc = subprocess.run([python, str(PLAIN_ORT), *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def test_images(demo_assets):
    return load_npz(demo_assets[2], ["image", "label"])


@pytest.mark.parametrize(
    "options",
    [dict(), dict(per_channel=True), dict(per_channel=True, param_bw=4), dict(per_channel=True, activation_bw=16)],
    ids=["w8a8", "w8a8-pc", "w4a8-pc", "w8a16-pc"],
)
def test_deployed_model_matches_sim_within_one_lsb(deploy_python, demo_assets, test_images, tmp_path, options):
    model, calib, _ = demo_assets
    sim = QuantizationSimModel(model, **options)
    sim.compute_encodings(NpzBatches(load_npz(calib, ["image"]), 64), progress=False)
    paths = sim.export(tmp_path)
    x = test_images["image"][:1000]
    np.savez(tmp_path / "in.npz", image=x)
    info = plain_ort(deploy_python, "outputs", paths["qdq"], tmp_path / "in.npz", tmp_path / "out.npz")
    if deploy_interpreter()[1] is None:  # a separate deploy environment: really the plain, current release
        assert not info["onnxruntime"].startswith("1.19")
    deployed = np.load(tmp_path / "out.npz")["probs"]
    (simulated,) = sim.run({"image": x})
    lsb = float(sim.encodings["probs"].scale)
    assert np.abs(deployed - simulated).max() <= 1.0 * lsb + 1e-7


def test_deployed_accuracy_and_file_size(deploy_python, demo_assets, test_images, tmp_path):
    model, calib, test = demo_assets
    sim = QuantizationSimModel(model, per_channel=True)
    sim.compute_encodings(NpzBatches(load_npz(calib, ["image"]), 64), progress=False)
    paths = sim.export(tmp_path)
    from onnxqat.evaluate import accuracy

    sim_acc, _ = accuracy(sim.run, NpzBatches(test_images, 500), progress=False)
    deployed = plain_ort(deploy_python, "accuracy", paths["qdq"], test)
    assert abs(deployed["accuracy"] - sim_acc) <= 0.002
    # int8 weights: the file is a fraction of the float model (graph structure dominates in a
    # 66k-parameter model; BENCHMARKS.md has the ratio for larger models)
    assert os.path.getsize(paths["qdq"]) < 0.45 * os.path.getsize(paths["float"])
