"""aimet-onnx AMP (choose_mixed_precision) on the demo model, for the search-time comparison with
``onnxqat.mixed.search`` (run by the aimet venv: /work/peers/aimet/bin/python bench/bench_amp.py OUT).

Same data as ``bench/bench_analyze.py --mixed``: calibration = first 256 of fmnist_calib.npz,
evaluation = first 300 of fmnist_test.npz (phase 1 and phase 2), allowed accuracy drop 0.02,
candidates W4A8, W8A8, W16A16 (AIMET's (activation, param) pairs), per-channel default config.
Prints one JSON line: seconds, the accuracy of the chosen point, the load average.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import onnx
    from aimet_common.defs import QuantizationDataType
    from aimet_onnx import QuantizationSimModel
    from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight
    from aimet_onnx.common.defs import CallbackFunc
    from aimet_onnx.mixed_precision import choose_mixed_precision

    out = sys.argv[1]
    calib = np.load(ROOT / "models" / "fmnist_calib.npz")["image"][:256]
    test = np.load(ROOT / "models" / "fmnist_test.npz")
    images, labels = test["image"][:300], test["label"][:300]
    model = onnx.load(str(ROOT / "models" / "fmnist_dsconv.onnx"))
    fold_all_batch_norms_to_weight(model)
    batches = [{"image": calib[i:i + 64]} for i in range(0, len(calib), 64)]
    load0 = os.getloadavg()
    start = time.perf_counter()
    sim = QuantizationSimModel(model, param_type="int8", activation_type="int8", config_file="default",
                               dummy_input=batches[0], path=os.path.join(out, "_tmp"))

    def forward(session, *_):
        for b in batches:
            session.run(None, b)

    sim.compute_encodings(forward)

    def evaluate(session, *_):
        scores = session.run(None, {"image": images})[0]
        return float((scores.argmax(-1) == labels).mean())

    int_ = QuantizationDataType.int
    candidates = [((8, int_), (4, int_)), ((8, int_), (8, int_)), ((16, int_), (16, int_))]
    pareto = choose_mixed_precision(sim, candidates, CallbackFunc(evaluate), CallbackFunc(evaluate), 0.02,
                                    os.path.join(out, "amp"), True, CallbackFunc(forward))
    seconds = time.perf_counter() - start
    chosen = evaluate(sim.session)
    print(json.dumps({"tool": "aimet-onnx AMP", "seconds": round(seconds, 1), "accuracy": chosen,
                      "pareto_points": len(pareto or []), "load_before": [round(x, 2) for x in load0],
                      "load_after": [round(x, 2) for x in os.getloadavg()]}))


if __name__ == "__main__":
    main()
