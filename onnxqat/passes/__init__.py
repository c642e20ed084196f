"""Graph passes over onnx-ir models (canonicalise, fold BatchNorm, annotate, insert/strip QDQ)."""
