"""Import onnxruntime's training API without importing torch.

``import onnxruntime.training`` runs ``onnxruntime/training/__init__.py``, which imports its
optimizer helpers and, through them, torch. The two submodules onnxqat uses, ``artifacts``
(artifact generation) and ``api`` (Module, Optimizer, CheckpointState), need no torch. This
module registers a bare package object for ``onnxruntime.training`` whose ``__path__`` is the
real package folder, so those submodules import normally and the package ``__init__`` never runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import types
from collections.abc import Iterator
from typing import Any

__all__ = ["quiet", "training_modules"]

_PACKAGE = "onnxruntime.training"


def training_modules() -> tuple[Any, Any]:
    """``(onnxruntime.training.artifacts, onnxruntime.training.api)``, torch-free."""
    if _PACKAGE not in sys.modules:
        from onnxqat.backend import require_training
        from onnxqat.runtime import ort as onnxruntime

        require_training()

        folder = os.path.join(os.path.dirname(onnxruntime.__file__ or ""), "training")
        if not os.path.isdir(folder):
            raise ImportError(
                "this onnxruntime has no training API: install onnxruntime-training-cpu==1.19.2 "
                "(and not the plain onnxruntime package in the same environment)"
            )
        package = types.ModuleType(_PACKAGE)
        package.__path__ = [folder]
        package.__package__ = _PACKAGE
        sys.modules[_PACKAGE] = package
    from onnxruntime.training import api, artifacts

    return artifacts, api


@contextlib.contextmanager
def quiet() -> Iterator[None]:
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
