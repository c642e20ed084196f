"""Time ``analyze``'s per-layer sensitivity: one switchable session (now) against a session per
layer and configuration (the implementation before, loaded from git with ``--before``).

    .venv/bin/python bench/bench_analyze.py demo [--before] [--samples 64]
    .venv/bin/python bench/bench_analyze.py ppocr-cls|ppocr-rec|nudenet|... (tests/zoo.py keys)
    .venv/bin/python bench/bench_analyze.py demo --mixed 0.02    # mixed.search, the data of bench/bench_amp.py

Another checkout's onnxqat is timed by putting it first on PYTHONPATH (e.g. ``git archive ea27124
onnxqat | tar -x -C /tmp/old`` and ``PYTHONPATH=/tmp/old``).

Prints one JSON line: model, layers, seconds, metric values, the load average before and after.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _data(key: str, samples: int):
    from onnxqat.data import NpzBatches, load_npz

    if key == "demo":
        model = str(ROOT / "models" / "fmnist_dsconv.onnx")
        calib = list(NpzBatches(load_npz(str(ROOT / "models" / "fmnist_calib.npz"), ["image"]), samples, limit=samples))
        return model, calib
    import zoo

    model = str(zoo.fetch(key))
    data = zoo.make_data(key, n=samples, split="calib")
    names = zoo._input_names(key)
    return model, [{n: data[n] for n in names}]


def _before():
    """The analysis module as committed before the switchable session (git: 63b1705)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", "63b1705:onnxqat/analysis.py"], capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "analysis_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("analysis_before", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["analysis_before"] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _mixed(drop: float) -> None:
    from onnxqat import QuantizationSimModel
    from onnxqat.data import NpzBatches, load_npz
    from onnxqat.mixed import search

    calib = list(NpzBatches(load_npz(str(ROOT / "models" / "fmnist_calib.npz"), ["image"]), 64, limit=256))
    test = load_npz(str(ROOT / "models" / "fmnist_test.npz"), ["image", "label"])
    evaluation = [{k: v[:300] for k, v in test.items()}]
    load0 = os.getloadavg()
    start = time.perf_counter()
    sim = QuantizationSimModel(str(ROOT / "models" / "fmnist_dsconv.onnx"), per_channel=True)
    sim.compute_encodings(calib, progress=False)
    found = search(sim, calib, evaluation, target_accuracy_drop=drop, progress=False)
    counts: dict[int, int] = {}
    for b in found.bits.values():
        counts[b] = counts.get(b, 0) + 1
    print(json.dumps({"tool": "onnxqat mixed.search", "seconds": round(time.perf_counter() - start, 1),
                      "accuracy": found.metric, "float": found.float_metric, "relative_cost": found.relative_cost,
                      "evaluations": found.evaluations, "bits": counts, "load_before": [round(x, 2) for x in load0],
                      "load_after": [round(x, 2) for x in os.getloadavg()]}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", help="demo or a tests/zoo.py key")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--before", action="store_true", help="time the per-layer-session implementation instead")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--timeout", type=float, default=None, help="--before: stop after this many seconds")
    p.add_argument("--mixed", type=float, default=None, metavar="DROP",
                   help="demo: time mixed.search to this accuracy drop instead (the data of bench/bench_amp.py)")
    args = p.parse_args()
    if args.mixed is not None:
        _mixed(args.mixed)
        return
    from onnxqat import QuantizationSimModel

    model, calib = _data(args.model, args.samples)
    sim = QuantizationSimModel(model, per_channel=True)
    sim.compute_encodings(calib, progress=False)
    load0 = os.getloadavg()
    start = time.perf_counter()
    if args.before:
        old = _before()
        metric = old.output_sqnr_metric(sim, calib)
        units = old.layers(sim)
        if args.timeout:  # time a prefix of the layers and extrapolate
            done, t0 = 0, time.perf_counter()
            plan = sim.effective_plan
            every = set(plan.quantizer_names())
            from onnxqat.passes.insert_qdq import InsertQDQPass
            from onnxqat.runtime import Session

            for layer in units:
                mine = set(layer.quantizers)
                for enabled in (mine, every - mine):
                    m = InsertQDQPass(old._subset_plan(plan, enabled), sim.encodings, fold_weights=False)(sim.float_model).model
                    metric(Session(m).run)
                done += 1
                if time.perf_counter() - t0 > args.timeout:
                    break
            seconds = (time.perf_counter() - t0) / done * len(units)
            result = {"layers_timed": done, "extrapolated": True}
        else:
            sens = old.sensitivity(sim, metric, progress=False)
            seconds = time.perf_counter() - start
            result = {"quantized": sens["quantized"], "ranking": sens["ranking"][:5]}
        result["layers"] = len(units)
    else:
        from onnxqat.analysis import Evaluator, local_sqnr, quantizer_sqnr, sensitivity

        evaluator = Evaluator(sim.float_model, calib)
        proxies = local_sqnr(sim, quantizer_sqnr(sim, calib[0]))
        sens = sensitivity(sim, evaluator, top_k=args.top_k, proxies=proxies, progress=True)
        seconds = time.perf_counter() - start
        result = {"layers": sens["total_layers"], "scored": sens["scored"], "runs": sens["runs"],
                  "float": sens["float"], "quantized": sens["quantized"], "ranking": sens["ranking"][:5],
                  **{k: sens[k] for k in ("segments",) if k in sens}}
    print(json.dumps({"model": args.model, "implementation": "before" if args.before else "switchable",
                      "samples": args.samples, "seconds": round(seconds, 1), **result,
                      "load_before": [round(x, 2) for x in load0],
                      "load_after": [round(x, 2) for x in os.getloadavg()]}, default=float))


if __name__ == "__main__":
    main()
