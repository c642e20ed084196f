"""onnxqat: quantization simulation, calibration, QAT and export directly on ONNX graphs."""

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
from onnxqat.sim import QuantizationSimModel
from onnxqat.spec import QuantSpec

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
