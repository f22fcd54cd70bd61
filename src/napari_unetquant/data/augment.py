"""Training crops with augmentation: flips, 90° turns, small affine, elastic, intensity.

Each crop is *sampled* through one coordinate map from its source slice (rotation and scale
about the crop centre, plus an elastic displacement field), so the deformations never show
borders and crops may be larger than small slices (the slice is mirrored). 3D patches of
volumes (:func:`sample_patch`) use the same in-plane map on whole slices, and may be deeper
than the volume (its slices are mirrored too).
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
    scanner: float = 0.0
    """Strength (0: off, 1: the full ranges) of changes other scanners and sites make: gamma,
    a smooth multiplicative bias field, blur, noise, on top of the gain and offset."""

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
        centre = _random_centre(image.shape, (crop, crop), rng)
    coordinates = _coordinates(crop, centre, config, rng)
    image_crop = ndimage.map_coordinates(image, coordinates, order=1, mode="mirror")
    mask_crop = ndimage.map_coordinates(mask, coordinates, order=0, mode="mirror")
    return _intensity(image_crop, config, rng), mask_crop.astype(np.uint8)


def _random_centre(
    shape: tuple[int, ...], window: tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
    """A random window centre (pixel coordinates, one per axis) keeping the window inside the
    image where it fits, anywhere near the middle where it does not."""
    size, extent = np.array(shape, np.float64), np.array(window, np.float64)
    low = np.minimum(extent / 2, size / 2)
    high = np.maximum(size - extent / 2, size / 2)
    centre: np.ndarray = rng.uniform(low, high) - 0.5
    return centre


def _intensity(crop: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Scanner-like changes (when ``config.scanner``), then a random gain and offset (float32
    out)."""
    if config.scanner > 0:
        crop = _scanner(crop, config.scanner, rng)
    if config.intensity > 0:
        gain = 1.0 + rng.uniform(-1, 1) * config.intensity
        crop = crop * gain + rng.uniform(-1, 1) * config.intensity
    result: np.ndarray = crop.astype(np.float32)
    return result


GAMMA_RANGE = 0.4
"""Gamma between 1 / (1 + r) and 1 + r at full strength."""
BIAS_RANGE = 0.3
"""A smooth multiplicative field between 1 - r and 1 + r across a crop at full strength."""
BLUR_SIGMA = 1.0
NOISE_SD = 0.1
"""Gaussian blur up to this sigma (pixels) and noise up to this SD (normalised units)."""


def _scanner(crop: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """What another scanner or site does to a normalised crop (2D ``(H, W)`` or 3D): a gamma
    on its intensity range, a smooth bias field, blur (resolution) and noise, each of a random
    amount up to ``strength`` times its range. The crop's mean and SD are kept, as the
    normalisation would make them."""
    mean, sd = float(crop.mean()), float(crop.std()) or 1.0
    low, high = float(crop.min()), float(crop.max())
    span = max(high - low, 1e-6)
    gamma = (1.0 + GAMMA_RANGE * strength) ** rng.uniform(-1, 1)
    out = low + span * ((crop - low) / span) ** gamma
    out = out * _bias_field(crop.shape, BIAS_RANGE * strength, rng)
    sigma = rng.uniform(0, BLUR_SIGMA * strength)
    plane = (0,) * (crop.ndim - 2) + (sigma, sigma)  # 3D patches: in-plane blur only
    out = ndimage.gaussian_filter(out, plane) if sigma > 0.05 else out
    out = out + rng.normal(0, rng.uniform(0, NOISE_SD * strength), crop.shape)
    out = (out - out.mean()) / (float(out.std()) or 1.0) * sd + mean
    result: np.ndarray = out.astype(np.float32)
    return result


def _bias_field(shape: tuple[int, ...], amount: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth field of mean about 1 varying by up to ``amount``: a random plane plus a
    quadratic in-plane (``(H, W)`` broadcast over leading axes)."""
    rows, cols = np.meshgrid(
        np.linspace(-1, 1, shape[-2]), np.linspace(-1, 1, shape[-1]), indexing="ij"
    )
    terms = np.stack([rows, cols, rows * cols, rows**2 - 1 / 3, cols**2 - 1 / 3])
    weights = rng.uniform(-1, 1, len(terms))
    field = np.tensordot(weights, terms, axes=1)
    field = field / max(float(np.abs(field).max()), 1e-6) * amount
    result: np.ndarray = 1.0 + field
    return result


def sample_patch(
    volume: np.ndarray,
    mask: np.ndarray,
    shape: tuple[int, int],
    config: AugmentConfig,
    rng: np.random.Generator,
    centre: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One augmented ``(depth, crop, crop)`` patch (``shape == (depth, crop)``) of a volume
    ``(S, H, W)`` float32 and its uint8 ``mask``, around ``centre`` (slice, row, col) or, when
    ``None``, a random centre inside the volume.

    Every slice of the patch is a whole source slice (no blending between slices) taken
    through the same in-plane map as :func:`sample_crop` (flips, 90° turns, small rotation and
    scale); the slice order is flipped at random too. Beyond the volume's borders, slices and
    pixels are mirrored. Elastic deformation is for 2D crops only.
    """
    if config.elastic_alpha > 0:
        raise ValueError("elastic deformation is 2D only; turn it off for 3D patches")
    depth, crop = shape
    if centre is None:
        centre = _random_centre(volume.shape, (depth, crop, crop), rng)
    plane = _coordinates(crop, centre[1:], config, rng)
    first = int(np.floor(centre[0] - (depth - 1) / 2 + 0.5))
    slices = np.arange(first, first + depth, dtype=np.float64)
    if config.flips and rng.integers(2):
        slices = slices[::-1]
    coordinates = np.empty((3, depth, crop, crop))
    coordinates[0] = slices[:, None, None]
    coordinates[1:] = plane[:, None]
    image_patch = ndimage.map_coordinates(volume, coordinates, order=1, mode="mirror")
    mask_patch = ndimage.map_coordinates(mask, coordinates, order=0, mode="mirror")
    return _intensity(image_patch, config, rng), mask_patch.astype(np.uint8)
