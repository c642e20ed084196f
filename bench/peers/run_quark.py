"""PTQ with AMD Quark for ONNX (run by /work/peers/quark/bin/python): ``ModelQuantizer(config)
.quantize_model(model, out, calibration_data_reader)`` with one of Quark's default configurations,
through Quark's public API only.

    run_quark.py --model M.onnx --calib CALIB.npz --out OUT --w-bits 8 --a-bits 8 --per-channel
                 [--config INT8_CNN_DEFAULT|A8W8|XINT8|U8S8_AAWS|...] [--extra KEY=JSON ...]

Default config: ``QConfig.get_default_config("INT8_CNN_DEFAULT")`` ("8-bit, optimized for CNN
quantization" in Quark's docs: MinMax calibration, QDQ, uint8 activations, int8 weights, and Quark's
default CrossLayerEqualization). ``--per-channel`` sets the config's ``per_channel``; ``--extra``
adds Quark ``extra_options`` (e.g. ``--extra WeightSymmetric=true``). Quark's ONNX quantizer has
no 4-bit integer type for Conv/Gemm weights (its types: QInt8/QUInt8/QInt16/...; int4 only as
MatMulNBits weight-only blocks), so ``--w-bits 4`` tries onnxruntime's ``QuantType.QInt4`` as
``weight_type`` and fails, saying so, when the written weights are not 4-bit. Output:
OUT/model_qdq.onnx (QDQ); Quark writes no encodings file. Per-channel on a model below opset 13
(PaddleOCR's are opset 11/12) fails in Quark ("Per-Channel support with QDQ format requires onnx
opset version 13 or above"), so the model is first converted to opset 13 with Quark's own tool
``quark.onnx.tools.convert_opset_version`` (recorded as ``workaround`` in result.json).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _runner_common as rc  # noqa: E402


def main() -> None:
    p = rc.parser("AMD Quark")
    p.add_argument("--config", default="INT8_CNN_DEFAULT")
    p.add_argument("--extra", action="append", default=[], help="KEY=JSON, added to the config's extra_options")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)

    import onnx
    import onnxruntime
    import torch
    from importlib.metadata import version

    result = {"tool": "amd-quark", "version": version("amd-quark"),
              "deps": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
              "status": "ok"}
    try:
        from onnxruntime.quantization import QuantType
        from quark.onnx import CalibrationDataReader, ModelQuantizer
        from quark.onnx.quantization.config.config import QConfig

        names = rc.input_names(args.model)
        data = rc.load_calib(args.calib, names, args.max_samples)
        calib = rc.batches(data, args.batch_size)

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(calib)

            def get_next(self):
                return next(self.it, None)

            def rewind(self) -> None:
                self.it = iter(calib)

        config = QConfig.get_default_config(args.config)
        g = config.global_quant_config
        g.per_channel = args.per_channel
        for item in args.extra:
            key, _, value = item.partition("=")
            g.extra_options[key] = json.loads(value)
        if args.w_bits == 4:
            g.weight_type = QuantType.QInt4
        result["settings"] = {
            "config": args.config, "per_channel": g.per_channel, "calibrate_method": str(g.calibrate_method),
            "activation_type": str(g.activation_type), "weight_type": str(g.weight_type),
            "include_cle": g.include_cle, "extra_options": g.extra_options,
            "calib_samples": rc.n_samples(data), "batch_size": args.batch_size,
        }
        out_model = os.path.join(args.out, "model_qdq.onnx")
        with rc.Timer() as t:
            model_in = args.model
            opset = next((o.version for o in onnx.load(args.model, load_external_data=False).opset_import
                          if o.domain in ("", "ai.onnx")), 0)
            if args.per_channel and opset < 13:
                from quark.onnx.tools.convert_opset_version import convert_opset_version

                model_in = os.path.join(args.out, "_opset13_input.onnx")
                onnx.save(convert_opset_version(onnx.load(args.model), 13), model_in)
                result["workaround"] = (f"opset {opset} converted to 13 with quark.onnx.tools.convert_opset_version "
                                        "first (Quark: 'Per-Channel support with QDQ format requires onnx opset "
                                        "version 13 or above')")
            ModelQuantizer(config).quantize_model(model_in, out_model, Reader())
            if model_in != args.model:
                os.remove(model_in)
        result["method_seconds"] = round(t.seconds, 3)
        result["qdq"] = rc.qdq_summary(out_model)
        result["encodings"] = None
        if args.w_bits == 4:
            types = result["qdq"]["constant_dq_input_types"]
            if not any(k in types for k in ("INT4", "UINT4")):
                raise RuntimeError(
                    f"Quark wrote no 4-bit weights with weight_type=QuantType.QInt4 (its DequantizeLinear "
                    f"constants are {types}): W4 is not supported by Quark's ONNX quantizer for these ops")
    except Exception as e:  # noqa: BLE001 - recorded in result.json
        rc.fail(args.out, result, e)
    rc.write_result(args.out, result)


if __name__ == "__main__":
    main()
