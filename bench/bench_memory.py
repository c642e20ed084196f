"""Peak memory of calibration (and of the training session) on real zoo models, commit against commit.

Every measurement is a fresh child process (``_worker``) importing onnxqat from an extracted
snapshot of one commit (``git archive <ref> onnxqat`` under ``$QAT_MEM_WORK/src-<commit>``), so two
commits run side by side, interleaved, on the same data and the same load. Peaks are VmHWM, reset
through ``/proc/self/clear_refs`` between phases.

``calib``: ``QuantizationSimModel(model, param_bw, activation_bw, per_channel=True)`` (the
default ``auto`` scheme) and ``compute_encodings`` on the calib split in batches of 8, as
``bench_qat_real.py`` does. Phases: the sim built (before), calibration's statistics pass
(``collect_statistics``), the auto scheme's choice (``choose_scheme``), all of calibration. The
record holds a digest of every encoding (scale, zero point), so the refs' encodings can be compared
bit for bit, and the scheme auto chose.

``train``: the training phase only, after calibration (``sim.trainer`` + ``fit`` on a few batches),
with a choice of onnxruntime-training session options (see ``--variants``).

Data: the splits ``bench_qat_real.py prepare`` wrote (``$QAT_REAL_WORK/data/<key>``).

    QAT_REAL_WORK=/tmp/qat_wt .venv/bin/python bench/bench_memory.py calib --refs 621e607,HEAD \\
        --models opennsfw,ppocr-rec,ppocr-det --reps 2 --results /tmp/qatmem/calib.jsonl
    .venv/bin/python bench/bench_memory.py table /tmp/qatmem/calib.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
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

DATA = os.path.join(os.environ.get("QAT_REAL_WORK", "/tmp/qat_real"), "data")
WORK = os.environ.get("QAT_MEM_WORK", "/tmp/qatmem")
SETTINGS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4)}


def snapshot(ref: str) -> tuple[str, str]:
    """``(folder, commit)``: the onnxqat package of ``ref`` extracted once under WORK."""
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", ref], capture_output=True, text=True,
                            check=True).stdout.strip()
    folder = os.path.join(WORK, f"src-{commit[:12]}")
    if not os.path.isdir(os.path.join(folder, "onnxqat")):
        os.makedirs(WORK, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f"src-{commit[:12]}.", dir=WORK)
        archive = subprocess.run(["git", "-C", REPO, "archive", commit, "onnxqat"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        os.rename(tmp, folder)
    return folder, commit


def load() -> str:
    return "%.2f %.2f %.2f" % os.getloadavg()


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024.0


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024.0


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _calib_data(key: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(DATA, key, "calib.npz")) as z:
        return {k: z[k] for k in z.files}


def encodings_digest(encodings: Any) -> str:
    h = hashlib.sha256()
    for name in sorted(encodings):
        enc = encodings[name]
        h.update(name.encode())
        h.update(np.ascontiguousarray(enc.scale, np.float32).tobytes())
        h.update(np.ascontiguousarray(enc.zero_point, np.int64).tobytes())
    return h.hexdigest()[:16]


def worker_calib(spec: dict) -> dict:
    import zoo
    import onnxqat.pipeline as pipeline
    from onnxqat import QuantizationSimModel

    out: dict[str, Any] = {**spec, "load_start": load(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    phases: dict[str, float] = {}
    for name in ("collect_statistics", "choose_scheme"):
        original = getattr(pipeline, name)

        def phase(*args: Any, _original: Any = original, _name: str = name, **kw: Any) -> Any:
            before = _hwm_mib()
            _reset_hwm()
            try:
                return _original(*args, **kw)
            finally:
                phases[_name] = _hwm_mib()
                phases["outer"] = max(phases.get("outer", 0.0), before)  # the peak between phases
                _reset_hwm()

        setattr(pipeline, name, phase)
    pbw, abw = SETTINGS[spec["setting"]]
    data = _calib_data(spec["key"])
    sim = QuantizationSimModel(zoo.fetch(spec["key"]), param_bw=pbw, activation_bw=abw, per_channel=True)
    out["sim_mib"] = _hwm_mib()
    _reset_hwm()
    out["rss_before_mib"] = _rss_mib()
    t = time.time()
    sim.compute_encodings(list(zoo.feeds(spec["key"], data, batch_size=8)), progress=False)
    out["calibrate_s"] = time.time() - t
    out["statistics_mib"] = phases.get("collect_statistics")
    out["choose_mib"] = phases.get("choose_scheme")
    out["calibration_mib"] = max(_hwm_mib(), phases.get("outer", 0.0), out["statistics_mib"] or 0.0,
                                 out["choose_mib"] or 0.0)
    out["digest"] = encodings_digest(sim.encodings)
    out["n_encodings"] = len(sim.encodings)
    out["choice"] = sim.scheme_choice.summary() if sim.scheme_choice is not None else None
    out["load_end"] = load()
    return out


# Session options of the training module (``trainer._open``) per variant; "base" is onnxqat's own.
VARIANTS = ("base", "noenv", "noarena", "nopattern", "noenv-nopattern", "memopt")


def _patch_training_options(variant: str) -> None:
    import onnxqat.train.sessions as sessions
    import onnxqat.train.trainer as trainer_module

    original = sessions.session_options

    def options(threads: int | None = None) -> Any:
        o = original(threads)
        if "nopattern" in variant:
            o.enable_mem_pattern = False
        if variant == "noarena":
            o.enable_cpu_mem_arena = False
        if variant == "memopt":  # onnxruntime-training's recompute optimizer, probing every subgraph
            o.add_session_config_entry("optimization.enable_memory_probe_recompute_config", "1:1")
            o.log_severity_level = int(os.environ.get("QAT_MEM_LOG", "3"))
        return o

    trainer_module.session_options = options  # the module, not the evaluation sessions


class _Batches:
    def __init__(self, folder: str, limit: int) -> None:
        self.files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".npz"))[:limit]

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Any:
        for path in self.files:
            with np.load(path) as z:
                yield {k: z[k] for k in z.files}


def worker_train(spec: dict) -> dict:
    import resource

    import zoo
    from onnxqat import QuantizationSimModel

    out: dict[str, Any] = {**spec, "load_start": load(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    key = spec["key"]
    if spec["mode"] == "infer":  # the float model alone in onnxruntime, one training batch
        import onnxruntime as ort

        first = next(iter(_Batches(os.path.join(DATA, key, "train"), 1)))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        session = ort.InferenceSession(str(zoo.fetch(key)), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        session.run(None, {k: first[k] for k in names})
        out["peak_mib"] = _hwm_mib()
        out["load_end"] = load()
        return out
    _patch_training_options(spec["variant"])
    pbw, abw = SETTINGS[spec["setting"]]
    sim = QuantizationSimModel(zoo.fetch(key), param_bw=pbw, activation_bw=abw, per_channel=True, quant_scheme="minmax")
    sim.compute_encodings(list(zoo.feeds(key, _calib_data(key), batch_size=8)), progress=False)
    out["before_train_mib"] = _hwm_mib()
    _reset_hwm()
    out["rss_at_start_mib"] = _rss_mib()
    train = _Batches(os.path.join(DATA, key, "train"), spec["batches"])
    options = dict(loss="distill", range_learning=spec["mode"] == "rl", threads=2, output_index=0, lr=1e-5,
                   quantized=spec["mode"] != "float")
    if spec.get("micro") is not None:  # micro_batch (0: automatic); commits before it have no such option
        options["micro_batch"] = spec["micro"]
    with sim.trainer(**options) as trainer:
        t = time.time()
        trainer.fit(train, epochs=1, progress=False)
        out["fit_s"] = time.time() - t
        out["epoch_s"] = trainer.history[0].seconds
        out["steps"] = trainer.history[0].steps
        out["loss"] = trainer.history[0].loss
        out["micro_batch"] = getattr(trainer, "micro_batch", None)
        out["train_only_mib"] = _hwm_mib()
        out["canary_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
        first = next(iter(train))
        step_s = []
        for _ in range(spec.get("timed", 4)):  # steps timed one by one after the epoch (warm)
            t = time.time()
            trainer.step(first)
            step_s.append(time.time() - t)
        out["step_s"] = step_s
        out["train_only_mib"] = max(out["train_only_mib"], _hwm_mib())
    out["load_end"] = load()
    return out


def run_child(spec: dict, src: str) -> dict:
    env = dict(os.environ, PYTHONPATH=src)
    if spec.get("variant") in ("noenv", "noarena", "noenv-nopattern"):
        env["ONNXQAT_SHARED_ARENA"] = "0"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "_worker", json.dumps(spec)],
                          capture_output=True, text=True, cwd=WORK, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith('{"result"'):
            return json.loads(line)["result"]
    return {**spec, "error": proc.stderr.strip()[-2000:], "status": proc.returncode}


def cmd_calib(args: argparse.Namespace) -> None:
    os.makedirs(WORK, exist_ok=True)
    refs = [snapshot(r) for r in args.refs.split(",")]
    for key in args.models.split(","):
        for rep in range(args.reps):
            for src, commit in refs if rep % 2 == 0 else refs[::-1]:  # alternate which commit runs first
                spec = {"kind": "calib", "key": key, "setting": args.setting, "commit": commit[:12], "rep": rep}
                result = run_child(spec, src)
                with open(args.results, "a") as f:
                    f.write(json.dumps(result) + "\n")
                print(json.dumps(result), flush=True)


def cmd_train(args: argparse.Namespace) -> None:
    """Training cells of every ref (comma-separated, alternating per rep) x mode x variant x micro
    size; micro sizes go only to refs that have the option (``onnxqat/train/micro.py``)."""
    os.makedirs(WORK, exist_ok=True)
    refs = [snapshot(r) for r in args.ref.split(",")]
    micros = [None if m == "-" else int(m) for m in args.micros.split(",")]
    for key in args.models.split(","):
        specs = [({"kind": "train", "key": key, "mode": "infer", "setting": args.setting, "commit": refs[0][1][:12]},
                  refs[0][0])]
        for rep in range(args.reps):
            for src, commit in refs if rep % 2 == 0 else refs[::-1]:
                has_micro = os.path.exists(os.path.join(src, "onnxqat", "train", "micro.py"))
                for variant in args.variants.split(","):
                    for mode in args.modes.split(","):
                        for micro in (micros if has_micro else [None]):
                            spec = {"kind": "train", "key": key, "mode": mode, "variant": variant,
                                    "setting": args.setting, "batches": args.batches, "commit": commit[:12], "rep": rep,
                                    "timed": args.timed}
                            if micro is not None:
                                spec["micro"] = micro
                            specs.append((spec, src))
        for spec, src in specs:
            result = run_child(spec, src)
            with open(args.results, "a") as f:
                f.write(json.dumps(result) + "\n")
            print(json.dumps(result), flush=True)


def cmd_table(args: argparse.Namespace) -> None:
    rows: dict[tuple[str, str], list[dict]] = {}
    for line in open(args.results):
        r = json.loads(line)
        if "error" in r or r.get("kind") != "calib":
            continue
        rows.setdefault((r["key"], r["commit"]), []).append(r)
    print("| model | commit | runs | sim built MiB | statistics pass MiB | auto choice MiB | calibration peak MiB "
          "(median) | calibrate s (median) | encodings digest | load start-end |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (key, commit), rs in rows.items():
        def med(k: str) -> str:
            return f"{statistics.median(r[k] for r in rs):.0f}"
        digests = sorted({r["digest"] for r in rs})
        loads = f"{min(float(r['load_start'].split()[0]) for r in rs):.1f}-" \
                f"{max(float(r['load_end'].split()[0]) for r in rs):.1f}"
        print(f"| {key} | {commit[:7]} | {len(rs)} | {med('sim_mib')} | {med('statistics_mib')} | {med('choose_mib')} "
              f"| {med('calibration_mib')} | {statistics.median(r['calibrate_s'] for r in rs):.1f} | "
              f"{', '.join(digests)} | {loads} |")


def main() -> None:
    warnings.simplefilter("ignore", RuntimeWarning)
    if len(sys.argv) > 2 and sys.argv[1] == "_worker":
        spec = json.loads(sys.argv[2])
        result = worker_train(spec) if spec["kind"] == "train" else worker_calib(spec)
        print(json.dumps({"result": result}), flush=True)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calib")
    c.add_argument("--refs", default="621e607,HEAD")
    c.add_argument("--models", default="opennsfw,ppocr-rec,ppocr-det")
    c.add_argument("--setting", default="w4a8", choices=sorted(SETTINGS))
    c.add_argument("--reps", type=int, default=2)
    c.add_argument("--results", default=os.path.join(WORK, "calib.jsonl"))
    r = sub.add_parser("train")
    r.add_argument("--ref", default="HEAD", help="commit(s), comma-separated: measured alternately")
    r.add_argument("--models", default="opennsfw")
    r.add_argument("--setting", default="w4a8", choices=sorted(SETTINGS))
    r.add_argument("--modes", default="float,fixed", help="float (quantized=False), fixed, rl")
    r.add_argument("--variants", default="base,noenv,nopattern")
    r.add_argument("--batches", type=int, default=4)
    r.add_argument("--timed", type=int, default=4, help="warm steps timed one by one after the epoch")
    r.add_argument("--micros", default="-", help="micro_batch values, comma-separated: 0 automatic, - not passed "
                                                 "(commits without the option)")
    r.add_argument("--reps", type=int, default=1)
    r.add_argument("--results", default=os.path.join(WORK, "train.jsonl"))
    t = sub.add_parser("table")
    t.add_argument("results")
    args = p.parse_args()
    {"calib": cmd_calib, "train": cmd_train, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
