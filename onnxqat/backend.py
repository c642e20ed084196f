"""Which onnxruntime this environment has, and what it can run.

onnxqat runs on one of two runtimes, chosen by the install extra:

* ``onnxqat[cpu]``: the plain ``onnxruntime`` release (simulate, calibrate, export, analyze,
  eval, compare);
* ``onnxqat[train]``: ``onnxruntime-training-cpu`` (all of that, and quantization-aware training).

GPU builds (``onnxruntime-gpu``, ``onnxruntime-training``) take the place of either. Every
distribution installs the same module, ``onnxruntime``, so two of them in one environment
overwrite each other's files; this module finds that from the installed distributions' metadata
before the module is imported, and says what to install when no runtime or more than one is
there. It also knows the runtime's model limits (newest opset and IR version it loads) and its
execution providers, which ``device="cuda"`` selects.
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Callable
from types import ModuleType

from onnxqat.errors import OnnxQatError

__all__ = ["DEVICES", "RuntimeSetupError", "check_environment", "has_training", "model_limits", "onnxruntime",
           "providers", "require_training", "runtime_distributions"]

DEVICES = ("cpu", "cuda")
_TRAINING = ("onnxruntime-training", "onnxruntime-training-cpu")
_INSTALL = "pip install 'onnxqat[cpu]' (PTQ) or 'onnxqat[train]' (PTQ and training)"


class RuntimeSetupError(OnnxQatError):
    """The environment has no usable onnxruntime, two of them, or not the one a command needs."""


def _provides_module(dist: importlib.metadata.Distribution) -> bool:
    """Whether the distribution installs the top-level module ``onnxruntime`` (onnxruntime-extensions
    and other ``onnxruntime-*`` helpers do not)."""
    files = dist.files
    if files is None:  # no RECORD: judge by top_level.txt
        return "onnxruntime" in (dist.read_text("top_level.txt") or "").split()
    return any(str(f).replace("\\", "/") == "onnxruntime/__init__.py" for f in files)


@functools.cache
def runtime_distributions() -> list[tuple[str, str]]:
    """``(name, version)`` of every installed distribution that provides the module ``onnxruntime``
    (read once per process)."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("onnxruntime") and name not in found and _provides_module(dist):
            found[name] = dist.version
    return sorted(found.items())


def check_environment() -> tuple[str, str]:
    """The one runtime distribution installed, ``(name, version)``; else :class:`RuntimeSetupError`."""
    dists = runtime_distributions()
    if not dists:
        raise RuntimeSetupError(f"no onnxruntime is installed: {_INSTALL}")
    if len(dists) > 1:
        names = ", ".join(f"{n} {v}" for n, v in dists)
        raise RuntimeSetupError(
            f"{names} are installed in one environment, and they overwrite each other's module "
            f"'onnxruntime': pip uninstall {' '.join(n for n, _ in dists)}, then {_INSTALL}")
    return dists[0]


@functools.cache
def onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module, after :func:`check_environment`."""
    name, version = check_environment()
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RuntimeSetupError(f"{name} {version} is installed but does not import ({e}); reinstall it") from None
    ort.set_default_logger_severity(3)
    module: ModuleType = ort
    return module


def has_training() -> bool:
    """Whether the installed runtime is a training build."""
    return check_environment()[0] in _TRAINING


def require_training(what: str = "training") -> None:
    """Refuse ``what`` without the training runtime, naming the extra that brings it."""
    name, version = check_environment()
    if name not in _TRAINING:
        raise RuntimeSetupError(
            f"{what} needs onnxruntime's training build, and this environment has {name} {version}: "
            "pip install 'onnxqat[train]' in a fresh environment (Python 3.10-3.12, Linux x86-64)")


def _loads(ort: ModuleType, ir_version: int, opset: int) -> bool:
    """Whether the runtime loads a one-Identity model stamped with this IR version and opset."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # the runtime's own refusal of a too-new model
        return False
    return True


def _newest(accepts: Callable[[int], bool], low: int, high: int) -> int:
    """The largest value in ``[low, high]`` that ``accepts`` (monotone: true up to some value)."""
    while low < high:
        middle = (low + high + 1) // 2
        if accepts(middle):
            low = middle
        else:
            high = middle - 1
    return low


@functools.cache
def model_limits() -> tuple[int, int]:
    """``(opset, IR version)``: the newest the installed runtime loads and the installed onnx knows.

    Asked of the runtime itself (a few one-node sessions, once per process): onnxruntime-training
    1.19 loads opset 21 and IR 10; current plain releases load newer ones. Models above the limits
    are converted down by :func:`onnxqat.io.load_model`.
    """
    import onnx

    ort = onnxruntime()
    known_opset = max(21, onnx.defs.onnx_opset_version())
    ir_version = _newest(lambda v: _loads(ort, v, 21), 10, max(10, onnx.IR_VERSION))
    opset = _newest(lambda o: _loads(ort, ir_version, o), 21, known_opset)
    return opset, ir_version


def providers(device: str) -> list[str]:
    """onnxruntime execution providers for ``device`` ("cpu" or "cuda"), checked against the runtime."""
    if device not in DEVICES:
        raise RuntimeSetupError(f"device '{device}': unknown (choose {' or '.join(DEVICES)})")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = onnxruntime().get_available_providers()
    if "CUDAExecutionProvider" not in available:
        name, version = check_environment()
        raise RuntimeSetupError(
            f"device 'cuda': {name} {version} has no CUDA execution provider (it has "
            f"{', '.join(p.removesuffix('ExecutionProvider') for p in available)}); install a GPU build in a fresh "
            "environment: onnxruntime-gpu for PTQ, onnxruntime-training (GPU) for training")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]
