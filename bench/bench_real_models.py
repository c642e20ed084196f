"""Real third-party models: what onnxqat does with them, how long it takes, how close PTQ stays.

Models: PaddleOCR's classifier, detector and recognizer as shipped in the rapidocr-onnxruntime
1.4.4 wheel (fetched once with ``pip download --no-deps`` into ``--cache``), and the shipped demo
model. For each model and config preset, one fresh child process (onnxqat venv) runs
QuantizationSimModel(per_channel=True) + compute_encodings (4 batches of 4 synthetic text-like
pages; the demo model uses its calibration images) + export, and reports: node count, quantizers
inserted, wall time of simulate+calibrate+export, peak RSS (ru_maxrss), the size of model_qdq.onnx
relative to the float file, and FP32-vs-PTQ agreement on held-out inputs: top-1 agreement for the
classifiers, per-timestep character agreement for the recognizer, and the IoU of the thresholded
(0.3) text mask for the detector. Then plain onnxruntime (deploy venv) times float vs QDQ model
inference, interleaved.

    /tmp/venv/bin/python bench/bench_real_models.py [--presets onnxruntime,aimet]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WHEEL = "rapidocr-onnxruntime==1.4.4"
OCR = {
    "PP-OCR cls (mobile v2)": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", [3, 48, 192], "top1"),
    "PP-OCRv4 det": ("ch_PP-OCRv4_det_infer.onnx", [3, 320, 320], "mask"),
    "PP-OCRv4 rec": ("ch_PP-OCRv4_rec_infer.onnx", [3, 48, 320], "timestep"),
}

CHILD = textwrap.dedent(
    """
    import json, os, sys, time, resource
    import numpy as np
    sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
    from test_real_models import text_like
    from onnxqat import QuantizationSimModel
    from onnxqat.runtime import Session
    from onnxqat.io import load_model
    repo, model, shape, metric, preset, out = sys.argv[1:7]
    shape = json.loads(shape)
    if metric == "demo":
        z = np.load(os.path.join(repo, "models/fmnist_calib.npz"))
        calib = [{"image": z["image"][i:i + 64]} for i in range(0, 512, 64)]
        t = np.load(os.path.join(repo, "models/fmnist_test.npz"))
        held = {"image": t["image"][:1000]}
    else:
        calib = [{"x": text_like(4, tuple(shape), s)} for s in range(4)]
        held = {"x": text_like(8, tuple(shape), 99)}
    start = time.perf_counter()
    sim = QuantizationSimModel(model, per_channel=True, config=preset)
    sim.compute_encodings(calib, progress=False)
    paths = sim.export(out)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (got,) = sim.run(held)
    (ref,) = Session(load_model(model), optimize=False).run(held)
    if metric == "mask":
        a, b = ref > 0.3, got > 0.3
        agreement = float((a & b).sum() / max((a | b).sum(), 1))
    else:
        agreement = float((got.argmax(-1) == ref.argmax(-1)).mean())
    print(json.dumps({
        "nodes": sum(1 for _ in sim.float_model.graph), "activation_quantizers": len(sim.plan.activations),
        "quantized_tensors": sum(len(q.tensors) for q in sim.plan.activations),
        "weight_quantizers": len(sim.plan.params), "int32_biases": len(sim.effective_plan.biases),
        "seconds": elapsed, "peak_rss": peak, "agreement": agreement,
        "qdq_ratio": os.path.getsize(paths["qdq"]) / os.path.getsize(model), "qdq": paths["qdq"],
        "input": list(held)[0], "held_shape": list(next(iter(held.values())).shape)}))
    """
)


def fetch(cache: str) -> dict[str, str]:
    paths = {name: os.path.join(cache, f) for name, (f, _, _) in OCR.items()}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", tmp], check=True)
        wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
        with zipfile.ZipFile(wheel) as z:
            for member in z.namelist():
                if member.endswith(".onnx"):
                    with open(os.path.join(cache, os.path.basename(member)), "wb") as f:
                        f.write(z.read(member))
    return paths


def measure(python: str, model: str, shape: list[int], metric: str, preset: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([python, "-c", CHILD, REPO, model, json.dumps(shape), metric, preset, out],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{model} ({preset}) failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["latency"] = latency(model, result)
    return result


def latency(model: str, result: dict) -> dict[str, float]:
    """Float vs QDQ inference in plain onnxruntime on the held-out shape (batch 1)."""
    deploy = ARGS.deploy_python
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "in.npz")
        subprocess.run([ARGS.python, "-c", "import numpy as np, sys, json; shape = json.loads(sys.argv[2]); "
                        "np.savez(sys.argv[1], **{sys.argv[3]: np.random.default_rng(0).uniform(-1, 1, shape)"
                        ".astype(np.float32)})", data, json.dumps([1, *result["held_shape"][1:]]), result["input"]],
                       check=True)
        proc = subprocess.run([deploy, os.path.join(REPO, "onnxqat/tools/plain_ort.py"), "latency", model,
                               result["qdq"], "--data", data, "--batch-size", "1", "--runs", str(ARGS.runs)],
                              capture_output=True, text=True, check=True)
    times = json.loads(proc.stdout.strip().splitlines()[-1])["median_ms"]
    return {"float_ms": times[model], "qdq_ms": times[result["qdq"]]}


ARGS = argparse.Namespace()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "onnxqat", "rapidocr-1.4.4"))
    parser.add_argument("--python", default="/tmp/venv/bin/python", help="onnxqat venv interpreter")
    parser.add_argument("--deploy-python", default="/tmp/deployvenv/bin/python", help="plain onnxruntime interpreter")
    parser.add_argument("--presets", default="onnxruntime,aimet")
    parser.add_argument("--runs", type=int, default=20)
    global ARGS
    ARGS = parser.parse_args()
    models = {name: (path, OCR[name][1], OCR[name][2]) for name, path in fetch(ARGS.cache).items()}
    models["demo fmnist_dsconv"] = (os.path.join(REPO, "models/fmnist_dsconv.onnx"), [1, 28, 28], "demo")
    rows = []
    for name, (path, shape, metric) in models.items():
        for preset in ARGS.presets.split(","):
            r = measure(ARGS.python, path, shape, metric, preset)
            label = {"top1": "top-1 agree", "timestep": "char agree", "mask": "mask IoU", "demo": "top-1 agree"}[metric]
            rows.append(
                f"| {name} | {preset} | {r['nodes']} | {r['activation_quantizers']} on {r['quantized_tensors']} "
                f"| {r['weight_quantizers']} / {r['int32_biases']} | {r['seconds']:.2f} | {r['peak_rss'] / 2**20:.0f} "
                f"| {label} {r['agreement']:.3f} | {r['qdq_ratio']:.2f} "
                f"| {r['latency']['float_ms']:.2f} / {r['latency']['qdq_ms']:.2f} |"
            )
            print(rows[-1], flush=True)
    header = ("| model | preset | nodes | activation quantizers on tensors | weight quantizers / int32 biases "
              "| simulate+calibrate+export s | peak RSS MiB | FP32 vs PTQ | QDQ file / float file "
              "| batch-1 latency float / QDQ ms |\n|---|---|---:|---:|---:|---:|---:|---|---:|---:|")
    print("\n" + header + "\n" + "\n".join(rows))
    print(f"\ndate: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, machine: {os.cpu_count()} cores, "
          f"command: {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
