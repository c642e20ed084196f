"""The public API is what onnxqat.__all__ says; changing it is a deliberate act."""

import onnxqat


def test_public_api_is_pinned():
    assert sorted(onnxqat.__all__) == [
        "ConfigError", "DataError", "Encoding", "EncodingsError", "ModelError", "OnnxQatError", "OutputError",
        "QuantSimConfig", "QuantSpec", "QuantizationSimModel", "compute_encoding", "dequantize", "load_config",
        "quantize",
    ]
    for name in onnxqat.__all__:
        assert getattr(onnxqat, name) is not None


def test_importing_onnxqat_does_not_import_torch_or_training():
    import subprocess
    import sys

    code = "import sys, onnxqat; print('torch' in sys.modules, 'onnxruntime.training' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
