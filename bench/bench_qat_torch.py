"""QAT accuracy, onnxqat vs PyTorch QAT of the same network: PTQ and final test accuracy.

What is compared, on the demo model (models/fmnist_dsconv.onnx) and the Fashion-MNIST test set
(models/fmnist_test.npz, 10000 images; every accuracy is top-1 on all of it), per quantization
config (default W4A8 per-channel and W8A8 per-channel; weights symmetric int, activations
asymmetric uint8, BatchNorm folded), per method (default: fixed ranges, range learning) and per
shuffle seed (default 0 and 1):

* onnxqat: exactly bench_qat_accuracy.py's runs (its child bench/_qat_accuracy_run.py in the onnxqat
  venv): ``compute_encodings`` (minmax) on models/fmnist_calib.npz, PTQ accuracy of ``sim.run``,
  then ``sim.trainer(loss="cross_entropy", lr=3e-5, range_learning=...)`` (AdamW, weight decay 0)
  for ``--epochs`` epochs over models/fmnist_train.npz in batches of ``--batch-size`` shuffled by
  ``NpzBatches(shuffle=True, seed=SEED)``, accuracy of ``sim.run`` afterwards; plus the FP32 model;
* torch: the same network written in PyTorch eager (bench/_qat_torch_run.py in the torch venv,
  on bench/_qat_speed_torch.py's network and quantizers): the shipped weights with BatchNorm
  folded, the same calibration file and min/max rule (AIMET scale/offset), fake quantization at
  the same places, weight scales recomputed every step with a straight-through estimator, int32
  biases, the same batches in the same order, cross-entropy, ``torch.optim.AdamW`` (lr 3e-5,
  eps 1e-6 as onnxruntime-training's, weight decay 0); fixed ranges use
  ``torch.fake_quantize_per_tensor_affine``, range learning PyTorch's LSQ kernel.

The onnxqat PTQ runs go first: the torch runs compare their own calibration with the encodings
onnxqat exported (activation scales and zero points, per-channel weight scales), so both provably
start from the same point. Each run is a fresh child process; ``--jobs`` run at once (default 2,
each with ``--threads`` threads, default cores / jobs), a throughput choice only: accuracies do not
depend on it, the training seconds do (and on machine load).

Aims, printed as PASS/FAIL lines: torch's calibration equals onnxqat's (scales within 1e-5
relative, identical zero points); torch PTQ within 0.2 points of onnxqat PTQ; torch QAT (mean over
seeds) within 0.3 points of onnxqat QAT, per config and method.

The parent uses only the standard library:

    /tmp/venv/bin/python bench/bench_qat_torch.py [--configs w4a8-pc,w8a8-pc] [--seeds 0,1] ...

Results are printed as markdown and written to the ``bench_qat_torch`` section of ``--results``
(default /tmp/bench_qat_torch_results.md).
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
    BENCH_DIR, REPO_DIR, RunStart, add_path_args, assets_line, bullet_section, check, choice_list,
    environment_block, progress, publish, run_json, run_start, venv_line,
)
from bench_qat_accuracy import (  # noqa: E402
    CONFIGS, METHOD_LABELS, QuantConfig, Run, add_qat_run_args, child_command, finish_qat_run_args,
)

TORCH_CHILD = os.path.join(BENCH_DIR, "_qat_torch_run.py")
SECTION = "bench_qat_torch"
TORCH_VARIANT = {"qat": "qat-fixed", "qat-rl": "qat-rl"}
FRAMEWORKS = ("onnxqat", "torch")


@dataclasses.dataclass(frozen=True)
class Job:
    framework: str
    run: Run

    @property
    def name(self) -> str:
        return f"{self.framework}_{self.run.name}"


def build_jobs(args: argparse.Namespace) -> tuple[list[Job], list[Job]]:
    """(reference runs: onnxqat PTQ per config and FP32; training runs, longest first)."""
    configs = [CONFIGS[k] for k in args.configs]
    reference = [Job("onnxqat", Run("ptq", c)) for c in configs] + [Job("onnxqat", Run("fp32", None))]
    training = [Job(fw, Run(m, c, s, lr=args.lr)) for c, m in settings(args) for s in args.seeds for fw in FRAMEWORKS]
    return reference, training


def torch_command(args: argparse.Namespace, run: Run) -> list[str]:
    assert run.config is not None and run.seed is not None
    reference = os.path.join(args.work_dir, "out", Run("ptq", run.config).name, "model.encodings")
    return [args.torch_python, TORCH_CHILD, "--model", args.model, "--calib", args.calib, "--train", args.train_data,
            "--test", args.test_data, "--variant", TORCH_VARIANT[run.method], "--param-bw", str(run.config.param_bw),
            "--per-channel" if run.config.per_channel else "--no-per-channel", "--lr", repr(run.lr),
            "--eps", repr(args.torch_eps), "--seed", str(run.seed), "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--train-limit", str(args.train_limit),
            "--threads", str(args.threads), "--reference-encodings", reference]


def execute(args: argparse.Namespace, job: Job) -> tuple[Job, dict]:
    start = time.perf_counter()
    cmd = torch_command(args, job.run) if job.framework == "torch" else child_command(args, job.run)
    report = run_json(cmd, os.path.join(args.work_dir, "logs", job.name))
    before = f"PTQ {100 * report['ptq_accuracy']:.2f}%, " if "ptq_accuracy" in report else ""
    progress("bench_qat_torch", f"{job.name}: {before}final {100 * report['sim_accuracy']:.2f}% "
             f"({time.perf_counter() - start:.0f} s)")
    return job, report


def execute_all(args: argparse.Namespace, *phases: list[Job]) -> dict[str, dict]:
    os.makedirs(os.path.join(args.work_dir, "logs"), exist_ok=True)
    reports: dict[str, dict] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for jobs in phases:
            reports.update((job.name, report) for job, report in pool.map(lambda j: execute(args, j), jobs))
    return reports


# -- analysis -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """Accuracies (fractions) of one config and method, per framework."""

    ptq: dict[str, float]
    final: dict[str, list[float]]  # per seed, in --seeds order

    def mean(self, framework: str) -> float:
        return statistics.fmean(self.final[framework])


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def outcome(args: argparse.Namespace, reports: dict[str, dict], config: QuantConfig, method: str) -> Outcome:
    runs = {fw: [reports[Job(fw, Run(method, config, s, lr=args.lr)).name] for s in args.seeds] for fw in FRAMEWORKS}
    return Outcome(
        ptq={"onnxqat": reports[Job("onnxqat", Run("ptq", config)).name]["sim_accuracy"],
             "torch": runs["torch"][0]["ptq_accuracy"]},
        final={fw: [r["sim_accuracy"] for r in rs] for fw, rs in runs.items()},
    )


def settings(args: argparse.Namespace) -> list[tuple[QuantConfig, str]]:
    """(config, QAT method) pairs in report order."""
    return [(CONFIGS[key], method) for key in args.configs for method in args.methods]


def summary_table(args: argparse.Namespace, reports: dict[str, dict]) -> list[str]:
    seeds = ", ".join(map(str, args.seeds))
    lines = [f"| config | QAT method | PTQ onnxqat | PTQ torch | QAT onnxqat (seeds {seeds}) | mean "
             f"| QAT torch (seeds {seeds}) | mean | torch − onnxqat (points) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for config, method in settings(args):
        o = outcome(args, reports, config, method)
        seeds_of = {fw: ", ".join(pct(x) for x in o.final[fw]) for fw in FRAMEWORKS}
        lines.append(f"| {config.label} | {METHOD_LABELS[method]} | {pct(o.ptq['onnxqat'])} "
                     f"| {pct(o.ptq['torch'])} | {seeds_of['onnxqat']} | {pct(o.mean('onnxqat'))} "
                     f"| {seeds_of['torch']} | {pct(o.mean('torch'))} "
                     f"| {100 * (o.mean('torch') - o.mean('onnxqat')):+.2f} |")
    return lines


def detail_table(args: argparse.Namespace, reports: dict[str, dict]) -> list[str]:
    lines = ["| framework | config | QAT method | seed | PTQ acc % | final acc % | train s | mean train loss per epoch |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for config, method in settings(args):
        for seed in args.seeds:
            for fw in FRAMEWORKS:
                r = reports[Job(fw, Run(method, config, seed, lr=args.lr)).name]
                losses = ", ".join(f"{h['loss']:.4f}" for h in r.get("history", []))
                lines.append(f"| {fw} | {config.label} | {METHOD_LABELS[method]} | {seed} "
                             f"| {pct(r.get('ptq_accuracy'))} | {pct(r['sim_accuracy'])} "
                             f"| {r['train_s']:.0f} | {losses} |")
    return lines


def torch_reports(args: argparse.Namespace, reports: dict[str, dict], config: QuantConfig) -> list[dict]:
    return [reports[Job("torch", Run(m, config, s, lr=args.lr)).name] for m in args.methods for s in args.seeds]


def calibration_lines(args: argparse.Namespace, reports: dict[str, dict]) -> list[str]:
    out = []
    for key in args.configs:
        ref = torch_reports(args, reports, CONFIGS[key])[0]["reference_check"]
        out.append(f"{CONFIGS[key].label}: {ref['activations']} activation encodings compared, max relative scale "
                   f"difference {ref['max_rel_scale_diff']:.1e}, zero points differing: "
                   f"{'; '.join(ref['zero_point_mismatches']) or 'none'}; {ref['weights']} weight tensors, max "
                   f"relative per-channel scale difference {ref['max_rel_weight_scale_diff']:.1e}")
    return out


def checks(args: argparse.Namespace, reports: dict[str, dict]) -> list[str]:
    out = []
    for key in args.configs:
        c = CONFIGS[key]
        ref = torch_reports(args, reports, c)[0]["reference_check"]
        same = not ref["missing"] and not ref["zero_point_mismatches"] and ref["max_rel_scale_diff"] <= 1e-5 \
            and ref["max_rel_weight_scale_diff"] <= 1e-5
        out.append(check(same, f"{c.label} calibration: torch's encodings equal onnxqat's (scales within 1e-5 "
                               "relative, same zero points)"))
        runs = torch_reports(args, reports, c)
        same_ptq = len({r["ptq_accuracy"] for r in runs}) == 1
        o = outcome(args, reports, c, args.methods[0])
        gap = 100 * (o.ptq["torch"] - o.ptq["onnxqat"])
        out.append(check(abs(gap) <= 0.2 and same_ptq,
                         f"{c.label} PTQ: torch {pct(o.ptq['torch'])}% vs onnxqat {pct(o.ptq['onnxqat'])}% "
                         f"({gap:+.2f} points; aim: within 0.2; torch PTQ "
                         f"{'the same' if same_ptq else 'DIFFERENT'} in its {len(runs)} runs)"))
        for method in args.methods:
            o = outcome(args, reports, c, method)
            gap = 100 * (o.mean("torch") - o.mean("onnxqat"))
            out.append(check(abs(gap) <= 0.3, f"{c.label} {METHOD_LABELS[method]}: torch {pct(o.mean('torch'))}% vs "
                                              f"onnxqat {pct(o.mean('onnxqat'))}% ({gap:+.2f} points; aim: within 0.3)"))
    return out


# -- report -------------------------------------------------------------------------------------


NOTES = [
    "Same in both: float weights (BatchNorm folded), calibration data and rule, quantizer placement "
    "(24 activation quantizers before the loss, 16 weight quantizers, 16 int32 biases), the batches and "
    "their order, loss, optimizer hyper-parameters; see the calibration lines above.",
    "AdamW: onnxruntime-training's AdamW (adam_mode 1, the Hugging Face form) adds eps to sqrt(v) before "
    "bias correction, torch.optim.AdamW to the bias-corrected sqrt(v̂); with eps 1e-6 in both this differs "
    "only in the first steps' effective eps.",
    "A Relu feeding a quantizer whose grid starts at 0 is dropped by onnxqat (the quantizer's clamp "
    "does the same in the forward pass), so its straight-through gradient also passes for inputs in "
    "(−scale/2, 0); the torch network keeps the Relu.",
    "Range learning is not parametrised alike: onnxqat learns log(scale) (gain 10) and a zero-point "
    "offset (not for quantizers after a Relu); the torch model uses PyTorch's LSQ kernel on the raw scale "
    "and zero point (grad factor 1) with the same learning rate. Fixed ranges are the like-for-like row.",
    "Float arithmetic differs (onnxruntime vs PyTorch kernels), so the two trajectories drift apart "
    "after the first steps; the spread over seeds shows how much that alone moves the final accuracy.",
]


def environment(args: argparse.Namespace, start: RunStart, reports: dict[str, dict]) -> list[str]:
    torch_report = next(r for name, r in reports.items() if name.startswith("torch_"))
    return [
        *start.environment(),
        f"jobs: {args.jobs} children at once, {args.threads} thread(s) each (onnxruntime training / torch)",
        venv_line("onnxqat venv", args.ours_python, ["onnxruntime (training build)", "onnx"]),
        venv_line("torch venv", args.torch_python, ["torch", "numpy"])
        + f"; memory format channels_last; {torch_report['quantizers']} activation quantizers",
        assets_line([args.model, args.calib, args.train_data, args.test_data]),
    ]


def render(args: argparse.Namespace, reports: dict[str, dict], env: list[str], command: str) -> str:
    n_train = args.train_limit or "all"
    fp32 = reports[Job("onnxqat", Run("fp32", None)).name]["sim_accuracy"]
    torch_fp32 = {r["float_accuracy"] for name, r in reports.items() if name.startswith("torch_")}
    return "\n".join([
        "## QAT accuracy: onnxqat vs PyTorch QAT of the same network",
        "",
        f"Model `{os.path.relpath(args.model, REPO_DIR)}`, BatchNorm folded; test set "
        f"`{os.path.relpath(args.test_data, REPO_DIR)}` (all images); accuracy in %. Both start from the same float "
        f"weights and minmax calibration on `{os.path.relpath(args.calib, REPO_DIR)}` (PTQ columns), then train "
        f"{args.epochs} epoch(s) over `{os.path.relpath(args.train_data, REPO_DIR)}` ({n_train} samples) in the same "
        f"shuffled batches of {args.batch_size}, cross-entropy, AdamW lr {args.lr:g}, weight decay 0. onnxqat: "
        "`sim.run` after `sim.trainer(...).fit` (onnxruntime-training); torch: the eager fake-quant model "
        "(bench/_qat_torch_run.py).",
        "",
        f"FP32: {pct(fp32)} (model file, onnxruntime); torch float network, BatchNorm folded: "
        f"{', '.join(pct(x) for x in sorted(torch_fp32))}.",
        "",
        *summary_table(args, reports),
        "",
        *bullet_section("Checks", checks(args, reports)),
        *bullet_section("Calibration: torch vs onnxqat's exported encodings", calibration_lines(args, reports)),
        "### Every run",
        "",
        *detail_table(args, reports),
        "",
        "*train s* is wall time of training only and depends on machine load and `--jobs`; accuracies do not.",
        "",
        *bullet_section("Known differences", NOTES),
        *environment_block(env, command),
    ])


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", type=choice_list(list(CONFIGS), "config"), default=["w4a8-pc", "w8a8-pc"],
                   help=f"comma-separated: {', '.join(CONFIGS)} (default w4a8-pc,w8a8-pc)")
    p.add_argument("--methods", type=choice_list(list(TORCH_VARIANT), "method"), default=list(TORCH_VARIANT),
                   help="qat (fixed ranges), qat-rl (range learning); default both")
    add_qat_run_args(p)
    p.add_argument("--torch-eps", type=float, default=1e-6, help="torch AdamW eps (default onnxruntime-training's 1e-6)")
    add_path_args(p, ["model", "calib", "train-data", "test-data"], ["ours-python", "torch-python"],
                  work_dir="/tmp/bench_qat_torch", results="/tmp/bench_qat_torch_results.md")
    args = p.parse_args(argv)
    finish_qat_run_args(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = run_start("bench_qat_torch.py", argv)
    reference, training = build_jobs(args)
    progress("bench_qat_torch", f"{len(reference)} reference runs, then {len(training)} training runs, {args.jobs} at once")
    reports = execute_all(args, reference, training)
    publish("bench_qat_torch", render(args, reports, environment(args, start, reports), start.command), args.results,
            SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
