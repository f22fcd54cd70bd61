"""Inference: sliding-window prediction, whole volumes, and integer-only execution."""

from .integer import IntegerUNet
from .predict import gaussian_weights, predict_probabilities, segment_volume, window_starts

__all__ = [
    "IntegerUNet",
    "gaussian_weights",
    "predict_probabilities",
    "segment_volume",
    "window_starts",
]
