"""The public API is what onnxqat.__all__ says; changing it is a deliberate act."""

import onnxqat


def test_public_api_is_pinned():
    assert sorted(onnxqat.__all__) == [
        "ConfigError", "DataError", "Encoding", "EncodingsError", "ModelError", "OnnxQatError", "OutputError",
        "QuantSimConfig", "QuantSpec", "QuantizationSimModel", "compute_encoding", "dequantize", "load_config",
        "quantize",
    ]



# Each public name and the module that defines it: the package re-exports the object itself.
_HOMES = {
    "ConfigError": "errors", "DataError": "errors", "EncodingsError": "errors", "ModelError": "errors",
    "OnnxQatError": "errors", "OutputError": "errors", "Encoding": "qparams", "compute_encoding": "qparams",
    "dequantize": "qparams", "quantize": "qparams", "QuantSimConfig": "config", "load_config": "config",
    "QuantSpec": "spec", "QuantizationSimModel": "sim",
}


def test_every_public_name_is_the_object_of_its_module():
    import importlib

    assert set(_HOMES) == set(onnxqat.__all__)
    for name, home in _HOMES.items():
        module = importlib.import_module(f"onnxqat.{home}")
        exported = getattr(onnxqat, name)
        assert exported is getattr(module, name), name
        assert exported.__module__ == module.__name__, name  # defined there, not re-exported from elsewhere
        assert exported.__doc__, f"{name} has no docstring"
    errors = importlib.import_module("onnxqat.errors")
    assert all(issubclass(getattr(onnxqat, n), errors.OnnxQatError) for n in _HOMES if n.endswith("Error"))


def test_importing_onnxqat_does_not_import_torch_or_training():
    import subprocess
    import sys

    code = "import sys, onnxqat; print('torch' in sys.modules, 'onnxruntime.training' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
