"""Real third-party models: PaddleOCR's models as shipped in the rapidocr-onnxruntime wheel.

PaddlePaddle exports (opset 11/12, weights in Constant nodes, -1 dims, HardSwish written out as
Mul/Clip/Div, a transformer in the recognizer). The wheel is fetched once with
``pip download --no-deps`` into a cache (``ONNXQAT_MODEL_CACHE``, default ~/.cache/onnxqat); the
tests skip, saying why, when the cache is empty and cannot be filled. Inputs are synthetic
text-like images (dark strokes on a light page), normalised as PaddleOCR does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from onnxqat import QuantizationSimModel

pytestmark = pytest.mark.slow

WHEEL = "rapidocr-onnxruntime==1.4.4"
MODELS = {
    "cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", (3, 48, 192)),
    "det": ("ch_PP-OCRv4_det_infer.onnx", (3, 320, 320)),
    "rec": ("ch_PP-OCRv4_rec_infer.onnx", (3, 48, 320)),
}


def _cache() -> Path:
    return Path(os.environ.get("ONNXQAT_MODEL_CACHE", Path.home() / ".cache" / "onnxqat")) / "rapidocr-1.4.4"


@pytest.fixture(scope="session")
def ocr_models() -> dict[str, Path]:
    cache = _cache()
    paths = {k: cache / name for k, (name, _) in MODELS.items()}
    if all(p.exists() for p in paths.values()):
        return paths
    try:
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", tmp],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                pytest.skip(f"cannot fill the model cache {cache}: pip download {WHEEL} failed: "
                            f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
            wheel = next(Path(tmp).glob("*.whl"))
            cache.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheel) as z:
                for member in z.namelist():
                    if member.endswith(".onnx"):
                        (cache / Path(member).name).write_bytes(z.read(member))
    except (OSError, subprocess.TimeoutExpired, StopIteration) as e:
        pytest.skip(f"cannot fill the model cache {cache}: {e}")
    return paths


def text_like(n: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Dark strokes on a light, slightly noisy page, scaled to [-1, 1] like PaddleOCR input."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    images = rng.uniform(0.85, 1.0, size=(n, 1, h, w))
    for img in images:
        for _ in range(rng.integers(8, 30)):
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            img[0, y : y + rng.integers(2, max(3, h // 3)), x : x + rng.integers(2, max(3, w // 12))] = rng.uniform(0, 0.3)
    images = np.repeat(images, c, axis=1) + rng.normal(scale=0.02, size=(n, c, h, w))
    return ((np.clip(images, 0, 1) - 0.5) / 0.5).astype(np.float32)


def _float_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("which", ["cls", "det", "rec"])
def test_ocr_model_ptq_agrees_with_float(ocr_models, which, tmp_path):
    path = ocr_models[which]
    shape = MODELS[which][1]
    calib = [{"x": text_like(4, shape, seed)} for seed in range(4)]
    sim = QuantizationSimModel(path, per_channel=True)
    assert sim.plan.params and sim.plan.activations  # Constant-node weights are found as weights
    sim.compute_encodings(calib, progress=False)
    x = text_like(4, shape, seed=99)
    ref = _float_outputs(path, x)
    (got,) = sim.run({"x": x})
    assert got.shape == ref.shape
    if which == "det":  # a text probability map, thresholded as DB post-processing does
        a, b = ref > 0.3, got > 0.3
        iou = (a & b).sum() / max((a | b).sum(), 1)
        assert a.any() and iou > 0.6, iou
    else:  # class / per-timestep character decisions
        agree = (got.argmax(-1) == ref.argmax(-1)).mean()
        assert agree >= 0.9, agree
    paths = sim.export(tmp_path)
    ratio = os.path.getsize(paths["qdq"]) / os.path.getsize(path)
    if which != "cls":  # the 0.6 MB classifier is dominated by graph structure
        assert ratio < 0.32, ratio
