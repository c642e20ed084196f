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
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from onnxqat.errors import OnnxQatError, Terminated
from onnxqat.train.options import TrainOptions

if TYPE_CHECKING:  # the CLI imports numpy and the sim only when a command needs them
    import numpy as np

    from onnxqat.sim import QuantizationSimModel

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

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


class _SubParser(_Parser):
    """A subcommand's parser: its help shows each option's default (:class:`_Help`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)


def _add_sim_options(p: argparse.ArgumentParser, batch_size: int = 64) -> None:
    p.add_argument("--param-bw", type=int, default=8, help="weight bitwidth, 4-16")
    p.add_argument("--activation-bw", type=int, default=8, help="activation bitwidth, 4-16")
    p.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=None,
                   help="per-channel weight quantization (default: the config's; the onnxruntime preset "
                        "quantizes weights per channel, whose integer kernels take per-channel scales; "
                        "the aimet preset per tensor, as aimet-onnx's default config)")
    p.add_argument(
        "--scheme", choices=["auto", "minmax", "percentile", "sqnr", "meanminmax"], default="auto",
        help="activation calibration scheme; auto: whichever of minmax, percentile and sqnr brings the "
             "simulation closest to the float model's outputs on the first calibration batches; "
             "meanminmax: the mean of each sample's min and max (NNCF's default)",
    )
    p.add_argument(
        "--config", default=None,
        help="quantization config: JSON file or preset 'onnxruntime' (default) / 'aimet'",
    )
    p.add_argument("--weight-rounding", choices=["none", "seqmse", "adaround"], default="none",
                   help="after calibration, choose weight grids against each layer's float output on the "
                        "calibration data: seqmse (per-channel scales), adaround (scales, then rounding)")
    p.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="correct biases for the weights' mean output error (default: on with --weight-rounding)")
    p.add_argument("--pack-4bit", action="store_true",
                   help="store weights of at most 4 bits as packed INT4/UINT4 in model_qdq.onnx: half the "
                        "file, but onnxruntime's CPU provider runs those layers in float")
    p.add_argument("--target", choices=["x86-avx2", "x86-vnni", "arm64", "htp"], default=None,
                   help="deployment target whose integer arithmetic the model must be exact on "
                        "(default: detected from this machine)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="batch size for running the data")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="run calibration and training on onnxruntime's CPU or CUDA provider")
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
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_SubParser)

    q = sub.add_parser("quantize", help="simulate + calibrate + export (PTQ)")
    q.add_argument("model", help="float ONNX model")
    q.add_argument("--data", required=True, help="calibration npz: one array per model input")
    q.add_argument("--output-dir", required=True, help="where model.onnx, model.encodings, model_qdq.onnx go")
    _add_sim_options(q)
    q.add_argument("--encoding-version", choices=["1.0.0", "0.6.1"], default="1.0.0")
    q.add_argument("--prefix", default="model", help="file name prefix of the outputs")
    q.add_argument("--encodings", default=None, metavar="FILE",
                   help="AIMET encodings to use instead of calibrating (ours or aimet-onnx's; names matched "
                        "through Identity/Reshape/... and folded BatchNorms)")
    q.add_argument("--missing-encodings", choices=["error", "calibrate"], default="error",
                   help="quantizers --encodings has no encoding for: an error, or calibrated on --data")
    q.add_argument("--encodings-format", choices=["onnxqat", "aimet-strict"], default="onnxqat",
                   help="aimet-strict: name tensors as aimet-onnx's graph of MODEL does, for its "
                        "load_encodings(strict=True)")
    q.add_argument("--target-accuracy-drop", type=float, default=None, metavar="X",
                   help="mixed precision: the cheapest 4/8/16-bit assignment per node whose top-1 on --eval "
                        "stays within X of the float model's; writes OUT/mixed_precision.json (a --config)")
    q.add_argument("--target-sqnr", type=float, default=None, metavar="DB",
                   help="mixed precision: the same, keeping output --output-index at DB dB SQNR against float")
    q.add_argument("--eval", default=None, help="labelled npz for --target-accuracy-drop")
    q.add_argument("--label-key", default="label")
    q.add_argument("--output-index", type=int, default=0)
    q.add_argument("--eval-samples", type=int, default=1000, help="evaluation samples the search uses")

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
    t.add_argument("--lr", type=float, default=TRAIN_DEFAULTS.lr,
                   help="AdamW learning rate; default: 1e-5 at 8 bits, doubled per bit --activation-bw "
                        "is below 8 (4 bits: 1.6e-4)")
    t.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="optimizer")
    t.add_argument("--range-learning", action="store_true", help="train activation scales/offsets (LSQ)")
    t.add_argument("--freeze", action="append", default=[], metavar="NAME",
                   help="initializer or node whose parameters stay fixed (repeatable)")
    t.add_argument("--train-last-n", type=int, default=None, help="train only the last N layers with weights")
    t.add_argument("--micro-batch", type=int, default=0, metavar="N",
                   help="samples per training run: each --batch-size batch runs in pieces of at most N, gradients "
                        "added up exactly (the same steps and updates); 0 (default): the largest size within a "
                        "memory estimate (about 3x float inference at --batch-size)")
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
    a.add_argument("--eval-samples", type=int, default=500, help="evaluation samples used per configuration")
    a.add_argument("--top-k", type=int, default=None,
                   help="rank the worst K layers: stop scoring once --patience layers in a row do not enter them")
    a.add_argument("--patience", type=int, default=None, help="with --top-k (default: max(8, 2K))")
    a.add_argument("--suggest", action="store_true",
                   help="measure suggestions (per-channel, schemes, 7-bit weights, exclusions, 16-bit layers): "
                        "each built, calibrated and scored, and timed in plain onnxruntime when .venv-deploy exists")
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


# -- checks before any work ---------------------------------------------------------------------------
def _check_numbers(args: argparse.Namespace) -> None:
    """Every numeric option in range (argparse accepts -1, nan and inf)."""
    from onnxqat.errors import ConfigError
    from onnxqat.spec import MAX_BITWIDTH, MIN_BITWIDTH

    for name, low in (("batch_size", 1), ("epochs", 1), ("max_samples", 1), ("eval_samples", 1),
                      ("train_last_n", 1), ("micro_batch", 0), ("keep_16bit", 0), ("seed", 0), ("top_k", 1), ("patience", 1)):
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    for name in ("param_bw", "activation_bw"):
        value = getattr(args, name, None)
        if value is not None and not MIN_BITWIDTH <= value <= MAX_BITWIDTH:
            raise ConfigError(f"{name} must be an integer from {MIN_BITWIDTH} to {MAX_BITWIDTH}, got {value}")
    if getattr(args, "device", "cpu") != "cpu":
        from onnxqat.backend import providers

        providers(args.device)  # the installed runtime has that provider


def _config_path(args: argparse.Namespace) -> str | None:
    from onnxqat.config import PRESETS

    config = getattr(args, "config", None)
    return config if config is not None and config not in PRESETS else None


def _inputs(args: argparse.Namespace, *names: str) -> list[str]:
    """The input files of a command (the model, its data, the config), checked to be regular files."""
    from onnxqat.errors import ConfigError, DataError, ModelError
    from onnxqat.io import check_input_file

    paths = []
    for name in names:
        path = getattr(args, name, None)
        if path is not None:
            error = ModelError if name in ("model", "float_model", "quantized_model") else DataError
            paths.append(check_input_file(path, error))
    config = _config_path(args)
    if config is not None:
        paths.append(check_input_file(config, ConfigError))
    return paths


def _export_names(prefix: str) -> list[str]:
    from onnxqat.errors import ConfigError

    if not prefix or "/" in prefix or os.sep in prefix or "\0" in prefix or prefix in (".", ".."):
        raise ConfigError(f"--prefix {prefix!r}: expected a plain file name prefix")
    return [f"{prefix}.onnx", f"{prefix}.onnx.data", f"{prefix}.encodings", f"{prefix}_qdq.onnx",
            f"{prefix}_qdq.onnx.data"]


def _model_files(model: str, out_dir: str) -> list[str]:
    """The model and, when ``out_dir`` is its folder or inside it, the external-data files it uses."""
    from onnxqat.io import external_data_files

    folder = os.path.realpath(os.path.dirname(os.path.abspath(model)))
    out = os.path.realpath(out_dir)
    if os.path.commonpath([folder, out]) == folder:
        return [model, *external_data_files(model)]
    return [model]


def _check_outputs(args: argparse.Namespace, inputs: list[str], folder_names: list[str],
                   checkpoint_dir: str | None = None) -> None:
    """Every output writable, none replacing an input or another output: before any work."""
    from onnxqat.outputs import check_distinct, check_output_dir, check_output_file

    inputs = [*inputs, *_model_files(args.model, args.output_dir)[1:]]
    check_output_dir(args.output_dir, folder_names, inputs=inputs)
    outputs: list[tuple[str, str]] = [(f"output {n}", os.path.join(args.output_dir, n)) for n in folder_names]
    report = getattr(args, "report", None)
    if report:
        check_output_file(report, inputs=inputs)
        outputs.append(("report", report))
    if checkpoint_dir is not None:
        check_output_dir(checkpoint_dir, ["checkpoint.ckpt"], inputs=inputs)
        outputs.append(("checkpoint", os.path.join(checkpoint_dir, "checkpoint.ckpt")))
    check_distinct(outputs)


class _Checked:
    """What the checks before any work found: the model, its inputs, the calibration data."""

    def __init__(self, args: argparse.Namespace, calib: str) -> None:
        from onnxqat.config import check_names, load_config
        from onnxqat.data import input_signature, load_model_inputs, parse_batch_axes, warn_range_outliers
        from onnxqat.io import load_model
        from onnxqat.passes.fix_inputs import parse_fixed_inputs

        self.model_path = args.model
        self.fixed = parse_fixed_inputs(args.fix_input)
        self.axes = parse_batch_axes(args.batch_axis)
        self.model = load_model(args.model)
        self.signature = [s for s in input_signature(self.model) if s.name not in self.fixed]
        if args.config is not None:
            config = load_config(args.config)
            nodes = list(self.model.graph.all_nodes())
            check_names(config, (n.name for n in nodes if n.name), (n.op_type for n in nodes),
                        source=args.config)
        self.calib = load_model_inputs(calib, self.signature, batch_axes=self.axes)
        warn_range_outliers(self.calib, self.signature, where=calib, batch_axes=self.axes)

    def load(self, path: str, extra: Sequence[str] = (), optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
        from onnxqat.data import load_model_inputs

        return load_model_inputs(path, self.signature, extra, optional_keys=optional, batch_axes=self.axes)

    def check_labels(self, arrays: Mapping[str, np.ndarray], where: str, key: str, output_index: int,
                     binary: bool = False) -> None:
        """Class labels in range; with ``binary``, labels of a binary cross-entropy output (Sigmoid,
        one channel) in [0, 1] too."""
        from onnxqat.data import check_label_range, output_classes

        if binary and key in arrays:
            from onnxqat.train.lower import binary_output
            from onnxqat.train.trainer import check_binary_labels

            found = binary_output(self.model, output_index)
            if found is not None:
                check_binary_labels(arrays[key], where=where, key=key, output=found[0], sigmoid=found[1])
                return
        classes = output_classes(self.model, output_index)
        labels = arrays.get(key)
        if classes is not None and labels is not None and labels.ndim == 1:
            check_label_range(labels, classes, where=where, key=key)


def _calibrated_sim(args: argparse.Namespace, checked: _Checked) -> QuantizationSimModel:
    from onnxqat.data import NpzBatches
    from onnxqat.sim import QuantizationSimModel

    sim = QuantizationSimModel(
        args.model,
        param_bw=args.param_bw,
        activation_bw=args.activation_bw,
        quant_scheme=args.scheme,
        per_channel=args.per_channel,
        config=args.config,
        target=args.target,
        fix_inputs=checked.fixed,
        device=args.device,
    )
    how = "given" if args.target else "detected"
    print(f"target: {sim.target.name} ({how}; {sim.target.description})")
    print(f"plan: {sim.plan.summary()}")
    batches = NpzBatches(checked.calib, args.batch_size, batch_axes=checked.axes)
    if getattr(args, "encodings", None):
        sim.load_encodings(args.encodings, missing=args.missing_encodings,
                           batches=batches if args.missing_encodings == "calibrate" else None)
        return sim
    sim.compute_encodings(batches, weight_rounding=args.weight_rounding, bias_correction=args.bias_correction)
    if sim.scheme_choice is not None:
        print(f"calibration: {sim.scheme_choice.summary()}")
    return sim


def _export(sim: QuantizationSimModel, args: argparse.Namespace) -> None:
    """The export set and the report as one output transaction: both are published, or neither."""
    from onnxqat import distributed
    from onnxqat.outputs import transaction

    if not distributed.is_root():  # under MPI rank 0 alone writes
        return
    with transaction() as tx:
        paths = sim.export(args.output_dir, args.prefix, encoding_version=args.encoding_version,
                           encodings_format=getattr(args, "encodings_format", "onnxqat"),
                           pack_4bit=getattr(args, "pack_4bit", False))
        if args.report:
            with open(tx.file(args.report), "w", encoding="utf-8") as f:
                f.write(json.dumps(sim.report(), indent=2) + "\n")
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    if args.report:
        print(f"wrote report: {args.report}")


def _quantize(args: argparse.Namespace) -> None:
    from onnxqat.errors import ConfigError

    _check_numbers(args)
    mixed = args.target_accuracy_drop is not None or args.target_sqnr is not None
    if args.target_accuracy_drop is not None and args.target_sqnr is not None:
        raise ConfigError("give --target-accuracy-drop or --target-sqnr, not both")
    if args.target_accuracy_drop is not None and args.eval is None:
        raise ConfigError("--target-accuracy-drop needs --eval (labelled data)")
    inputs = _inputs(args, "model", "data", "encodings", "eval")
    _check_outputs(args, inputs, _export_names(args.prefix) + (["mixed_precision.json"] if mixed else []))
    checked = _Checked(args, args.data)
    evaluation = None
    if mixed and args.eval is not None:
        from onnxqat.data import NpzBatches

        labels = [args.label_key] if args.target_accuracy_drop is not None else []
        arrays = checked.load(args.eval, labels)
        if labels:
            checked.check_labels(arrays, args.eval, args.label_key, args.output_index)
        evaluation = list(NpzBatches(arrays, 250, limit=args.eval_samples, batch_axes=checked.axes))
    sim = _calibrated_sim(args, checked)
    if not mixed:
        _export(sim, args)
        return
    _mixed_export(sim, args, checked, evaluation)


def _mixed_export(sim: QuantizationSimModel, args: argparse.Namespace, checked: _Checked,
                  evaluation: list[dict[str, np.ndarray]] | None) -> None:
    """Mixed precision to the target, then the export and the chosen config in one transaction."""
    from onnxqat.data import NpzBatches
    from onnxqat.outputs import transaction

    calib = list(NpzBatches(checked.calib, args.batch_size, batch_axes=checked.axes))
    found = sim.mixed_precision(calib, evaluation, target_accuracy_drop=args.target_accuracy_drop,
                                target_sqnr=args.target_sqnr, label_key=args.label_key,
                                output_index=args.output_index)
    counts = ", ".join(f"{n} at {b} bits" for b, n in sorted(_bit_counts(found.bits).items()))
    print(f"mixed precision: {found.metric_name} {found.metric:.4f} (float {found.float_metric:.4f}, target "
          f">= {found.target:.4f}); cost {found.relative_cost:.3f} x W8A8 bit operations; {counts}; "
          f"{found.evaluations} evaluations, {found.seconds:.1f} s")
    with transaction() as tx:
        stage = tx.folder(args.output_dir, "mixed-precision")
        with open(stage.path("mixed_precision.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(found.config, indent=2) + "\n")
        _export(sim, args)
    print(f"wrote config: {os.path.join(args.output_dir, 'mixed_precision.json')}")


def _bit_counts(bits: dict[str, int]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for b in bits.values():
        counts[b] = counts.get(b, 0) + 1
    return counts


def _train(args: argparse.Namespace) -> None:
    from onnxqat.backend import require_training
    from onnxqat.data import NpzBatches, output_classes
    from onnxqat.train.options import TrainOptions, default_epochs

    require_training("onnxqat train")
    _check_numbers(args)
    options = {"loss": args.loss, "optimizer": args.optimizer, "lr": args.lr, "range_learning": args.range_learning,
               "output_index": args.output_index, "label_key": args.label_key, "target_key": args.target_key,
               "freeze": tuple(args.freeze), "train_last_n": args.train_last_n, "micro_batch": args.micro_batch}
    TrainOptions(**options)  # every training option checked before any work
    inputs = _inputs(args, "model", "data", "calib", "eval")
    _check_outputs(args, inputs, _export_names(args.prefix), args.checkpoint_dir)
    checked = _Checked(args, args.calib)
    output_classes(checked.model, args.output_index)  # in range
    _check_freeze(checked, args.freeze)
    extra = {"cross_entropy": [args.label_key], "mse": [args.target_key], "distill": []}[args.loss]
    train = checked.load(args.data, extra)
    if args.loss == "cross_entropy":
        checked.check_labels(train, args.data, args.label_key, args.output_index, binary=True)
    evaluation = None
    if args.eval is not None:
        arrays = checked.load(args.eval, optional=[args.label_key])
        if args.loss == "cross_entropy":
            checked.check_labels(arrays, args.eval, args.label_key, args.output_index, binary=True)
        evaluation = list(NpzBatches(arrays, args.batch_size, batch_axes=checked.axes))  # peak: the training step
    from onnxqat.distributed import RankRows, world

    ranks = world().size  # under MPI --batch-size is per rank: a global batch of ranks x batch size, split
    batches: NpzBatches | RankRows = NpzBatches(train, args.batch_size * ranks, shuffle=True, seed=args.seed, limit=args.max_samples,
                         batch_axes=checked.axes)
    batches = RankRows(batches) if ranks > 1 else batches
    if args.epochs is None:
        args.epochs = default_epochs(len(batches))
        print(f"epochs: {args.epochs} ({len(batches)} steps per epoch at batch size {args.batch_size}; "
              "--epochs to change)")
    sim = _calibrated_sim(args, checked)
    with sim.trainer(**options) as trainer:
        if args.lr is None:
            print(f"lr: {trainer.options.lr:g} (the default at this activation bitwidth; --lr to change)")
        if evaluation is not None:
            print("calibrated (PTQ) " + _metrics_line(trainer.evaluate(evaluation)), flush=True)
        told: list[int] = []

        def on_epoch(stats: Any) -> None:
            micro = trainer.micro_batch
            if not told and micro is not None and micro < args.batch_size:
                told.append(micro)
                how = "--micro-batch" if args.micro_batch else "chosen from a memory estimate; --micro-batch to change"
                print(f"micro-batches: {micro} samples a run, gradients of each --batch-size {args.batch_size} "
                      f"step added up ({how})")
            print(stats.line(), flush=True)

        trainer.fit(batches, epochs=args.epochs, eval_batches=evaluation, checkpoint_dir=args.checkpoint_dir,
                    on_epoch=on_epoch)
    _export(sim, args)


def _check_freeze(checked: _Checked, names: list[str]) -> None:
    import difflib

    from onnxqat.errors import ConfigError

    graph = checked.model.graph
    known = set(graph.initializers) | {n.name for n in graph if n.name}
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.5)
            hint = f" (closest: '{close[0]}')" if close else ""
            raise ConfigError(f"--freeze: no initializer or node named '{name}' in {checked.model_path}{hint}")


def _metrics_line(metrics: dict[str, float]) -> str:
    names = {"accuracy": "eval_accuracy", "top1_agreement": "eval_agreement", "sqnr_db": "eval_sqnr_db"}
    return " ".join(f"{names.get(k, k)}={v:.4f}" for k, v in metrics.items())


def _eval(args: argparse.Namespace) -> None:
    from onnxqat.data import (NpzBatches, check_label_range, input_signature, load_model_inputs, output_classes,
                              parse_batch_axes)
    from onnxqat.evaluate import accuracy
    from onnxqat.io import load_model
    from onnxqat.runtime import Session

    _check_numbers(args)
    _inputs(args, "model", "data")
    axes = parse_batch_axes(args.batch_axis)
    model = load_model(args.model)
    arrays = load_model_inputs(args.data, input_signature(model), [args.label_key], batch_axes=axes)
    labels = arrays[args.label_key]
    classes = output_classes(model, args.output_index)
    if classes is not None:
        check_label_range(labels, classes, where=args.data, key=args.label_key)
    session = Session(model)
    checked = classes is not None or labels.ndim != 1

    def run(batch: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        nonlocal checked
        outputs = session.run(batch)
        if not checked:  # a symbolic class dimension: checked on the first batch's scores
            scores = outputs[args.output_index] if -len(outputs) <= args.output_index < len(outputs) else None
            if scores is not None and scores.ndim >= 1 and scores.shape[-1] >= 2:
                check_label_range(labels, scores.shape[-1], where=args.data, key=args.label_key)
            checked = True
        return outputs

    acc, n = accuracy(run, NpzBatches(arrays, args.batch_size, batch_axes=axes), label_key=args.label_key,
                      output_index=args.output_index)
    print(f"accuracy={acc:.6f} n={n}")


def _compare(args: argparse.Namespace) -> None:
    from onnxqat.compare import compare_models
    from onnxqat.data import NpzBatches, input_signature, load_model_inputs, parse_batch_axes
    from onnxqat.io import load_model, write_text_atomic
    from onnxqat.outputs import check_output_file

    _check_numbers(args)
    inputs = _inputs(args, "float_model", "quantized_model", "data")
    if args.json:
        check_output_file(args.json, inputs=inputs)
    axes = parse_batch_axes(args.batch_axis)
    float_model = load_model(args.float_model)
    quantized = load_model(args.quantized_model)
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


ANALYZE_OUTPUTS = ("report.html", "report.json", "mixed_precision.json")


def _analyze(args: argparse.Namespace) -> None:
    from onnxqat.analysis import analyze
    from onnxqat.data import NpzBatches
    from onnxqat.outputs import transaction
    from onnxqat.report import render_html

    _check_numbers(args)
    inputs = _inputs(args, "model", "data", "eval")
    _check_outputs(args, inputs, list(ANALYZE_OUTPUTS))
    checked = _Checked(args, args.data)
    evaluation = None
    if args.eval is not None:
        arrays = checked.load(args.eval, [args.label_key])
        checked.check_labels(arrays, args.eval, args.label_key, args.output_index)
        evaluation = list(NpzBatches(arrays, 500, limit=args.eval_samples, batch_axes=checked.axes))
    sim = _calibrated_sim(args, checked)
    calib = list(NpzBatches(checked.calib, args.batch_size, limit=4 * args.batch_size, batch_axes=checked.axes))
    from onnxqat.demo import find_deploy_python

    result = analyze(sim, calib, evaluation, label_key=args.label_key, output_index=args.output_index,
                     keep=args.keep_16bit, top_k=args.top_k, patience=args.patience, suggest=args.suggest,
                     deploy_python=find_deploy_python() if args.suggest else None)
    name = os.path.basename(args.model)
    texts = (render_html(result, model_name=name), json.dumps(result, indent=1) + "\n",
             json.dumps(result["mixed_precision"], indent=2) + "\n")
    from onnxqat import distributed

    if not distributed.is_root():  # under MPI rank 0 alone writes
        return
    with transaction() as tx:
        stage = tx.folder(args.output_dir, "analyze")
        for file, text in zip(ANALYZE_OUTPUTS, texts):
            with open(stage.path(file), "w", encoding="utf-8") as f:
                f.write(text)
    sens = result["sensitivity"]
    print(f"{result['settings']['metric']}: float {sens['float']:.4f}, quantized {sens['quantized']:.4f} "
          f"({sens['scored']}/{sens['total_layers']} layers scored, {sens['runs']} runs, {sens['seconds']:.1f} s)")
    rows = {r["name"]: r for r in sens["layers"]}
    for rank, name in enumerate(sens["ranking"][:5], 1):
        row = rows[name]
        gain = "" if row["gain_if_float"] is None else f", {row['gain_if_float']:+.4f} if left float"
        print(f"{rank}. {name} (node {row['node']}, {row['op_type']}): {row['only_this_quantized']:.4f} "
              f"quantized alone{gain}")
    for r in result.get("suggestions", {}).get("rows", []):
        speed = f", {r['speedup_vs_float']:.2f}x float speed" if r.get("speedup_vs_float") else ""
        what = f"{r['metric']:.4f} ({r['change']:+.4f})" if "metric" in r else f"not possible: {r['error']}"
        print(f"suggestion: {r['suggestion']}: {what}{speed}")
    print(f"wrote {os.path.join(args.output_dir, 'report.html')}, report.json, mixed_precision.json")


def _demo(args: argparse.Namespace) -> None:
    from onnxqat.backend import require_training
    from onnxqat.demo import run_demo

    require_training("onnxqat demo (it fine-tunes the model)")
    _check_numbers(args)
    run_demo(args.output_dir, models=args.models, epochs=args.epochs)


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: object = None, line: str | None = None) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one clean shutdown; a second TERM waits for it
    raise Terminated()


def _internal_error(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import warnings

    shown = warnings.showwarning
    warnings.showwarning = _one_line_warning
    handlers = {"quantize": _quantize, "train": _train, "eval": _eval, "analyze": _analyze, "demo": _demo,
                "compare": _compare}
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _terminate)  # like Ctrl-C: temp folders removed, nothing half-published
    try:
        from onnxqat.distributed import run_command

        run_command(handlers[args.command], args)  # under mpirun: same setup on every rank, one error
    except OnnxQatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("error: terminated (SIGTERM); nothing was published, the last good checkpoint is kept", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("error: interrupted; nothing was published, the last good checkpoint is kept", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory (use smaller --batch-size or fewer samples)", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: still one line, the traceback on request
        if os.environ.get("ONNXQAT_TRACEBACK"):
            raise
        print(f"error: internal error, please report it (ONNXQAT_TRACEBACK=1 shows where): {_internal_error(e)}",
              file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        warnings.showwarning = shown
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
