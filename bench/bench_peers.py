"""onnxqat's PTQ beside the peer tools (aimet-onnx, NNCF, AMD Quark), each in its own venv.

For every model x setting (W8A8 / W4A8, per-channel weights, 8-bit activations) this runs, one fresh
child process each: ``onnxqat quantize`` (the CLI, onnxqat venv), and bench/peers/run_<peer>.py in
that peer's venv (see bench/peers/README.md for how the venvs were made). Each child is timed from
spawn to exit (*wall*) and its peak RSS read with ``os.wait4`` (ru_maxrss of that child);
the runners also report the tool's own call time (*method s*: model load to QDQ written). Then every
QDQ model is scored against the float model in plain onnxruntime (the deploy venv) on held-out data,
twice: with onnxruntime's default graph optimizations (*deployed*: fused integer kernels) and with
them disabled (*reference*: Q/DQ math as written) -- on CPUs without VNNI the fused u8s8 kernels can
saturate, so the two differ.

Models: the shipped demo (``fmnist``: models/fmnist_calib.npz to calibrate, the 10000 labelled
test images to score), PaddleOCR cls/det/rec from the rapidocr-onnxruntime 1.4.4 wheel
(synthetic text-like pages of tests/test_real_models.py: 32 to calibrate, 32 others held out), and
``zoo:KEY`` models from tests/zoo.py (make_data split "calib" / "test").

    /work/main/.venv/bin/python bench/bench_peers.py [--models fmnist,ppocr-cls,ppocr-det,ppocr-rec]
        [--settings w8a8,w4a8] [--tools onnxqat,aimet,aimet-seqmse,aimet-adaround,nncf,quark]
        [--work-dir /tmp/bench_peers] [--results bench/peers/RESULTS.md] [--adaround-iters 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common as common  # noqa: E402

REPO = common.REPO_DIR
PEERS = os.path.join(HERE, "peers")
# a git worktree may have no .venv of its own: ONNXQAT_BIN names the CLI (with --onnxqat-src, the
# code it imports is the snapshot's whatever install the script belongs to)
ONNXQAT = os.environ.get("ONNXQAT_BIN", os.path.join(REPO, ".venv", "bin", "onnxqat"))
DEPLOY_PY = os.path.join(REPO, ".venv-deploy", "bin", "python")
PEER_PY = {"aimet": "/work/peers/aimet/bin/python", "nncf": "/work/peers/nncf/bin/python",
           "quark": "/work/peers/quark/bin/python"}
OCR_CACHE = os.path.join(os.environ.get("ONNXQAT_MODEL_CACHE", os.path.expanduser("~/.cache/onnxqat")), "rapidocr-1.4.4")
OCR = {  # key: (file, input shape, metric)
    "ppocr-cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", (3, 48, 192), "top1"),
    "ppocr-det": ("ch_PP-OCRv4_det_infer.onnx", (3, 320, 320), "mask"),
    "ppocr-rec": ("ch_PP-OCRv4_rec_infer.onnx", (3, 48, 320), "timestep"),
}
ZOO_METRIC = {"top1": "top1", "cosine": "cosine", "mask_iou": "mask", "string": "timestep"}
SETTINGS = {"w8a8": 8, "w4a8": 4}
TOOLS = ("onnxqat", "onnxqat-seqmse", "onnxqat-adaround", "aimet", "aimet-seqmse", "aimet-adaround", "nncf", "quark")


def prepare(key: str, work: str, n_calib: int, n_test: int) -> dict:
    """{model, calib, test, metric, output_index, batch}: paths of the float model and the npz files."""
    data_dir = os.path.join(work, "data")
    os.makedirs(data_dir, exist_ok=True)
    if key == "fmnist":
        return {"model": os.path.join(REPO, "models", "fmnist_dsconv.onnx"),
                "calib": os.path.join(REPO, "models", "fmnist_calib.npz"),
                "test": os.path.join(REPO, "models", "fmnist_test.npz"), "metric": "top1", "output_index": 0,
                "batch": 64}
    import numpy as np

    calib = os.path.join(data_dir, f"{key}_calib.npz")
    test = os.path.join(data_dir, f"{key}_test.npz")
    if key in OCR:
        name, shape, metric = OCR[key]
        model = os.path.join(OCR_CACHE, name)
        if not os.path.exists(model):
            raise SystemExit(f"error: {model} missing: run the real-model tests once to fill the cache")
        sys.path.insert(0, os.path.join(REPO, "tests"))
        from test_real_models import text_like

        if not os.path.exists(calib):
            np.savez(calib, x=text_like(n_calib, shape, seed=0))
            np.savez(test, x=text_like(n_test, shape, seed=1000))
        return {"model": model, "calib": calib, "test": test, "metric": metric, "output_index": 0, "batch": 16}
    if key.startswith("zoo:"):
        sys.path.insert(0, os.path.join(REPO, "tests"))
        import zoo

        zkey = key[4:]
        zm = zoo.MODELS[zkey]
        model = str(zoo.fetch(zkey))
        if not os.path.exists(calib):
            for path, split, n in ((calib, "calib", n_calib), (test, "test", n_test)):
                d = zoo.make_data(zkey, n=n, seed=0, split=split)
                np.savez(path, **{k: v for k, v in d.items() if isinstance(v, np.ndarray) and v.dtype.kind in "fiub"})
        return {"model": model, "calib": calib, "test": test, "metric": ZOO_METRIC.get(zm.agree, "sqnr"),
                "output_index": zoo._MAIN_OUTPUT.get(zkey, 0), "batch": zm.batch or 16}
    raise SystemExit(f"error: unknown model {key!r}")


def run_child(cmd: list[str], log: str, timeout: float, cwd: str = REPO, env: dict | None = None) -> dict:
    """Run to exit; wall seconds, ru_maxrss (MiB) of that child from os.wait4, exit status."""
    with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=cwd, env=env)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = -9
                return {"wall_s": time.perf_counter() - start, "child_peak_rss_mib": usage.ru_maxrss / 1024,
                        "returncode": "timeout"}
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": time.perf_counter() - start, "child_peak_rss_mib": usage.ru_maxrss / 1024,
            "returncode": proc.returncode}


def weight_check(path: str) -> dict:
    """What the QDQ model really does to the weights of Conv/ConvTranspose/Gemm/MatMul: how many read
    their weight through DequantizeLinear, how many of those per channel (scale with > 1 element),
    and the most integer levels any output channel uses (<= 2^bits)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.load(path)
    prod = {o: n for n in m.graph.node for o in n.output}
    vals = {i.name: i for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    vals[n.output[0]] = a.t

    def const(name):
        t = vals.get(name)
        if t is None and name in prod and prod[name].op_type == "Identity":
            return const(prod[name].input[0])
        return None if t is None else numpy_helper.to_array(t)

    ops = [n for n in m.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    total, through_dq, per_channel, levels = 0, 0, 0, 0
    for n in ops:
        if len(n.input) < 2:
            continue
        dq = prod.get(n.input[1])
        w_float = const(n.input[1])
        if dq is None and w_float is None:
            continue  # activation x activation MatMul
        total += 1
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        scale = const(dq.input[1])
        if scale is None:
            continue
        through_dq += 1
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if scale.size > 1:
            per_channel += 1
        q = const(dq.input[0])
        if q is None and dq.input[0] in prod and prod[dq.input[0]].op_type == "QuantizeLinear":
            qn = prod[dq.input[0]]
            w, zp = const(qn.input[0]), const(qn.input[2]) if len(qn.input) > 2 else None
            if w is None:
                continue
            info = np.iinfo(zp.dtype) if zp is not None and zp.dtype.kind in "iu" else np.iinfo(np.uint8)
            shape = [1] * w.ndim
            if scale.size > 1:
                shape[axis] = -1
            zpv = 0 if zp is None else zp.astype(np.float64).reshape(shape)
            q = np.clip(np.rint(w / scale.reshape(shape)) + zpv, info.min, info.max)
        if q is None:
            continue
        q = np.moveaxis(np.asarray(q, dtype=np.float64), axis if scale.size > 1 else 0, 0).reshape(q.shape[axis if scale.size > 1 else 0], -1)
        levels = max(levels, max(len(np.unique(row)) for row in q))
    return {"weights": total, "through_dq": through_dq, "per_channel": per_channel, "max_levels": levels}


def tail(path: str, n: int = 400) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
    except OSError:
        return ""
    return (lines[-1] if lines else "")[:n]


def quantize(tool: str, spec: dict, wbits: int, out: str, args: argparse.Namespace) -> dict:
    cell = os.path.join(out, "cell.json")
    if args.reuse and os.path.exists(cell):
        with open(cell) as f:
            result = json.load(f)
        if result.get("status") in ("ok", "failed"):  # a tool's own failure is deterministic; timeouts re-run
            common.progress("peers", f"{tool}: reusing {cell}")
            return result
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "log")
    if tool.startswith("onnxqat"):
        cmd = [ONNXQAT, "quantize", spec["model"], "--data", spec["calib"], "--output-dir", out, "--per-channel"]
        if wbits != 8:
            cmd += ["--param-bw", str(wbits)]
        rounding = tool.partition("-")[2]
        if rounding:
            cmd += ["--weight-rounding", rounding]
    else:
        peer, _, method = tool.partition("-")
        cmd = [PEER_PY[peer], os.path.join(PEERS, f"run_{peer}.py"), "--model", spec["model"], "--calib", spec["calib"],
               "--out", out, "--w-bits", str(wbits), "--a-bits", "8", "--per-channel"]
        if method:
            cmd += ["--method", method]
        if method == "adaround":
            cmd += ["--adaround-iters", str(args.adaround_iters)]
    common.progress("peers", f"{tool}: {shlex.join(cmd)}")
    env = None
    ours = tool.startswith("onnxqat")
    if ours and args.onnxqat_src:
        env = dict(os.environ, PYTHONPATH=args.onnxqat_src)
    # peers run in OUT: Quark writes quantized_info.csv into its working directory
    run = run_child(cmd, log, args.timeout, cwd=REPO if ours else out, env=env)
    rj = os.path.join(out, "result.json")
    if ours:
        result = {"tool": tool, "version": args.onnxqat_version, "status": "ok" if run["returncode"] == 0 else "failed",
                  "settings": {"cli": shlex.join(["onnxqat", "quantize", *cmd[7:]]),
                               "scheme": "auto (default)", "config": "onnxruntime (default)"},
                  "files": {f: os.path.getsize(os.path.join(out, f)) for f in sorted(os.listdir(out))
                            if os.path.isfile(os.path.join(out, f)) and not f.startswith("log")}}
        if run["returncode"] != 0:
            result["error"] = tail(log + ".err")
        with open(rj, "w") as f:
            json.dump(result, f, indent=2)
    else:
        try:
            with open(rj) as f:
                result = json.load(f)
        except (OSError, ValueError):
            result = {"tool": tool, "status": "failed", "error": tail(log + ".err") or f"exit {run['returncode']}"}
        if run["returncode"] == "timeout":
            result = {"tool": tool, "status": "timeout", "error": f"killed after {args.timeout:.0f} s"}
    result.update(run)
    with open(cell, "w") as f:
        json.dump(result, f, indent=2)
    return result


def fmt(x, spec: str = ".4f") -> str:
    return "–" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="fmnist,ppocr-cls,ppocr-det,ppocr-rec")
    p.add_argument("--settings", default="w8a8,w4a8")
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--work-dir", default="/tmp/bench_peers")
    p.add_argument("--results", default=os.path.join(PEERS, "RESULTS.md"))
    p.add_argument("--adaround-iters", type=int, default=1000, help="aimet documents 10000 (infeasible on 2 cores)")
    p.add_argument("--n-calib", type=int, default=32, help="calibration samples for generated data")
    p.add_argument("--n-test", type=int, default=32, help="held-out samples for generated data")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--latency-runs", type=int, default=10)
    p.add_argument("--onnxqat-src", default="",
                   help="run onnxqat from this folder (PYTHONPATH), e.g. a `git archive HEAD onnxqat` snapshot, so "
                        "uncommitted changes in the shared checkout do not leak into the numbers")
    p.add_argument("--reuse", action="store_true",
                   help="keep cells (OUT/cell.json) that succeeded or failed in an earlier run into the same --work-dir")
    p.add_argument("--skip", default="", help="comma list of model/setting/tool triples to skip, e.g. ppocr-rec/w4a8/aimet-adaround")
    args = p.parse_args(argv)
    start = common.run_start("bench_peers.py", argv)
    if args.onnxqat_src:
        args.onnxqat_src = os.path.abspath(args.onnxqat_src)
        stamp = os.path.join(args.onnxqat_src, "SNAPSHOT")
        snap = open(stamp).read().strip() if os.path.exists(stamp) else "?"
        args.onnxqat_version = f"snapshot {snap} in {args.onnxqat_src}"
    else:
        args.onnxqat_version = str(common.code_state())
    models = args.models.split(",")
    settings = args.settings.split(",")
    tools = args.tools.split(",")
    skip = set(filter(None, args.skip.split(",")))
    rows, scores = [], {}
    for key in models:
        spec = prepare(key, args.work_dir, args.n_calib, args.n_test)
        for setting in settings:
            wbits = SETTINGS[setting]
            qdqs = {}
            for tool in tools:
                if f"{key}/{setting}/{tool}" in skip:
                    continue
                out = os.path.join(args.work_dir, key.replace(":", "_"), setting, tool)
                r = quantize(tool, spec, wbits, out, args)
                r.update(model=key, setting=setting, tool=tool, out=out)
                rows.append(r)
                qdq = os.path.join(out, "model_qdq.onnx")
                if r.get("status") == "ok" and os.path.exists(qdq):
                    qdqs[tool] = qdq
                    try:
                        r["weight_check"] = weight_check(qdq)
                    except Exception as e:  # noqa: BLE001 - reported in the table
                        r["weight_check"] = {"error": f"{type(e).__name__}: {e}"}
                common.progress("peers", f"{key} {setting} {tool}: {r.get('status')} wall {r['wall_s']:.1f}s "
                                         f"rss {r['child_peak_rss_mib']:.0f}MiB {r.get('error', '')}")
            for label, extra in (("deployed", ["--latency-runs", str(args.latency_runs)]), ("reference", ["--no-optimize"])):
                # with --reuse, a reused cell keeps its scores (OUT/score_<label>.json) and only new ones are scored
                cached = {}
                if args.reuse:
                    for t, q in qdqs.items():
                        path = os.path.join(os.path.dirname(q), f"score_{label}.json")
                        if os.path.exists(path) and os.path.getmtime(path) > os.path.getmtime(q):
                            with open(path) as f:
                                cached[t] = json.load(f)
                todo = {t: q for t, q in qdqs.items() if t not in cached}
                float_cache = os.path.join(args.work_dir, key.replace(":", "_"), setting, f"float_{label}.json")
                if todo or not os.path.exists(float_cache):
                    cmd = [DEPLOY_PY, os.path.join(PEERS, "_score.py"), "--float", spec["model"], "--data", spec["test"],
                           "--metric", spec["metric"], "--output-index", str(spec["output_index"]),
                           "--batch-size", str(spec["batch"]), *extra, *[f"{t}={q}" for t, q in todo.items()]]
                    got = common.run_json(cmd)
                    with open(float_cache, "w") as f:
                        json.dump({k: v for k, v in got.items() if k != "models"}, f)
                    for t, q in todo.items():
                        with open(os.path.join(os.path.dirname(q), f"score_{label}.json"), "w") as f:
                            json.dump(got["models"][t], f)
                else:
                    with open(float_cache) as f:
                        got = dict(json.load(f), models={})
                got["models"] = {**cached, **got["models"]}
                scores[(key, setting, label)] = got
            scores[(key, setting, "float_size")] = os.path.getsize(spec["model"])
    write_report(args, start, rows, scores, models, settings)


def write_report(args, start, rows, scores, models, settings) -> None:
    lines = ["# PTQ: onnxqat vs aimet-onnx, NNCF, AMD Quark", ""]
    lines += [
        "Every cell: one fresh child process per tool (onnxqat: `onnxqat quantize --per-channel [--param-bw 4]`; "
        "peers: `bench/peers/run_<peer>.py` in its own venv, see bench/peers/README.md). Weights per-channel, "
        "activations 8-bit. *agree*: agreement with the float model on held-out data (top-1 for classifiers, "
        "per-timestep characters for the recognizer, IoU of the >0.3 text mask for the detector, mean cosine for "
        "embeddings) in plain onnxruntime, *deployed* = default graph optimizations (fused integer kernels), "
        "*ref* = optimizations off (Q/DQ as written). *acc*: accuracy with labels (deployed / ref). *SQNR*: "
        "output SQNR vs float, deployed, dB. *method s*: the tool's call (load → QDQ written; onnxqat: whole "
        "CLI process); *wall s*: child process spawn → exit; *peak RSS*: ru_maxrss of that child (os.wait4). "
        "*QDQ KiB*: model_qdq.onnx (ratio to the float file). *ms*: median latency of one batch, deployed, "
        "interleaved, noisy (shared machine). *weights q / pc / levels*: of the Conv/Gemm/MatMul weights, how many "
        "the QDQ model reads through DequantizeLinear / how many of those per channel / the most integer levels "
        "one channel uses (≤ 256 at W8, ≤ 16 at W4): a tool may not do what its settings ask.",
        "",
    ]
    for key in models:
        for setting in settings:
            dep = scores.get((key, setting, "deployed"), {})
            ref = scores.get((key, setting, "reference"), {})
            fsize = scores.get((key, setting, "float_size"), 0)
            lines.append(f"### {key}, {setting.upper()} (n={dep.get('n')})")
            lines.append("")
            facc = dep.get("float", {}).get("accuracy")
            fl = dep.get("float", {}).get("latency_ms")
            lines.append(f"float: {f'accuracy {facc:.4f}, ' if facc is not None else ''}{fsize / 1024:.0f} KiB"
                         + (f", {fl:.2f} ms/batch of {dep.get('latency_batch')}" if fl else ""))
            lines.append("")
            lines.append("| tool | status | weights q / pc / levels | agree deployed | agree ref | acc deployed / ref | SQNR dB | method s | wall s | peak RSS MiB | QDQ KiB (ratio) | ms |")
            lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for r in rows:
                if (r["model"], r["setting"]) != (key, setting):
                    continue
                d = dep.get("models", {}).get(r["tool"], {})
                f = ref.get("models", {}).get(r["tool"], {})
                size = r.get("files", {}).get("model_qdq.onnx")
                status = r.get("status")
                if status != "ok":
                    status = f"{status}: {r.get('error', '')[:300]}"
                elif "error" in d:
                    status = f"ORT cannot run it: {d['error'][:300]}"
                acc = "–"
                if "accuracy" in d or "accuracy" in f:
                    acc = f"{fmt(d.get('accuracy'))} / {fmt(f.get('accuracy'))}"
                wc = r.get("weight_check") or {}
                wcs = (f"{wc['through_dq']}/{wc['weights']} / {wc['per_channel']} / {wc['max_levels']}"
                       if "weights" in wc else ("–" if not wc else wc.get("error", "")[:80]))
                if r.get("workaround"):
                    status += " (workaround: " + r["workaround"].split(":")[0] + ")"
                lines.append(
                    f"| {r['tool']} | {status} | {wcs} | {fmt(d.get('agreement'))} | {fmt(f.get('agreement'))} | {acc} | "
                    f"{fmt(d.get('sqnr_db'), '.1f')} | {fmt(r.get('method_seconds'), '.2f')} | {r['wall_s']:.1f} | "
                    f"{r['child_peak_rss_mib']:.0f} | "
                    + (f"{size / 1024:.0f} ({size / fsize:.2f})" if size and fsize and r.get("status") == "ok" else "–")
                    + f" | {fmt(d.get('latency_ms'), '.2f')} |")
            lines.append("")
    lines += ["#### Settings each peer used", ""]
    seen = set()
    for r in rows:
        if r["tool"] in seen or r.get("status") != "ok" or "settings" not in r:
            continue
        seen.add(r["tool"])
        lines.append(f"- {r['tool']} {r.get('version', '')}: `{json.dumps(r['settings'], sort_keys=True)}`")
    lines += ["", "#### Environment", ""]
    env = start.environment()
    env += [
        common.venv_line("onnxqat venv", os.path.join(REPO, ".venv", "bin", "python"), ["onnxruntime", "onnx", "numpy"]),
        common.venv_line("deploy venv", DEPLOY_PY, ["onnxruntime", "numpy"]),
        common.venv_line("aimet venv", PEER_PY["aimet"], ["aimet_onnx", "onnxruntime", "onnx", "torch"]),
        common.venv_line("nncf venv", PEER_PY["nncf"], ["nncf", "onnxruntime", "onnx"]),
        common.venv_line("quark venv", PEER_PY["quark"], ["onnxruntime", "onnx", "torch"]),
        f"onnxqat measured: {args.onnxqat_version}",
        f"work dir (all outputs, logs, result.json per cell): {args.work_dir}",
    ]
    lines += [f"- {e}" for e in env]
    lines += ["", "Reproduce:", "", "```", start.command, "```", ""]
    common.publish("peers", "\n".join(lines), args.results)


if __name__ == "__main__":
    main()
