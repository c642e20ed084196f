"""Quantization-aware training: lowering to a differentiable graph, onnxruntime-training loop."""
