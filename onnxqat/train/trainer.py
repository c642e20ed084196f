"""Quantization-aware training of a simulation with onnxruntime-training.

>>> trainer = sim.trainer(loss="cross_entropy", lr=1e-4, range_learning=False)   # doctest: +SKIP
>>> trainer.fit(train_batches, epochs=2, eval_batches=test, checkpoint_dir="ckpt")  # doctest: +SKIP
>>> sim.export("out")       # trained weights, learned encodings, deployable QDQ model  # doctest: +SKIP

The trainer owns a working folder (a temporary one unless ``work_dir`` is given) holding the
training artifacts; nothing is written to the current directory. After every epoch the trained
weights (and learned ranges) are written back into the sim, so ``sim.run``, evaluation and export
reflect them; with ``checkpoint_dir`` a checkpoint is written atomically, and ``fit`` resumes from
the last one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from tqdm.auto import tqdm

from onnxqat.data import count_batches, input_signature, validate_feed
from onnxqat.errors import ConfigError, DataError, ModelError, OutputError
from onnxqat.evaluate import accuracy, check_labels
from onnxqat.graph import values_by_name
from onnxqat.runtime import Session
from onnxqat.train.lower import LossSpec, TrainingGraph, lower_for_training
from onnxqat.train.ort_training import training_modules

if TYPE_CHECKING:
    from onnxqat.sim import QuantizationSimModel

__all__ = ["OPTIMIZERS", "EpochStats", "QATTrainer"]

OPTIMIZERS = ("adamw", "sgd")
_CHECKPOINT = "checkpoint.ckpt"


@dataclasses.dataclass(frozen=True)
class EpochStats:
    epoch: int
    loss: float
    train_accuracy: float | None
    eval_accuracy: float | None
    steps: int
    seconds: float

    def line(self) -> str:
        parts = [f"epoch {self.epoch}", f"loss={self.loss:.4f}"]
        if self.train_accuracy is not None:
            parts.append(f"train_accuracy={self.train_accuracy:.4f}")
        if self.eval_accuracy is not None:
            parts.append(f"eval_accuracy={self.eval_accuracy:.4f}")
        parts.append(f"steps={self.steps} time={self.seconds:.1f}s")
        return " ".join(parts)


class QATTrainer:
    """Fine-tunes a calibrated :class:`QuantizationSimModel` in onnxruntime.

    Args:
        sim: A calibrated simulation; it is updated in place after every epoch.
        loss: ``cross_entropy`` (labels), ``mse`` (targets) or ``distill`` (match the float model;
            no labels needed).
        optimizer: ``adamw`` or ``sgd``.
        lr: Learning rate.
        weight_decay: AdamW weight decay (applies to every trained tensor).
        range_learning: Train activation scales and zero points (LSQ) instead of keeping the
            calibrated ones. Weight encodings always follow the weights.
        encoding_lr_scale: How much faster than the weights encodings move under range learning
            (see :class:`~onnxqat.train.lower.RangeParams`).
        output_index: Model output the loss reads.
        label_key, target_key: Batch keys of labels (cross-entropy) and targets (MSE).
        temperature: Distillation temperature.
        freeze: Initializer or node names whose parameters are not trained.
        train_last_n: Train only the parameters of the last N layers (nodes with weights).
        work_dir: Folder for the training artifacts (default: a temporary folder).
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).
    """

    def __init__(
        self,
        sim: QuantizationSimModel,
        *,
        loss: str = "cross_entropy",
        optimizer: str = "adamw",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        range_learning: bool = False,
        encoding_lr_scale: float = 10.0,
        output_index: int = 0,
        label_key: str = "label",
        target_key: str = "target",
        temperature: float = 2.0,
        freeze: Sequence[str] = (),
        train_last_n: int | None = None,
        work_dir: str | os.PathLike[str] | None = None,
        threads: int | None = None,
    ) -> None:
        sim._require_calibrated()
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ConfigError(f"learning rate must be a positive number, got {lr!r}")
        self.sim = sim
        self.loss = LossSpec(loss, output_index, label_key, target_key, temperature)
        self.optimizer_name = optimizer
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.range_learning = range_learning
        self.encoding_lr_scale = float(encoding_lr_scale)
        self.threads = threads
        self._initial_encodings = dict(sim.encodings)
        frozen = self._resolve_frozen(freeze, train_last_n)
        self.graph: TrainingGraph = lower_for_training(
            sim.float_model, sim.effective_plan, sim.encodings, self.loss, range_learning=range_learning,
            encoding_lr_scale=self.encoding_lr_scale, frozen=frozen,
        )
        self._signature = input_signature(sim.float_model)
        self._teacher = self._teacher_session() if self.graph.teacher_input else None
        if work_dir is None:
            self._tmp: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(prefix="onnxqat-train-")
            self.work_dir = self._tmp.name
        else:
            self._tmp = None
            self.work_dir = os.fspath(work_dir)
            os.makedirs(self.work_dir, exist_ok=True)
        self._generate_artifacts()
        self._state: Any = None
        self._module: Any = None
        self._optimizer: Any = None
        self.history: list[EpochStats] = []
        self.epochs_done = 0

    # -- setup -----------------------------------------------------------------------------------
    def _resolve_frozen(self, freeze: Sequence[str], train_last_n: int | None) -> set[str]:
        graph = self.sim.float_model.graph
        frozen: set[str] = set()
        nodes = {n.name: n for n in graph}
        for name in freeze:
            if name in graph.initializers:
                frozen.add(name)
            elif name in nodes:
                frozen.update(v.name for v in nodes[name].inputs if v is not None and v.name in graph.initializers)
            else:
                raise ConfigError(f"freeze: no initializer or node named '{name}'")
        if train_last_n is not None:
            if train_last_n < 1:
                raise ConfigError(f"train_last_n must be >= 1, got {train_last_n}")
            layers = [n for n in graph if any(v is not None and v.name in graph.initializers and v.const_value is not None
                                               and v.const_value.size > 1 for v in n.inputs)]
            keep = {v.name for n in layers[-train_last_n:] for v in n.inputs if v is not None}
            frozen.update(name for name in graph.initializers if name not in keep)
            if self.range_learning:
                frozen.update(f"{q.name}.log_scale" for q in self.sim.plan.activations)
                frozen.update(f"{q.name}.zero_point_offset" for q in self.sim.plan.activations)
        return frozen

    def _teacher_session(self) -> Session:
        teacher = self.sim.float_model.clone()
        source = self.graph.teacher_source
        values = values_by_name(teacher.graph)
        teacher.graph.outputs.clear()
        teacher.graph.outputs.append(values[source])
        return Session(teacher)

    def _generate_artifacts(self) -> None:
        artifacts, _ = training_modules()
        from onnxruntime.training import onnxblock

        optimizer = (
            onnxblock.optim.AdamW(weight_decay=self.weight_decay)
            if self.optimizer_name == "adamw"
            else onnxblock.optim.SGD()
        )
        proto = ir.to_proto(self.graph.model)
        with _quiet():
            try:
                artifacts.generate_artifacts(
                    proto,
                    requires_grad=list(self.graph.trainable),
                    frozen_params=[],
                    loss=None,
                    optimizer=optimizer,
                    artifact_directory=self.work_dir,
                )
            except Exception as e:  # onnxruntime raises plain RuntimeErrors/ValidationErrors here
                first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise ModelError(f"onnxruntime-training cannot build a training graph for this model: {first}") from None

    def _path(self, name: str) -> str:
        return os.path.join(self.work_dir, name)

    def _open(self, checkpoint: str) -> None:
        _, api = training_modules()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
        self._state = api.CheckpointState.load_checkpoint(checkpoint)
        self._module = api.Module(self._path("training_model.onnx"), self._state, self._path("eval_model.onnx"),
                                  session_options=options)
        self._optimizer = api.Optimizer(self._path("optimizer_model.onnx"), self._module)
        self._optimizer.set_learning_rate(self.lr)
        self._inputs = list(self._module.input_names())

    # -- checkpoints -------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Identity of the training setup: a checkpoint resumes only into the same one."""
        h = hashlib.sha256()
        setup = (self.loss, self.optimizer_name, self.range_learning, self.encoding_lr_scale, self.graph.trainable)
        h.update(repr(setup).encode())
        for name in sorted(self._initial_encodings):
            enc = self._initial_encodings[name]
            h.update(name.encode())
            h.update(enc.scale.tobytes())
            h.update(enc.zero_point.tobytes())
            h.update(str(enc.bitwidth).encode())
        return h.hexdigest()[:16]

    def save_checkpoint(self, checkpoint_dir: str | os.PathLike[str]) -> str:
        """Write the training state (weights, optimizer, epoch) atomically; returns its path."""
        _, api = training_modules()
        folder = os.fspath(checkpoint_dir)
        try:
            os.makedirs(folder, exist_ok=True)
            self._state.properties["onnxqat_epoch"] = self.epochs_done
            self._state.properties["onnxqat_fingerprint"] = self.fingerprint()
            self._state.properties["onnxqat_history"] = json.dumps([dataclasses.asdict(s) for s in self.history])
            fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", dir=folder)
            os.close(fd)
            api.CheckpointState.save_checkpoint(self._state, tmp, include_optimizer_state=True)
            final = os.path.join(folder, _CHECKPOINT)
            os.replace(tmp, final)
        except OSError as e:
            raise OutputError(f"{folder}: cannot write checkpoint: {e.strerror or e}") from None
        return final

    def _resume(self, checkpoint_dir: str) -> bool:
        path = os.path.join(checkpoint_dir, _CHECKPOINT)
        if not os.path.isfile(path):
            return False
        self._open(path)
        props = self._state.properties
        if "onnxqat_fingerprint" not in props or props["onnxqat_fingerprint"] != self.fingerprint():
            raise ConfigError(
                f"{path}: the checkpoint belongs to a different training setup (model, plan, encodings, "
                "loss or range learning differ); use another checkpoint_dir or resume=False"
            )
        self.epochs_done = int(props["onnxqat_epoch"])
        self.history = [EpochStats(**s) for s in json.loads(props["onnxqat_history"])]
        self.write_back()
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
        if epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {epochs}")
        folder = os.fspath(checkpoint_dir) if checkpoint_dir is not None else None
        if self._module is None:
            if not (folder and resume and self._resume(folder)):
                self._open(self._path("checkpoint"))
        while self.epochs_done < epochs:
            epoch = self.epochs_done
            if hasattr(train_batches, "set_epoch"):
                train_batches.set_epoch(epoch)  # type: ignore[attr-defined]
            start = time.perf_counter()
            loss, train_acc, steps = self._train_epoch(train_batches, epoch, progress)
            self.write_back()
            eval_acc = None
            if eval_batches is not None:
                eval_acc, _ = accuracy(self.sim.run, eval_batches, label_key=self.loss.label_key,
                                       output_index=self.loss.output_index, progress=progress, desc="evaluating")
            stats = EpochStats(epoch + 1, loss, train_acc, eval_acc, steps, time.perf_counter() - start)
            self.history.append(stats)
            self.epochs_done = epoch + 1
            if folder is not None:
                self.save_checkpoint(folder)
            if on_epoch is not None:
                on_epoch(stats)
        return self.history

    def _feed(self, batch: Mapping[str, Any], index: int) -> tuple[list[np.ndarray], np.ndarray | None]:
        where = f"training data: batch {index}"
        feed = validate_feed(batch, self._signature, where=where)
        n = next(iter(feed.values())).shape[0]
        labels = None
        extra: dict[str, np.ndarray] = {}
        for graph_input, key in self.graph.feeds.items():
            if key in feed:
                continue
            if key == self.loss.label_key and self.loss.kind == "cross_entropy":
                labels = check_labels(batch, key, n, where) if self._labels_rank() == 1 else _labels_nd(batch, key, where)
                extra[graph_input] = labels.astype(np.int64)
            elif key == self.loss.target_key:
                if key not in batch:
                    raise DataError(f"{where}: no target array '{key}' for the mse loss")
                extra[graph_input] = np.asarray(batch[key], dtype=np.float32)
        if self._teacher is not None:
            extra[self.graph.teacher_input] = self._teacher.run(feed)[0]  # type: ignore[index]
        values = {**feed, **extra}
        return [values[name] for name in self._inputs], labels

    def _labels_rank(self) -> int:
        return max(1, self._source_rank() - 1)

    def _source_rank(self) -> int:
        out = self.graph.model.graph.outputs[1]
        return len(out.shape) if out.shape is not None else 2

    def _train_epoch(self, batches: Iterable[Mapping[str, Any]], epoch: int, progress: bool | None) -> tuple[float, float | None, int]:
        self._module.train()
        total_loss, total, correct, steps = 0.0, 0, 0, 0
        bar = tqdm(batches, total=count_batches(batches), desc=f"epoch {epoch + 1}", unit="batch",
                   disable=None if progress is None else not progress)
        for i, batch in enumerate(bar):
            inputs, labels = self._feed(batch, i)
            loss, prediction = self._module(*inputs)
            loss = float(loss)
            if not math.isfinite(loss):
                raise DataError(f"training diverged: loss is {loss} at epoch {epoch + 1}, batch {i}; lower the learning rate")
            self._optimizer.step()
            self._module.lazy_reset_grad()
            n = len(inputs[0]) if np.ndim(inputs[0]) else 1
            total_loss += loss * n
            total += n
            steps += 1
            if labels is not None and labels.ndim == 1:
                correct += int((prediction.reshape(len(labels), -1).argmax(-1) == labels).sum())
            bar.set_postfix(loss=f"{total_loss / total:.4f}")
        bar.close()
        if steps == 0:
            raise DataError("training data: no batches")
        train_acc = correct / total if self.loss.kind == "cross_entropy" and self._labels_rank() == 1 else None
        return total_loss / total, train_acc, steps

    def compute_gradients(self, batch: Mapping[str, Any]) -> tuple[float, dict[str, np.ndarray]]:
        """Loss and gradient of every trained tensor on one batch, without an optimizer step."""
        if self._module is None:
            self._open(self._path("checkpoint"))
        self._module.train()
        inputs, _ = self._feed(batch, 0)
        loss, _ = self._module(*inputs)
        grads = {name: np.array(self._state.parameters[name].grad) for name in self.graph.trainable}
        self._module.lazy_reset_grad()
        return float(loss), grads

    # -- write-back --------------------------------------------------------------------------------
    def trained_parameters(self) -> dict[str, np.ndarray]:
        """Current values of every trained tensor (weights and range-learning parameters)."""
        return {name: np.array(self._state.parameters[name].data) for name in self.graph.trainable}

    def write_back(self) -> None:
        """Copy trained weights and learned encodings into the sim."""
        if self._state is None:
            return
        params = self.trained_parameters()
        weights = {k: v for k, v in params.items() if k in self.sim.float_model.graph.initializers}
        self.sim.set_weights(weights)
        for rp in self.graph.range_params:
            enc = self._initial_encodings[rp.quantizer]
            scale = rp.scale(float(params[rp.scale_param])) if rp.scale_param in params else enc.scale
            zero_point = enc.zero_point
            if rp.zero_point_param is not None and rp.zero_point_param in params:
                zero_point = rp.zero_point(float(params[rp.zero_point_param]), enc.qmin, enc.qmax)
            self.sim.encodings[rp.quantizer] = dataclasses.replace(
                enc, scale=np.asarray(scale, np.float32).reshape(enc.scale.shape),
                zero_point=np.asarray(zero_point, np.int64).reshape(enc.zero_point.shape),
            )
        self.sim._session = None

    def close(self) -> None:
        """Release the training session and delete the temporary working folder."""
        self._module = self._optimizer = self._state = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> QATTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _labels_nd(batch: Mapping[str, Any], key: str, where: str) -> np.ndarray:
    if key not in batch:
        raise DataError(f"{where}: no label array '{key}' (got {sorted(map(str, batch))})")
    labels = np.asarray(batch[key])
    if labels.dtype.kind not in "iu":
        raise DataError(f"{where}: labels '{key}' must be integers, got {labels.dtype}")
    return labels


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence onnxruntime-training during artifact generation.

    Its C++ logger writes INFO lines to the stderr file descriptor whatever the configured
    severity, and its Python side logs at INFO; both are muted for the duration.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            logging.disable(previous)
