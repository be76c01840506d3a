"""Remaining-duration model: features, priors, training, ONNX export, inference (docs/model.md)."""
