"""The whole workflow on the shipped Fashion-MNIST model, as one command: ``onnxqat demo``.

FP32 accuracy; PTQ at W8A8 and W4A8 (per-channel); QAT of the W4A8 simulation; export; then the
exported QDQ model's accuracy and speed in plain onnxruntime, as a short table. The deployed model
runs in a separate plain-onnxruntime environment when one is found (``ONNXQAT_DEPLOY_PYTHON``, or
``.venv-deploy`` beside the repository), else in this environment's runtime (the row says which).

The assets are the repository's ``models/`` in a checkout, else the copy shipped in the package
(``onnxqat/demo_data``: the model and a class-balanced subsample of the data, made by
``models/package_demo_data.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any
from pathlib import Path

from onnxqat.data import NpzBatches, input_signature, load_model_inputs
from onnxqat.errors import DataError
from onnxqat.evaluate import accuracy
from onnxqat.runtime import Session
from onnxqat.sim import QuantizationSimModel

__all__ = ["find_deploy_python", "find_models", "run_demo"]

_PACKAGE = Path(__file__).resolve().parent
_REPO = _PACKAGE.parent
_PLAIN_ORT = _PACKAGE / "tools" / "plain_ort.py"
_ASSETS = ("fmnist_dsconv.onnx", "fmnist_calib.npz", "fmnist_train.npz", "fmnist_test.npz")


def find_models(folder: str | None) -> Path:
    """The folder of the demo assets: ``folder``, else the checkout's ``models/``, else the
    package's ``demo_data/``."""
    if folder:
        candidates = [Path(folder)]
    else:  # a checkout: the package folder sits beside pyproject.toml and models/
        checkout = _REPO / "models" if (_REPO / "pyproject.toml").is_file() else None
        candidates = [p for p in (checkout, _PACKAGE / "demo_data") if p is not None]
    for path in candidates:
        missing = [name for name in _ASSETS if not (path / name).is_file()]
        if not missing:
            return path
    raise DataError(f"{candidates[0]}: the demo assets are not here (missing {', '.join(missing)}); pass --models "
                    "with a folder holding them (the repository's models/)")


def find_deploy_python() -> str | None:
    for candidate in (os.environ.get("ONNXQAT_DEPLOY_PYTHON"), str(_REPO / ".venv-deploy" / "bin" / "python")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def _plain(python: str, *args: str) -> dict[str, Any]:
    proc = subprocess.run([python, str(_PLAIN_ORT), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DataError(f"plain onnxruntime run failed: {proc.stderr.strip().splitlines()[-1:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run_demo(out_dir: str, *, models: str | None = None, epochs: int = 2, progress: bool | None = None) -> list[tuple[str, float, str]]:
    """Run the demo; returns the table rows ``(what, accuracy, note)`` and prints the table."""
    from onnxqat.outputs import check_output_dir

    folder = find_models(models)
    model = folder / "fmnist_dsconv.onnx"
    data = [folder / f"fmnist_{part}.npz" for part in ("calib", "train", "test")]
    # before any work: the export folder is writable and replaces none of the shipped files
    check_output_dir(out_dir, ["model.onnx", "model.encodings", "model_qdq.onnx"], inputs=[str(model), *map(str, data)])
    start = time.perf_counter()
    probe = QuantizationSimModel(model)
    signature = input_signature(probe.float_model)
    calib = load_model_inputs(folder / "fmnist_calib.npz", signature)
    train = load_model_inputs(folder / "fmnist_train.npz", signature, ["label"])
    test = load_model_inputs(folder / "fmnist_test.npz", signature, ["label"])
    test_batches = NpzBatches(test, 500)
    rows: list[tuple[str, float, str]] = []

    fp32, _ = accuracy(Session(probe.float_model).run, test_batches, progress=progress, desc="FP32")
    rows.append(("FP32 (float model)", fp32, ""))
    for label, bits in (("PTQ W8A8 per-channel", 8), ("PTQ W4A8 per-channel", 4)):
        sim = QuantizationSimModel(model, param_bw=bits, per_channel=True)
        sim.compute_encodings(NpzBatches(calib, 64), progress=progress)
        acc, _ = accuracy(sim.run, test_batches, progress=progress, desc=label)
        rows.append((label, acc, ""))
    with sim.trainer(lr=3e-5) as trainer:
        trainer.fit(NpzBatches(train, 32, shuffle=True), epochs=epochs, progress=progress)
    qat, _ = accuracy(sim.run, test_batches, progress=progress, desc="QAT W4A8")
    rows.append((f"QAT W4A8 per-channel ({epochs} epochs, {len(train['label'])} images)", qat, ""))
    paths = sim.export(out_dir)

    python = find_deploy_python()
    runtime = "plain onnxruntime {}"
    if python is None:  # one environment: its own runtime runs the deployed file (plain_ort.py needs only it)
        from onnxqat.backend import check_environment

        python = sys.executable
        runtime = f"{check_environment()[0]} {{}} (this environment; set ONNXQAT_DEPLOY_PYTHON for another)"
    deployed = _plain(python, "accuracy", paths["qdq"], str(folder / "fmnist_test.npz"))
    timing = {}
    for batch in (64, 1):
        timing[batch] = _plain(python, "latency", str(model), paths["qdq"], "--data", str(folder / "fmnist_test.npz"),
                               "--batch-size", str(batch), "--runs", "50" if batch == 64 else "300")["median_ms"]
    speed = ", ".join(f"batch {b}: {t[str(model)] / t[paths['qdq']]:.2f}x float speed "
                      f"({t[paths['qdq']]:.2f} vs {t[str(model)]:.2f} ms)" for b, t in timing.items())
    rows.append((f"deployed model_qdq.onnx, {runtime.format(deployed['onnxruntime'])}", deployed["accuracy"], speed))

    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'':{width}}  accuracy  vs FP32")
    for what, acc, note in rows:
        print(f"{what:{width}}  {acc * 100:7.2f}%  {100 * (acc - fp32):+6.2f}  {note}")
    print(f"\nexported: {', '.join(paths.values())}")
    print(f"demo time: {time.perf_counter() - start:.0f} s")
    sys.stdout.flush()
    return rows
