"""PTQ with aimet-onnx (run by /work/peers/aimet/bin/python): QuantizationSimModel + compute_encodings
+ export, optionally after SeqMSE or AdaRound, through aimet-onnx's public API only.

    run_aimet.py --model M.onnx --calib CALIB.npz --out OUT --w-bits 8 --a-bits 8 --per-channel
                 [--method ptq|seqmse|adaround] [--adaround-iters 10000] [--seqmse-candidates 20]
                 [--config default|htp_v73|PATH] [--no-bn-fold]

Flow, as aimet-onnx documents it: ``fold_all_batch_norms_to_weight(model)`` (its QuantizationSimModel
warns without it), ``QuantizationSimModel(model, param_type=int<w>, activation_type=int8,
config_file=...)`` with the default quant scheme (min_max); for ``seqmse`` ``apply_seq_mse(sim,
batches)`` and for ``adaround`` ``apply_adaround(sim, batches, num_iterations)`` before
``sim.compute_encodings(batches)``; then ``sim.export(OUT, "model")`` (model.onnx + model.data +
model.encodings, aimet's default encoding version) and ``sim.to_onnx_qdq(prequantize_constants=True)``
saved as OUT/model_qdq.onnx (int weights + DequantizeLinear; activations as uint8, aimet's default).
Graph inputs declared with a negative dimension (PaddleOCR's classifier: [-1, 3, ?, ?]) get a
symbolic dimension instead, or ``to_onnx_qdq`` fails: it makes a dummy input from the declared shape
(``ValueError: negative dimensions are not allowed``).

``--per-channel`` picks aimet's ``"default"`` config (default_config_per_channel.json: per-channel
Conv/ConvTranspose/Gemm/MatMul/PRelu weights); without it, the shipped per-tensor default_config.json.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _runner_common as rc  # noqa: E402


def main() -> None:
    p = rc.parser("aimet-onnx")
    p.add_argument("--method", choices=("ptq", "seqmse", "adaround"), default="ptq")
    p.add_argument("--adaround-iters", type=int, default=10000, help="aimet's documented default: 10000")
    p.add_argument("--seqmse-candidates", type=int, default=20, help="aimet's default: 20")
    p.add_argument("--config", default=None, help="aimet config alias or JSON path (default: per --per-channel)")
    p.add_argument("--no-bn-fold", action="store_true", help="skip fold_all_batch_norms_to_weight")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)

    import aimet_onnx
    import onnx
    import onnxruntime
    import torch

    result = {
        "tool": "aimet-onnx",
        "version": aimet_onnx.__version__,
        "deps": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
        "status": "ok",
    }
    try:
        from aimet_onnx import QuantizationSimModel, apply_adaround, apply_seq_mse
        from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight

        if args.config:
            config = args.config
        elif args.per_channel:
            config = "default"  # alias of default_config_per_channel.json
        else:
            config = os.path.join(os.path.dirname(aimet_onnx.__file__), "common", "quantsim_config", "default_config.json")
        names = rc.input_names(args.model)
        data = rc.load_calib(args.calib, names, args.max_samples)
        calib = rc.batches(data, args.batch_size)
        result["settings"] = {
            "method": args.method, "param_type": f"int{args.w_bits}", "activation_type": f"int{args.a_bits}",
            "quant_scheme": "min_max (default)", "config_file": config if not os.path.isabs(config) else os.path.basename(config),
            "per_channel": args.per_channel, "bn_fold": not args.no_bn_fold,
            "calib_samples": rc.n_samples(data), "batch_size": args.batch_size,
            "export": "sim.export (encodings) + sim.to_onnx_qdq(prequantize_constants=True)",
        }
        if args.method == "adaround":
            result["settings"]["adaround_iters"] = args.adaround_iters
        if args.method == "seqmse":
            result["settings"]["seqmse_candidates"] = args.seqmse_candidates
        with rc.Timer() as t:
            model = onnx.load(args.model)
            fixed = rc.symbolic_negative_dims(model)
            folded = [] if args.no_bn_fold else fold_all_batch_norms_to_weight(model)[0]
            sim = QuantizationSimModel(
                model,
                param_type=f"int{args.w_bits}",
                activation_type=f"int{args.a_bits}",
                config_file=config,
                dummy_input=calib[0],
                path=os.path.join(args.out, "_aimet_tmp"),
            )
            if args.method == "seqmse":
                apply_seq_mse(sim, calib, num_candidates=args.seqmse_candidates)
            elif args.method == "adaround":
                apply_adaround(sim, calib, num_iterations=args.adaround_iters)
            sim.compute_encodings(calib)
            sim.export(args.out, "model")
            qdq = sim.to_onnx_qdq(prequantize_constants=True)
            onnx.save(qdq, os.path.join(args.out, "model_qdq.onnx"))
        result["method_seconds"] = round(t.seconds, 3)
        result["bn_folded"] = len(folded)
        if fixed:
            result["workaround"] = (f"graph input dims < 0 renamed to symbolic dims ({fixed}): aimet's to_onnx_qdq "
                                    "builds a dummy input from the declared shape and fails on -1")
        params, acts = sim.get_all_quantizers()
        result["quantizers"] = {"param_enabled": sum(1 for q in params if q.enabled),
                                "activation_enabled": sum(1 for q in acts if q.enabled)}
        result["qdq"] = rc.qdq_summary(os.path.join(args.out, "model_qdq.onnx"))
        result["encodings"] = "model.encodings"
        import shutil

        shutil.rmtree(os.path.join(args.out, "_aimet_tmp"), ignore_errors=True)
    except Exception as e:  # noqa: BLE001 - recorded in result.json
        rc.fail(args.out, result, e)
    rc.write_result(args.out, result)


if __name__ == "__main__":
    main()
