"""Overlap metrics on binary masks, with an explicit rule for empty masks.

Rule: where prediction and ground truth are both empty, Dice and IoU are 1 (a correct "nothing
here"). The paper's reference code scored such slices 0, which lowers means on data with empty
slices.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class SegmentationScores:
    """Scores of ``(S, H, W)`` predictions against their ground truth.

    ``dice_mean`` is the mean of per-slice Dice (empty-vs-empty slices count 1), ``dice_volume``
    the Dice of all pixels pooled, ``iou_mean`` the mean per-slice IoU.
    """

    dice_per_slice: tuple[float, ...]
    iou_per_slice: tuple[float, ...]
    intersection: int
    total: int

    @property
    def n_slices(self) -> int:
        return len(self.dice_per_slice)

    @property
    def dice_mean(self) -> float:
        return float(np.mean(self.dice_per_slice))

    @property
    def dice_volume(self) -> float:
        return 1.0 if self.total == 0 else 2.0 * self.intersection / self.total

    @property
    def iou_mean(self) -> float:
        return float(np.mean(self.iou_per_slice))

    def as_dict(self) -> dict[str, float | int | list[float]]:
        return {
            "dice_mean": self.dice_mean,
            "dice_volume": self.dice_volume,
            "iou_mean": self.iou_mean,
            "n_slices": self.n_slices,
            "dice_per_slice": list(self.dice_per_slice),
        }

    @classmethod
    def pooled(cls, parts: list[SegmentationScores]) -> SegmentationScores:
        """All slices of several volumes as one set."""
        return cls(
            dice_per_slice=tuple(d for p in parts for d in p.dice_per_slice),
            iou_per_slice=tuple(d for p in parts for d in p.iou_per_slice),
            intersection=sum(p.intersection for p in parts),
            total=sum(p.total for p in parts),
        )


def segmentation_scores(prediction: ArrayLike, target: ArrayLike) -> SegmentationScores:
    """Per-slice and pooled scores of ``(S, H, W)`` (or ``(H, W)``) masks."""
    pred, true = _masks(prediction, target)
    if pred.ndim == 2:
        pred, true = pred[None], true[None]
    return SegmentationScores(
        dice_per_slice=tuple(dice_score(p, t) for p, t in zip(pred, true, strict=True)),
        iou_per_slice=tuple(iou_score(p, t) for p, t in zip(pred, true, strict=True)),
        intersection=int(np.logical_and(pred, true).sum()),
        total=int(pred.sum()) + int(true.sum()),
    )
