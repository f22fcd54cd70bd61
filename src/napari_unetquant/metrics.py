"""Overlap metrics on binary masks, with an explicit rule for empty masks.

Rule: where prediction and ground truth are both empty, Dice and IoU are 1 (a correct "nothing
here"). The paper's reference code scored such slices 0, which lowers means on data with empty
slices.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def _masks(prediction: ArrayLike, target: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(prediction).astype(bool)
    true = np.asarray(target).astype(bool)
    if pred.shape != true.shape:
        raise ValueError(
            f"prediction shape {pred.shape} does not match ground truth {true.shape}; "
            f"compare masks of the same image"
        )
    return pred, true


def dice_score(prediction: ArrayLike, target: ArrayLike) -> float:
    """Dice ``2|P & T| / (|P| + |T|)`` of two masks of the same shape (non-zero = foreground)."""
    pred, true = _masks(prediction, target)
    total = int(pred.sum()) + int(true.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, true).sum()) / total


def iou_score(prediction: ArrayLike, target: ArrayLike) -> float:
    """Intersection over union ``|P & T| / |P | T|`` (1 when both are empty)."""
    pred, true = _masks(prediction, target)
    union = int(np.logical_or(pred, true).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred, true).sum()) / union
