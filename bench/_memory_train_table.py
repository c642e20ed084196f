"""The training table of bench/results/qatmem.md from ``bench_memory.py train`` result files.

    python bench/_memory_train_table.py /tmp/qatmem/train.jsonl /tmp/qatmem/train2.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys


def main(paths: list[str]) -> None:
    records = [(path.split("/")[-1], json.loads(line)) for path in paths for line in open(path)]
    infer = [r["peak_mib"] for _, r in records if r.get("mode") == "infer"]
    print(f"float inference, one batch of 16 (bare onnxruntime session, VmHWM): "
          f"{', '.join(f'{v:.0f}' for v in infer)} MiB\n")
    print("| file | mode | session options | runs | training phase peak MiB (each run) | canary child MiB | "
          "warm step s, median of 4 per run | peak / float inference | load start |")
    print("|---|---|---|---|---|---|---|---|---|")
    reference = statistics.median(infer)
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for name, r in records:
        if r.get("mode") != "infer" and "error" not in r:
            groups.setdefault((name, r["mode"], r["variant"]), []).append(r)
    for (name, mode, variant), rs in groups.items():
        peaks = ", ".join(f"{r['train_only_mib']:.0f}" for r in rs)
        steps = ", ".join(f"{statistics.median(r['step_s']):.1f}" for r in rs)
        ratio = statistics.median(r["train_only_mib"] for r in rs) / reference
        loads = ", ".join(r["load_start"].split()[0] for r in rs)
        print(f"| {name} | {mode} | {variant} | {len(rs)} | {peaks} | "
              f"{statistics.median(r['canary_mib'] for r in rs):.0f} | {steps} | {ratio:.1f}x | {loads} |")


if __name__ == "__main__":
    main(sys.argv[1:])
