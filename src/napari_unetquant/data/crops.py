"""Per-image normalisation and random training crops."""

from __future__ import annotations

import numpy as np


def zscore(image: np.ndarray) -> np.ndarray:
    """``(image - mean) / std`` as float32 (a constant image becomes zeros)."""
    values = np.asarray(image, dtype=np.float32)
    std = float(values.std())
    return (values - float(values.mean())) / (std if std > 0 else 1.0)


def random_crop_batch(
    images: np.ndarray, labels: np.ndarray, crop: int, batch_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random ``crop x crop`` windows from random slices, randomly flipped and rotated by 90°.

    Parameters
    ----------
    images, labels
        ``(S, H, W)`` stacks of the same shape; ``H, W >= crop``.

    Returns
    -------
    ``(B, 1, crop, crop)`` float32 images and ``(B, 1, crop, crop)`` float32 {0, 1} labels.
    """
    if images.shape != labels.shape or images.ndim != 3:
        raise ValueError(
            f"images {images.shape} and labels {labels.shape} must be (S, H, W) stacks of the "
            f"same shape"
        )
    slices, height, width = images.shape
    if crop > min(height, width):
        raise ValueError(
            f"crop {crop} is larger than the images ({height} x {width}); use a smaller crop"
        )
    xs, ys = [], []
    for _ in range(batch_size):
        index = rng.integers(slices)
        top, left = rng.integers(height - crop + 1), rng.integers(width - crop + 1)
        window = (index, slice(top, top + crop), slice(left, left + crop))
        x, y = images[window], labels[window]
        turns, flip = int(rng.integers(4)), bool(rng.integers(2))
        x, y = np.rot90(x, turns), np.rot90(y, turns)
        if flip:
            x, y = x[:, ::-1], y[:, ::-1]
        xs.append(x)
        ys.append(y)
    batch_x = np.stack(xs)[:, None].astype(np.float32)
    batch_y = (np.stack(ys)[:, None] > 0).astype(np.float32)
    return batch_x, batch_y
