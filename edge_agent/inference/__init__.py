"""Inference: model packages, registry, routing, preprocessing, ONNX Runtime runner."""
