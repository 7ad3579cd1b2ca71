"""Exporters: model → artifact (GGUF, ONNX)."""
