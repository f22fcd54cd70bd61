"""Training crops with augmentation: flips, 90° turns, small affine, elastic, intensity.

Each crop is *sampled* through one coordinate map from its source slice (rotation and scale
about the crop centre, plus an elastic displacement field), so the deformations never show
borders and crops may be larger than small slices (the slice is mirrored).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths; ``AugmentConfig.none()`` turns everything off."""

    flips: bool = True
    max_rotation_degrees: float = 15.0
    scale_range: float = 0.1
    elastic_alpha: float = 0.0
    elastic_sigma: float = 6.0
    intensity: float = 0.1

    @classmethod
    def none(cls) -> AugmentConfig:
        return cls(flips=False, max_rotation_degrees=0.0, scale_range=0.0, intensity=0.0)


def _coordinates(
    crop: int, centre: np.ndarray, config: AugmentConfig, rng: np.random.Generator
) -> np.ndarray:
    """Source (row, col) coordinates ``(2, crop, crop)`` of an augmented crop."""
    offsets = np.mgrid[0:crop, 0:crop].astype(np.float64) - (crop - 1) / 2
    angle = np.deg2rad(rng.uniform(-1, 1) * config.max_rotation_degrees)
    scale = 1.0 + rng.uniform(-1, 1) * config.scale_range
    turns = int(rng.integers(4)) if config.flips else 0
    matrix = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = matrix @ np.linalg.matrix_power(np.array([[0.0, -1.0], [1.0, 0.0]]), turns)
    if config.flips and rng.integers(2):
        matrix = matrix @ np.diag([1.0, -1.0])
    coordinates = np.einsum("ij,jhw->ihw", matrix, offsets)
    if config.elastic_alpha > 0:
        for axis in range(2):
            field = ndimage.gaussian_filter(rng.uniform(-1, 1, (crop, crop)), config.elastic_sigma)
            peak = max(float(np.abs(field).max()), 1e-12)
            coordinates[axis] += config.elastic_alpha * field / peak
    shifted: np.ndarray = coordinates + centre[:, None, None]
    return shifted


def sample_crop(
    image: np.ndarray,
    mask: np.ndarray,
    crop: int,
    config: AugmentConfig,
    rng: np.random.Generator,
    centre: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One augmented ``crop x crop`` window of a 2D ``image`` (float32) and its uint8 ``mask``,
    around ``centre`` (row, col) or, when ``None``, a random centre inside the image."""
    if centre is None:
        height, width = image.shape
        low = np.array([min(crop / 2, height / 2), min(crop / 2, width / 2)])
        high = np.array([max(height - crop / 2, height / 2), max(width - crop / 2, width / 2)])
        centre = rng.uniform(low, high) - 0.5
    coordinates = _coordinates(crop, centre, config, rng)
    image_crop = ndimage.map_coordinates(image, coordinates, order=1, mode="mirror")
    mask_crop = ndimage.map_coordinates(mask, coordinates, order=0, mode="mirror")
    if config.intensity > 0:
        gain = 1.0 + rng.uniform(-1, 1) * config.intensity
        image_crop = image_crop * gain + rng.uniform(-1, 1) * config.intensity
    return image_crop.astype(np.float32), mask_crop.astype(np.uint8)
