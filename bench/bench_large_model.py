"""Large-model benchmark: QuantSim + calibration + export of a model over the 2 GB protobuf limit.

Builds (once, into --work) a float model whose weights live in an external-data file: a chain of
``--layers`` MatMul(+Relu) layers of ``--width`` x ``--width`` float32 weights (default 8 x 8192^2
= 2.15 GB), written layer by layer so the builder never holds the model in memory. Then, in a
fresh child process (the onnxqat venv), it runs what a user runs:

    QuantizationSimModel(model, per_channel=True) -> compute_encodings(one small batch) -> export

and reports wall time per stage, the child's peak RSS up to the end of export (ru_maxrss) and its
ratio to the model size, the sizes of the exported files, and the agreement of the simulation's output with
the float model's (SQNR) on the calibration batch.

    /tmp/venv/bin/python bench/bench_large_model.py [--layers 8] [--width 8192] [--work /tmp/onnxqat_large]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import textwrap
import time

CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np
    t0 = time.perf_counter()
    from onnxqat import QuantizationSimModel
    from onnxqat.runtime import Session
    from onnxqat.io import load_model
    model, out_dir, width = sys.argv[1], sys.argv[2], int(sys.argv[3])
    t1 = time.perf_counter()
    sim = QuantizationSimModel(model, per_channel=True)
    t2 = time.perf_counter()
    x = np.random.default_rng(0).normal(size=(4, width)).astype(np.float32)
    sim.compute_encodings([{"x": x}], progress=False)
    t3 = time.perf_counter()
    paths = sim.export(out_dir)
    t4 = time.perf_counter()
    import resource
    peak_export = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (got,) = sim.run({"x": x})
    del sim
    (ref,) = Session(load_model(model), optimize=False).run({"x": x})
    sqnr = float(10 * np.log10((ref ** 2).mean() / max(((ref - got) ** 2).mean(), 1e-30)))
    print(json.dumps({"peak_after_export": peak_export, "import_s": t1 - t0, "simulate_s": t2 - t1, "calibrate_s": t3 - t2, "export_s": t4 - t3,
                      "sqnr_db": sqnr, "files": {k: os.path.getsize(v) for k, v in paths.items()},
                      "data_files": {f: os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir)}}))
    """
)


def build(path: str, layers: int, width: int) -> int:
    """Write the model and its external data without holding all weights in memory."""
    import numpy as np
    from onnx import TensorProto, helper

    data_name = os.path.basename(path) + ".weights"
    data_path = os.path.join(os.path.dirname(path), data_name)
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    offset = 0
    with open(data_path, "wb") as f:
        current = "x"
        for i in range(layers + 1):
            out_width = width if i < layers else 16
            w = (rng.standard_normal((width, out_width), dtype=np.float32) / np.sqrt(width)).astype(np.float32)
            raw = w.tobytes()
            f.write(raw)
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=list(w.shape))
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                t.external_data.add(key=key, value=value)
            offset += len(raw)
            inits.append(t)
            nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
            current = f"m{i}"
            if i < layers:
                nodes.append(helper.make_node("Relu", [current], [f"r{i}"], name=f"relu{i}"))
                current = f"r{i}"
            del w, raw
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["N", 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return offset


def run_child(python: str, model: str, out_dir: str, width: int) -> tuple[dict, float, float]:
    start = time.perf_counter()
    proc = subprocess.Popen([python, "-c", CHILD, model, out_dir, str(width)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    if status != 0:
        raise SystemExit(f"child failed:\n{err}")
    return json.loads(out.strip().splitlines()[-1]), wall, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--work", default="/tmp/onnxqat_large")
    parser.add_argument("--python", default="/tmp/venv/bin/python", help="interpreter of the onnxqat venv")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    model = os.path.join(args.work, "large.onnx")
    weights = model + ".weights"
    expected = (args.layers * args.width + 16) * args.width * 4
    if not (os.path.exists(model) and os.path.exists(weights) and os.path.getsize(weights) == expected):
        print(f"building {model} ({expected / 1e9:.2f} GB of weights)...", flush=True)
        build(model, args.layers, args.width)
    size = os.path.getsize(weights) + os.path.getsize(model)
    out_dir = os.path.join(args.work, "out")
    result, wall, peak = run_child(args.python, model, out_dir, args.width)
    print(f"model: {size / 1e9:.2f} GB ({args.layers} x MatMul {args.width}x{args.width}, external data)")
    print(f"wall {wall:.1f} s (import {result['import_s']:.1f}, simulate {result['simulate_s']:.1f}, "
          f"calibrate {result['calibrate_s']:.1f}, export {result['export_s']:.1f})")
    base = result["peak_after_export"]
    print(f"peak RSS through simulate + calibrate + export: {base / 1e9:.2f} GB = {base / size:.2f} x model size")
    print(f"peak RSS including the parity check afterwards: {peak / 1e9:.2f} GB")
    print("exported: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in result["data_files"].items()))
    print(f"sim vs float output SQNR: {result['sqnr_db']:.1f} dB")


if __name__ == "__main__":
    main()
