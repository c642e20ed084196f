"""Helper of bench_ptq.py: which ops remain after onnxruntime's own graph optimizer.

Runs under a venv with plain onnxruntime and onnx. For each model it opens an inference
session with the default optimization level (ORT_ENABLE_ALL, CPU provider, as plain_ort.py
does), saves the optimized graph, and prints one JSON line: ``{model: {op_type: count}}``.
Domain-qualified names (``com.microsoft.QLinearConv``) show ORT's fused kernels.

    python _ort_optimized_ops.py OUT_DIR MODEL [MODEL ...]
"""

from __future__ import annotations

import collections
import json
import os
import sys

import onnx
import onnxruntime as ort


def optimized_op_counts(model_path: str, saved_path: str) -> dict[str, int]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = saved_path
    ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    graph = onnx.load(saved_path).graph
    names = (f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in graph.node)
    return dict(collections.Counter(names).most_common())


def main(argv: list[str]) -> None:
    out_dir, *models = argv
    os.makedirs(out_dir, exist_ok=True)
    counts = {
        m: optimized_op_counts(m, os.path.join(out_dir, f"optimized_{i}.onnx")) for i, m in enumerate(models)
    }
    print(json.dumps(counts))


if __name__ == "__main__":
    main(sys.argv[1:])
