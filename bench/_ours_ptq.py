"""Child process of bench_ptq.py: onnxqat PTQ (sim + compute_encodings + export), one run.

Runs under the onnxqat venv. Prints one JSON line with the in-process timings:
``import_s`` (importing onnxqat and numpy) and ``call_s`` (building the sim from the model
file, calibrating on the data, exporting); the data is loaded between the two and timed in
neither. The parent measures the wall time and peak RSS of this whole process.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402

import numpy as np  # noqa: E402

from onnxqat import QuantizationSimModel  # noqa: E402
from onnxqat.data import NpzBatches  # noqa: E402

_IMPORT_S = time.perf_counter() - _T0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="npz whose keys include the model input names")
    p.add_argument("--input-name", default="image")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True)
    return p.parse_args()


def quantize(args: argparse.Namespace, images: np.ndarray) -> str:
    sim = QuantizationSimModel(
        args.model, param_bw=8, activation_bw=8, quant_scheme="minmax", per_channel=args.per_channel
    )
    sim.compute_encodings(NpzBatches({args.input_name: images}, args.batch_size), progress=False)
    return sim.export(args.out_dir)["qdq"]


def main() -> None:
    args = parse_args()
    with np.load(args.data) as data:
        images = data[args.input_name]
    start = time.perf_counter()
    qdq_path = quantize(args, images)
    call_s = time.perf_counter() - start
    print(json.dumps({
        "import_s": _IMPORT_S,
        "call_s": call_s,
        "samples": len(images),
        "qdq": qdq_path,
        "self_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }))


if __name__ == "__main__":
    main()
