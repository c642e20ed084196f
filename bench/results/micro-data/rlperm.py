"""Range learning on open-nsfw W4A8: the epoch loss of 4 AdamW steps (batches of 16) by row order
and micro-batch size (bench/results/micro.md, section 4).

    QAT_REAL_WORK=/tmp/micro_qat PYTHONPATH=. python bench/results/micro-data/rlperm.py
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "tests"))

import zoo  # noqa: E402
from onnxqat import QuantizationSimModel  # noqa: E402

warnings.simplefilter("ignore")
KEY = "opennsfw"
DATA = os.path.join(os.environ.get("QAT_REAL_WORK", "/tmp/qat_real"), "data", KEY)
with np.load(os.path.join(DATA, "calib.npz")) as z:
    calib = {k: z[k] for k in z.files}
batches = []
for name in sorted(os.listdir(os.path.join(DATA, "train")))[:4]:
    with np.load(os.path.join(DATA, "train", name)) as z:
        batches.append({k: z[k] for k in z.files})
reversed_rows = [{k: v[::-1].copy() for k, v in b.items()} for b in batches]
for label, data, micro in (("original, whole batch", batches, 16), ("original, micro 2", batches, 2),
                           ("rows reversed, whole batch", reversed_rows, 16), ("rows reversed, micro 8", reversed_rows, 8),
                           ("original, micro 8", batches, 8)):
    sim = QuantizationSimModel(zoo.fetch(KEY), param_bw=4, activation_bw=8, per_channel=True, quant_scheme="minmax")
    sim.compute_encodings(list(zoo.feeds(KEY, calib, batch_size=8)), progress=False)
    with sim.trainer(loss="distill", range_learning=True, threads=2, lr=1e-5, micro_batch=micro) as trainer:
        history = trainer.fit(data, epochs=1, progress=False)
        print(f"{label}: epoch loss {history[0].loss:.7f}", flush=True)
