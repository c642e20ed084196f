"""Calibration: streaming observers, range schemes and the onnxruntime runner."""
