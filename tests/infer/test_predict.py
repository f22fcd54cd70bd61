"""Sliding-window inference: coverage, seams, and the original grid."""

from __future__ import annotations

import itertools
import types

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


def test_networks_with_several_outputs_give_class_probabilities() -> None:
    model = build_unet(UNetConfig(base_width=2, out_classes=3))
    probabilities = predict_probabilities(model, np.zeros((1, 16, 16), np.float32), InferConfig())
    assert probabilities.shape == (1, 3, 16, 16) and probabilities.dtype == np.float32
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)


def _blended_reference(
    model: nn.Module, slices: np.ndarray, window: tuple[int, int, int], overlap: float
) -> np.ndarray:
    """The textbook sliding window, written out plainly: every window of the whole stack at once,
    sigmoid outputs weighted by separable Gaussians, divided by the summed weights."""
    count, height, width = slices.shape
    depth, tile_h, tile_w = (min(n, size) for n, size in zip(window, slices.shape, strict=True))

    def profile(size: int, tile: int) -> np.ndarray:
        return gaussian_weights(tile) if size > tile else np.ones(tile, np.float32)

    three_d = getattr(getattr(model, "config", None), "spatial_dims", 2) == 3
    weights = np.einsum(
        "d,h,w->dhw",
        profile(count, depth) if three_d else np.ones(1, np.float32),
        profile(height, tile_h),
        profile(width, tile_w),
    )
    total = np.zeros(slices.shape, np.float32)
    norm = np.zeros(slices.shape, np.float32)
    depths = window_starts(count, depth, overlap) if three_d else range(count)
    for d in depths:
        for r in window_starts(height, tile_h, overlap):
            for c in window_starts(width, tile_w, overlap):
                box = (slice(d, d + depth), slice(r, r + tile_h), slice(c, c + tile_w))
                tile = torch.from_numpy(np.ascontiguousarray(slices[box]))[None]
                with torch.no_grad():
                    logits = model(tile if not three_d else tile[None])
                total[box] += torch.sigmoid(logits[0, 0]).numpy() * weights
                norm[box] += weights
    return total / norm


class Volumetric(nn.Module):
    """A 3D network stand-in: one 3x3x3 convolution, so windows see their neighbours."""

    def __init__(self) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(spatial_dims=3)  # what a 3D U-Net's config says
        self.conv = nn.Conv3d(1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 5, "3D networks get (N, C, D, H, W) boxes"
        out: torch.Tensor = self.conv(x)
        return out


@pytest.mark.parametrize("three_d", [False, True])
def test_streamed_windows_equal_the_whole_stack_reference(three_d: bool) -> None:
    slices = np.random.default_rng(5).normal(size=(23, 40, 52)).astype(np.float32)
    model: nn.Module = Volumetric() if three_d else build_unet(UNetConfig(base_width=4, depth=2))
    config = InferConfig(tile=32, tile_3d=(6, 24, 32), overlap=0.25)
    window = config.window(3 if three_d else 2)
    expected = _blended_reference(model.eval(), slices, window, config.overlap)
    assert np.allclose(predict_probabilities(model, slices, config), expected, atol=1e-6)


@pytest.mark.parametrize("three_d", [False, True])
def test_streaming_reads_each_slice_once_and_holds_only_a_few(three_d: bool) -> None:
    from napari_unetquant.infer.predict import predict_chunks

    slices = np.random.default_rng(6).normal(size=(60, 24, 24)).astype(np.float32)
    model: nn.Module = Volumetric() if three_d else Pointwise()
    config = InferConfig(tile=16, tile_3d=(8, 16, 16))
    reads: list[tuple[int, int]] = []
    held: list[int] = []
    yielded = 0

    def read(start: int, stop: int) -> np.ndarray:
        reads.append((start, stop))
        held.append(stop - yielded)  # slices read but not yet handed back
        return slices[start:stop]

    chunks = []
    for chunk in predict_chunks(model, read, slices.shape, config):
        yielded += len(chunk)
        chunks.append(chunk)
    assert [a for a, _ in reads] == [0] + [b for _, b in reads[:-1]]  # in order, once each
    assert reads[-1][1] == 60 and yielded == 60
    depth = config.tile_3d[0] if three_d else 1
    assert max(held) <= depth + 8 + depth  # a window, the read-ahead, and the window in flight
    assert np.allclose(np.concatenate(chunks), predict_probabilities(model, slices, config))
