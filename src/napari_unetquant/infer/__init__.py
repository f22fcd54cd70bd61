"""Inference: sliding-window prediction, whole volumes, and integer-only execution.

Modules: ``predict`` (sliding windows, whole volumes), ``integer`` (:class:`IntegerUNet`, the
network on integer codes), ``integer_conv`` (one convolution on codes), ``integer_ops``
(formats, requantization, upsampling and pooling of codes), ``export`` (the integer network
file).
"""

from .integer import IntegerUNet
from .predict import gaussian_weights, predict_probabilities, segment_volume, window_starts

__all__ = [
    "IntegerUNet",
    "gaussian_weights",
    "predict_probabilities",
    "segment_volume",
    "window_starts",
]
