"""Inference: sliding-window prediction and whole volumes."""

from .predict import gaussian_weights, predict_probabilities, segment_volume, window_starts

__all__ = ["gaussian_weights", "predict_probabilities", "segment_volume", "window_starts"]
