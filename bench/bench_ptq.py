"""PTQ benchmark: onnxqat against onnxruntime.quantization.quantize_static, side by side.

What is measured, on the shipped demo model (models/fmnist_dsconv.onnx, a 66k-parameter
depthwise-separable CNN with BatchNorm and residual Adds):

1. Calibration + export cost. Each measured run is a fresh child process, so the numbers
   include interpreter start-up and imports, as a user running a script would see them:

   * ``onnxqat``: QuantizationSimModel + compute_encodings + export, W8A8 minmax, batch 64,
     in the onnxqat venv (bench/_ours_ptq.py);
   * ``ort U8S8``: quantize_static, QDQ, QUInt8 activations, QInt8 weights, MinMax, a
     CalibrationDataReader of batches of 64, in a venv with the current onnxruntime
     (bench/_ort_quantize_static.py);
   * ``ort S8S8``: the same with quantize_static's default activation type (QInt8);
   * ``ort pre+U8S8``: quant_pre_process (ORT's recommended pre-processing: shape inference +
     basic graph optimization, which folds BatchNorm into Conv) then ``ort U8S8``.

   Calibration sets are the first N images of models/fmnist_train.npz, the same files for all
   tools. The headline is the child's wall time (parent clock, spawn to exit) and peak RSS
   (``ru_maxrss`` of that child alone, from ``os.wait4``). The child also reports ``call_s``,
   the time of the quantization call itself (model load + calibrate + export), and
   ``import_s``; ``wall - call`` is start-up + imports + loading the calibration npz.
   Every figure is the median over ``--reps`` repetitions (the spread of wall time is shown);
   the repetitions are interleaved across tools so machine noise hits all of them alike.

2. PTQ accuracy on models/fmnist_test.npz (10000 images) of each produced QDQ model, and of the
   float model, all run by plain onnxruntime in the deploy venv (onnxqat/tools/plain_ort.py),
   so every model is judged by the same runtime. Per-channel weights at every size; per-tensor
   weights at ``--per-tensor-size`` for onnxqat and ``ort U8S8``. Calibration is
   deterministic, so the model of the last repetition is the one evaluated.

3. Inference latency in plain onnxruntime of the float model and the per-channel QDQ models
   calibrated on ``--latency-size`` samples, batch 64 and batch 1, timed interleaved by
   plain_ort.py latency (median per model); the median of ``--reps`` such medians is shown,
   with the ops left after onnxruntime's own graph optimizer (bench/_ort_optimized_ops.py).

The parent uses only the standard library and runs under any Python >= 3.9 on Linux:

    /tmp/venv/bin/python bench/bench_ptq.py [--reps 3] [--sizes 64,512,4096] ...

Results are printed as markdown and written to ``--results`` (default /tmp/bench_ptq_results.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    BENCH_DIR, PLAIN_ORT, REPO_DIR, RunStart, absolute_paths, add_path_args, assets_line, environment_block,
    int_list, last_json, progress, publish, run_json, run_start, str_list, venv_line, warn_if_loaded,
)

FLOAT_LABEL = "float (FP32)"


# -- configuration ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tool:
    """One PTQ pipeline: how to launch a child that quantizes ``data`` into ``out_dir``."""

    key: str
    label: str
    python: str
    argv: Callable[[str, str, bool], list[str]]  # (data npz, out dir, per_channel) -> argv

    def qdq_path(self, out_dir: str) -> str:
        return os.path.join(out_dir, "model_qdq.onnx")


def build_tools(args: argparse.Namespace) -> dict[str, Tool]:
    model = args.model

    def ours(data: str, out_dir: str, per_channel: bool) -> list[str]:
        return [os.path.join(BENCH_DIR, "_ours_ptq.py"), "--model", model, "--data", data,
                "--out-dir", out_dir, "--batch-size", str(args.batch_size), _channel_flag(per_channel)]

    def ort(activation_type: str, preprocess: bool) -> Callable[[str, str, bool], list[str]]:
        def argv(data: str, out_dir: str, per_channel: bool) -> list[str]:
            cmd = [os.path.join(BENCH_DIR, "_ort_quantize_static.py"), "--model", model, "--data", data,
                   "--out", os.path.join(out_dir, "model_qdq.onnx"), "--batch-size", str(args.batch_size),
                   "--activation-type", activation_type, _channel_flag(per_channel)]
            return cmd + (["--preprocess"] if preprocess else [])
        return argv

    tools = [
        Tool("ours", "onnxqat", args.ours_python, ours),
        Tool("ort-u8s8", "ort U8S8", args.ort_python, ort("QUInt8", False)),
        Tool("ort-s8s8", "ort S8S8 (defaults)", args.ort_python, ort("QInt8", False)),
        Tool("ort-pre-u8s8", "ort pre+U8S8", args.ort_python, ort("QUInt8", True)),
    ]
    return {t.key: t for t in tools}


def _channel_flag(per_channel: bool) -> str:
    return "--per-channel" if per_channel else "--no-per-channel"


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured configuration: a tool, a calibration size and a weight granularity."""

    tool: Tool
    samples: int
    per_channel: bool

    @property
    def name(self) -> str:
        return f"{self.tool.key}_{self.samples}_{'pc' if self.per_channel else 'pt'}"


def build_cases(args: argparse.Namespace, tools: dict[str, Tool]) -> list[Case]:
    cases = [Case(tools[k], n, True) for n in args.sizes for k in args.tools]
    if args.per_tensor_size:
        cases += [Case(tools[k], args.per_tensor_size, False) for k in args.per_tensor_tools if k in args.tools]
    return cases


# -- child processes ----------------------------------------------------------------------------


@dataclasses.dataclass
class ChildRun:
    wall_s: float
    maxrss_kb: int
    report: dict


def run_measured(cmd: Sequence[str], log_prefix: str) -> ChildRun:
    """Run ``cmd``; return its wall time, its own peak RSS and its JSON stdout line."""
    with open(log_prefix + ".out", "w") as out, open(log_prefix + ".err", "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, cwd=REPO_DIR)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {shlex.join(cmd)}\nsee {log_prefix}.err")
    with open(log_prefix + ".out") as f:
        return ChildRun(wall, usage.ru_maxrss, last_json(f.read()))


# -- the three measurements ---------------------------------------------------------------------


def make_calibration_sets(args: argparse.Namespace) -> dict[int, str]:
    sizes = sorted(set(args.sizes) | ({args.per_tensor_size} if args.per_tensor_size else set()))
    out_dir = os.path.join(args.work_dir, "data")
    cmd = [args.ours_python, os.path.join(BENCH_DIR, "_make_calib_sets.py"), args.calib_source, out_dir]
    subprocess.run(cmd + [str(n) for n in sizes], check=True, capture_output=True)
    return {n: os.path.join(out_dir, f"calib_{n}.npz") for n in sizes}


def measure_ptq(args: argparse.Namespace, cases: list[Case], data: dict[int, str]) -> dict[str, list[ChildRun]]:
    runs: dict[str, list[ChildRun]] = {c.name: [] for c in cases}
    log_dir = os.path.join(args.work_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    for rep in range(args.reps):
        for case in cases:
            out_dir = os.path.join(args.work_dir, "out", case.name)
            cmd = [case.tool.python, *case.tool.argv(data[case.samples], out_dir, case.per_channel)]
            run = run_measured(cmd, os.path.join(log_dir, f"{case.name}_rep{rep}"))
            runs[case.name].append(run)
            _progress(f"rep {rep + 1}/{args.reps} {case.name}: {run.wall_s:.2f} s, {run.maxrss_kb / 1024:.0f} MiB")
    return runs


def measure_accuracy(args: argparse.Namespace, models: dict[str, str]) -> dict[str, float]:
    acc = {}
    for name, path in models.items():
        acc[name] = run_json([args.deploy_python, PLAIN_ORT, "accuracy", path, args.test_data])["accuracy"]
        _progress(f"accuracy {name}: {acc[name]:.4f}")
    return acc


def measure_latency(args: argparse.Namespace, models: dict[str, str]) -> dict[int, dict[str, float]]:
    """Median over reps of plain_ort.py's per-model median ms, per batch size."""
    names, paths = list(models), list(models.values())
    result = {}
    for batch, runs in ((64, args.latency_runs), (1, args.latency_runs_b1)):
        per_rep: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.reps):
            threads = ["--threads", str(args.latency_threads)] if args.latency_threads else []
            cmd = [args.deploy_python, PLAIN_ORT, *threads, "latency", *paths, "--data", args.test_data,
                   "--batch-size", str(batch), "--runs", str(runs)]
            medians = run_json(cmd)["median_ms"]
            for name, path in zip(names, paths):
                per_rep[name].append(medians[path])
        result[batch] = {n: statistics.median(v) for n, v in per_rep.items()}
        _progress(f"latency batch {batch}: " + ", ".join(f"{n} {v:.3f} ms" for n, v in result[batch].items()))
    return result


def optimized_ops(args: argparse.Namespace, models: dict[str, str]) -> dict[str, dict[str, int]]:
    out_dir = os.path.join(args.work_dir, "optimized")
    counts = run_json([args.ort_python, os.path.join(BENCH_DIR, "_ort_optimized_ops.py"), out_dir,
                       *models.values()])
    return {name: counts[path] for name, path in models.items()}


def _progress(message: str) -> None:
    progress("bench_ptq", message)


# -- environment --------------------------------------------------------------------------------


def environment_lines(args: argparse.Namespace, start: RunStart) -> list[str]:
    return [
        *start.environment(),
        venv_line("onnxqat venv", args.ours_python, ["onnxruntime (training build)", "onnx", "numpy"]),
        venv_line("peer venv", args.ort_python, ["onnxruntime", "onnx", "numpy"]),
        venv_line("deploy venv", args.deploy_python, ["onnxruntime"]),
        assets_line([args.model, args.calib_source, args.test_data]),
    ]


# -- report -------------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ptq_table(cases: list[Case], runs: dict[str, list[ChildRun]], acc: dict[str, float]) -> list[str]:
    lines = [
        "| tool | weights | calib samples | wall s (min–max) | quantize call s | wall − call s "
        "| peak RSS MiB | test acc |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in sorted(cases, key=lambda c: (not c.per_channel, c.samples)):
        rs = runs[case.name]
        walls = [r.wall_s for r in rs]
        calls = [r.report["call_s"] for r in rs]
        overhead = [r.wall_s - r.report["call_s"] for r in rs]
        lines.append(
            f"| {case.tool.label} | {'per-channel' if case.per_channel else 'per-tensor'} | {case.samples} "
            f"| {_median(walls):.2f} ({min(walls):.2f}–{max(walls):.2f}) | {_median(calls):.2f} "
            f"| {_median(overhead):.2f} | {_median([r.maxrss_kb for r in rs]) / 1024:.0f} "
            f"| {acc[case.name]:.4f} |"
        )
    lines.append(f"| {FLOAT_LABEL} | – | – | – | – | – | – | {acc[FLOAT_LABEL]:.4f} |")
    return lines


def latency_table(latency: dict[int, dict[str, float]], ops: dict[str, dict[str, int]]) -> list[str]:
    lines = ["| model | batch 64 ms | batch 1 ms | ops after ORT graph optimization |", "|---|---:|---:|---|"]
    for name in latency[64]:
        op_list = ", ".join(f"{op.replace('com.microsoft.', 'ms.')}×{n}" for op, n in ops.get(name, {}).items())
        lines.append(f"| {name} | {latency[64][name]:.3f} | {latency[1][name]:.3f} | {op_list} |")
    return lines


def render(args: argparse.Namespace, sections: dict[str, list[str]], command: str) -> str:
    parts = [
        "## PTQ: onnxqat vs onnxruntime.quantization.quantize_static",
        "",
        f"Model: `{os.path.relpath(args.model, REPO_DIR)}`; calibration: first N images of "
        f"`{os.path.relpath(args.calib_source, REPO_DIR)}`, batch {args.batch_size}; W8A8 MinMax. "
        f"Medians of {args.reps} runs, each a fresh process. *wall* = child process spawn to exit; "
        "*quantize call* = model load + calibration + export inside the child; *wall − call* = "
        "interpreter start-up + imports + loading the calibration npz; *peak RSS* = ru_maxrss of the child. "
        "Accuracy: plain onnxruntime on the 10000 test images. "
        "`ort pre+U8S8` = quant_pre_process (BatchNorm folding) then quantize_static.",
        "",
        *sections["ptq"],
        "",
        f"### Inference latency (plain onnxruntime, calibrated on {args.latency_size} samples, per-channel)",
        "",
        f"Median ms per batch, intra-op threads: {args.latency_threads or 'onnxruntime default'}; batch 64: {args.latency_runs} runs, batch 1: {args.latency_runs_b1} runs, "
        f"models interleaved, median of {args.reps} such medians. `ms.` = com.microsoft domain.",
        "",
        *sections["latency"],
        "",
        *environment_block(sections["env"], command),
    ]
    return "\n".join(parts)


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3, help="repetitions per measurement (default 3)")
    p.add_argument("--sizes", type=int_list, default=[64, 512, 4096], help="calibration sizes, comma-separated")
    p.add_argument("--per-tensor-size", type=int, default=512, help="calibration size of the per-tensor runs; 0 = none")
    p.add_argument("--tools", type=str_list, default=["ours", "ort-u8s8", "ort-s8s8", "ort-pre-u8s8"],
                   help="tools to run: ours, ort-u8s8, ort-s8s8, ort-pre-u8s8")
    p.add_argument("--per-tensor-tools", type=str_list, default=["ours", "ort-u8s8"])
    p.add_argument("--batch-size", type=int, default=64, help="calibration batch size")
    p.add_argument("--latency-size", type=int, default=512, help="calibration size of the models timed")
    p.add_argument("--latency-runs", type=int, default=30, help="timed runs per model at batch 64")
    p.add_argument("--latency-runs-b1", type=int, default=300, help="timed runs per model at batch 1")
    p.add_argument("--latency-threads", type=int, default=0,
                   help="intra-op threads for the latency runs; 0 = onnxruntime's default (one per core)")
    add_path_args(p, ["model", "calib-source", "test-data"], ["ours-python", "ort-python", "deploy-python"],
                  work_dir="/tmp/bench_ptq", results="/tmp/bench_ptq_results.md")
    args = p.parse_args(argv)
    if args.latency_size not in args.sizes:
        p.error(f"--latency-size {args.latency_size} must be one of --sizes")
    absolute_paths(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = run_start("bench_ptq.py", argv)
    warn_if_loaded("bench_ptq")
    tools = build_tools(args)
    cases = build_cases(args, tools)
    data = make_calibration_sets(args)

    runs = measure_ptq(args, cases, data)
    qdq_models = {c.name: c.tool.qdq_path(os.path.join(args.work_dir, "out", c.name)) for c in cases}
    acc = measure_accuracy(args, {FLOAT_LABEL: args.model, **qdq_models})

    timed = {FLOAT_LABEL: args.model}
    timed.update({c.tool.label: qdq_models[c.name] for c in cases
                  if c.per_channel and c.samples == args.latency_size})
    latency = measure_latency(args, timed)
    ops = optimized_ops(args, timed)

    sections = {"ptq": ptq_table(cases, runs, acc), "latency": latency_table(latency, ops),
                "env": environment_lines(args, start)}
    publish("bench_ptq", render(args, sections, start.command), args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
