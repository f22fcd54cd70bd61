"""Generated EM-like phantoms: cells with dark membranes, organelles, blur and noise.

The project's own sample data (it ships no third-party images): serial-section EM of neural
tissue looks like packed cells separated by thin dark membranes, with dark organelles inside
the cells that a good model must not mistake for membranes. Ground truth is the membrane mask.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

MEMBRANE_GREY = 0.12
ORGANELLE_GREY = 0.3


def em_phantom(
    height: int = 256, width: int = 256, *, seed: int = 0, cell_size: float = 28.0
) -> tuple[np.ndarray, np.ndarray]:
    """One EM-like slice and its membrane mask.

    Returns
    -------
    image
        ``(height, width)`` float32 in [0, 1].
    membranes
        ``(height, width)`` uint8, 1 on membranes, 0 inside cells.
    """
    if height < 8 or width < 8:
        raise ValueError(f"phantom must be at least 8 x 8 pixels, got {height} x {width}")
    if cell_size < 4:
        raise ValueError(f"cell_size must be at least 4 pixels, got {cell_size}")
    rng = np.random.default_rng(seed)
    cell_id, membranes = _cells(height, width, cell_size, rng)
    image = _cell_interiors(cell_id, cell_size, rng)
    image[_organelles(cell_id, cell_size, rng) & ~membranes] = ORGANELLE_GREY
    image[membranes] = MEMBRANE_GREY
    image = ndimage.gaussian_filter(image, sigma=1.0)
    image += rng.normal(0.0, 0.06, image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), membranes.astype(np.uint8)


def em_phantom_stack(
    slices: int, height: int = 256, width: int = 256, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``slices`` independent phantoms stacked: ``(S, H, W)`` float32 images, uint8 masks."""
    if slices < 1:
        raise ValueError(f"slices must be at least 1, got {slices}")
    pairs = [em_phantom(height, width, seed=seed * 10_007 + index) for index in range(slices)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-peak smooth random field."""
    field: np.ndarray = ndimage.gaussian_filter(rng.normal(size=shape), sigma=sigma, mode="wrap")
    return field / max(float(np.abs(field).max()), 1e-12)


def _cells(
    height: int, width: int, cell_size: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Warped Voronoi cells: ``(cell index map, membrane mask)``."""
    grid_rows = np.arange(0.0, height + cell_size, cell_size)
    grid_cols = np.arange(0.0, width + cell_size, cell_size)
    lattice = np.stack(np.meshgrid(grid_rows, grid_cols, indexing="ij"), axis=-1).reshape(-1, 2)
    seeds = lattice + rng.uniform(-0.45, 0.45, size=lattice.shape) * cell_size
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    amplitude = 0.1 * cell_size
    rows += amplitude * _smooth_noise((height, width), cell_size / 2, rng)
    cols += amplitude * _smooth_noise((height, width), cell_size / 2, rng)
    points = np.stack([rows.ravel(), cols.ravel()], axis=1)
    distances, nearest = cKDTree(seeds).query(points, k=2)
    thickness = rng.uniform(2.0, 3.5)
    membranes = (distances[:, 1] - distances[:, 0]) < thickness
    return nearest[:, 0].reshape(height, width), membranes.reshape(height, width)


def _cell_interiors(cell_id: np.ndarray, cell_size: float, rng: np.random.Generator) -> np.ndarray:
    """Grey levels per cell plus fine texture."""
    brightness = rng.uniform(0.5, 0.85, size=int(cell_id.max()) + 1)
    texture = 0.08 * _smooth_noise(cell_id.shape, cell_size / 10, rng)
    interiors: np.ndarray = brightness[cell_id] + texture
    return interiors


def _organelles(cell_id: np.ndarray, cell_size: float, rng: np.random.Generator) -> np.ndarray:
    """Dark elliptical blobs (mitochondria-like) scattered over a third of the cells."""
    height, width = cell_id.shape
    mask = np.zeros(cell_id.shape, dtype=bool)
    rows, cols = np.mgrid[0:height, 0:width]
    for _ in range(max(1, round(height * width / cell_size**2 / 3))):
        centre_r, centre_c = rng.uniform(0, height), rng.uniform(0, width)
        radius_r, radius_c = rng.uniform(0.1, 0.22, size=2) * cell_size
        inside = ((rows - centre_r) / radius_r) ** 2 + ((cols - centre_c) / radius_c) ** 2 <= 1
        home = cell_id[int(centre_r), int(centre_c)]
        mask |= inside & (cell_id == home)
    return mask
