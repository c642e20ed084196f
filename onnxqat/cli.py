"""Command line: a thin layer over the Python API.

    onnxqat quantize MODEL.onnx --data CALIB.npz --output-dir OUT [options]
    onnxqat train MODEL.onnx --data TRAIN.npz --calib CALIB.npz --output-dir OUT [options]
    onnxqat eval MODEL.onnx --data DATA.npz [--label-key label] [--output-index 0]
    onnxqat compare FLOAT.onnx QDQ.onnx --data DATA.npz [--batch-axis NAME=AXIS] [--json OUT.json]
    onnxqat analyze MODEL.onnx --data CALIB.npz [--eval EVAL.npz] --output-dir OUT [options]
    onnxqat demo [--output-dir onnxqat-demo]

Errors print one line (``error: ...``) on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from onnxqat.errors import OnnxQatError
from onnxqat.train.options import TrainOptions

TRAIN_DEFAULTS = TrainOptions()

__all__ = ["build_parser", "main"]


class _Help(argparse.HelpFormatter):
    """Shows each option's default, unless it has none or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == argparse.SUPPRESS or default == []:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: one line on stderr, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _add_sim_options(p: argparse.ArgumentParser, batch_size: int = 64) -> None:
    p.add_argument("--param-bw", type=int, default=8, help="weight bitwidth, 4-16")
    p.add_argument("--activation-bw", type=int, default=8, help="activation bitwidth, 4-16")
    p.add_argument("--per-channel", action="store_true", help="per-channel weight quantization")
    p.add_argument(
        "--scheme", choices=["minmax", "percentile", "sqnr"], default="minmax",
        help="activation calibration scheme",
    )
    p.add_argument(
        "--config", default=None,
        help="quantization config: JSON file or preset 'onnxruntime' (default) / 'aimet'",
    )
    p.add_argument("--target", choices=["x86-avx2", "x86-vnni", "arm64", "htp"], default=None,
                   help="deployment target whose integer arithmetic the model must be exact on "
                        "(default: detected from this machine)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="batch size for running the data")
    _add_data_layout(p)
    p.add_argument("--fix-input", action="append", default=[], metavar="NAME=VALUE",
                   help="specialise the model to a constant input (e.g. sr=16000): folds If nodes "
                        "whose condition becomes constant (repeatable)")
    p.add_argument("--report", default=None,
                   help="write a JSON report: every quantizer, and why each float tensor left float stays float")


def _add_data_layout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-axis", action="append", default=[], metavar="NAME=AXIS",
                   help="axis of input NAME that indexes samples in the npz files (default 0; "
                        "none: the same array for every batch, e.g. a scalar); repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxqat", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add = sub.add_parser

    def add_parser(name: str, **kw: object) -> argparse.ArgumentParser:
        return _add(name, formatter_class=_Help, **kw)  # type: ignore[arg-type]

    sub.add_parser = add_parser  # type: ignore[method-assign]

    q = sub.add_parser("quantize", help="simulate + calibrate + export (PTQ)")
    q.add_argument("model", help="float ONNX model")
    q.add_argument("--data", required=True, help="calibration npz: one array per model input")
    q.add_argument("--output-dir", required=True, help="where model.onnx, model.encodings, model_qdq.onnx go")
    _add_sim_options(q)
    q.add_argument("--encoding-version", choices=["1.0.0", "0.6.1"], default="1.0.0")
    q.add_argument("--prefix", default="model", help="file name prefix of the outputs")

    t = sub.add_parser("train", help="simulate + calibrate + quantization-aware training + export")
    t.add_argument("model", help="float ONNX model")
    t.add_argument("--data", required=True, help="training npz: model inputs (+ labels / targets)")
    t.add_argument("--calib", required=True, help="calibration npz: one array per model input")
    t.add_argument("--output-dir", required=True, help="where model.onnx, model.encodings, model_qdq.onnx go")
    _add_sim_options(t, batch_size=32)
    t.add_argument("--loss", choices=["cross_entropy", "mse", "distill"], default="cross_entropy",
                   help="cross_entropy on labels, mse on targets, or distill (match the float model, no labels)")
    t.add_argument("--label-key", default="label", help="label array (class indices) in the npz files")
    t.add_argument("--target-key", default="target", help="target array for the mse loss")
    t.add_argument("--output-index", type=int, default=0, help="model output the loss reads")
    t.add_argument("--epochs", type=int, default=None,
                   help="epochs; default: enough for about 300 optimizer steps (1 to 20)")
    t.add_argument("--lr", type=float, default=TRAIN_DEFAULTS.lr, help="learning rate")
    t.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="optimizer")
    t.add_argument("--range-learning", action="store_true", help="train activation scales/offsets (LSQ)")
    t.add_argument("--freeze", action="append", default=[], metavar="NAME",
                   help="initializer or node whose parameters stay fixed (repeatable)")
    t.add_argument("--train-last-n", type=int, default=None, help="train only the last N layers with weights")
    t.add_argument("--eval", default=None,
                   help="npz scored after calibration and each epoch: agreement with the float model "
                        "(top-1, SQNR), and accuracy when it holds labels")
    t.add_argument("--checkpoint-dir", default=None, help="write a checkpoint every epoch; resume from it")
    t.add_argument("--max-samples", type=int, default=None, help="use only the first N training samples")
    t.add_argument("--seed", type=int, default=0, help="shuffling seed")
    t.add_argument("--encoding-version", choices=["1.0.0", "0.6.1"], default="1.0.0", help="encodings format")
    t.add_argument("--prefix", default="model", help="file name prefix of the outputs")

    a = sub.add_parser("analyze", help="per-quantizer SQNR, per-layer sensitivity, histograms: HTML + JSON report")
    a.add_argument("model")
    a.add_argument("--data", required=True, help="calibration npz")
    a.add_argument("--eval", default=None, help="labelled npz: sensitivity by accuracy (else by output SQNR)")
    a.add_argument("--label-key", default="label")
    a.add_argument("--output-index", type=int, default=0)
    a.add_argument("--eval-samples", type=int, default=2000, help="evaluation samples used per configuration")
    a.add_argument("--keep-16bit", type=int, default=3, help="layers kept at 16 bits in mixed_precision.json")
    a.add_argument("--output-dir", required=True)
    _add_sim_options(a)

    d = sub.add_parser("demo", help="FP32 / PTQ / QAT / deployed accuracy and speed on the shipped model")
    d.add_argument("--output-dir", default="onnxqat-demo", help="where the QAT model's exports go")
    d.add_argument("--models", default=None, help="folder of the shipped demo assets (default: the repository's models/)")
    d.add_argument("--epochs", type=int, default=2)

    c = sub.add_parser("compare", help="a quantized model against its float original: per-output SQNR, cosine, "
                                       "top-1 agreement, fused vs reference")
    c.add_argument("float_model", help="the float ONNX model")
    c.add_argument("quantized_model", help="the quantized (QDQ) model, e.g. OUT/model_qdq.onnx")
    c.add_argument("--data", required=True, help="npz with one array per model input")
    c.add_argument("--batch-size", type=int, default=32, help="samples per run")
    _add_data_layout(c)
    c.add_argument("--json", default=None, help="also write the numbers as JSON here")

    e = sub.add_parser("eval", help="top-1 accuracy of a model (float, sim export or QDQ) on npz data")
    e.add_argument("model")
    e.add_argument("--data", required=True, help="npz with the model inputs and a label array")
    e.add_argument("--label-key", default="label")
    e.add_argument("--output-index", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=256)
    _add_data_layout(e)
    return parser


def _calibrated_sim(args: argparse.Namespace, calib: str):  # type: ignore[no-untyped-def]
    from onnxqat.data import NpzBatches, input_signature, load_model_inputs, parse_batch_axes
    from onnxqat.passes.fix_inputs import parse_fixed_inputs
    from onnxqat.sim import QuantizationSimModel

    sim = QuantizationSimModel(
        args.model,
        param_bw=args.param_bw,
        activation_bw=args.activation_bw,
        quant_scheme=args.scheme,
        per_channel=True if args.per_channel else None,
        config=args.config,
        target=args.target,
        fix_inputs=parse_fixed_inputs(args.fix_input),
    )
    how = "given" if args.target else "detected"
    print(f"target: {sim.target.name} ({how}; {sim.target.description})")
    print(f"plan: {sim.plan.summary()}")
    axes = parse_batch_axes(args.batch_axis)
    arrays = load_model_inputs(calib, input_signature(sim.float_model), batch_axes=axes)
    sim.compute_encodings(NpzBatches(arrays, args.batch_size, batch_axes=axes))
    return sim


def _export(sim, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    paths = sim.export(args.output_dir, args.prefix, encoding_version=args.encoding_version)
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    if args.report:
        from onnxqat.io import write_text_atomic

        write_text_atomic(args.report, json.dumps(sim.report(), indent=2) + "\n")
        print(f"wrote report: {args.report}")


def _quantize(args: argparse.Namespace) -> None:
    _export(_calibrated_sim(args, args.data), args)


def _train(args: argparse.Namespace) -> None:
    from onnxqat.data import NpzBatches, input_signature, load_model_inputs, parse_batch_axes
    from onnxqat.errors import ConfigError
    from onnxqat.train.options import default_epochs

    for name in ("max_samples", "epochs", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    sim = _calibrated_sim(args, args.calib)
    signature = input_signature(sim.float_model)
    extra = {"cross_entropy": [args.label_key], "mse": [args.target_key], "distill": []}[args.loss]
    axes = parse_batch_axes(args.batch_axis)
    train = load_model_inputs(args.data, signature, extra, batch_axes=axes)
    batches = NpzBatches(train, args.batch_size, shuffle=True, seed=args.seed, limit=args.max_samples, batch_axes=axes)
    epochs = args.epochs
    if epochs is None:
        epochs = default_epochs(len(batches))
        print(f"epochs: {epochs} ({len(batches)} steps per epoch at batch size {args.batch_size}; --epochs to change)")
    evaluation = None
    with sim.trainer(
        loss=args.loss, optimizer=args.optimizer, lr=args.lr, range_learning=args.range_learning,
        output_index=args.output_index, label_key=args.label_key, target_key=args.target_key,
        freeze=tuple(args.freeze), train_last_n=args.train_last_n,
    ) as trainer:
        if args.eval is not None:
            evaluation = list(NpzBatches(load_model_inputs(args.eval, signature, optional_keys=[args.label_key],
                                                           batch_axes=axes), 256, batch_axes=axes))
            print("calibrated (PTQ) " + _metrics_line(trainer.evaluate(evaluation)), flush=True)
        trainer.fit(batches, epochs=epochs, eval_batches=evaluation, checkpoint_dir=args.checkpoint_dir,
                    on_epoch=lambda stats: print(stats.line(), flush=True))
    _export(sim, args)


def _metrics_line(metrics: dict[str, float]) -> str:
    names = {"accuracy": "eval_accuracy", "top1_agreement": "eval_agreement", "sqnr_db": "eval_sqnr_db"}
    return " ".join(f"{names.get(k, k)}={v:.4f}" for k, v in metrics.items())


def _eval(args: argparse.Namespace) -> None:
    from onnxqat.data import NpzBatches, input_signature, load_model_inputs, parse_batch_axes
    from onnxqat.evaluate import accuracy
    from onnxqat.io import load_model
    from onnxqat.runtime import Session

    model = load_model(args.model)
    axes = parse_batch_axes(args.batch_axis)
    arrays = load_model_inputs(args.data, input_signature(model), [args.label_key], batch_axes=axes)
    session = Session(model)
    acc, n = accuracy(session.run, NpzBatches(arrays, args.batch_size, batch_axes=axes), label_key=args.label_key,
                      output_index=args.output_index)
    print(f"accuracy={acc:.6f} n={n}")


def _compare(args: argparse.Namespace) -> None:
    from onnxqat.compare import compare_models
    from onnxqat.data import NpzBatches, input_signature, load_model_inputs, parse_batch_axes
    from onnxqat.io import load_model, write_text_atomic

    float_model = load_model(args.float_model)
    quantized = load_model(args.quantized_model)
    axes = parse_batch_axes(args.batch_axis)
    arrays = load_model_inputs(args.data, input_signature(float_model), batch_axes=axes)
    rows = compare_models(float_model, quantized, NpzBatches(arrays, args.batch_size, batch_axes=axes))
    for r in rows:
        parts = [f"output {r.output}:", f"sqnr_db={r.sqnr_db:.2f}", f"cosine={r.cosine:.6f}"]
        if r.top1_agreement is not None:
            parts.append(f"top1_agreement={r.top1_agreement:.4f}")
        parts.append(f"max_abs_diff={r.max_abs_diff:.4g}")
        if r.fused_vs_reference_lsb is not None:
            parts.append(f"fused_vs_reference_lsb={r.fused_vs_reference_lsb:.1f}")
        print(" ".join(parts))
    if args.json:
        write_text_atomic(args.json, json.dumps([r.as_dict() for r in rows], indent=2) + "\n")
        print(f"wrote {args.json}")


def _analyze(args: argparse.Namespace) -> None:
    from onnxqat.analysis import analyze
    from onnxqat.data import NpzBatches, input_signature, load_model_inputs
    from onnxqat.io import staged_outputs
    from onnxqat.report import render_html

    sim = _calibrated_sim(args, args.data)
    signature = input_signature(sim.float_model)
    calib = list(NpzBatches(load_model_inputs(args.data, signature), args.batch_size, limit=4 * args.batch_size))
    evaluation = None
    if args.eval is not None:
        arrays = load_model_inputs(args.eval, signature, [args.label_key])
        evaluation = list(NpzBatches(arrays, 500, limit=args.eval_samples))
    result = analyze(sim, calib, evaluation, label_key=args.label_key, output_index=args.output_index,
                     keep=args.keep_16bit)
    import os

    name = os.path.basename(args.model)
    with staged_outputs(args.output_dir) as stage:
        for file, text in (("report.html", render_html(result, model_name=name)),
                           ("report.json", json.dumps(result, indent=1) + "\n"),
                           ("mixed_precision.json", json.dumps(result["mixed_precision"], indent=2) + "\n")):
            with open(stage.path(file), "w", encoding="utf-8") as f:
                f.write(text)
            stage.add(stage.path(file))
    sens = result["sensitivity"]
    print(f"{result['settings']['metric']}: float {sens['float']:.4f}, quantized {sens['quantized']:.4f}")
    for rank, node in enumerate(sens["ranking"][:5], 1):
        row = next(r for r in sens["layers"] if r["node"] == node)
        print(f"{rank}. {node} ({row['op_type']}): {row['gain_if_float']:+.4f} if left float")
    print(f"wrote {os.path.join(args.output_dir, 'report.html')}, report.json, mixed_precision.json")


def _demo(args: argparse.Namespace) -> None:
    from onnxqat.demo import run_demo

    run_demo(args.output_dir, models=args.models, epochs=args.epochs)


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: object = None, line: str | None = None) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import warnings

    warnings.showwarning = _one_line_warning
    handlers = {"quantize": _quantize, "train": _train, "eval": _eval, "analyze": _analyze, "demo": _demo,
                "compare": _compare}
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
