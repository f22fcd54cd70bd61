"""Inference: sliding windows with Gaussian blending, and whole volumes on their own grid."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from ..config import InferConfig
from ..data.io import Volume
from ..data.preprocess import network_input, resize_slices
from ..modelio import SegmentationModel
from .integer import IntegerUNet

Window = tuple[int, int, int]  # slice index, top row, left column


def window_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of windows of ``tile`` covering ``size`` with at least ``overlap`` overlap."""
    if size <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


def gaussian_weights(tile: int) -> np.ndarray:
    """``(tile,)`` blending profile, highest in the centre, never zero at the border."""
    positions = np.arange(tile) - (tile - 1) / 2
    profile = np.exp(-(positions**2) / (2 * (tile / 8) ** 2))
    floored: np.ndarray = np.maximum(profile / profile.max(), 1e-3).astype(np.float32)
    return floored


def _blend_weights(height: int, width: int, tile: int) -> np.ndarray:
    """Weights of one window: Gaussian along each axis that is tiled, flat along the others."""
    rows = gaussian_weights(tile) if height > tile else np.ones(height, np.float32)
    cols = gaussian_weights(tile) if width > tile else np.ones(width, np.float32)
    weights: np.ndarray = np.outer(rows, cols)
    return weights


def _windows(shape: tuple[int, int, int], config: InferConfig) -> Iterator[Window]:
    slices, height, width = shape
    for index in range(slices):
        for top in window_starts(height, config.tile, config.overlap):
            for left in window_starts(width, config.tile, config.overlap):
                yield index, top, left


@torch.no_grad()
def predict_probabilities(
    model: nn.Module | Callable[[Tensor], Tensor],
    slices: np.ndarray,
    config: InferConfig,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Foreground probabilities ``(S, H, W)`` float32 of normalised slices ``(S, H, W)``.

    Images larger than ``config.tile`` are cut into overlapping tiles whose sigmoid outputs are
    blended with Gaussian weights (no seams); smaller ones go through whole. Tiles from all
    slices are batched ``config.batch_size`` at a time (automatic: 1 on the CPU, 4 on GPUs).
    """
    if isinstance(model, nn.Module):
        model.eval()
    height, width = slices.shape[1:]
    tile_h, tile_w = min(config.tile, height), min(config.tile, width)
    weights = _blend_weights(height, width, config.tile)
    total = np.zeros(slices.shape, dtype=np.float32)
    norm = np.zeros(slices.shape, dtype=np.float32)
    windows = list(_windows(slices.shape, config))
    batch_size = config.batch_size or (1 if torch.device(device).type == "cpu" else 4)
    for first in range(0, len(windows), batch_size):
        batch = windows[first : first + batch_size]
        tiles = np.stack([slices[i, r : r + tile_h, c : c + tile_w] for i, r, c in batch])
        logits = model(torch.from_numpy(tiles[:, None]).to(device))
        if logits.shape[1] != 1:
            raise ValueError(
                f"the model has {logits.shape[1]} output classes; segmentation here is binary "
                f"(one foreground class)"
            )
        probabilities = torch.sigmoid(logits[:, 0]).float().cpu().numpy()
        for (i, r, c), probability in zip(batch, probabilities, strict=True):
            total[i, r : r + tile_h, c : c + tile_w] += probability * weights
            norm[i, r : r + tile_h, c : c + tile_w] += weights
    return total / norm


_INTEGER_NETWORKS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], IntegerUNet]]
_INTEGER_NETWORKS = weakref.WeakKeyDictionary()


def integer_network(model: nn.Module) -> IntegerUNet:
    """``IntegerUNet(model)``, built once per model and rebuilt when its parameters change
    (optimizer steps and other in-place updates bump a tensor's version counter; quantizer
    buffers are left out: evaluation rewrites them with the same values)."""
    versions = _parameter_versions(model)
    cached = _INTEGER_NETWORKS.get(model)
    if cached is None or cached[0] != versions:
        cached = (versions, IntegerUNet(model))
        _INTEGER_NETWORKS[model] = cached
    return cached[1]


def _parameter_versions(model: nn.Module) -> tuple[int, ...]:
    return tuple(parameter._version for parameter in model.parameters())


def segment_volume(
    bundle: SegmentationModel,
    volume: Volume,
    config: InferConfig,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Foreground probabilities ``(S, H, W)`` float32 on ``volume``'s own grid.

    The image is resampled and normalised as in training (the model file's preprocessing),
    predicted, and the probabilities are resampled back before any thresholding.
    """
    network: nn.Module | IntegerUNet = bundle.model
    if config.integer:
        if torch.device(device).type != "cpu":
            raise ValueError(
                f"integer inference runs on the CPU, not {device}; use the CPU or drop --integer"
            )
        network = integer_network(bundle.model)
    inputs = network_input(volume, bundle.preprocess)
    probabilities = predict_probabilities(network, inputs, config, device)
    original: tuple[int, int] = (volume.array.shape[1], volume.array.shape[2])
    resampled: np.ndarray = np.clip(resize_slices(probabilities, original, order=1), 0.0, 1.0)
    return resampled
