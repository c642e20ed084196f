"""onnxqat: quantization simulation, calibration, QAT and export directly on ONNX graphs."""

from typing import TYPE_CHECKING, Any

from onnxqat.config import QuantSimConfig, load_config
from onnxqat.errors import (
    ConfigError,
    DataError,
    EncodingsError,
    ModelError,
    OnnxQatError,
    OutputError,
)
from onnxqat.qparams import Encoding, compute_encoding, dequantize, quantize
from onnxqat.spec import QuantSpec

if TYPE_CHECKING:
    from onnxqat.sim import QuantizationSimModel

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "Encoding",
    "EncodingsError",
    "ModelError",
    "OnnxQatError",
    "OutputError",
    "QuantSimConfig",
    "QuantSpec",
    "QuantizationSimModel",
    "compute_encoding",
    "dequantize",
    "load_config",
    "quantize",
]


def __getattr__(name: str) -> Any:
    # The simulation imports onnxruntime, whose absence (or a second copy) onnxqat.backend
    # reports as an error; importing the package stays possible without it, so the CLI can say so.
    if name == "QuantizationSimModel":
        from onnxqat.sim import QuantizationSimModel

        return QuantizationSimModel
    raise AttributeError(f"module 'onnxqat' has no attribute {name!r}")
