"""Child process of bench_ptq.py: onnxruntime.quantization.quantize_static, one run.

Runs under a venv with the current plain onnxruntime + onnx. QDQ format, MinMax calibration,
QInt8 weights, activations QUInt8 or QInt8 (the tool's default), per-channel or per-tensor.
With ``--preprocess`` the model first goes through ``quant_pre_process`` (ONNX shape inference
and ORT's basic graph optimizer, which folds BatchNorm into Conv; symbolic shape inference is
skipped, as the model's shapes are static and it would need sympy), as ORT's docs recommend; its
time is included in ``call_s`` and also reported alone as ``preprocess_s``.

Prints one JSON line with ``import_s`` (importing onnxruntime.quantization and numpy) and
``call_s`` (pre-processing if asked + quantize_static: load, calibrate, quantize, save). The
data is loaded between the two and timed in neither. The parent measures the wall time and
peak RSS of this whole process.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402

import numpy as np  # noqa: E402
from onnxruntime.quantization import (  # noqa: E402
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

_IMPORT_S = time.perf_counter() - _T0


class ArrayBatches(CalibrationDataReader):
    """Feeds ``{input_name: images[i:i+batch_size]}`` until the images run out."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int) -> None:
        self.input_name = input_name
        self.images = images
        self.batch_size = batch_size
        self.start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start >= len(self.images):
            return None
        batch = self.images[self.start : self.start + self.batch_size]
        self.start += self.batch_size
        return {self.input_name: batch}

    def rewind(self) -> None:
        self.start = 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="npz with the calibration images")
    p.add_argument("--input-name", default="image")
    p.add_argument("--out", required=True, help="path of the QDQ model to write")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--activation-type", choices=["QUInt8", "QInt8"], default="QUInt8")
    p.add_argument("--preprocess", action="store_true", help="run quant_pre_process first")
    return p.parse_args()


def preprocess(model: str, out: str) -> tuple[str, float]:
    start = time.perf_counter()
    prepared = os.path.splitext(out)[0] + "_preprocessed.onnx"
    quant_pre_process(model, prepared, skip_symbolic_shape=True)  # the model has static shapes; spares sympy
    return prepared, time.perf_counter() - start


def quantize(args: argparse.Namespace, model: str, images: np.ndarray) -> None:
    quantize_static(
        model,
        args.out,
        ArrayBatches(args.input_name, images, args.batch_size),
        quant_format=QuantFormat.QDQ,
        per_channel=args.per_channel,
        activation_type=QuantType[args.activation_type],
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )


def main() -> None:
    logging.disable(logging.WARNING)  # the "consider pre-processing" notes, printed per run
    args = parse_args()
    with np.load(args.data) as data:
        images = data[args.input_name]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    start = time.perf_counter()
    model, preprocess_s = preprocess(args.model, args.out) if args.preprocess else (args.model, 0.0)
    quantize(args, model, images)
    call_s = time.perf_counter() - start
    print(json.dumps({
        "import_s": _IMPORT_S,
        "call_s": call_s,
        "preprocess_s": preprocess_s,
        "samples": len(images),
        "qdq": args.out,
        "self_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }))


if __name__ == "__main__":
    main()
