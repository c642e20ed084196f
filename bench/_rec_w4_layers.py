"""ppocr-rec: the float model with one weight at a time fake-quantized to 4-bit per-channel min-max.

Independent of onnxqat (numpy + onnxruntime): the weights are the model's Constant nodes read by
Conv/MatMul; each is replaced by its symmetric 4-bit per-output-channel fake-quantized values and
the output (CTC softmax) is compared with the float model's on the first 16 lines of the calib
split (SQNR dB, per-frame argmax agreement). Prints the 12 most harmful weights.

    QAT_REAL_WORK=/tmp/qat_wt python bench/_rec_w4_layers.py
"""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import zoo  # noqa: E402

DATA = os.path.join(os.environ.get("QAT_REAL_WORK", "/tmp/qat_real"), "data", "ppocr-rec", "calib.npz")


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    ref64 = ref.astype(np.float64)
    return float(10 * np.log10(np.sum(ref64 ** 2) / np.sum((ref64 - out) ** 2)))


def _q4(w: np.ndarray, axis: int) -> np.ndarray:
    rows = np.moveaxis(w, axis, 0)
    flat = rows.reshape(rows.shape[0], -1)
    scale = np.abs(flat).max(1, keepdims=True) / 7
    scale[scale == 0] = 1
    q = (np.clip(np.round(flat / scale), -8, 7) * scale).reshape(rows.shape)
    return np.moveaxis(q, 0, axis).astype(np.float32)


def main() -> None:
    x = np.load(DATA)["x"][:16]
    model = onnx.load(str(zoo.fetch("ppocr-rec")))
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"}
    ref = _run(model, x)
    rows = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
            continue
        w = consts.get(node.input[1])
        if w is None or w.ndim < 2:
            continue
        axis = 0 if node.op_type == "Conv" else w.ndim - 1
        changed = onnx.ModelProto()
        changed.CopyFrom(model)
        for c in changed.graph.node:
            if c.op_type == "Constant" and c.output[0] == node.input[1]:
                c.attribute[0].t.CopyFrom(numpy_helper.from_array(_q4(w, axis), c.attribute[0].t.name))
        out = _run(changed, x)
        channel_max = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(1)
        rows.append((_sqnr(ref, out), float(np.mean(out.argmax(-1) == ref.argmax(-1))), node.name, node.op_type,
                     w.shape, float(np.abs(w).max()), float(np.median(channel_max))))
    for r in sorted(rows)[:12]:
        print("%.2f dB frames %.3f %s %s %s max %.3g median-channel-max %.3g" % r)
    print("weights", len(rows))


if __name__ == "__main__":
    main()
