"""Helper of bench_ptq.py: write the first N samples of an npz as ``<out_dir>/calib_<N>.npz``.

Every tool is calibrated from these files, so all see the same images and each child loads
only the samples it is given.

    python _make_calib_sets.py SOURCE.npz OUT_DIR N [N ...]
"""

from __future__ import annotations

import os
import sys

import numpy as np


def write_prefix(source: np.lib.npyio.NpzFile, out_dir: str, n: int) -> str:
    available = min(len(source[k]) for k in source.files)
    if n > available:
        raise SystemExit(f"asked for {n} samples, the source holds {available}")
    path = os.path.join(out_dir, f"calib_{n}.npz")
    np.savez(path, **{k: source[k][:n] for k in source.files})
    return path


def main(argv: list[str]) -> None:
    source_path, out_dir, *sizes = argv
    os.makedirs(out_dir, exist_ok=True)
    with np.load(source_path) as source:
        for n in sizes:
            print(write_prefix(source, out_dir, int(n)))


if __name__ == "__main__":
    main(sys.argv[1:])
