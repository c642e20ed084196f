"""Make tests/fixtures/aimet/rounding/ with aimet-onnx itself (run by /work/peers/aimet/bin/python).

    /work/peers/aimet/bin/python bench/peers/make_aimet_rounding_fixture.py [--out tests/fixtures/aimet/rounding]

What aimet-onnx 2.42's quantizer (its CPU QcQuantizeOp, quantize-dequantize mode) makes of values
at and near the midpoints of its grid: a model ``x -> Sigmoid -> y`` whose input quantizer gets a
loaded encoding, run on chosen inputs, and the quantizer's output dumped. Two encodings: the
[-1, 1] range of 8-bit images normalised as ``(p / 255 - 0.5) / 0.5`` (scale 2/255, offset -128,
as aimet calibrates PaddleOCR's input) and an awkward one (scale 0.0123456, offset -77). Inputs,
per encoding: every midpoint ``(k + 0.5 + offset) * scale`` (k = 0..254, in float64, rounded to
float32) and its 24 float32 neighbours on either side, the 256 normalised pixel values, 4096
uniform values over the range and a little beyond it.

Writes ``rounding.npz``: ``x_<i>`` (float32 inputs), ``q_<i>`` (aimet's output for them), and
``encoding_<i>`` = [scale, offset, bitwidth] as aimet holds them (its encoding's delta, a double).

And ``weights.npz``: a 1x1 Conv's per-channel weights on and next to midpoints of their
symmetric grid (``(k + 0.5) / 127``, one float32 step either way or none, channel maximum 1),
calibrated by aimet-onnx (``w``, ``delta``, ``offset``) and its weight quantizer's output ``wq``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENCODINGS = ((2.0 / 255.0, -128), (0.0123456, -77))


def inputs(scale: float, offset: int) -> np.ndarray:
    mids = ((np.arange(255) + 0.5 + offset) * scale).astype(np.float32)
    near = [mids]
    up, down = mids.copy(), mids.copy()
    for _ in range(24):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
        near += [up, down]
    pixels = ((np.arange(256) / 255.0 - 0.5) / 0.5).astype(np.float32)
    lo, hi = offset * scale, (255 + offset) * scale
    rand = np.random.default_rng(0).uniform(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo), 4096).astype(np.float32)
    return np.concatenate(near + [pixels, rand]).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(REPO, "tests", "fixtures", "aimet", "rounding"))
    args = p.parse_args()
    import onnx
    from aimet_onnx import QuantizationSimModel
    from aimet_onnx.quantsim import load_encodings_to_sim
    from onnx import TensorProto, helper

    os.makedirs(args.out, exist_ok=True)
    graph = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["y"], name="sigmoid")], "rounding",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    out = {}
    for i, (scale, offset) in enumerate(ENCODINGS):
        x = inputs(scale, offset)
        with tempfile.TemporaryDirectory() as tmp:
            sim = QuantizationSimModel(onnx.load_from_string(model.SerializeToString()), param_type="int8",
                                       activation_type="int8", config_file="default", dummy_input={"x": x[:4]},
                                       path=tmp)
            enc = {"version": "1.0.0", "activation_encodings": [
                {"name": "x", "bw": 8, "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": False,
                 "offset": [offset], "scale": [scale]},
                {"name": "y", "bw": 8, "dtype": "INT", "enc_type": "PER_TENSOR", "is_sym": False,
                 "offset": [0], "scale": [1 / 255]}], "param_encodings": []}
            path = os.path.join(tmp, "x.encodings")
            with open(path, "w") as f:
                json.dump(enc, f)
            load_encodings_to_sim(sim, path, strict=True)
            q = sim.qc_quantize_op_dict["x"]
            held = q.get_encodings()[0]
            qmodel = onnx.ModelProto()
            qmodel.CopyFrom(sim.model.model)
            node = next(n for n in qmodel.graph.node if n.op_type == "QcQuantizeOp" and n.input[0] == "x")
            qmodel.graph.output.append(onnx.ValueInfoProto(name=node.output[0]))
            from aimet_onnx.utils import OrtInferenceSession

            os.makedirs(os.path.join(tmp, "dump"))
            session = OrtInferenceSession(qmodel, sim.providers, session_options=sim._ort_session_options,
                                          path=os.path.join(tmp, "dump"))
            got = session.run([node.output[0]], {"x": x})[0]
        out[f"x_{i}"], out[f"q_{i}"] = x, got.astype(np.float32)
        out[f"encoding_{i}"] = np.array([held.delta, held.offset, held.bw], np.float64)
    np.savez_compressed(os.path.join(args.out, "rounding.npz"), **out)
    weights(os.path.join(args.out, "weights.npz"))


def weights(path: str) -> None:
    import onnx
    from aimet_onnx import QuantizationSimModel
    from aimet_onnx.utils import OrtInferenceSession
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    k = rng.integers(-120, 120, (16, 64)).astype(np.float64)
    w = np.zeros((16, 64, 1, 1), np.float32)
    w[:, :, 0, 0] = (k + 0.5) / 127.0
    w[:, 0, 0, 0] = 1.0
    w = np.nextafter(w, w + rng.choice([-1, 0, 1], w.shape).astype(np.float32)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "c",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 2, 2])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = rng.uniform(-1, 1, (4, 64, 2, 2)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        sim = QuantizationSimModel(model, param_type="int8", activation_type="int8", config_file="default",
                                   dummy_input={"x": x}, path=tmp)
        sim.compute_encodings([{"x": x}])
        encs = sim.qc_quantize_op_dict["w"].get_encodings()
        m = onnx.ModelProto()
        m.CopyFrom(sim.model.model)
        node = next(n for n in m.graph.node if n.op_type == "QcQuantizeOp" and n.input[0] == "w")
        m.graph.output.append(onnx.ValueInfoProto(name=node.output[0]))
        os.makedirs(os.path.join(tmp, "d"))
        session = OrtInferenceSession(m, sim.providers, session_options=sim._ort_session_options,
                                      path=os.path.join(tmp, "d"))
        wq = session.run([node.output[0]], {"x": x})[0]
    np.savez(path, w=w, wq=wq, delta=np.array([e.delta for e in encs]), offset=np.array([e.offset for e in encs]))


if __name__ == "__main__":
    main()
