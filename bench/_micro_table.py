"""The micro-batch tables of bench/results/micro.md from ``bench_memory.py train`` result files.

    python bench/_micro_table.py /tmp/micro_mem/final.jsonl

One row per model x commit x mode x micro_batch option: the training phase's peak (VmHWM after
calibration, every run), the canary child, the size the trainer ran, the epoch's loss, the warm
step times (median of each run's timed steps, then the median of those), against the float
inference peak of the same model at the same batch.
"""

from __future__ import annotations

import json
import statistics
import sys


def main(paths: list[str]) -> None:
    records = [json.loads(line) for path in paths for line in open(path)]
    infer: dict[str, list[float]] = {}
    for r in records:
        if r.get("mode") == "infer":
            infer.setdefault(r["key"], []).append(r["peak_mib"])
    print("| model | commit | mode | micro_batch option -> ran | runs | training phase peak MiB (each run) | "
          "canary child MiB | peak / float inference | epoch loss | warm step s (median per run) | step s median | "
          "load start |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    groups: dict[tuple[str, str, str, object], list[dict]] = {}
    for r in records:
        if r.get("mode") != "infer" and "error" not in r:
            groups.setdefault((r["key"], r["commit"][:7], r["mode"], r.get("micro", "-")), []).append(r)
    for (key, commit, mode, micro), rs in groups.items():
        reference = statistics.median(infer.get(key, [float("nan")]))
        peaks = ", ".join(f"{r['train_only_mib']:.0f}" for r in rs)
        medians = [statistics.median(r["step_s"]) for r in rs]
        ran = sorted({str(r.get("micro_batch") or "whole") for r in rs})
        label = "auto" if micro == 0 else ("(none)" if micro == "-" else str(micro))
        ratio = statistics.median(r["train_only_mib"] for r in rs) / reference
        loads = ", ".join(r["load_start"].split()[0] for r in rs)
        losses = ", ".join(f"{r['loss']:.7f}" for r in rs if "loss" in r) or "-"
        print(f"| {key} | {commit} | {mode} | {label} -> {'/'.join(ran)} | {len(rs)} | {peaks} | "
              f"{statistics.median(r['canary_mib'] for r in rs):.0f} | {ratio:.2f}x | {losses} | "
              f"{', '.join(f'{m:.1f}' for m in medians)} | {statistics.median(medians):.1f} | {loads} |")
    print()
    for key, values in infer.items():
        print(f"float inference {key}, one batch (bare onnxruntime session, VmHWM): "
              f"{', '.join(f'{v:.0f}' for v in values)} MiB")


if __name__ == "__main__":
    main(sys.argv[1:])
