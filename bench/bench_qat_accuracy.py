"""QAT accuracy benchmark: FP32 vs PTQ vs QAT (with and without range learning) on the demo model.

What is measured, on models/fmnist_dsconv.onnx and the real Fashion-MNIST test set
(models/fmnist_test.npz, 10000 images); every accuracy is top-1 on all of it:

* FP32: the float model file as shipped, run by the onnxruntime of the onnxqat venv and by plain
  onnxruntime in the deploy venv;
* PTQ, per quantization config (default W8A8 per-tensor, W8A8 per-channel, W4A8 per-channel;
  weights symmetric int, activations asymmetric uint8, BatchNorm folded): QuantizationSimModel +
  compute_encodings on models/fmnist_calib.npz (512 images, batch 64, minmax); accuracy of
  ``sim.run``. PTQ is deterministic, so one run per config;
* QAT, per config, per seed (default 0 and 1), without and with range learning: the same PTQ
  starting point, then ``sim.trainer(loss="cross_entropy", lr=3e-5, range_learning=...)`` (AdamW,
  weight decay 0) for ``--epochs`` epochs over models/fmnist_train.npz (8000 images, batch 32,
  ``NpzBatches(shuffle=True, seed=SEED)``: the seed only changes the shuffle order), no
  evaluation during training; accuracy of ``sim.run`` afterwards;
* distillation, W4A8 per-channel by default: the same with ``loss="distill"`` (the float model as
  teacher, no labels) and ``lr=1e-4``, without range learning;
* every PTQ/QAT model is exported (``sim.export``) and its ``model_qdq.onnx`` is evaluated by
  plain onnxruntime in the deploy venv (onnxqat/tools/plain_ort.py accuracy); the table shows the
  difference deployed - sim in percentage points.

Each run is a fresh child process (bench/_qat_accuracy_run.py in the onnxqat venv); ``--jobs``
children run at once (default 2, each with ``--threads`` onnxruntime threads for training, default
cores / jobs), which is a throughput choice only: accuracies do not depend on it. The training
seconds in the per-run table do, and on the machine load.

Aims, printed as PASS/FAIL lines: W8A8 QAT (mean over seeds) within 0.3 points of FP32; W4A8 QAT
recovers at least half of the points W4A8 PTQ lost; range learning at least as good as fixed
ranges (means); every deployed QDQ model within 0.2 points of its sim.

The parent uses only the standard library:

    /tmp/venv/bin/python bench/bench_qat_accuracy.py [--seeds 0,1] [--epochs 2] [--jobs 2] ...

Results are printed as markdown and written to the ``bench_qat_accuracy`` section of
``--results`` (default /tmp/bench_qat_results.md); bench_qat_speed.py writes another section.
bench_qat_torch.py runs the same onnxqat children (``child_command``) next to a PyTorch QAT of the
same network.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    BENCH_DIR, PLAIN_ORT, QAT_RESULTS, REPO_DIR, RunStart, absolute_paths, add_path_args, assets_line,
    bullet_section, check, choice_list, environment_block, int_list, progress, publish, run_json, run_start,
    venv_line,
)

CHILD = os.path.join(BENCH_DIR, "_qat_accuracy_run.py")
SECTION = "bench_qat_accuracy"


# -- configuration ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    key: str
    label: str
    param_bw: int
    per_channel: bool

    @property
    def is_w8(self) -> bool:
        return self.param_bw == 8


CONFIGS = {c.key: c for c in (
    QuantConfig("w8a8-pt", "W8A8 per-tensor", 8, False),
    QuantConfig("w8a8-pc", "W8A8 per-channel", 8, True),
    QuantConfig("w4a8-pc", "W4A8 per-channel", 4, True),
)}

METHOD_LABELS = {
    "fp32": "FP32",
    "ptq": "PTQ",
    "qat": "QAT, fixed ranges",
    "qat-rl": "QAT, range learning",
    "distill": "QAT, distillation",
}


@dataclasses.dataclass(frozen=True)
class Run:
    """One child run: a method, a config (None for FP32) and a seed (None for FP32/PTQ)."""

    method: str
    config: QuantConfig | None
    seed: int | None = None
    loss: str = "cross_entropy"
    lr: float = 3e-5

    @property
    def name(self) -> str:
        parts = [self.method] + ([self.config.key] if self.config else []) + ([f"s{self.seed}"] if self.seed is not None else [])
        return "_".join(parts)

    @property
    def trains(self) -> bool:
        return self.method in ("qat", "qat-rl", "distill")


@dataclasses.dataclass
class Result:
    run: Run
    sim: float  # fraction
    deployed: float | None = None
    train_s: float | None = None
    final_loss: float | None = None


def build_runs(args: argparse.Namespace) -> list[Run]:
    configs = [CONFIGS[k] for k in args.configs]
    runs = [Run(m, c, s, lr=args.lr) for m in ("qat", "qat-rl") for c in configs for s in args.seeds]
    if args.distill_config:
        runs += [Run("distill", CONFIGS[args.distill_config], s, loss="distill", lr=args.distill_lr)
                 for s in args.distill_seeds]
    runs += [Run("ptq", c) for c in configs] + [Run("fp32", None)]
    return runs  # longest first, for the job pool


# -- running ------------------------------------------------------------------------------------


def child_command(args: argparse.Namespace, run: Run) -> list[str]:
    cmd = [args.ours_python, CHILD, "--mode", "qat" if run.trains else run.method, "--model", args.model,
           "--calib", args.calib, "--train", args.train_data, "--test", args.test_data,
           "--out-dir", os.path.join(args.work_dir, "out", run.name), "--threads", str(args.threads)]
    if run.config:
        cmd += ["--param-bw", str(run.config.param_bw), "--act-bw", "8",
                "--per-channel" if run.config.per_channel else "--no-per-channel"]
    if run.trains:
        cmd += ["--loss", run.loss, "--lr", repr(run.lr), "--seed", str(run.seed), "--epochs", str(args.epochs),
                "--batch-size", str(args.batch_size), "--train-limit", str(args.train_limit)]
        if run.method == "qat-rl":
            cmd.append("--range-learning")
    return cmd


def deployed_accuracy(args: argparse.Namespace, model_path: str) -> float:
    cmd = [args.deploy_python, PLAIN_ORT, "--threads", str(args.threads), "accuracy", model_path, args.test_data]
    return run_json(cmd)["accuracy"]


def execute(args: argparse.Namespace, run: Run) -> Result:
    start = time.perf_counter()
    report = run_json(child_command(args, run), os.path.join(args.work_dir, "logs", run.name))
    result = Result(run, report["sim_accuracy"], train_s=report.get("train_s"))
    if report.get("history"):
        result.final_loss = report["history"][-1]["loss"]
    if run.method == "fp32":
        result.deployed = deployed_accuracy(args, args.model)
    else:
        result.deployed = deployed_accuracy(args, report["qdq"])
    progress("bench_qat_accuracy", f"{run.name}: sim {100 * result.sim:.2f}%, deployed {100 * result.deployed:.2f}% "
             f"({time.perf_counter() - start:.0f} s)")
    return result


def execute_all(args: argparse.Namespace, runs: list[Run]) -> list[Result]:
    os.makedirs(os.path.join(args.work_dir, "logs"), exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        return list(pool.map(lambda r: execute(args, r), runs))


# -- analysis -----------------------------------------------------------------------------------


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def mean_of(results: list[Result], method: str, config: QuantConfig | None, attr: str = "sim") -> float | None:
    values = [getattr(r, attr) for r in results if r.run.method == method and r.run.config == config]
    return statistics.fmean(values) if values else None


def summary_table(args: argparse.Namespace, results: list[Result]) -> list[str]:
    configs = [CONFIGS[k] for k in args.configs]
    fp32 = mean_of(results, "fp32", None)
    seeds = ",".join(map(str, args.seeds))
    head = "| method | " + " | ".join(c.label for c in configs) + " |"
    lines = [head, "|---|" + "---:|" * len(configs), "| FP32 | " + " | ".join(pct(fp32) for _ in configs) + " |"]
    rows = [("ptq", "PTQ"), ("qat", f"QAT, fixed ranges (mean, seeds {seeds})"),
            ("qat-rl", f"QAT, range learning (mean, seeds {seeds})")]
    if args.distill_config:
        rows.append(("distill", f"QAT, distillation lr {args.distill_lr:g} (mean, seeds {','.join(map(str, args.distill_seeds))})"))
    for method, label in rows:
        cells = []
        for c in configs:
            sim = mean_of(results, method, c)
            cells.append("–" if sim is None else f"{pct(sim)} ({pct(mean_of(results, method, c, 'deployed'))})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def detail_table(results: list[Result]) -> list[str]:
    lines = ["| method | config | seed | sim acc % | deployed acc % (plain ORT) | deployed − sim (points) "
             "| train s | final train loss |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    order = {m: i for i, m in enumerate(METHOD_LABELS)}
    keyed = sorted(results, key=lambda r: (order[r.run.method], list(CONFIGS.values()).index(r.run.config) if r.run.config else -1,
                                           r.run.seed if r.run.seed is not None else -1))
    for r in keyed:
        diff = None if r.deployed is None else 100 * (r.deployed - r.sim)
        lines.append(
            f"| {METHOD_LABELS[r.run.method]} | {r.run.config.label if r.run.config else '–'} "
            f"| {'–' if r.run.seed is None else r.run.seed} | {pct(r.sim)} | {pct(r.deployed)} "
            f"| {'–' if diff is None else f'{diff:+.2f}'} | {'–' if r.train_s is None else f'{r.train_s:.0f}'} "
            f"| {'–' if r.final_loss is None else f'{r.final_loss:.4f}'} |"
        )
    return lines


def checks(args: argparse.Namespace, results: list[Result]) -> list[str]:
    fp32 = mean_of(results, "fp32", None)
    out = []
    methods = ["qat", "qat-rl"]
    for c in (CONFIGS[k] for k in args.configs):
        for m in methods + (["distill"] if args.distill_config == c.key else []):
            qat = mean_of(results, m, c)
            if qat is None:
                continue
            if c.is_w8:
                gap = 100 * (qat - fp32)
                out.append(check(gap >= -0.3, f"{c.label} {METHOD_LABELS[m]}: {pct(qat)}% vs FP32 {pct(fp32)}% "
                                              f"({gap:+.2f} points; aim: at most 0.3 below)"))
            else:
                ptq = mean_of(results, "ptq", c)
                lost = fp32 - ptq
                regained = qat - ptq
                share = regained / lost if lost > 0 else float("inf")
                out.append(check(lost <= 0 or share >= 0.5,
                                 f"{c.label} {METHOD_LABELS[m]}: PTQ lost {100 * lost:.2f} points, QAT regained "
                                 f"{100 * regained:.2f} ({100 * share:.0f}%; aim: at least 50%)"))
        fixed, learned = mean_of(results, "qat", c), mean_of(results, "qat-rl", c)
        if fixed is not None and learned is not None:
            out.append(check(learned >= fixed, f"{c.label} range learning {pct(learned)}% vs fixed ranges "
                                               f"{pct(fixed)}% ({100 * (learned - fixed):+.2f} points; aim: >= 0)"))
    trained = [r for r in results if r.run.trains]
    if trained:
        worst = max(trained, key=lambda r: abs(r.deployed - r.sim))
        gap = 100 * abs(worst.deployed - worst.sim)
        out.append(check(gap <= 0.2, f"deployed QDQ vs sim, all {len(trained)} QAT models: max |deployed − sim| = "
                                     f"{gap:.2f} points ({worst.run.name}; aim: <= 0.2)"))
    return out


# -- report -------------------------------------------------------------------------------------


def environment(args: argparse.Namespace, start: RunStart) -> list[str]:
    return [
        *start.environment(),
        f"jobs: {args.jobs} children at once, {args.threads} onnxruntime training thread(s) each",
        venv_line("onnxqat venv", args.ours_python, ["onnxruntime (training build)", "onnx"]),
        venv_line("deploy venv", args.deploy_python, ["onnxruntime"]),
        assets_line([args.model, args.calib, args.train_data, args.test_data]),
    ]


def render(args: argparse.Namespace, results: list[Result], env: list[str], command: str) -> str:
    n_train = args.train_limit or "all"
    return "\n".join([
        "## QAT accuracy: FP32 vs PTQ vs QAT (onnxqat)",
        "",
        f"Model `{os.path.relpath(args.model, REPO_DIR)}`; test set `{os.path.relpath(args.test_data, REPO_DIR)}` "
        f"(all images); accuracy in %. PTQ: minmax calibration on `{os.path.relpath(args.calib, REPO_DIR)}`. "
        f"QAT: {args.epochs} epoch(s) over `{os.path.relpath(args.train_data, REPO_DIR)}` ({n_train} samples), "
        f"batch {args.batch_size}, AdamW lr {args.lr:g}, cross-entropy, starting from the PTQ encodings. "
        "Cells: mean accuracy of `sim.run` (in brackets: of the exported `model_qdq.onnx` in plain onnxruntime).",
        "",
        *summary_table(args, results),
        "",
        *bullet_section("Checks", checks(args, results)),
        "### Every run",
        "",
        *detail_table(results),
        "",
        "*train s* is wall time of `fit` only and depends on machine load and `--jobs`; accuracies do not.",
        "",
        *environment_block(env, command),
    ])


# -- main ---------------------------------------------------------------------------------------


def add_qat_run_args(p: argparse.ArgumentParser) -> None:
    """What ``child_command`` reads besides the paths: training settings and parallelism."""
    p.add_argument("--seeds", type=int_list, default=[0, 1], help="shuffle seeds of the QAT runs (default 0,1)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--train-limit", type=int, default=0, help="train on the first N samples only; 0 = all 8000")
    p.add_argument("--jobs", type=int, default=2, help="child runs at once (default 2)")
    p.add_argument("--threads", type=int, default=0, help="threads per child (onnxruntime training); 0 = cores / jobs")


def finish_qat_run_args(args: argparse.Namespace) -> None:
    if args.threads <= 0:
        args.threads = max(1, (os.cpu_count() or 2) // max(1, args.jobs))
    absolute_paths(args)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", type=choice_list(list(CONFIGS), "config"), default=list(CONFIGS), help=f"comma-separated: {', '.join(CONFIGS)}")
    add_qat_run_args(p)
    p.add_argument("--distill-config", default="w4a8-pc", help="config of the distillation row; '' = none")
    p.add_argument("--distill-lr", type=float, default=1e-4)
    p.add_argument("--distill-seeds", type=int_list, default=None, help="default: --seeds")
    add_path_args(p, ["model", "calib", "train-data", "test-data"], ["ours-python", "deploy-python"],
                  work_dir="/tmp/bench_qat_accuracy", results=QAT_RESULTS)
    args = p.parse_args(argv)
    if args.distill_config and args.distill_config not in CONFIGS:
        p.error(f"--distill-config must be one of {', '.join(CONFIGS)} or ''")
    if args.distill_seeds is None:
        args.distill_seeds = args.seeds
    finish_qat_run_args(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = run_start("bench_qat_accuracy.py", argv)
    runs = build_runs(args)
    progress("bench_qat_accuracy", f"{len(runs)} runs, {args.jobs} at once")
    results = execute_all(args, runs)
    publish("bench_qat_accuracy", render(args, results, environment(args, start), start.command), args.results, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
