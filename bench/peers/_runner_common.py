"""Shared by run_aimet.py, run_nncf.py and run_quark.py (standard library + numpy + onnx only).

Each runner is executed by its own peer's venv python, so this file must import nothing from
onnxqat and nothing peer-specific. It gives the common CLI, the calibration batches, and the
``result.json`` writer.

Common CLI::

    run_<peer>.py --model M.onnx --calib CALIB.npz --out OUT_DIR --w-bits {8,4} --a-bits 8
                  [--per-channel] [--batch-size 64] [--max-samples N] [peer options]

The calibration ``.npz`` holds one array per model input, keyed by input name, first axis =
samples (other keys such as ``label`` are ignored), as for ``onnxqat quantize --data``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback

import numpy as np


def parser(tool: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=f"PTQ of an ONNX model with {tool}; writes OUT/model_qdq.onnx and result.json")
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True, help=".npz: one array per model input, first axis = samples")
    p.add_argument("--out", required=True)
    p.add_argument("--w-bits", type=int, choices=(8, 4), default=8)
    p.add_argument("--a-bits", type=int, choices=(8,), default=8)
    p.add_argument("--per-channel", action="store_true")
    p.add_argument("--batch-size", type=int, default=64, help="calibration batch size (as onnxqat quantize)")
    p.add_argument("--max-samples", type=int, default=0, help="use only the first N calibration samples (0: all)")
    return p


def input_names(model_path: str) -> list[str]:
    import onnx

    m = onnx.load(model_path, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits]


def symbolic_negative_dims(model) -> list[str]:
    """Give graph inputs declared with a negative dim_value (invalid ONNX, e.g. paddle2onnx's -1 batch)
    a symbolic dim instead, in place; returns the inputs changed."""
    changed = []
    for i in model.graph.input:
        for k, d in enumerate(i.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value < 0:
                d.dim_param = f"{i.name}_dim{k}"
                changed.append(i.name)
    return sorted(set(changed))


def load_calib(path: str, names: list[str], max_samples: int = 0) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        missing = [n for n in names if n not in z.files]
        if missing:
            raise SystemExit(f"error: {path} has no array for model input(s) {missing} (has {z.files})")
        data = {n: z[n] for n in names}
    if max_samples:
        data = {k: v[:max_samples] for k, v in data.items()}
    return data


def batches(data: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(data.values())))
    return [{k: v[i : i + batch_size] for k, v in data.items()} for i in range(0, n, batch_size)]


def n_samples(data: dict[str, np.ndarray]) -> int:
    return len(next(iter(data.values())))


def peak_rss_mib() -> float:
    """ru_maxrss of this process (KiB on Linux) and of any children it waited for, in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


def file_sizes(out: str) -> dict[str, int]:
    return {f: os.path.getsize(os.path.join(out, f)) for f in sorted(os.listdir(out)) if os.path.isfile(os.path.join(out, f))}


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def write_result(out: str, result: dict) -> None:
    """Add sizes and peak RSS, write ``OUT/result.json`` and print it as the last stdout line."""
    result.setdefault("peak_rss_mib", round(peak_rss_mib(), 1))
    result["python"] = sys.version.split()[0]
    path = os.path.join(out, "result.json")
    result["files"] = file_sizes(out)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    print(json.dumps(result, sort_keys=True), flush=True)


def fail(out: str, result: dict, exc: BaseException) -> None:
    """Record a failure in result.json (status 'failed', the error's last line) and exit 3."""
    os.makedirs(out, exist_ok=True)
    result["status"] = "failed"
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    result["error"] = last[:2000]
    traceback.print_exc()
    write_result(out, result)
    raise SystemExit(3)


def qdq_summary(path: str) -> dict:
    """Op counts of the written QDQ model and the integer types its DequantizeLinear nodes read."""
    import onnx
    from collections import Counter

    m = onnx.load(path, load_external_data=False)
    ops = Counter(n.op_type for n in m.graph.node)
    inits = {i.name: i for i in m.graph.initializer}
    dq_types = Counter()
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            dq_types[onnx.TensorProto.DataType.Name(inits[n.input[0]].data_type)] += 1
    return {"ops": dict(ops.most_common()), "constant_dq_input_types": dict(dq_types)}
