"""Exceptions raised by onnxqat.

Every error a user can cause (bad model, bad data, bad encodings, bad output location) is an
:class:`OnnxQatError` whose message names the offending file, node or tensor. The CLI prints the
message as one line and exits non-zero; anything else is a bug.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "EncodingsError",
    "ModelError",
    "OnnxQatError",
    "OutputError",
    "Terminated",
]


class OnnxQatError(Exception):
    """Base class of all user-facing errors."""

    #: raised identically on every MPI rank, so rank 0 alone reports it (:mod:`onnxqat.distributed`)
    collective: bool = False


class ModelError(OnnxQatError):
    """The ONNX model cannot be loaded, is invalid, or uses something unsupported."""


class DataError(OnnxQatError):
    """Calibration, training or evaluation data does not fit the model."""


class ConfigError(OnnxQatError):
    """A quantization config or option is invalid."""


class EncodingsError(OnnxQatError):
    """An encodings file is malformed or does not fit the model."""


class OutputError(OnnxQatError):
    """Outputs cannot be written where requested."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the CLI receives it: handled like Ctrl-C (temporary folders removed,
    staged outputs discarded, the last good checkpoint kept)."""
