"""PTQ with NNCF (run by /work/peers/nncf/bin/python): ``nncf.quantize`` on the ONNX model with its
defaults (preset performance, target device ANY, fast bias correction on, MinMax/quantile range
estimators of NNCF's defaults), through NNCF's public API only.

    run_nncf.py --model M.onnx --calib CALIB.npz --out OUT --w-bits 8 --a-bits 8 --per-channel
                [--subset-size N] [--no-bias-correction]

Calibration data is given as NNCF's examples do: an ``nncf.Dataset`` of single samples (batch 1).
``subset_size`` defaults to the number of calibration samples (NNCF's own default is 300), so every
tool sees the same images. ``--per-channel`` / no flag set
``weights_quantization_params=QuantizationParameters(per_channel=...)``; ``--w-bits 4`` sets
``num_bits=4`` there (NNCF's advanced parameters). The returned ModelProto already holds
QuantizeLinear/DequantizeLinear nodes: saved as OUT/model_qdq.onnx. NNCF has no encodings file.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _runner_common as rc  # noqa: E402


def main() -> None:
    p = rc.parser("NNCF")
    p.add_argument("--subset-size", type=int, default=0, help="0: all calibration samples")
    p.add_argument("--no-bias-correction", action="store_true")
    # ablations of NNCF's defaults (BENCHMARKS.md, "NNCF 3.4's ONNX PTQ defaults", measures each)
    p.add_argument("--overflow-fix", choices=["default", "enable", "first_layer_only", "disable"], default="default",
                   help="NNCF's default for target device ANY is first_layer_only (first convs' weights at 7 bits)")
    p.add_argument("--activation-range", choices=["default", "minmax", "mean_minmax"], default="default",
                   help="NNCF's default for per-tensor activations is mean_minmax (mean over samples of each "
                        "sample's min and max)")
    p.add_argument("--quantize-outputs", action="store_true", help="also quantize the model outputs (NNCF: off)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)

    import nncf
    import onnx
    import onnxruntime

    result = {"tool": "nncf", "version": nncf.__version__,
              "deps": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}, "status": "ok"}
    try:
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

        names = rc.input_names(args.model)
        data = rc.load_calib(args.calib, names, args.max_samples)
        samples = rc.batches(data, 1)
        subset = args.subset_size or len(samples)
        weights = QuantizationParameters(num_bits=args.w_bits, per_channel=args.per_channel)
        extra: dict = {}
        if args.overflow_fix != "default":
            extra["overflow_fix"] = nncf.OverflowFix(args.overflow_fix)
        if args.activation_range != "default":
            from nncf.quantization.range_estimator import RangeEstimatorParametersSet

            extra["activations_range_estimator_params"] = getattr(RangeEstimatorParametersSet,
                                                                  args.activation_range.upper())
        if args.quantize_outputs:
            extra["quantize_outputs"] = True
        advanced = AdvancedQuantizationParameters(weights_quantization_params=weights,
                                                  disable_bias_correction=args.no_bias_correction, **extra)
        result["settings"] = {
            "call": "nncf.quantize(model, nncf.Dataset(samples), subset_size=N, advanced_parameters=...)",
            "preset": "default (performance)", "target_device": "ANY (default)",
            "fast_bias_correction": "True (default)", "bias_correction": not args.no_bias_correction,
            "weights": {"num_bits": args.w_bits, "per_channel": args.per_channel},
            "activations": f"default ({args.a_bits}-bit)", "calib_samples": rc.n_samples(data),
            "subset_size": subset, "batch_size": 1,
            "overflow_fix": args.overflow_fix, "activation_range": args.activation_range,
            "quantize_outputs": args.quantize_outputs,
        }
        with rc.Timer() as t:
            model = onnx.load(args.model)
            q = nncf.quantize(model, nncf.Dataset(samples), subset_size=subset, advanced_parameters=advanced)
            onnx.save(q, os.path.join(args.out, "model_qdq.onnx"))
        result["method_seconds"] = round(t.seconds, 3)
        result["qdq"] = rc.qdq_summary(os.path.join(args.out, "model_qdq.onnx"))
        result["encodings"] = None
    except Exception as e:  # noqa: BLE001 - recorded in result.json
        rc.fail(args.out, result, e)
    rc.write_result(args.out, result)


if __name__ == "__main__":
    main()
