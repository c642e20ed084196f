"""Step time of whole batches against micro-batches, side by side in one process.

One calibrated sim, one trainer per ``--micros`` value (``micro_batch``; 0 = automatic), all
built first; then ``--rounds`` rounds, each timing one optimizer step of every trainer on the
same batch in an order that alternates per round (ABC, CBA, ...), so every size sees the same
load. Prints one JSON line per trainer (the size it ran, every step time, the median) and the
load average before and after.

    QAT_REAL_WORK=/tmp/micro_qat python bench/bench_micro_steps.py --model opennsfw --micros 16,0 --rounds 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)

from bench_memory import DATA, SETTINGS, _calib_data, load  # noqa: E402


def main() -> None:
    warnings.simplefilter("ignore", RuntimeWarning)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="opennsfw")
    p.add_argument("--setting", default="w4a8", choices=sorted(SETTINGS))
    p.add_argument("--mode", default="fixed", choices=["fixed", "rl"])
    p.add_argument("--micros", default="16,0")
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args()
    import zoo
    from onnxqat import QuantizationSimModel

    pbw, abw = SETTINGS[args.setting]
    folder = os.path.join(DATA, args.model, "train")
    with np.load(os.path.join(folder, sorted(os.listdir(folder))[0])) as z:
        batch = {k: z[k] for k in z.files}
    sim = QuantizationSimModel(zoo.fetch(args.model), param_bw=pbw, activation_bw=abw, per_channel=True,
                               quant_scheme="minmax")
    sim.compute_encodings(list(zoo.feeds(args.model, _calib_data(args.model), batch_size=8)), progress=False)
    trainers = {}
    for m in (int(v) for v in args.micros.split(",")):
        trainer = sim.trainer(loss="distill", range_learning=args.mode == "rl", threads=2, lr=1e-5, micro_batch=m)
        trainer.step(batch)  # built, warm
        trainers[m] = trainer
    start_load = load()
    times: dict[int, list[float]] = {m: [] for m in trainers}
    order = list(trainers)
    for r in range(args.rounds):
        for m in order if r % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            trainers[m].step(batch)
            times[m].append(time.perf_counter() - t)
    for m, trainer in trainers.items():
        print(json.dumps({"model": args.model, "mode": args.mode, "micro_option": m, "micro_batch": trainer.micro_batch,
                          "batch": len(next(iter(batch.values()))), "step_s": times[m],
                          "median_s": statistics.median(times[m]), "load_start": start_load, "load_end": load(),
                          "date": time.strftime("%Y-%m-%d %H:%M:%S")}), flush=True)
        trainer.close()


if __name__ == "__main__":
    main()
