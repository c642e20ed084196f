"""Data-parallel runs over MPI: ``mpirun -n N onnxqat train ...`` (or the Python API under mpirun).

Each of the N processes (ranks) holds the whole model; the data is split:

* training: rank ``r`` takes rows ``[r*B, (r+1)*B)`` of every global batch of ``N*B`` rows
  (:class:`RankRows`); after each backward pass the gradient buffers are averaged across ranks in
  place (:class:`GradientSync`) and every rank steps its own optimizer, so the ranks stay identical
  and N ranks at batch B train as one process at batch N*B (``QATTrainer.fit``; ``step`` and
  ``compute_gradients`` stay per rank);
* calibration: rank ``r`` observes every N-th batch (:func:`own_batches`); the observers are merged
  (:func:`merge_observers`) so every rank derives the encodings of all the data (min/max exactly;
  histograms within a bin, so percentile/SQNR ranges within one quantization step; weight rounding
  and bias correction still run on all the data on every rank);
* analysis: per-layer runs are split across ranks and gathered in order (:func:`map_split`).

Rank 0 alone prints and writes (checkpoints, exports, reports); every rank reads the same inputs and
can resume from the same checkpoint. Without an MPI launch (no launcher variables, or one process)
:func:`world` is a single process and every function here is the identity: ``mpi4py`` is imported
only under ``mpirun`` with more than one rank (the ``onnxqat[mpi]`` extra installs it).

Errors: a setup that differs between ranks (model, data or options: :func:`check_same`) or ranks
that run out of batches at different steps raise the same error on every rank, printed once by
rank 0. Any other error on one rank is printed by that rank and ends every rank
(``MPI_Abort``; :func:`run_command`); a rank that dies is ended by ``mpirun``, which ends the others.
Checkpoints are written as one output transaction, so the last good one stays readable.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any, TypeVar

import numpy as np

from onnxqat.errors import ConfigError, DataError, OnnxQatError

__all__ = [
    "GradientSync", "RankRows", "World", "check_same", "file_fingerprints", "is_root", "map_split",
    "merge_observers", "own_batches", "run_command", "world",
]

T = TypeVar("T")
R = TypeVar("R")

# variables the MPI launchers set in each process they start (Open MPI / PMIx, MPICH / Hydra, Slurm)
_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_SIZE", "MPI_LOCALNRANKS")


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size``; ``comm`` is None for one process."""

    rank: int = 0
    size: int = 1
    comm: Any = None

    @property
    def root(self) -> bool:
        return self.rank == 0


def _launched_size() -> int:
    for name in _SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


@functools.lru_cache(maxsize=1)
def world() -> World:
    """The MPI world when launched by mpirun with more than one rank, else a single process."""
    if _launched_size() <= 1:
        return World()
    try:
        from mpi4py import MPI
    except ImportError:
        raise ConfigError("started by an MPI launcher with several ranks, but mpi4py is not installed: "
                          "pip install 'onnxqat[mpi]' (or run without mpirun)") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() <= 1:
        return World()
    return World(comm.Get_rank(), comm.Get_size(), comm)


def is_root() -> bool:
    """Whether this process prints and writes (rank 0, or the only process)."""
    return world().root


def _collective(error: OnnxQatError) -> OnnxQatError:
    """Mark an error raised identically on every rank: rank 0 alone reports it."""
    error.collective = True
    return error


# -- setup checks ---------------------------------------------------------------------------------
def file_fingerprints(paths: Mapping[str, str | None]) -> dict[str, str]:
    """SHA-256 (first 16 hex digits) of each named file's bytes; None paths are left out."""
    found = {}
    for role, path in paths.items():
        if path is None or not os.path.isfile(path):
            continue
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        found[role] = h.hexdigest()[:16]
    return found


def check_same(what: str, fingerprint: Mapping[str, str]) -> None:
    """Raise one error on every rank unless every rank has the same ``fingerprint`` (a dict of
    named parts, e.g. ``{"model": sha, "data": sha}``: the error names the parts that differ)."""
    w = world()
    if w.size == 1:
        return
    every = w.comm.allgather(dict(fingerprint))
    for rank, other in enumerate(every):
        if other != every[0]:
            parts = sorted(k for k in set(other) | set(every[0]) if other.get(k) != every[0].get(k))
            raise _collective(ConfigError(
                f"rank {rank} has a different {what} than rank 0 ({', '.join(parts)} differ): every rank must "
                "run the same command on the same files"))


# -- data -----------------------------------------------------------------------------------------
def own_batches(batches: Iterable[T]) -> Iterable[T]:
    """This rank's batches for calibration: every ``size``-th, starting at ``rank`` (all of them
    for one process). Re-iterable when ``batches`` is."""
    w = world()
    if w.size == 1:
        return batches
    return _EveryNth(batches, w.rank, w.size)


def _length(batches: Iterable[Any]) -> int:
    """``len(batches)``: a TypeError, as len() gives, when they have none."""
    if not isinstance(batches, Sized):
        raise TypeError(f"object of type '{type(batches).__name__}' has no len()")
    return len(batches)


class _EveryNth:
    def __init__(self, batches: Iterable[Any], start: int, step: int) -> None:
        self.batches, self.start, self.step = batches, start, step

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.batches):
            if i % self.step == self.start:
                yield batch

    def __len__(self) -> int:
        return max(0, (_length(self.batches) - self.start + self.step - 1) // self.step)


class RankRows:
    """This rank's rows of every global batch: rank ``r`` of ``N`` takes rows ``[r*b, (r+1)*b)``
    with ``b = ceil(rows / N)`` along each array's batch axis (``axes``: key -> axis or None for
    arrays passed whole; default: ``batches.axes`` if it has one, else axis 0).

    Length and ``set_epoch`` are those of ``batches``, so every rank runs the same number of steps
    in the same shuffle order. A short last global batch gives some ranks fewer rows than the
    training graph's batch: the step is then skipped on every rank (:class:`GradientSync`).

    >>> [b["x"].tolist() for b in RankRows([{"x": np.arange(6)}], rank=1, size=2)]
    [[3, 4, 5]]
    """

    def __init__(self, batches: Iterable[Mapping[str, Any]], *, rank: int | None = None, size: int | None = None,
                 axes: Mapping[str, int | None] | None = None) -> None:
        w = world()
        self.batches = batches
        self.rank = w.rank if rank is None else rank
        self.size = w.size if size is None else size
        self.axes = dict(axes if axes is not None else getattr(batches, "axes", {}))

    def __len__(self) -> int:
        return _length(self.batches)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.batches:
            yield self.part(batch)

    def part(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        rows = None
        out = {}
        for key, value in batch.items():
            axis = self.axes.get(key, 0)
            array = np.asarray(value)
            if axis is None or array.ndim == 0:
                out[key] = value
                continue
            if rows is None:
                rows = -(-array.shape[axis] // self.size)
            index = [slice(None)] * array.ndim
            index[axis] = slice(self.rank * rows, (self.rank + 1) * rows)
            out[key] = array[tuple(index)]
        return out


# -- training -------------------------------------------------------------------------------------
class GradientSync:
    """Averages the gradient buffers of ``names`` across ranks, in place, before each optimizer step.

    ``state.parameters[name].grad`` is a numpy view of onnxruntime-training's gradient buffer, so
    writing the average into it changes what ``Optimizer.step()`` applies. One all-reduce per step
    carries every gradient (float32, packed in one buffer) and four numbers: whether the rank ran
    the step, whether it ran out of batches, and its loss sum and sample count.
    """

    def __init__(self, state: Any, names: Sequence[str]) -> None:
        self.world = world()
        self.state = state
        self.names = list(names)
        self.sizes = [int(np.asarray(state.parameters[n].data).size) for n in self.names]
        self.buffer = np.zeros(sum(self.sizes) + 4, dtype=np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes all-reduced per step (the gradients and the four numbers)."""
        return int(self.buffer.nbytes)

    def step(self, loss: float | None, samples: int = 0) -> float | None:
        """After this rank's backward pass (``loss``) or without one (``loss=None``: a short
        batch): the mean loss over the ranks if every rank ran (the gradients are then averaged;
        step the optimizer), None if some rank did not (skip the step on every rank)."""
        ran = loss is not None
        return self._reduce(ran=ran, done=False, loss=(loss or 0.0) * samples, samples=samples)

    def finish(self) -> None:
        """After this rank's last batch: raises on every rank if another one still had batches."""
        self._reduce(ran=False, done=True, loss=0.0, samples=0)

    def _reduce(self, *, ran: bool, done: bool, loss: float, samples: int) -> float | None:
        w = self.world
        buf = self.buffer
        if ran:
            offset = 0
            for name, size in zip(self.names, self.sizes):
                buf[offset:offset + size] = np.asarray(self.state.parameters[name].grad).ravel()
                offset += size
        else:
            buf[:-4] = 0.0
        buf[-4:] = (float(ran), float(done), loss, float(samples))
        if w.size > 1:
            from mpi4py import MPI

            w.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        ran_all, done_all, loss_sum, total = (float(v) for v in buf[-4:])
        if 0 < done_all < w.size:
            raise _collective(DataError(
                f"the ranks have different numbers of training batches ({int(done_all)} of {w.size} ranks ran out "
                "first): give every rank the same number of batches (RankRows of one global batch list)"))
        if done or ran_all < w.size:
            return None
        if w.size > 1:
            buf[:-4] /= w.size
            offset = 0
            for name, size in zip(self.names, self.sizes):
                grad = self.state.parameters[name].grad
                grad[...] = buf[offset:offset + size].reshape(grad.shape)
                offset += size
        return loss_sum / total if total else 0.0


# -- calibration and analysis ---------------------------------------------------------------------
def merge_observers(observers: dict[str, Any]) -> dict[str, Any]:
    """Every rank's observers merged in rank order (the same result on every rank).

    Min/max merge exactly; histograms merge bin by bin, exact when the grids agree and otherwise
    within one bin of the coarser grid (:meth:`HistogramObserver.merge`).
    """
    w = world()
    if w.size == 1:
        return observers
    every = w.comm.allgather(observers)
    merged: dict[str, Any] = every[0]
    for other in every[1:]:
        for name, obs in other.items():
            merged[name].merge(obs)
    return merged


def map_split(fn: Callable[[T], R], items: Sequence[T], wrap: Callable[[Iterable[T]], Iterable[T]] | None = None) -> list[R]:
    """``[fn(x) for x in items]`` with rank ``r`` computing items ``r, r+N, ...``; every rank gets
    the whole list, in order. ``wrap`` (e.g. a progress bar) wraps this rank's items."""
    w = world()
    mine = list(items)[w.rank::w.size]
    done = [fn(x) for x in (wrap(mine) if wrap is not None else mine)]
    if w.size == 1:
        return done
    every = w.comm.allgather(done)
    return [every[i % w.size][i // w.size] for i in range(len(items))]


# -- the CLI ----------------------------------------------------------------------------------------
def run_command(fn: Callable[..., None], args: Any, inputs: Sequence[str] = ("model", "data", "calib", "eval")) -> None:
    """Run a CLI command on every rank: the input files (``args.<input>``) and the command line are
    checked to be the same on every rank first; ranks other than 0 print nothing. An error raised
    on every rank alike is left to the caller (rank 0 prints it, the others stay silent); any other
    error on one rank is printed by that rank and ends all ranks."""
    w = world()
    if w.size == 1:
        fn(args)
        return
    import warnings

    if not w.root:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
        warnings.simplefilter("ignore")
    try:
        files = file_fingerprints({k: getattr(args, k, None) for k in inputs})
        options = {k: repr(v) for k, v in sorted(vars(args).items()) if k not in inputs}
        check_same("model, data or command line", {**files, "options": hashlib.sha256(repr(options).encode()).hexdigest()})
        fn(args)
    except OnnxQatError as e:
        if getattr(e, "collective", False):
            if not w.root:
                sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - rank 0 reports it
            raise
        _abort(w, f"error: rank {w.rank} of {w.size}: {e}")
    except BaseException as e:  # noqa: BLE001 - a rank cannot return alone: the others would wait forever
        if isinstance(e, KeyboardInterrupt):
            message = "interrupted" if type(e) is KeyboardInterrupt else "terminated (SIGTERM)"
            _abort(w, f"error: rank {w.rank} of {w.size}: {message}; nothing was published, the last good checkpoint "
                      "is kept", 130)
        if os.environ.get("ONNXQAT_TRACEBACK"):
            import traceback

            traceback.print_exc()
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        _abort(w, f"error: rank {w.rank} of {w.size}: internal error, please report it (ONNXQAT_TRACEBACK=1 shows "
                  f"where): {type(e).__name__}: {lines[0][:300] if lines else ''}")


def _abort(w: World, message: str, code: int = 2) -> None:
    print(message, file=sys.stderr, flush=True)
    w.comm.Abort(code)
