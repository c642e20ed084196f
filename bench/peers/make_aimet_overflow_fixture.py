"""Make tests/fixtures/aimet/overflow/ with aimet-onnx itself (run by /work/peers/aimet/bin/python).

    /work/peers/aimet/bin/python bench/peers/make_aimet_overflow_fixture.py [--out tests/fixtures/aimet/overflow]

A tiny model (built here with onnx only) whose weight scales aimet-onnx 2.42 raises after
calibration (``QuantizationSimModel._adjust_weight_scales_against_overflow``, logged "Adjusted
weight scale for ... to prevent bias/scale overflow-underflow") although its default config leaves
biases float. Each layer has channels of near-zero weights, so that each of the three rules binds
somewhere:

* ``conv1`` (its output quantized): channel 1 (weights ~1e-7, bias 0.5) by the requantization
  scale ``input x weight / output > 2^-23.5``; channel 2 (bias -10) by the accumulator bias
  ``|bias + output min| / (input x weight) < 2^31 - 2^15``;
* ``conv2`` (Conv+Relu supergroup: no output quantizer, so only the bias rule): channel 3 (weights
  ~1e-8, bias 20) by ``|bias| / (input x weight) < 2^31 - 2^15``;
* ``gemm`` (the model output ``out``): row 2 (weights ~1e-9);
* ``matmul`` + ``add``: column 1 (weights ~1e-9, bias 30 on the Add). aimet-onnx fuses a MatMul
  of a rank-2 constant and the Add of a rank-1 constant into one Gemm (its ``MatmulAdd`` fusion),
  so the rules see the Add's output quantizer (``out2``) as the layer's output.

(aimet-onnx logs "Adjusted weight scale for <op>" for every layer it checks, changed or not; the
two files show which scales changed.)

Writes ``model.onnx``, ``calib.npz`` (16 samples, batches of 4), ``model.encodings`` (aimet's
export, 1.0.0) and ``unadjusted.encodings`` (the same calibration with the adjustment switched off).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(path: str) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.5
    w1[1] *= 2e-7
    w1[2] *= 2e-7
    w1[3] *= 0.2
    b1 = np.array([0.0, 0.5, -10.0, 0.0], np.float32)
    w2 = rng.standard_normal((4, 4, 1, 1)).astype(np.float32) * 0.3
    w2[3] *= 1e-8
    b2 = np.array([0.0, 0.1, -0.2, 20.0], np.float32)
    wg = rng.standard_normal((3, 4)).astype(np.float32) * 0.5
    wg[2] *= 1e-9
    bg = np.array([0.1, -0.1, 0.0], np.float32)
    wm = rng.standard_normal((4, 2)).astype(np.float32) * 0.5
    wm[:, 1] *= 1e-9
    bm = np.array([0.0, 30.0], np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (wg, "wg"), (bg, "bg"), (wm, "wm"), (bm, "bm"))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["out"], name="gemm", transB=1),
        helper.make_node("MatMul", ["f", "wm"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "bm"], ["out2"], name="add"),
    ]
    graph = helper.make_graph(nodes, "overflow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3]),
                               helper.make_tensor_value_info("out2", TensorProto.FLOAT, ["N", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def calibrate(model_path: str, calib: list[dict], out: str, adjust: bool) -> None:
    import onnx
    from aimet_onnx import QuantizationSimModel

    with tempfile.TemporaryDirectory() as tmp:
        sim = QuantizationSimModel(onnx.load(model_path), param_type="int8", activation_type="int8",
                                   config_file="default", dummy_input=calib[0], path=tmp)
        if not adjust:
            sim._adjust_weight_scales_against_overflow = lambda: None  # type: ignore[method-assign]
        sim.compute_encodings(calib)
        sim.export(tmp, "model", export_model=False)
        shutil.copyfile(os.path.join(tmp, "model.encodings"), out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(REPO, "tests", "fixtures", "aimet", "overflow"))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model_path = os.path.join(args.out, "model.onnx")
    build(model_path)
    x = np.random.default_rng(1).uniform(-1, 1, (16, 4, 8, 8)).astype(np.float32)
    np.savez(os.path.join(args.out, "calib.npz"), x=x)
    calib = [{"x": x[i:i + 4]} for i in range(0, 16, 4)]
    calibrate(model_path, calib, os.path.join(args.out, "model.encodings"), True)
    calibrate(model_path, calib, os.path.join(args.out, "unadjusted.encodings"), False)


if __name__ == "__main__":
    main()
