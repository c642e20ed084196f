"""Shared encodings are refused where they would wreck the smaller input (a YOLO head's boxes in
pixels concatenated with class scores in [0, 1] kept 14% of the float detections)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from conftest import make_model, run_onnx, tensor
from onnxqat import QuantizationSimModel
from onnxqat.pipeline import SHARED_RANGE_RATIO

f32 = np.float32
rng = np.random.default_rng(0)


def head(scale_b: float):
    """Concat(conv_a(x), conv_b(x) * scale) where conv_b's weights are ``scale_b`` times larger."""
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
             helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_b"),
             helper.make_node("Concat", ["a", "b"], ["y"], name="cat", axis=1)]
    return make_model(nodes, [tensor("x", ["N", 3, 4, 4])], [tensor("y", ["N", 4, 4, 4])],
                      {"wa": (rng.normal(size=(2, 3, 1, 1)) * 0.3).astype(f32),
                       "wb": (rng.normal(size=(2, 3, 1, 1)) * 0.3 * scale_b).astype(f32)})


def calibrated(model):
    sim = QuantizationSimModel(model, per_channel=True)
    x = rng.normal(size=(32, 3, 4, 4)).astype(f32)
    sim.compute_encodings([{"x": x[i:i + 8]} for i in range(0, 32, 8)], progress=False)
    return sim, x


def test_close_ranges_share_one_grid():
    sim, _ = calibrated(head(2.0))
    (q,) = [q for q in sim.plan.activations if q.shared_by]
    assert set(q.tensors) == {"a", "b", "y"} and q.shared_by == ("cat",)


def test_ranges_far_apart_get_their_own_quantizers_and_the_concat_runs_float():
    model = head(300.0)
    plain = QuantizationSimModel(model, per_channel=True)
    assert {"a", "b", "y"} <= {t for q in plain.plan.activations for t in q.tensors}  # tied before data
    with pytest.warns(RuntimeWarning, match=r"Concat 'cat': its inputs span .*more than the 16x"):
        sim, x = calibrated(model)
    assert sim.plan.activation_of("y") is None and "16x" in sim.why_not_quantized()["y"]
    qa, qb = sim.plan.activation_of("a"), sim.plan.activation_of("b")
    assert qa is not None and qb is not None and qa is not qb
    ref = run_onnx(model, {"x": x})[0]
    got = sim.run({"x": x})[0]
    lsb_a = float(sim.encodings[qa.name].scale)
    # the small branch is within its own grid's steps (input + weight quantization included)
    assert np.abs(got[:, :2] - ref[:, :2]).max() <= 2 * lsb_a
    assert float(sim.encodings[qb.name].scale) > (SHARED_RANGE_RATIO / 2) * lsb_a
