"""Write the demo assets shipped inside the package (onnxqat/demo_data/): the demo model and a
class-balanced subsample of the Fashion-MNIST files here, small enough for a wheel of a few MB.

    python models/package_demo_data.py

``onnxqat demo`` uses models/ in a checkout and onnxqat/demo_data/ in an installed package.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "onnxqat" / "demo_data"
# samples per file; calibration is kept whole (512)
SIZES = {"calib": 512, "train": 3000, "test": 2000}


def subsample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices with the classes in equal shares (in file order within each class)."""
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    per_class = n // len(classes)
    picks = [np.sort(rng.permutation(np.flatnonzero(labels == c))[:per_class]) for c in classes]
    return np.sort(np.concatenate(picks))


def main() -> None:
    OUT.mkdir(exist_ok=True)
    shutil.copyfile(HERE / "fmnist_dsconv.onnx", OUT / "fmnist_dsconv.onnx")
    for seed, (part, n) in enumerate(SIZES.items()):
        with np.load(HERE / f"fmnist_{part}.npz") as f:
            arrays = {k: f[k] for k in f.files}
        keep = subsample(arrays["label"], n, seed) if n < len(arrays["label"]) else np.arange(len(arrays["label"]))
        np.savez_compressed(OUT / f"fmnist_{part}.npz", **{k: v[keep] for k, v in arrays.items()})
        print(f"fmnist_{part}.npz: {len(keep)} of {len(arrays['label'])} samples")


if __name__ == "__main__":
    main()
