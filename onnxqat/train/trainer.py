"""Quantization-aware training of a simulation state with onnxruntime-training.

>>> trainer = sim.trainer(loss="cross_entropy", lr=3e-5)                            # doctest: +SKIP
>>> trainer.fit(train_batches, epochs=2, eval_batches=test, checkpoint_dir="ckpt")  # doctest: +SKIP
>>> sim.export("out")       # trained weights, learned encodings, deployable QDQ model  # doctest: +SKIP

The trainer takes a :class:`~onnxqat.pipeline.SimState` and :class:`~onnxqat.train.options.TrainOptions`
and produces a new state after every epoch (:func:`apply_trained`, a pure function of the initial
state and the trained tensors); ``on_state`` receives it (the sim adopts it). It never touches the
object that created it.

The training graph is built at the first batch, with every shape made concrete from that batch
(onnxruntime-training sizes some gradients from static shapes; a symbolic batch dimension crashed
it), in a folder the trainer owns. The artifacts are generated and one step is run in a child
process first (:mod:`onnxqat.train.canary`), so a crash of the training runtime becomes an error
naming the node. Batches of another shape than the first are skipped when they are only shorter
(the usual last partial batch; counted in the epoch's stats) and refused otherwise.

An optimizer batch may run as several smaller training runs (``micro_batch``;
:mod:`onnxqat.train.micro`): the graph and the canary then have the micro-batch's shape, the
gradients of the runs add up to the batch's, and each step's loss and accuracy are still those of
the whole batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxqat import distributed, pipeline
from onnxqat.backend import providers, require_training
from onnxqat.calibrate.schemes import Scheme
from onnxqat.data import count_batches, input_signature, validate_feed
from onnxqat.errors import ConfigError, DataError, ModelError, OnnxQatError, OutputError
from onnxqat.evaluate import accuracy, agreement, check_labels
from onnxqat.graph import name_of
from onnxqat.passes.expose import ExposeValuesPass
from onnxqat.passes.shapes import ConcreteShapesPass
from onnxqat.pipeline import SimState
from onnxqat.plan import QuantPlan
from onnxqat.progress import Progress
from onnxqat.train.canary import gradient_nodes, locate_crash, run_canary
from onnxqat.train.lower import LossSpec, RangeParams, TrainingGraph, lower_for_training
from onnxqat.train.micro import (choose_micro_batch, forward_bytes, inference_bytes, pad_rows, piece_sizes, saved_bytes,
                                 take_rows)
from onnxqat.train.options import MIN_STEPS, TrainOptions, default_lr, lowest_activation_bitwidth
from onnxqat.train.ort_training import training_modules
from onnxqat.train.sessions import EvalSession, release_free_memory, session_options

__all__ = ["EpochStats", "QATTrainer", "StepResult", "apply_trained", "check_binary_labels"]

_CHECKPOINT = "checkpoint.ckpt"


@dataclasses.dataclass(frozen=True)
class EpochStats:
    """What one epoch did.

    Attributes:
        epoch: 1-based epoch number.
        loss: Mean training loss.
        train_accuracy: Top-1 on the training batches (cross-entropy with class labels; binary
            cross-entropy: the share of label elements on the right side of logit 0), or None.
        eval: Evaluation after the epoch: ``accuracy`` (with labels), ``top1_agreement`` and
            ``sqnr_db`` against the float model; empty without evaluation data.
        steps: Optimizer steps.
        seconds: Wall time of the epoch including evaluation.
        skipped: Samples of shorter batches left out (the training graph has a fixed batch shape).
        loss_first, loss_last: Mean loss over the first and last tenth of the epoch's steps.
    """

    epoch: int
    loss: float
    train_accuracy: float | None
    eval: Mapping[str, float]
    steps: int
    seconds: float
    skipped: int = 0
    loss_first: float | None = None
    loss_last: float | None = None

    def line(self) -> str:
        parts = [f"epoch {self.epoch}", f"loss={self.loss:.4f}"]
        if self.train_accuracy is not None:
            parts.append(f"train_accuracy={self.train_accuracy:.4f}")
        for key in ("accuracy", "top1_agreement", "sqnr_db"):
            if key in self.eval:
                name = {"accuracy": "eval_accuracy", "top1_agreement": "eval_agreement", "sqnr_db": "eval_sqnr_db"}[key]
                parts.append(f"{name}={self.eval[key]:.4f}" if key != "sqnr_db" else f"{name}={self.eval[key]:.2f}")
        parts.append(f"steps={self.steps} time={self.seconds:.1f}s")
        if self.skipped:
            parts.append(f"skipped={self.skipped}")
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class StepResult:
    loss: float
    prediction: np.ndarray


def apply_trained(
    state: SimState,
    trained: Mapping[str, np.ndarray],
    range_params: Sequence[RangeParams],
    scheme: Scheme = Scheme.MINMAX,
) -> SimState:
    """The state after training: ``state`` (the one training started from) with the trained
    weights (weight encodings re-derived) and the learned activation encodings."""
    initializers = state.float_model.graph.initializers
    weights = {k: v for k, v in trained.items() if k in initializers}
    new = pipeline.apply_weights(state, weights, scheme) if weights else state
    updates = {}
    for rp in range_params:
        enc = state.encodings[rp.quantizer]
        scale = rp.scale(float(trained[rp.scale_param])) if rp.scale_param in trained else enc.scale
        zero_point: np.ndarray | int = enc.zero_point
        if rp.zero_point_param is not None and rp.zero_point_param in trained:
            zero_point = rp.zero_point(float(trained[rp.zero_point_param]), enc.qmin, enc.qmax)
        updates[rp.quantizer] = dataclasses.replace(
            enc, scale=np.asarray(scale, np.float32).reshape(enc.scale.shape),
            zero_point=np.asarray(zero_point, np.int64).reshape(enc.zero_point.shape),
        )
    return new.with_encodings(updates)


class QATTrainer:
    """Fine-tunes a calibrated :class:`~onnxqat.pipeline.SimState` in onnxruntime.

    Args:
        state: A calibrated state (``sim.state``).
        options: See :class:`~onnxqat.train.options.TrainOptions`.
        param_scheme: How weight encodings are re-derived from trained weights.
        work_dir: Folder for the training artifacts (default: a temporary folder, deleted on close).
        on_state: Called with the new state after every epoch (and after resuming).
    """

    def __init__(
        self,
        state: SimState,
        options: TrainOptions | None = None,
        *,
        param_scheme: Scheme = Scheme.MINMAX,
        work_dir: str | os.PathLike[str] | None = None,
        on_state: Callable[[SimState], None] | None = None,
    ) -> None:
        require_training("quantization-aware training")
        state.require_calibrated()
        self.options = options if options is not None else TrainOptions()
        providers(self.options.device)  # a CUDA provider the runtime lacks is refused before any work
        self.param_scheme = param_scheme
        self.on_state = on_state
        self.initial = state
        self.state = state
        o = self.options
        self.loss = LossSpec(o.loss.value, o.output_index, o.label_key, o.target_key, o.temperature)
        self._plan = state.effective_plan if o.quantized else QuantPlan()
        if o.lr is None:  # the default follows the lowest activation bitwidth (options.default_lr)
            self.options = o = dataclasses.replace(o, lr=default_lr(lowest_activation_bitwidth(self._plan, state.encodings)))
        self._frozen = self._resolve_frozen()
        # lowered once with the model's own shapes: every problem is reported before any work
        self.graph: TrainingGraph = self._lower(state.float_model)
        self._signature = input_signature(state.float_model)
        self._float: EvalSession | None = None  # the float model: teacher and evaluation reference
        self._float_exposed: set[str] = set()  # its outputs
        if work_dir is None:
            self._tmp: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(prefix="onnxqat-train-")
            self.work_dir = self._tmp.name
        else:
            self._tmp = None
            self.work_dir = os.fspath(work_dir)
            try:
                os.makedirs(self.work_dir, exist_ok=True)
            except OSError as e:
                raise OutputError(f"{self.work_dir}: cannot create the training folder: {e.strerror or e}") from None
        self._shapes: dict[str, tuple[int, ...]] | None = None  # of an optimizer batch
        self.micro_batch: int | None = None  # samples per training run, set when the graph is built
        self._axes: dict[str, int | None] = {}
        self._state: Any = None
        self._module: Any = None
        self._optimizer: Any = None
        self._inputs: list[str] = []
        self.history: list[EpochStats] = []
        self.epochs_done = 0

    @classmethod
    def from_options(cls, state: SimState, *, param_scheme: Scheme = Scheme.MINMAX,
                     on_state: Callable[[SimState], None] | None = None,
                     work_dir: str | os.PathLike[str] | None = None, **options: Any) -> QATTrainer:
        """A trainer from keyword options (those of :class:`TrainOptions`)."""
        try:
            opts = TrainOptions(**options)
        except TypeError as e:
            raise ConfigError(f"trainer options: {e}") from None
        return cls(state, opts, param_scheme=param_scheme, work_dir=work_dir, on_state=on_state)

    # -- setup -----------------------------------------------------------------------------------
    def _lower(self, model: ir.Model) -> TrainingGraph:
        o = self.options
        return lower_for_training(
            model, self._plan, self.initial.encodings, self.loss, range_learning=o.range_learning and o.quantized,
            encoding_lr_scale=o.encoding_lr_scale, frozen=self._frozen, freeze_ranges=o.train_last_n is not None,
            fixed_weights=self.initial.fixed,
        )

    def _resolve_frozen(self) -> set[str]:
        graph = self.initial.float_model.graph
        frozen: set[str] = set()
        nodes = {n.name: n for n in graph}
        for name in self.options.freeze:
            if name in graph.initializers:
                frozen.add(name)
            elif name in nodes:
                frozen.update(name_of(v) for v in nodes[name].inputs if v is not None and v.name in graph.initializers)
            else:
                raise ConfigError(f"freeze: no initializer or node named '{name}'")
        n_last = self.options.train_last_n
        if n_last is not None:
            layers = [n for n in graph if any(v is not None and v.name in graph.initializers and v.const_value is not None
                                               and v.const_value.size > 1 for v in n.inputs)]
            keep = {v.name for n in layers[-n_last:] for v in n.inputs if v is not None}
            frozen.update(name for name in graph.initializers if name not in keep)
        return frozen

    def _float_session(self) -> EvalSession:
        """One session of the float model for both the distillation teacher (its ``teacher_source``
        is an extra output) and evaluation (the model outputs), built at first use."""
        source = self.graph.teacher_source
        if self._float is not None and source is not None and source not in self._float_exposed:
            self._float = None  # built for another graph's teacher (the lowering before concrete shapes)
        if self._float is None:
            model = self.initial.float_model
            outputs = [name_of(v) for v in model.graph.outputs]
            self._float_exposed = {*outputs, *([source] if source is not None else [])}
            if source is not None and source not in outputs:
                model = ExposeValuesPass([source])(model.clone()).model
            self._float = EvalSession(model, threads=self.options.threads, outputs=outputs, device=self.options.device)
        return self._float

    def _path(self, name: str) -> str:
        return os.path.join(self.work_dir, name)

    @property
    def built(self) -> bool:
        return self._module is not None

    def _build(self, batch: Mapping[str, Any]) -> None:
        """Training graph with the shapes of ``batch`` (of one micro-batch of it); artifacts and one
        step in a child first."""
        feed = validate_feed(batch, self._signature, where="training data: batch 0")
        rows = self._rows(feed)
        micro = self._micro_size(batch, feed, rows)
        first = batch if micro == rows else take_rows(batch, rows, 0, micro)
        graph, unresolved, _ = self._lower_concrete(validate_feed(first, self._signature, where="training data: batch 0"))
        out = graph.model.graph.outputs[1].shape
        if micro < rows and (out is None or not len(out) or out[0] != micro):
            raise ConfigError(f"micro_batch {micro}: the loss output's axis 0 is not the batch axis (shape "
                              f"{list(out) if out is not None else '?'} for {micro} samples); use micro_batch >= the "
                              "batch size")
        self.graph = graph
        self.micro_batch = micro
        self._shapes = {name: tuple(np.shape(v)) for name, v in feed.items()}
        values = self._values(first, rows=rows) if micro < rows else self._values(first)
        result = run_canary(self.work_dir, ir.to_proto(graph.model).SerializeToString(), graph.trainable,
                            self.options.optimizer.value, self.options.weight_decay, values, self.options.threads)
        if not result["ok"]:
            self._shapes = None
            raise ModelError(self._canary_error(result, unresolved))
        self._open(self._path("checkpoint"))

    def _lower_concrete(self, feed: Mapping[str, np.ndarray]) -> tuple[TrainingGraph, Sequence[str], ir.Model]:
        """The training graph with the shapes of ``feed``, the tensors left symbolic, and the
        float model with those shapes."""
        concrete = self.initial.float_model.clone()
        found = ConcreteShapesPass(feed)(concrete)
        graph = self._lower(concrete)
        if graph.trainable != self.graph.trainable:  # the same graph, with static shapes
            raise ModelError("the training graph with concrete shapes trains other tensors than without; "
                             "report this model")
        return graph, found.unresolved, concrete

    @staticmethod
    def _rows(feed: Mapping[str, np.ndarray]) -> int:
        first = next(iter(feed.values()), None)
        return int(first.shape[0]) if first is not None and first.ndim else 1

    def _micro_size(self, batch: Mapping[str, Any], feed: Mapping[str, np.ndarray], rows: int) -> int:
        """Samples per training run for optimizer batches of ``rows`` (options.micro_batch, else
        the memory estimate of :mod:`onnxqat.train.micro`); ``rows`` when the batch cannot be split
        on axis 0 (an input without ``rows`` rows there, a batch axis other than 0)."""
        wanted = self.options.micro_batch
        if wanted is not None and wanted >= rows:
            return rows
        splittable = rows > 1 and all(np.ndim(v) and np.shape(v)[0] == rows for v in feed.values()) and \
            all(axis == 0 for axis in self._axes.values())
        if not splittable:
            if wanted is not None:
                raise ConfigError(f"micro_batch {wanted}: the training batches cannot be split on axis 0 (every model "
                                  f"input needs its {rows} samples there); use micro_batch >= the batch size")
            return rows
        if wanted is not None:
            return piece_sizes(rows, wanted)[0]
        # the estimate, per sample: the training graph of one sample, its gradient graph generated
        # in a child (no step is run), and the float model's inference at one sample
        one = validate_feed(take_rows(batch, rows, 0, 1), self._signature, where="training data: batch 0")
        try:
            graph, _, concrete = self._lower_concrete(one)
        except OnnxQatError:
            return rows  # reported by the build at the whole batch
        out = graph.model.graph.outputs[1].shape
        if out is None or not len(out) or out[0] != 1:
            return rows  # the loss output's axis 0 is not the samples': not split
        inference = inference_bytes(concrete, rows)
        if choose_micro_batch(rows, inference, forward_bytes(graph.model)) == rows:
            return rows  # even every forward value of the batch fits: no gradient graph needed
        folder = self._path("estimate")
        os.makedirs(folder, exist_ok=True)
        result = run_canary(folder, ir.to_proto(graph.model).SerializeToString(), graph.trainable,
                            self.options.optimizer.value, self.options.weight_decay, {}, self.options.threads, step=False)
        if not result["ok"]:
            return rows
        kept = saved_bytes(graph.model, gradient_nodes(folder))
        shutil.rmtree(folder, ignore_errors=True)
        return choose_micro_batch(rows, inference, kept)

    def _canary_error(self, result: Mapping[str, Any], unresolved: Sequence[str]) -> str:
        if result.get("signal"):
            where = locate_crash(self.work_dir)
            at = f" in node '{where[1]}' ({where[2]}) of the training graph" if where else ""
            hint = (f"; {len(unresolved)} tensor(s) kept symbolic shapes (e.g. '{unresolved[0]}')" if unresolved else "")
            return (f"onnxruntime-training crashed ({result['signal']}){at} while running one training step of this "
                    f"model in a child process; no training was done{hint}. Freeze the layers around it "
                    "(--freeze NODE / train_last_n) to train the rest")
        stage = "building the training graph" if result.get("stage") == "artifacts" else "running one training step"
        return f"onnxruntime-training failed {stage}: {result.get('error')}"

    def _open(self, checkpoint: str) -> None:
        _, api = training_modules()
        options = session_options(self.options.threads)  # one arena with the evaluation sessions
        try:
            self._state = api.CheckpointState.load_checkpoint(checkpoint)
        except Exception as e:
            raise ConfigError(f"{checkpoint}: not a readable training checkpoint ({str(e).strip().splitlines()[-1][:200]})") from None
        self._module = api.Module(self._path("training_model.onnx"), self._state, self._path("eval_model.onnx"),
                                  device=self.options.device, session_options=options)
        self._optimizer = api.Optimizer(self._path("optimizer_model.onnx"), self._module)
        self._optimizer.set_learning_rate(self.options.lr)
        self._inputs = list(self._module.input_names())

    def _ensure_built(self, batch: Mapping[str, Any]) -> None:
        if self._module is None:
            self._build(batch)

    # -- checkpoints -------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Identity of the training setup: a checkpoint resumes only into the same one."""
        h = hashlib.sha256()
        o = self.options
        setup = (self.loss, o.optimizer.value, o.range_learning, o.encoding_lr_scale, o.quantized, self.graph.trainable)
        h.update(repr(setup).encode())
        for name in sorted(self.initial.encodings):
            enc = self.initial.encodings[name]
            h.update(name.encode())
            h.update(enc.scale.tobytes())
            h.update(enc.zero_point.tobytes())
            h.update(str(enc.bitwidth).encode())
        return h.hexdigest()[:16]

    def save_checkpoint(self, checkpoint_dir: str | os.PathLike[str]) -> str:
        """Write the training state (weights, optimizer, epoch) as one output transaction; returns its path.

        The metadata (epoch, setup fingerprint, history) is kept in the checkpoint's properties, so
        file and metadata are one unit; it replaces the previous checkpoint only once completely
        written (:mod:`onnxqat.outputs`), and what killed runs left in the folder is removed.
        """
        from onnxqat.outputs import transaction

        if self._state is None:
            raise ConfigError("nothing to checkpoint: no training step was run yet")
        _, api = training_modules()
        folder = os.fspath(checkpoint_dir)
        self._state.properties["onnxqat_epoch"] = self.epochs_done
        self._state.properties["onnxqat_fingerprint"] = self.fingerprint()
        self._state.properties["onnxqat_history"] = json.dumps([dataclasses.asdict(s) for s in self.history])
        try:
            with transaction(join=False) as tx:  # published now, even inside a caller's transaction
                stage = tx.folder(folder, "checkpoint")
                api.CheckpointState.save_checkpoint(self._state, stage.path(_CHECKPOINT), include_optimizer_state=True)
        except RuntimeError as e:  # onnxruntime reports a full disk as a plain RuntimeError
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            reason = next((line for line in lines if "rror" in line or "ail" in line), lines[0] if lines else "")
            reason = re.sub(r"^\d+ : \w+ : ", "", reason.split("] : ", 1)[-1])  # "1 : FAIL : " is no reason
            raise OutputError(f"{os.path.join(folder, _CHECKPOINT)}: cannot write checkpoint: {reason[:200]}") from None
        return os.path.join(folder, _CHECKPOINT)

    def _resume(self, checkpoint_dir: str) -> bool:
        path = os.path.join(checkpoint_dir, _CHECKPOINT)
        if not os.path.isfile(path):
            return False
        try:
            self._open(path)
        except ConfigError:  # onnxruntime's reason is a C++ signature
            raise ConfigError(f"{path}: not a readable training checkpoint (damaged or truncated); delete it to "
                              "start afresh, or use another checkpoint_dir") from None
        props = self._state.properties
        if "onnxqat_fingerprint" not in props or props["onnxqat_fingerprint"] != self.fingerprint():
            raise ConfigError(
                f"{path}: the checkpoint belongs to a different training setup (model, plan, encodings, "
                "loss or range learning differ); use another checkpoint_dir or resume=False"
            )
        self.epochs_done = int(props["onnxqat_epoch"])
        self.history = [EpochStats(**s) for s in json.loads(props["onnxqat_history"])]
        self._publish()
        return True

    # -- training ----------------------------------------------------------------------------------
    def fit(
        self,
        train_batches: Iterable[Mapping[str, Any]],
        *,
        epochs: int = 1,
        eval_batches: Iterable[Mapping[str, Any]] | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        resume: bool = True,
        progress: bool | None = None,
        on_epoch: Callable[[EpochStats], None] | None = None,
    ) -> list[EpochStats]:
        """Train until ``epochs`` epochs are done (counting those of a resumed checkpoint).

        ``train_batches`` must be re-iterable (a list, an :class:`~onnxqat.data.NpzBatches`, a
        DataLoader); if it has ``set_epoch`` it is called before each epoch, which makes shuffling
        reproducible across resumes.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
        folder = os.fspath(checkpoint_dir) if checkpoint_dir is not None else None
        if self._module is None:
            self._axes = dict(getattr(train_batches, "axes", None) or {})
            first = next(iter(train_batches), None)
            if first is None:
                raise DataError("training data: no batches")
            self._build(first)
            if folder and resume:
                self._resume(folder)
        per_epoch = count_batches(train_batches)
        if distributed.world().size > 1:  # rank 0 alone prints and writes; every rank has the same setup
            progress = progress if distributed.is_root() else False
            distributed.check_same("training setup", {"setup": self.fingerprint(), "batches": str(per_epoch)})
        if per_epoch is not None and per_epoch * (epochs - self.epochs_done) < MIN_STEPS:
            warnings.warn(f"only {per_epoch * (epochs - self.epochs_done)} optimizer steps to run "
                          f"({per_epoch} per epoch): fine-tuning usually needs {MIN_STEPS} or more; "
                          "use more epochs or a smaller batch size", RuntimeWarning, stacklevel=2)
        while self.epochs_done < epochs:
            epoch = self.epochs_done
            if hasattr(train_batches, "set_epoch"):
                train_batches.set_epoch(epoch)
            start = time.perf_counter()
            loss, train_acc, steps, skipped, trend = self._train_epoch(train_batches, epoch, progress)
            self._publish()
            metrics = self.evaluate(eval_batches, progress=progress) if eval_batches is not None else {}
            stats = EpochStats(epoch + 1, loss, train_acc, metrics, steps, time.perf_counter() - start, skipped,
                               trend[0], trend[1])
            self.history.append(stats)
            self.epochs_done = epoch + 1
            if trend[2]:
                warnings.warn(f"epoch {epoch + 1}: {trend[2]}; the learning rate may be too high", RuntimeWarning,
                              stacklevel=2)
            if folder is not None and distributed.is_root():
                self.save_checkpoint(folder)
            if on_epoch is not None:
                on_epoch(stats)
        return self.history

    def evaluate(self, batches: Iterable[Mapping[str, Any]], *, progress: bool | None = None) -> dict[str, float]:
        """Metrics of the current state: accuracy where batches carry labels (cross-entropy), and
        agreement with the float model (top-1 agreement, output SQNR) always."""
        batches = list(batches)
        run = EvalSession(pipeline.lower(self.state), threads=self.options.threads, device=self.options.device).run
        reference = self._float_session().run
        metrics: dict[str, float] = {}
        index = self.options.output_index
        if batches and self.options.label_key in batches[0] and self.loss.kind != "mse":
            try:
                if self.graph.binary:
                    metrics["accuracy"] = self._binary_accuracy(run, batches)
                else:
                    metrics["accuracy"], _ = accuracy(run, batches, label_key=self.options.label_key,
                                                      output_index=index, progress=progress, desc="evaluating")
            except DataError:
                pass  # labels that are not class labels of this output: agreement only
        found = agreement(reference, run, batches, output_index=index, progress=progress, desc="comparing")
        metrics.update({k: v for k, v in found.items() if k != "n"})
        return metrics

    def _binary_accuracy(self, run: Callable[[Mapping[str, Any]], Sequence[np.ndarray]],
                         batches: Sequence[Mapping[str, Any]]) -> float:
        """Share of label elements the model output gets on the right side of its threshold (0.5
        after a Sigmoid, 0 on logits), labels thresholded at 0.5: binary cross-entropy's accuracy."""
        threshold = 0.5 if self.graph.sigmoid else 0.0
        correct = total = 0
        for i, batch in enumerate(batches):
            out = np.asarray(run(batch)[self.options.output_index])
            labels = self._binary_labels(batch, out.shape, f"evaluation data: batch {i}")
            correct += int(np.count_nonzero((out > threshold) == (labels >= 0.5)))
            total += labels.size
        if total == 0:
            raise DataError("no samples to evaluate")
        return correct / total

    def _binary_labels(self, batch: Mapping[str, Any], shape: Sequence[object], where: str) -> np.ndarray:
        """Labels of binary cross-entropy as float32 of ``shape`` (the prediction's): numbers in [0,
        1], of that shape or of it without its one-channel axis 1 (``[N, H, W]`` masks of a
        ``[N, 1, H, W]`` map)."""
        key = self.loss.label_key
        if key not in batch:
            raise DataError(f"{where}: no label array '{key}' (got {sorted(map(str, batch))})")
        labels = np.asarray(batch[key])
        if labels.dtype.kind not in "biuf":
            raise DataError(f"{where}: labels '{key}' must be numbers in [0, 1], got {labels.dtype}")
        shape = tuple(shape)
        squeezed = shape[:1] + shape[2:] if len(shape) >= 2 and shape[1] == 1 else None

        def fits(want: tuple[object, ...]) -> bool:
            return len(want) == labels.ndim and all(not isinstance(w, int) or w == g for w, g in zip(want, labels.shape))

        if squeezed is not None and not fits(shape) and fits(squeezed):
            labels = labels.reshape(labels.shape[:1] + (1,) + labels.shape[1:])
        elif not fits(shape):
            dims = [d if isinstance(d, int) else "?" for d in shape]
            alt = f" or {[d if isinstance(d, int) else '?' for d in squeezed]}" if squeezed is not None else ""
            raise DataError(f"{where}: labels '{key}' have shape {list(labels.shape)}; binary cross-entropy needs the "
                            f"model output's shape {dims}{alt}")
        labels = labels.astype(np.float32)
        output = name_of(self.initial.float_model.graph.outputs[self.options.output_index])
        check_binary_labels(labels, where=where, key=key, output=output, sigmoid=self.graph.sigmoid)
        return labels

    def _values(self, batch: Mapping[str, Any], index: int = 0, *, rows: int | None = None,
                real: int | None = None, feed: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Every input of the training graph for one run (model inputs, labels, targets, teacher,
        sample weights): a whole batch (``rows`` None: every sample weighted ``1/N``), or a piece
        of an optimizer batch of ``rows`` samples whose first ``real`` rows are samples (weighted
        ``1/rows``) and the rest padding (weighted 0). ``feed``: the model inputs of ``batch``
        already validated."""
        where = f"training data: batch {index}"
        if feed is None:
            feed = validate_feed(batch, self._signature, where=where)
        n = next(iter(feed.values())).shape[0] if feed else 0
        extra: dict[str, np.ndarray] = {}
        for graph_input, key in self.graph.feeds.items():
            if key in feed:
                continue
            if key == self.loss.label_key and self.loss.kind == "cross_entropy" and self.graph.binary:
                prediction = self.graph.model.graph.outputs[1].shape
                dims: Sequence[object] = tuple(prediction) if prediction is not None else (n,)
                extra[graph_input] = self._binary_labels(batch, dims, where)
            elif key == self.loss.label_key and self.loss.kind == "cross_entropy":
                labels = (check_labels(batch, key, n, where) if self._labels_rank() == 1
                          else _labels_nd(batch, key, where))
                extra[graph_input] = labels.astype(np.int64)
            elif key == self.loss.target_key:
                if key not in batch:
                    raise DataError(f"{where}: no target array '{key}' for the mse loss")
                extra[graph_input] = np.asarray(batch[key], dtype=np.float32)
        if self.graph.teacher_input is not None and self.graph.teacher_source is not None:
            extra[self.graph.teacher_input] = self._float_session().run(feed, [self.graph.teacher_source])[0]
        if self.graph.weight_input:
            shape = next(v.shape for v in self.graph.model.graph.inputs if v.name == self.graph.weight_input)
            size = shape[0] if shape is not None and isinstance(shape[0], int) else n
            weight = np.full(size, 1.0 / size if rows is None else 1.0 / rows, np.float32)
            if rows is not None and real is not None:
                weight[real:] = 0.0
            extra[self.graph.weight_input] = weight
        values = {**feed, **extra}
        self._check_labels_range(values)
        return values

    def _check_labels_range(self, values: Mapping[str, np.ndarray]) -> None:
        if self.loss.kind != "cross_entropy" or self.graph.binary:
            return
        label_input = next((g for g, k in self.graph.feeds.items() if k == self.loss.label_key), None)
        prediction = self.graph.model.graph.outputs[1]
        classes = prediction.shape[self.graph.class_axis] if prediction.shape is not None else None
        if label_input is None or not isinstance(classes, int):
            return
        labels = values[label_input]
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise DataError(f"training data: labels '{self.loss.label_key}' range over [{int(labels.min())}, "
                            f"{int(labels.max())}] but the model output has {classes} classes")

    def _feed(self, batch: Mapping[str, Any], index: int) -> list[tuple[list[np.ndarray], np.ndarray | None, int]] | None:
        """The training runs of one optimizer batch: ``(inputs, labels, real rows)`` per piece of
        :attr:`micro_batch` samples (one run when it is the batch size), labels and real rows
        without the padding; None for a batch shorter than the training graph's (skipped)."""
        feed = validate_feed(batch, self._signature, where=f"training data: batch {index}")
        if self._shapes is not None:
            for name, shape in self._shapes.items():
                got = np.shape(feed[name])
                if got != shape:
                    if len(got) == len(shape) and got[1:] == shape[1:] and got[0] < shape[0]:
                        return None  # a shorter (last) batch: the training graph has a fixed batch size
                    raise DataError(f"training data: batch {index}: input '{name}' has shape {list(got)}, the "
                                    f"training graph was built for {list(shape)} (all batches need one shape)")
        rows = self._rows(feed)
        label_input = next((g for g, k in self.graph.feeds.items() if k == self.loss.label_key), None)
        micro = self.micro_batch if self.micro_batch is not None else rows
        if micro >= rows:
            values = self._values(batch, index, feed=feed)
            labels = values.get(label_input) if label_input is not None else None
            return [([values[name] for name in self._inputs], labels, rows)]
        runs = []
        start = 0
        for size in piece_sizes(rows, micro):
            piece = pad_rows(take_rows(batch, rows, start, start + size), size, micro)
            values = self._values(piece, index, rows=rows, real=size)
            labels = values.get(label_input) if label_input is not None else None
            runs.append(([values[name] for name in self._inputs], labels[:size] if labels is not None else None, size))
            start += size
        return runs

    def _run(self, runs: Sequence[tuple[list[np.ndarray], np.ndarray | None, int]]) -> tuple[float, np.ndarray]:
        """Forward and backward of every run of one optimizer batch (gradients add up in the
        runtime's buffers): the batch's loss (the runs' sum) and prediction (padding left out)."""
        loss = 0.0
        predictions = []
        for inputs, _, real in runs:
            part, prediction = self._module(*inputs)
            loss += float(part)
            predictions.append(np.asarray(prediction)[:real] if len(runs) > 1 else np.asarray(prediction))
        return loss, predictions[0] if len(predictions) == 1 else np.concatenate(predictions)

    @staticmethod
    def _labels_of(runs: Sequence[tuple[list[np.ndarray], np.ndarray | None, int]]) -> np.ndarray | None:
        labels = [r[1] for r in runs]
        if any(label is None for label in labels):
            return None
        return labels[0] if len(labels) == 1 else np.concatenate([np.asarray(label) for label in labels])

    def _labels_rank(self) -> int:
        return max(1, self._source_rank() - 1)

    def _source_rank(self) -> int:
        out = self.graph.model.graph.outputs[1]
        return len(out.shape) if out.shape is not None else 2

    def step(self, batch: Mapping[str, Any]) -> StepResult:
        """One optimizer step on ``batch``: forward, backward, update."""
        self._ensure_built(batch)
        fed = self._feed(batch, 0)
        if fed is None:
            raise DataError(f"batch: shorter than the training graph's batch shape {self._shapes}")
        self._module.train()
        loss, prediction = self._run(fed)
        if not math.isfinite(loss):
            raise DataError(f"training diverged: loss is {loss}; lower the learning rate")
        self._optimizer.step()
        self._module.lazy_reset_grad()
        return StepResult(loss, prediction)

    def _train_epoch(self, batches: Iterable[Mapping[str, Any]], epoch: int,
                     progress: bool | None) -> tuple[float, float | None, int, int, tuple[float | None, float | None, str | None]]:
        self._module.train()
        total_loss, total, correct, steps, skipped, elements = 0.0, 0, 0, 0, 0, 0
        losses: list[float] = []
        sync = distributed.GradientSync(self._state, self.graph.trainable) if distributed.world().size > 1 else None

        def postfix() -> str:
            return f"loss {total_loss / total:.4f}" if total else ""

        for i, batch in enumerate(Progress(batches, total=count_batches(batches), desc=f"epoch {epoch + 1}",
                                           enabled=progress, postfix=postfix)):
            fed = self._feed(batch, i)
            if fed is None:
                skipped += len(next(iter(validate_feed(batch, self._signature, where="batch").values())))
                if sync is not None:
                    sync.step(None)
                continue
            loss, prediction = self._run(fed)
            labels = self._labels_of(fed)
            if not math.isfinite(loss):
                raise DataError(f"training diverged: loss is {loss} at epoch {epoch + 1}, batch {i}; lower the learning rate")
            n = sum(real for _, _, real in fed)
            if sync is not None:  # gradients averaged over the ranks in place; the loss is their mean
                mean = sync.step(loss, n)
                if mean is None:  # some rank had a short batch: no rank steps
                    self._module.lazy_reset_grad()
                    skipped += n
                    continue
                loss = mean
            self._optimizer.step()
            self._module.lazy_reset_grad()
            total_loss += loss * n
            total += n
            steps += 1
            losses.append(loss)
            if labels is not None and self.graph.binary:
                correct += int(np.count_nonzero((np.asarray(prediction) > 0) == (labels >= 0.5)))
                elements += labels.size
            elif labels is not None and labels.ndim == 1:
                correct += int((np.asarray(prediction).reshape(len(labels), -1).argmax(-1) == labels).sum())
        if sync is not None:
            sync.finish()
        if steps == 0:
            raise DataError("training data: no batch of the training graph's shape")
        trend = _loss_trend(losses)
        if self.graph.binary:  # share of label elements on the right side of logit 0
            train_acc = correct / elements if elements else None
        else:
            train_acc = correct / total if self.loss.kind == "cross_entropy" and self._labels_rank() == 1 else None
        return total_loss / total, train_acc, steps, skipped, trend

    def compute_gradients(self, batch: Mapping[str, Any]) -> tuple[float, dict[str, np.ndarray]]:
        """Loss and gradient of every trained tensor on one batch, without an optimizer step."""
        self._ensure_built(batch)
        fed = self._feed(batch, 0)
        if fed is None:
            raise DataError("batch: shorter than the training graph's batch shape")
        self._module.train()
        loss, _ = self._run(fed)
        grads = {name: np.array(self._state.parameters[name].grad) for name in self.graph.trainable}
        self._module.lazy_reset_grad()
        return float(loss), grads

    def predict(self, batch: Mapping[str, Any]) -> np.ndarray:
        """The training graph's prediction output in eval mode (float semantics of the sim)."""
        self._ensure_built(batch)
        fed = self._feed(batch, 0)
        if fed is None:
            raise DataError("batch: shorter than the training graph's batch shape")
        self._module.eval()
        _, prediction = self._run(fed)
        return prediction

    # -- results -----------------------------------------------------------------------------------
    def trained_parameters(self) -> dict[str, np.ndarray]:
        """Current values of every trained tensor (weights and range-learning parameters)."""
        if self._state is None:
            return {}
        return {name: np.array(self._state.parameters[name].data) for name in self.graph.trainable}

    def _publish(self) -> None:
        self.state = apply_trained(self.initial, self.trained_parameters(), self.graph.range_params, self.param_scheme)
        if self.on_state is not None:
            self.on_state(self.state)

    def close(self) -> None:
        """Release the training session and delete the temporary working folder."""
        self._module = self._optimizer = self._state = self._float = None
        release_free_memory()  # the training step's memory goes back to the system
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> QATTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The loss of a step's batch varies several-fold from batch to batch; a hundredfold rise above
# the first step's (the weights the epoch began with) is a wrecked model, not noise.
WRECKED = 100.0


def _loss_trend(losses: Sequence[float]) -> tuple[float | None, float | None, str | None]:
    """Mean loss of the first and last tenth of an epoch's steps, and why the loss rose (None: it
    did not): the last tenth's mean clearly above the first tenth's (by over 10% and by more than
    three standard errors of the two means), or the last tenth's median :data:`WRECKED` times the
    first step's loss (a step that wrecked the model early, after which the loss stays flat; a far
    too high learning rate does that within the first tenth)."""
    if len(losses) < 10:
        return None, None, None
    tenth = len(losses) // 10
    first, last = np.asarray(losses[:tenth]), np.asarray(losses[-tenth:])
    reason = None
    if tenth >= 2:
        margin = 3 * math.sqrt((first.var(ddof=1) + last.var(ddof=1)) / tenth)
        if last.mean() > first.mean() * 1.1 and last.mean() - first.mean() > margin:
            reason = f"the training loss rose from {first.mean():.4g} to {last.mean():.4g} over the epoch"
    end = float(np.median(last))
    if reason is None and losses[0] > 0 and end > WRECKED * losses[0]:
        reason = (f"the training loss went from {losses[0]:.4g} at the epoch's first step to {end:.4g} at its "
                  "end (median of the last tenth)")
    return float(first.mean()), float(last.mean()), reason


def check_binary_labels(labels: np.ndarray, *, where: str, key: str, output: str, sigmoid: bool) -> None:
    """Labels of binary cross-entropy on ``output`` (a Sigmoid, else a one-channel output) must be
    finite numbers in [0, 1]."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "biuf":
        raise DataError(f"{where}: labels '{key}' must be numbers in [0, 1], got {labels.dtype}")
    if labels.size and not (np.isfinite(labels).all() and labels.min() >= 0 and labels.max() <= 1):
        what = "a Sigmoid" if sigmoid else "one channel"
        raise DataError(f"{where}: labels '{key}' range over [{labels.min():g}, {labels.max():g}] but output "
                        f"'{output}' is {what}: binary cross-entropy needs labels in [0, 1]")


def _labels_nd(batch: Mapping[str, Any], key: str, where: str) -> np.ndarray:
    if key not in batch:
        raise DataError(f"{where}: no label array '{key}' (got {sorted(map(str, batch))})")
    labels = np.asarray(batch[key])
    if labels.dtype.kind not in "iu":
        raise DataError(f"{where}: labels '{key}' must be integers, got {labels.dtype}")
    return labels

