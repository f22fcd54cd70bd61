"""Sliding-window inference: coverage, seams, and the original grid."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from napari_unetquant.config import InferConfig, PreprocessConfig, QuantConfig, UNetConfig
from napari_unetquant.data import Volume
from napari_unetquant.infer import (
    gaussian_weights,
    predict_probabilities,
    segment_volume,
    window_starts,
)
from napari_unetquant.model import build_unet
from napari_unetquant.modelio import SegmentationModel


@pytest.mark.parametrize(
    ("size", "tile", "overlap"), [(100, 32, 0.25), (64, 64, 0.5), (20, 64, 0.25), (129, 64, 0.5)]
)
def test_windows_cover_everything_with_the_overlap(size: int, tile: int, overlap: float) -> None:
    starts = window_starts(size, tile, overlap)
    covered = np.zeros(size, bool)
    for start in starts:
        covered[start : start + tile] = True
    assert covered.all() and starts[0] == 0
    if size > tile:
        assert starts[-1] == size - tile
        assert all(b - a <= tile * (1 - overlap) for a, b in itertools.pairwise(starts))


def test_gaussian_weights_peak_in_the_centre_and_never_vanish() -> None:
    weights = gaussian_weights(32)
    assert weights.shape == (32,) and weights.min() > 0
    assert weights[15:17].min() == weights.max() == 1.0
    assert np.array_equal(weights, weights[::-1])


def test_images_tiled_along_one_axis_only_blend_smoothly() -> None:
    slices = np.random.default_rng(3).normal(size=(2, 10, 150)).astype(np.float32)
    tiled = predict_probabilities(Pointwise(), slices, InferConfig(tile=64, overlap=0.5))
    assert np.allclose(tiled, 1 / (1 + np.exp(-3 * slices)), atol=1e-6)


class Pointwise(nn.Module):
    """logit = 3 * x: any tiling must reproduce it exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * x


def test_tiles_blend_without_seams_for_a_pointwise_model() -> None:
    slices = np.random.default_rng(0).normal(size=(3, 70, 90)).astype(np.float32)
    tiled = predict_probabilities(
        Pointwise(), slices, InferConfig(tile=32, overlap=0.5, batch_size=5)
    )
    expected = 1 / (1 + np.exp(-3 * slices))
    assert np.allclose(tiled, expected, atol=1e-6)


def test_tiled_unet_agrees_with_the_whole_image() -> None:
    model = build_unet(UNetConfig(base_width=4), QuantConfig.from_bits(8, 8)).eval()
    slices = np.random.default_rng(1).normal(size=(2, 96, 96)).astype(np.float32)
    whole = predict_probabilities(model, slices, InferConfig(tile=128))
    tiled = predict_probabilities(model, slices, InferConfig(tile=48, overlap=0.5))
    assert np.abs(whole - tiled).mean() < 0.02


def test_segment_volume_returns_the_original_grid() -> None:
    bundle = SegmentationModel(
        Pointwise(), UNetConfig(), QuantConfig(), PreprocessConfig(spacing=(0.25, 0.5))
    )
    volume = Volume(np.random.default_rng(2).normal(size=(2, 30, 40)), spacing=(0.5, 0.5))
    probabilities = segment_volume(bundle, volume, InferConfig())
    assert probabilities.shape == (2, 30, 40) and probabilities.dtype == np.float32
    assert probabilities.min() >= 0 and probabilities.max() <= 1


def test_multiclass_models_are_refused_for_binary_segmentation() -> None:
    model = build_unet(UNetConfig(base_width=2, out_classes=3))
    with pytest.raises(ValueError, match="3 output classes"):
        predict_probabilities(model, np.zeros((1, 16, 16), np.float32), InferConfig())
