"""QAT training speed benchmark: onnxqat (onnxruntime-training) vs the same QAT in PyTorch eager.

What is measured: milliseconds per training step on the demo model (models/fmnist_dsconv.onnx,
BatchNorm folded into the convs), W8A8 per-channel, cross-entropy, AdamW lr 3e-5 (weight decay 0),
at batch 32 and 128 (``--batches``). A step = forward + backward + optimizer step + gradient reset,
on a batch already converted to the framework's input form; data loading is not timed.

Six variants, two long-lived worker processes:

* ``ort float``, ``ort qat-fixed``, ``ort qat-rl``: onnxqat's trainer in the onnxqat venv
  (bench/_qat_speed_ort.py): float training of the same folded graph (``quantized=False``),
  QAT with fixed activation encodings, QAT with range learning;
* ``torch float``, ``torch qat-fixed``, ``torch qat-rl``: the same network written in PyTorch eager
  in the torch venv (bench/_qat_speed_torch.py, see its docstring): ``FashionDSNet`` with the
  shipped weights and BatchNorm folded, fake quantization at onnxqat's places (per-channel int8
  weights recomputed every step with a straight-through estimator, int32 biases, uint8
  activations via ``torch.fake_quantize_per_tensor_affine`` or, for range learning, LSQ with
  PyTorch's fused learnable kernel), channels_last memory format (``--torch-memory-format``).

Both use ``--threads`` intra-op threads (onnxruntime ``intra_op_num_threads`` /
``torch.set_num_threads``), default 2. Each worker builds its variants once, then the parent asks
for timings: per repetition (``--reps``) and batch size, every variant in turn runs ``--warmup``
untimed steps then ``--steps`` timed ones (fewer only if a block exceeds ``--max-block-seconds``,
which happens on a loaded machine), and the median step time is kept. The variant order is
rotated every repetition, so machine noise is spread over all of them; the table shows the median
of the ``--reps`` medians, their range, and the best (lowest) one, which is the closest to what an
idle machine gives. ``--pause`` seconds separate the blocks so one worker's spinning threads do not
overlap the next block.

Ratios (from the medians of medians), with aims printed as PASS/FAIL lines: ORT QAT / ORT float
< 1.5 and ORT QAT / torch QAT <= 1.0, for fixed ranges and range learning, at every batch size.

The parent uses only the standard library:

    /tmp/venv/bin/python bench/bench_qat_speed.py [--reps 3] [--batches 32,128] [--steps 50] ...

Results are printed as markdown and written to the ``bench_qat_speed`` section of ``--results``
(default /tmp/bench_qat_results.md); bench_qat_accuracy.py writes another section.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    BENCH_DIR, QAT_RESULTS, REPO_DIR, RunStart, absolute_paths, add_path_args, bullet_section, check, choice_list,
    environment_block, file_digest, int_list, load_average, package_version, progress, publish, run_start,
    warn_if_loaded,
)

SECTION = "bench_qat_speed"
ALL_VARIANTS = ("ort:float", "ort:qat-fixed", "ort:qat-rl", "torch:float", "torch:qat-fixed", "torch:qat-rl")
LABELS = {
    "ort:float": "ORT float (onnxqat, no fake-quant)",
    "ort:qat-fixed": "ORT QAT, fixed ranges (onnxqat)",
    "ort:qat-rl": "ORT QAT, range learning (onnxqat)",
    "torch:float": "torch float (eager)",
    "torch:qat-fixed": "torch QAT, fixed ranges (eager)",
    "torch:qat-rl": "torch QAT, LSQ range learning (eager)",
}
# (numerator, denominator, aim as (operator, bound) or None for context only)
RATIOS = (
    ("ort:qat-fixed", "ort:float", ("<", 1.5)),
    ("ort:qat-rl", "ort:float", ("<", 1.5)),
    ("ort:qat-fixed", "torch:qat-fixed", ("<=", 1.0)),
    ("ort:qat-rl", "torch:qat-rl", ("<=", 1.0)),
    ("ort:float", "torch:float", None),
    ("torch:qat-fixed", "torch:float", None),
    ("torch:qat-rl", "torch:float", None),
)


# -- workers ------------------------------------------------------------------------------------


class Worker:
    """A long-lived worker process answering timing requests (see bench/_qat_speed_common.py)."""

    def __init__(self, name: str, cmd: list[str], log_path: str):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, bufsize=1, cwd=REPO_DIR)
        self.hello = self._read()["hello"]

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit(f"worker {self.name} exited ({self.proc.wait()}); see {self.log_path}")
            if line.startswith("{"):
                reply = json.loads(line)
                if not reply.get("ok"):
                    raise SystemExit(f"worker {self.name} failed:\n{reply.get('error')}")
                return reply

    def time(self, variant: str, batch: int, warmup: int, steps: int, max_seconds: float) -> list[float]:
        request = {"cmd": "time", "variant": variant, "batch": batch, "warmup": warmup, "steps": steps,
                   "max_seconds": max_seconds}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()["ms"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def start_workers(args: argparse.Namespace) -> dict[str, Worker]:
    logs = os.path.join(args.work_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    wanted = {fw: [v.split(":", 1)[1] for v in args.variants if v.startswith(fw + ":")] for fw in ("ort", "torch")}
    common = ["--model", args.model, "--train", args.train_data, "--threads", str(args.threads), "--lr", repr(args.lr)]
    commands = {
        "ort": [args.ours_python, os.path.join(BENCH_DIR, "_qat_speed_ort.py"), *common, "--calib", args.calib],
        "torch": [args.torch_python, os.path.join(BENCH_DIR, "_qat_speed_torch.py"), *common,
                  "--memory-format", args.torch_memory_format, "--optimizer-impl", args.torch_optimizer_impl],
    }
    workers = {}
    for fw, variants in wanted.items():
        if variants:
            progress("bench_qat_speed", f"starting {fw} worker ({', '.join(variants)})")
            workers[fw] = Worker(fw, commands[fw] + ["--variants", ",".join(variants)], os.path.join(logs, f"{fw}.log"))
    return workers


# -- measurement --------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    rep_medians: list[float] = dataclasses.field(default_factory=list)
    counts: list[int] = dataclasses.field(default_factory=list)  # timed steps per repetition

    @property
    def median(self) -> float:
        return statistics.median(self.rep_medians)

    @property
    def best(self) -> float:
        return min(self.rep_medians)


def measure(args: argparse.Namespace, workers: dict[str, Worker]) -> tuple[dict[tuple[str, int], Timing], list[str]]:
    timings = {(v, b): Timing() for v in args.variants for b in args.batches}
    loads = []
    for rep in range(args.reps):
        order = args.variants[rep % len(args.variants):] + args.variants[:rep % len(args.variants)]
        for batch in args.batches:
            for variant in order:
                fw, name = variant.split(":", 1)
                ms = workers[fw].time(name, batch, args.warmup, args.steps, args.max_block_seconds)
                t = timings[(variant, batch)]
                t.rep_medians.append(statistics.median(ms))
                t.counts.append(len(ms))
                progress("bench_qat_speed", f"rep {rep + 1}/{args.reps} batch {batch} {variant}: "
                         f"median {t.rep_medians[-1]:.2f} ms over {len(ms)} steps")
                time.sleep(args.pause)
        loads.append(load_average())
    return timings, loads


# -- report -------------------------------------------------------------------------------------


def step_table(args: argparse.Namespace, timings: dict[tuple[str, int], Timing]) -> list[str]:
    head = "| variant | " + " | ".join(f"batch {b}: ms/step (range) | best | ms/sample" for b in args.batches) + " |"
    lines = [head, "|---|" + "---:|---:|---:|" * len(args.batches)]
    for v in args.variants:
        cells = []
        for b in args.batches:
            t = timings[(v, b)]
            cells.append(f"{t.median:.1f} ({min(t.rep_medians):.1f}–{max(t.rep_medians):.1f}) | {t.best:.1f} "
                         f"| {t.median / b:.3f}")
        lines.append(f"| {LABELS[v]} | " + " | ".join(cells) + " |")
    return lines


def short_blocks(args: argparse.Namespace, timings: dict[tuple[str, int], Timing]) -> list[str]:
    cut = [f"{v} batch {b}: {min(t.counts)}" for (v, b), t in timings.items() if min(t.counts) < args.steps]
    if not cut:
        return []
    return ["", f"Blocks cut short by `--max-block-seconds {args.max_block_seconds:g}` (fewest timed steps): "
            + "; ".join(cut) + "."]


def available_ratios(args: argparse.Namespace) -> list[tuple[str, str, tuple[str, float] | None]]:
    return [r for r in RATIOS if r[0] in args.variants and r[1] in args.variants]


def ratio_table(args: argparse.Namespace, timings: dict[tuple[str, int], Timing]) -> list[str]:
    head = "| ratio | " + " | ".join(f"batch {b} (best reps)" for b in args.batches) + " | aim |"
    lines = [head, "|---|" + "---:|" * len(args.batches) + "---|"]
    for num, den, aim in available_ratios(args):
        cells = [f"{timings[(num, b)].median / timings[(den, b)].median:.2f} "
                 f"({timings[(num, b)].best / timings[(den, b)].best:.2f})" for b in args.batches]
        aim_text = f"{aim[0]} {aim[1]:g}" if aim else "context"
        lines.append(f"| {LABELS[num]} / {LABELS[den]} | " + " | ".join(cells) + f" | {aim_text} |")
    return lines


def checks(args: argparse.Namespace, timings: dict[tuple[str, int], Timing]) -> list[str]:
    out = []
    for num, den, aim in available_ratios(args):
        if aim is None:
            continue
        for b in args.batches:
            ratio = timings[(num, b)].median / timings[(den, b)].median
            ok = ratio < aim[1] if aim[0] == "<" else ratio <= aim[1]
            out.append(check(ok, f"batch {b}: {num} / {den} = {ratio:.2f} (aim {aim[0]} {aim[1]:g})"))
    return out


def environment(args: argparse.Namespace, workers: dict[str, Worker], start: RunStart, loads: list[str]) -> list[str]:
    lines = [
        *start.environment(f"after each repetition: {' | '.join(loads)}"),
        f"threads: {args.threads} (onnxruntime intra_op_num_threads, torch.set_num_threads)",
    ]
    if "ort" in workers:
        lines.append(f"onnxqat venv ({args.ours_python}): onnxruntime {workers['ort'].hello['onnxruntime']} "
                     f"(training build); trained tensors per variant: {workers['ort'].hello['trainable']}")
    if "torch" in workers:
        h = workers["torch"].hello
        lines.append(f"torch venv ({args.torch_python}): torch {h['torch']}, numpy "
                     f"{package_version(args.torch_python, 'numpy')}; memory format {h['memory_format']}, "
                     f"AdamW implementation: {h['optimizer_impl']}; {h['quantizers']} activation quantizers")
    lines.append(f"model: {os.path.basename(args.model)} {file_digest(args.model)} (sha256 prefix)")
    return lines


def render(args: argparse.Namespace, timings: dict[tuple[str, int], Timing], env: list[str], command: str) -> str:
    return "\n".join([
        "## QAT training speed: onnxqat (onnxruntime-training) vs PyTorch eager",
        "",
        f"W8A8 per-channel, BatchNorm folded, cross-entropy, AdamW lr {args.lr:g}. ms per step (forward + "
        f"backward + optimizer step): per repetition the median of {args.steps} steps after {args.warmup} "
        f"warm-up steps; shown: the median over {args.reps} interleaved repetitions (range of the repetition "
        "medians) and the best repetition. *ms/sample* = median / batch.",
        *short_blocks(args, timings),
        "",
        *step_table(args, timings),
        "",
        "Ratios of median step times (in brackets: of the best repetitions):",
        "",
        *ratio_table(args, timings),
        "",
        *bullet_section("Checks", checks(args, timings)),
        *environment_block(env, command),
    ])


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    p.add_argument("--batches", type=int_list, default=[32, 128], help="batch sizes (default 32,128)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before each timed block")
    p.add_argument("--steps", type=int, default=50, help="timed steps per block")
    p.add_argument("--variants", type=choice_list(ALL_VARIANTS, "variant"), default=list(ALL_VARIANTS), help=", ".join(ALL_VARIANTS))
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of both frameworks")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--pause", type=float, default=0.5, help="seconds between timed blocks")
    p.add_argument("--max-block-seconds", type=float, default=20.0,
                   help="cut a block's timed steps (warm-up: half) after this long, keeping at least 10 (3); "
                        "0 = never. Only matters on a loaded machine")
    p.add_argument("--torch-memory-format", choices=("channels_last", "contiguous"), default="channels_last")
    p.add_argument("--torch-optimizer-impl", choices=("default", "foreach", "fused", "for-loop"), default="default")
    add_path_args(p, ["model", "calib", "train-data"], ["ours-python", "torch-python"],
                  work_dir="/tmp/bench_qat_speed", results=QAT_RESULTS)
    args = p.parse_args(argv)
    absolute_paths(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = run_start("bench_qat_speed.py", argv)
    warn_if_loaded("bench_qat_speed")
    workers = start_workers(args)
    try:
        timings, loads = measure(args, workers)
        env = environment(args, workers, start, loads)
    finally:
        for worker in workers.values():
            worker.close()
    publish("bench_qat_speed", render(args, timings, env, start.command), args.results, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
