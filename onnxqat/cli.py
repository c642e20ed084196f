"""Command line: a thin layer over the Python API.

    onnxqat quantize MODEL.onnx --data CALIB.npz --output-dir OUT [options]
    onnxqat eval MODEL.onnx --data DATA.npz [--label-key label] [--output-index 0]

Errors print one line (``error: ...``) on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from onnxqat.errors import OnnxQatError

__all__ = ["main", "build_parser"]


def _add_sim_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--param-bw", type=int, default=8, help="weight bitwidth, 4-16 (default 8)")
    p.add_argument("--activation-bw", type=int, default=8, help="activation bitwidth, 4-16 (default 8)")
    p.add_argument("--per-channel", action="store_true", help="per-channel weight quantization")
    p.add_argument(
        "--scheme", choices=["minmax", "percentile", "sqnr"], default="minmax",
        help="activation calibration scheme (default minmax)",
    )
    p.add_argument(
        "--config", default=None,
        help="quantization config: JSON file or preset 'onnxruntime' (default) / 'aimet'",
    )
    p.add_argument("--batch-size", type=int, default=64, help="batch size for running the data")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxqat", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="simulate + calibrate + export (PTQ)")
    q.add_argument("model", help="float ONNX model")
    q.add_argument("--data", required=True, help="calibration npz: one array per model input")
    q.add_argument("--output-dir", required=True, help="where model.onnx, model.encodings, model_qdq.onnx go")
    _add_sim_options(q)
    q.add_argument("--encoding-version", choices=["1.0.0", "0.6.1"], default="1.0.0")
    q.add_argument("--prefix", default="model", help="file name prefix of the outputs")

    e = sub.add_parser("eval", help="top-1 accuracy of a model (float, sim export or QDQ) on npz data")
    e.add_argument("model")
    e.add_argument("--data", required=True, help="npz with the model inputs and a label array")
    e.add_argument("--label-key", default="label")
    e.add_argument("--output-index", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=256)
    return parser


def _quantize(args: argparse.Namespace) -> None:
    from onnxqat.data import NpzBatches, input_signature, load_model_inputs
    from onnxqat.sim import QuantizationSimModel

    sim = QuantizationSimModel(
        args.model,
        param_bw=args.param_bw,
        activation_bw=args.activation_bw,
        quant_scheme=args.scheme,
        per_channel=True if args.per_channel else None,
        config=args.config,
    )
    print(f"plan: {sim.plan.summary()}")
    arrays = load_model_inputs(args.data, input_signature(sim.float_model))
    sim.compute_encodings(NpzBatches(arrays, args.batch_size))
    paths = sim.export(args.output_dir, args.prefix, encoding_version=args.encoding_version)
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")


def _eval(args: argparse.Namespace) -> None:
    from onnxqat.data import NpzBatches, input_signature, load_model_inputs
    from onnxqat.evaluate import accuracy
    from onnxqat.io import load_model
    from onnxqat.runtime import Session

    model = load_model(args.model)
    arrays = load_model_inputs(args.data, input_signature(model), [args.label_key])
    session = Session(model)
    acc, n = accuracy(session.run, NpzBatches(arrays, args.batch_size), label_key=args.label_key,
                      output_index=args.output_index)
    print(f"accuracy={acc:.6f} n={n}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"quantize": _quantize, "eval": _eval}
    try:
        handlers[args.command](args)
    except OnnxQatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
