"""Shared by the two workers of bench_qat_speed.py (numpy + stdlib only; runs in either venv):
their common arguments (``worker_parser``), the training batches they time, the timing loop
(``batch_timer``, ``time_steps``) and the request loop (``run_worker``, ``serve``).
bench/_qat_torch_run.py takes ``MODELS_DIR`` from here too.

A worker builds its training variants once, then serves timing requests from the parent, one JSON
object per line on stdin, answering one JSON line on stdout (lines that do not start with ``{``
are ignored by the parent, so stray prints cannot break the protocol):

    {"cmd": "time", "variant": "qat-fixed", "batch": 32, "warmup": 10, "steps": 50, "max_seconds": 20}
      -> {"ok": true, "ms": [per-step milliseconds of the timed steps]}
    {"cmd": "quit"}

A *step* is whatever the worker's ``step(batch)`` does: forward + backward + optimizer step + grad
reset, on a batch already in the framework's input form; batch preparation is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
VARIANTS = ("float", "qat-fixed", "qat-rl")
N_BATCHES = 16  # distinct training batches per batch size, cycled through


def training_batches(path: str, batch: int, count: int = N_BATCHES, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` batches (image float32, label int64) drawn from a fixed shuffle of the file."""
    with np.load(path) as data:
        images, labels = data["image"], data["label"]
    order = np.random.default_rng(seed).permutation(len(labels))
    out = []
    for i in range(count):
        sel = order[(i * batch) % len(order):][:batch]
        if len(sel) < batch:
            sel = order[:batch]
        out.append((np.ascontiguousarray(images[sel]), labels[sel].astype(np.int64)))
    return out


MIN_WARMUP, MIN_STEPS = 3, 10


def time_steps(step: Callable[[Any], None], batches: list[Any], warmup: int, steps: int,
               max_seconds: float = 0.0) -> list[float]:
    """Run ``warmup`` untimed steps, then ``steps`` timed ones; returns milliseconds per step.

    With ``max_seconds`` > 0, a phase (warm-up: half of it) ends early once it has run that long
    and has at least MIN_WARMUP / MIN_STEPS steps, so a heavily loaded machine cannot stretch a
    block without bound; on an idle machine the full counts fit.
    """
    begin = time.perf_counter()
    for i in range(warmup):
        if max_seconds and i >= MIN_WARMUP and time.perf_counter() - begin > max_seconds / 2:
            break
        step(batches[i % len(batches)])
    times: list[float] = []
    begin = time.perf_counter()
    for i in range(steps):
        if max_seconds and i >= MIN_STEPS and time.perf_counter() - begin > max_seconds:
            break
        batch = batches[(warmup + i) % len(batches)]
        start = time.perf_counter()
        step(batch)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


Timer = Callable[[str, int, int, int, float], list[float]]


def worker_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments both workers take; each adds its own."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", default=os.path.join(MODELS_DIR, "fmnist_dsconv.onnx"))
    p.add_argument("--train", default=os.path.join(MODELS_DIR, "fmnist_train.npz"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--once", nargs=2, metavar=("VARIANT", "BATCH"))
    return p


def batch_timer(train_path: str, steps: Mapping[str, Callable[[Any], None]],
                prepare: Callable[[str, int, tuple[np.ndarray, np.ndarray]], Any]) -> Timer:
    """A ``timer(variant, batch, warmup, steps, max_seconds)`` over ``training_batches`` of the file.

    ``prepare(variant, index, (images, labels))`` turns a batch into what ``steps[variant]`` takes;
    it runs once per variant and batch size, untimed.
    """
    cache: dict[tuple[str, int], list[Any]] = {}

    def timer(variant: str, batch: int, warmup: int, n: int, max_seconds: float = 0.0) -> list[float]:
        key = (variant, batch)
        if key not in cache:
            cache[key] = [prepare(variant, i, b) for i, b in enumerate(training_batches(train_path, batch))]
        return time_steps(steps[variant], cache[key], warmup, n, max_seconds)

    return timer


def run_worker(timer: Timer, once: list[str] | None, hello: Callable[[], dict]) -> None:
    """With ``once = [VARIANT, BATCH]``, time that variant (10 warm-up, 30 timed steps) and print the
    median; otherwise serve the parent's requests."""
    if once:
        ms = timer(once[0], int(once[1]), 10, 30, 0.0)
        print(f"{once[0]} batch {once[1]}: median {statistics.median(ms):.2f} ms")
        return
    serve(timer, hello())


def serve(timer: Timer, hello: dict) -> None:
    """Answer requests until ``quit`` or end of input. ``timer(variant, batch, warmup, steps, max_seconds)``."""
    reply({"ok": True, "hello": hello})
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("cmd") == "quit":
            break
        try:
            ms = timer(request["variant"], int(request["batch"]), int(request["warmup"]), int(request["steps"]),
                       float(request.get("max_seconds", 0.0)))
            reply({"ok": True, "ms": ms})
        except Exception:  # report to the parent, which aborts with the traceback
            reply({"ok": False, "error": traceback.format_exc()})


def reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()
