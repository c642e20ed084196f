"""Make tests/fixtures/aimet/ with aimet-onnx itself (run by /work/peers/aimet/bin/python).

    /work/peers/aimet/bin/python bench/peers/make_aimet_fixtures.py [--out tests/fixtures/aimet]
        [--ocr-cls ~/.cache/onnxqat/rapidocr-1.4.4/ch_ppocr_mobile_v2.0_cls_infer.onnx]

Writes:

* ``configs/``: every JSON file the installed aimet-onnx wheel ships (its quantsim configs and its
  logging config), byte for byte;
* ``encodings/<model>_<setting>[_<version>].encodings``: what ``QuantizationSimModel(...)
  .compute_encodings(...)`` then ``sim.export`` write, with aimet's default flow (BatchNorm folded
  by ``fold_all_batch_norms_to_weight``, config ``"default"`` = per-channel, min_max):
  fmnist_dsconv W8A8 (encoding versions 1.0.0 = aimet's default, 0.6.1 and 2.0.0) and W4A8
  (1.0.0), calibrated on the 512 images of models/fmnist_calib.npz (batches of 64); the PaddleOCR
  classifier W8A8 (1.0.0) on 16 synthetic text-like pages (seed 0; tests/test_real_models.py's
  generator, re-implemented here with numpy only);
* ``measured.json``: aimet's numerics measured from those outputs (per-channel weight scale vs the
  weights aimet exported, the int grid of its prequantized QDQ weights) and where it put
  quantizers (the producer/consumer op types of every activation encoding, parameter names
  before/after BN folding).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def text_like(n: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """The same pages as tests/test_real_models.py's text_like (same rng calls, same seed)."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    images = rng.uniform(0.85, 1.0, size=(n, 1, h, w))
    for img in images:
        for _ in range(rng.integers(8, 30)):
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            img[0, y : y + rng.integers(2, max(3, h // 3)), x : x + rng.integers(2, max(3, w // 12))] = rng.uniform(0, 0.3)
    images = np.repeat(images, c, axis=1) + rng.normal(scale=0.02, size=(n, c, h, w))
    return ((np.clip(images, 0, 1) - 0.5) / 0.5).astype(np.float32)


def make_sim(model_path: str, wbits: int, calib: list[dict], tmp: str):
    import onnx
    from aimet_onnx import QuantizationSimModel
    from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight

    import _runner_common as rc

    model = onnx.load(model_path)
    rc.symbolic_negative_dims(model)  # aimet's to_onnx_qdq fails on a declared -1 dim
    before = {i.name for i in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    pairs = fold_all_batch_norms_to_weight(model)[0]
    sim = QuantizationSimModel(model, param_type=f"int{wbits}", activation_type="int8", config_file="default",
                               dummy_input=calib[0], path=tmp)
    sim.compute_encodings(calib)
    return sim, before, len(pairs)


def weights_of(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def numerics(enc: dict, exported_model, qdq_model) -> dict:
    """Per-channel symmetric weight encodings vs the weights aimet exported (BN folded)."""
    from onnx import numpy_helper

    w = weights_of(exported_model)
    ratios, offsets, grids = [], collections.Counter(), collections.Counter()
    rules = collections.Counter()
    n_rule = 0
    for e in enc["param_encodings"]:
        if e["name"] not in w or not e.get("is_sym") or e["enc_type"] != "PER_CHANNEL":
            continue
        arr = w[e["name"]]
        scale = np.asarray(e["scale"], dtype=np.float64)
        axis = 0 if arr.ndim != 2 or arr.shape[0] == len(scale) else 1
        moved = np.moveaxis(arr.astype(np.float64), axis, 0).reshape(len(scale), -1)
        amax = np.abs(moved).max(axis=1)
        keep = amax > 0
        ratios.extend((amax[keep] / scale[keep]).tolist())
        bw = e["bw"]
        qmax, qmin = 2 ** (bw - 1) - 1, -(2 ** (bw - 1))
        lo, hi = np.minimum(moved.min(axis=1), 0), np.maximum(moved.max(axis=1), 0)
        candidates = {  # which rule reproduces the scale aimet wrote (relative error < 1e-5)
            "max(-min/2^(b-1), max/(2^(b-1)-1))": np.maximum(-lo / -qmin, hi / qmax),
            "max|w|/(2^(b-1)-1)  (onnxqat, strict)": amax / qmax,
            "max|w|/(2^(b-1)-0.5)": amax / (qmax + 0.5),
            "max|w|/2^(b-1)": amax / -qmin,
        }
        for k, v in candidates.items():
            rules[k] += int((np.abs(v[keep] - scale[keep]) <= 1e-5 * scale[keep]).sum())
        n_rule += int(keep.sum())
        offsets.update(float(o) for o in e["offset"])
    qmin_qmax = {}
    inits = {i.name: i for i in qdq_model.graph.initializer}
    for n in qdq_model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            q = numpy_helper.to_array(inits[n.input[0]])
            if q.dtype.kind == "i" and q.dtype.itemsize == 1 or str(q.dtype) == "int4":
                grids[(int(q.min()), int(q.max()))] += 1
                qmin_qmax[n.input[0]] = (int(q.min()), int(q.max()))
    r = np.asarray(ratios)
    return {
        "bw": enc["param_encodings"][0]["bw"] if enc["param_encodings"] else None,
        "channels": int(len(r)),
        "max_abs_over_scale": {"min": float(r.min()), "median": float(np.median(r)), "max": float(r.max())} if len(r) else None,
        "offsets": {str(k): v for k, v in offsets.items()},
        "channels_matching_rule": dict(rules),
        "channels_checked": n_rule,
        "qdq_weight_int_ranges": {f"[{a},{b}]": c for (a, b), c in grids.most_common()},
        "weights_reaching_qmin": sum(1 for a, _ in qmin_qmax.values() if a <= -(2 ** (enc["param_encodings"][0]["bw"] - 1))),
        "weights_total": len(qmin_qmax),
    }


def placement(enc: dict, exported_model, original_names: set[str], n_folded: int) -> dict:
    producers = {o: n for n in exported_model.graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in exported_model.graph.node:
        for i in n.input:
            consumers[i].append(n.op_type)
    graph_inputs = {i.name for i in exported_model.graph.input}
    acts = []
    for e in enc["activation_encodings"]:
        name = e["name"]
        prod = "graph input" if name in graph_inputs else (producers[name].op_type if name in producers else "?")
        acts.append({"name": name, "producer": prod, "consumers": sorted(set(consumers.get(name, [])))})
    by_producer = collections.Counter(a["producer"] for a in acts)
    all_outputs = collections.Counter(n.op_type for n in exported_model.graph.node)
    not_quantized = collections.Counter()
    encoded = {a["name"] for a in acts}
    for n in exported_model.graph.node:
        if n.op_type != "Constant" and not any(o in encoded for o in n.output):
            not_quantized[n.op_type] += 1
    params = [{"name": e["name"], "in_original_model": e["name"] in original_names,
               "consumer": sorted(set(consumers.get(e["name"], [])))} for e in enc["param_encodings"]]
    return {
        "bn_folded": n_folded,
        "activation_encodings": len(acts),
        "activation_encodings_by_producer_op": dict(by_producer.most_common()),
        "ops_in_exported_model": dict(all_outputs.most_common()),
        "ops_whose_output_has_no_encoding": dict(not_quantized.most_common()),
        "activations": acts,
        "params": params,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(REPO, "tests", "fixtures", "aimet"))
    p.add_argument("--ocr-cls", default=os.path.expanduser(
        "~/.cache/onnxqat/rapidocr-1.4.4/ch_ppocr_mobile_v2.0_cls_infer.onnx"))
    args = p.parse_args()

    import aimet_onnx
    import onnx
    import onnxruntime

    pkg = os.path.dirname(aimet_onnx.__file__)
    cfg_out = os.path.join(args.out, "configs")
    os.makedirs(cfg_out, exist_ok=True)
    shipped = []
    for root, _, files in os.walk(pkg):
        for f in sorted(files):
            if f.endswith(".json"):
                rel = os.path.relpath(os.path.join(root, f), pkg)
                shutil.copyfile(os.path.join(root, f), os.path.join(cfg_out, f))
                shipped.append(rel)
    enc_out = os.path.join(args.out, "encodings")
    os.makedirs(enc_out, exist_ok=True)

    z = np.load(os.path.join(REPO, "models", "fmnist_calib.npz"))
    fmnist_calib = [{"image": z["image"][i : i + 64]} for i in range(0, 512, 64)]
    jobs = [("fmnist_dsconv", os.path.join(REPO, "models", "fmnist_dsconv.onnx"), 8, fmnist_calib, ["1.0.0", "0.6.1", "2.0.0"]),
            ("fmnist_dsconv", os.path.join(REPO, "models", "fmnist_dsconv.onnx"), 4, fmnist_calib, ["1.0.0"])]
    if os.path.exists(args.ocr_cls):
        ocr = text_like(16, (3, 48, 192), seed=0)
        jobs.append(("ppocr_cls", args.ocr_cls, 8, [{"x": ocr[i : i + 4]} for i in range(0, 16, 4)], ["1.0.0"]))
    measured = {"aimet_onnx": aimet_onnx.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                "shipped_json": shipped, "models": {}}
    for name, path, wbits, calib, versions in jobs:
        with tempfile.TemporaryDirectory() as tmp:
            sim, before, n_folded = make_sim(path, wbits, calib, os.path.join(tmp, "sim"))
            for v in versions:
                d = os.path.join(tmp, v)
                os.makedirs(d)
                sim.export(d, "model", encoding_version=v)
                suffix = "" if v == "1.0.0" else f"_{v}"
                shutil.copyfile(os.path.join(d, "model.encodings"),
                                os.path.join(enc_out, f"{name}_w{wbits}a8{suffix}.encodings"))
            exported = onnx.load(os.path.join(tmp, "1.0.0", "model.onnx"))
            with open(os.path.join(tmp, "1.0.0", "model.encodings")) as f:
                enc = json.load(f)
            qdq = sim.to_onnx_qdq(prequantize_constants=True)
            measured["models"][f"{name}_w{wbits}a8"] = {
                "calibration": f"{sum(len(next(iter(b.values()))) for b in calib)} samples, batches of {len(next(iter(calib[0].values())))}",
                "numerics": numerics(enc, exported, qdq),
                "placement": placement(enc, exported, before, n_folded),
            }
    with open(os.path.join(args.out, "measured.json"), "w") as f:
        json.dump(measured, f, indent=1, sort_keys=True)
    print(json.dumps({k: v["numerics"] for k, v in measured["models"].items()}, indent=1))


if __name__ == "__main__":
    main()
