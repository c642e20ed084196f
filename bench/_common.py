"""Shared by the benchmark parents bench_ptq.py, bench_qat_accuracy.py, bench_qat_speed.py and
bench_qat_torch.py (standard library only, so the parents run under any Python >= 3.9).

Repository paths, default data files and interpreters (``add_path_args``), comma-separated list
arguments, running children that print one JSON line, progress messages, and the report: its
environment lines (machine, onnxqat code at start and end, load, wall time: ``run_start``;
package versions, asset digests), PASS/FAIL and bullet lines, the closing "Environment /
Reproduce" block, and the results file (``publish``). bench_ptq.py writes a whole file; the QAT
benchmarks each write their own section between marker comments (bench_qat_accuracy.py and
bench_qat_speed.py into one file by default), so any of them can be re-run alone without losing
the others' results.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
MODELS_DIR = os.path.join(REPO_DIR, "models")
PLAIN_ORT = os.path.join(REPO_DIR, "onnxqat", "tools", "plain_ort.py")
QAT_RESULTS = "/tmp/bench_qat_results.md"
TORCH_PYTHONS = ("/tmp/torch_bench_venv/bin/python", "/tmp/demo_torchvenv/bin/python")


def default_torch_python() -> str:
    """The first of TORCH_PYTHONS that exists (the brief's venv, else the demo's)."""
    return next((p for p in TORCH_PYTHONS if os.path.exists(p)), TORCH_PYTHONS[0])


# -- children -----------------------------------------------------------------------------------


def run_json(cmd: Sequence[str], log_prefix: str | None = None) -> dict:
    """Run a child to completion; parse its last stdout line starting with ``{`` as JSON.

    With ``log_prefix``, its stdout and stderr are kept in ``<log_prefix>.out`` / ``.err``.
    """
    done = subprocess.run(list(cmd), capture_output=True, text=True, cwd=REPO_DIR)
    if log_prefix:
        with open(log_prefix + ".out", "w") as f:
            f.write(done.stdout)
        with open(log_prefix + ".err", "w") as f:
            f.write(done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"child failed ({done.returncode}): {shlex.join(cmd)}\n{done.stderr[-3000:]}")
    return last_json(done.stdout)


def last_json(text: str) -> dict:
    """The last line of ``text`` that starts with ``{``, parsed as JSON."""
    lines = [line for line in text.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"no JSON line in child output:\n{text[-2000:]}")
    return json.loads(lines[-1])


def command_output(cmd: Sequence[str]) -> str:
    """Stripped stdout of ``cmd``, or ``n/a`` if it fails."""
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"n/a ({e.__class__.__name__})"
    return done.stdout.strip() if done.returncode == 0 else "n/a"


def progress(tag: str, message: str) -> None:
    print(f"[{tag}] {message}", file=sys.stderr, flush=True)


def warn_if_loaded(tag: str, threshold: float = 0.5) -> None:
    """Warn (on stderr) when the 1-minute load average is above ``threshold``: timings will be noisy."""
    if os.getloadavg()[0] > threshold:
        progress(tag, f"warning: load average {load_average()} at start; timings will be noisy")


# -- environment lines --------------------------------------------------------------------------


def package_version(python: str, module: str) -> str:
    return command_output([python, "-c", f"import {module}; print({module}.__version__)"])


def venv_line(label: str, python: str, modules: Sequence[str]) -> str:
    """``label (python): module version, ...``; a module entry may carry a note after a space,
    e.g. ``"onnxruntime (training build)"``."""
    parts = []
    for entry in modules:
        module, _, note = entry.partition(" ")
        parts.append(f"{module} {package_version(python, module)}" + (f" {note}" if note else ""))
    return f"{label} ({python}): " + ", ".join(parts)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def assets_line(paths: Sequence[str]) -> str:
    return "assets (sha256 prefix): " + ", ".join(f"{os.path.basename(p)} {file_digest(p)}" for p in paths)


def machine_lines() -> list[str]:
    """The date (call it at the start of a run), then cores, CPU model, RAM and OS on one line."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [
        f"date (start): {command_output(['date', '-u'])}",
        f"nproc: {command_output(['nproc'])}; CPU: {cpu}; RAM: {ram_gib:.1f} GiB; OS: {platform.platform()}",
    ]


@dataclasses.dataclass(frozen=True)
class CodeState:
    """The onnxqat package as it runs (installed editable): HEAD, uncommitted changes in onnxqat/, and
    the tree of onnxqat/ at HEAD (which tells whether a new commit changed the package)."""

    commit: str
    diff: str  # sha256 prefix of ``git diff HEAD -- onnxqat``, "" if clean
    tree: str

    def __str__(self) -> str:
        return self.commit + (f", uncommitted changes in onnxqat/ (diff sha256 {self.diff})" if self.diff else "")


def code_state() -> CodeState:
    diff = command_output(["git", "-C", REPO_DIR, "diff", "HEAD", "--", "onnxqat"])
    return CodeState(command_output(["git", "-C", REPO_DIR, "rev-parse", "--short", "HEAD"]),
                     hashlib.sha256(diff.encode()).hexdigest()[:12] if diff else "",
                     command_output(["git", "-C", REPO_DIR, "rev-parse", "--short", "HEAD:onnxqat"]))


def code_lines(start: CodeState, end: CodeState) -> list[str]:
    """One line if the onnxqat code stayed the same during the run, else a warning."""
    if start == end:
        return [f"onnxqat code: {start}"]
    if (start.tree, start.diff) == (end.tree, end.diff):
        return [f"onnxqat code: {start} (HEAD moved to {end.commit} during the run; onnxqat/ unchanged)"]
    return [f"onnxqat code CHANGED during the run: {start} at start, {end} at end"]


# -- report -------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunStart:
    """What a report records from the start of a run (see ``run_start``)."""

    command: str  # to reproduce the run
    machine: list[str]  # machine_lines()
    code: CodeState
    load: str  # load_average()
    clock: float  # time.perf_counter()

    def environment(self, loads: str | None = None) -> list[str]:
        """The first environment lines: machine, onnxqat code (start vs now), load average at start and
        ``loads`` (default: now), wall time so far."""
        loads = loads or f"at end: {load_average()}"
        return [
            *self.machine,
            *code_lines(self.code, code_state()),
            f"load average (1/5/15 min) at start: {self.load}; {loads}; "
            f"wall time {(time.perf_counter() - self.clock) / 60:.1f} min",
        ]


def run_start(script: str, argv: list[str] | None) -> RunStart:
    return RunStart(reproduce_command(script, argv), machine_lines(), code_state(), load_average(), time.perf_counter())


def publish(tag: str, report: str, path: str, section: str | None = None) -> None:
    """Print the report and write it to ``path``: as its section ``section`` (see ``write_section``), or
    the whole file."""
    print(report)
    if section:
        write_section(path, section, report)
    else:
        with open(path, "w") as f:
            f.write(report)
    progress(tag, f"wrote {path}")


def reproduce_command(script: str, argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["cd", REPO_DIR]) + " && " + shlex.join([sys.executable, f"bench/{script}", *args])


def bullet_section(title: str, lines: Sequence[str]) -> list[str]:
    """A ``###`` heading, then ``lines`` as a bullet list, then a blank line."""
    return [f"### {title}", "", *[f"- {line}" for line in lines], ""]


def environment_block(env: Sequence[str], command: str) -> list[str]:
    """The closing lines of a report: the environment as a bullet list, then the command to reproduce."""
    return [*bullet_section("Environment", env), "Reproduce:", "", "```", command, "```", ""]


def check(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'}: {text}"


def write_section(path: str, key: str, text: str) -> None:
    """Replace (or append) the section ``key`` of the results file with ``text``."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        new = head + block + ("\n" + tail if tail else "")
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block
    with open(path, "w") as f:
        f.write(new)


# -- arguments ----------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def str_list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def choice_list(choices: Sequence[str], what: str):
    """An argparse type: comma-separated items, each one of ``choices``."""

    def parse(text: str) -> list[str]:
        items = str_list(text)
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what}(s) {bad}; choose from {', '.join(choices)}")
        return items

    return parse


DATA_FILES = {
    "model": os.path.join(MODELS_DIR, "fmnist_dsconv.onnx"),
    "calib": os.path.join(MODELS_DIR, "fmnist_calib.npz"),
    "calib-source": os.path.join(MODELS_DIR, "fmnist_train.npz"),
    "train-data": os.path.join(MODELS_DIR, "fmnist_train.npz"),
    "test-data": os.path.join(MODELS_DIR, "fmnist_test.npz"),
}
PYTHONS = {
    "ours-python": "/tmp/venv/bin/python",  # onnxqat (editable) with the onnxruntime-training build
    "ort-python": "/tmp/ortq_venv/bin/python",  # the current plain onnxruntime, for quantize_static
    "deploy-python": "/tmp/deployvenv/bin/python",  # plain onnxruntime, to run exported models
    "torch-python": None,  # default_torch_python()
}


def add_path_args(p: argparse.ArgumentParser, files: Sequence[str], pythons: Sequence[str], work_dir: str,
                  results: str) -> None:
    """``--FILE`` for each of ``files`` (keys of DATA_FILES), ``--PYTHON`` for each of ``pythons`` (keys of
    PYTHONS), ``--work-dir`` and ``--results``; ``absolute_paths`` makes the paths absolute after parsing."""
    for name in files:
        p.add_argument(f"--{name}", default=DATA_FILES[name])
    for name in pythons:
        p.add_argument(f"--{name}", default=PYTHONS[name] or default_torch_python())
    p.add_argument("--work-dir", default=work_dir)
    p.add_argument("--results", default=results)


def absolute_paths(args: argparse.Namespace) -> None:
    """Make the data file, work-dir and results arguments absolute (children run in the repository)."""
    for attr in [*(name.replace("-", "_") for name in DATA_FILES), "work_dir", "results"]:
        if hasattr(args, attr):
            setattr(args, attr, os.path.abspath(getattr(args, attr)))


def emit_row(row: dict, json_path: str | None) -> None:
    """Print one result row as a JSON line (with the load average) and append it to ``json_path``."""
    row = {**row, "load": os.getloadavg()[0]}
    line = json.dumps(row, default=float)
    print(line, flush=True)
    if json_path:
        with open(json_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
