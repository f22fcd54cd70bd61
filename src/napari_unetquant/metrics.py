"""Overlap metrics on binary masks and per class, with an explicit rule for empty masks.

Rule: where prediction and ground truth are both empty, Dice and IoU are 1 (a correct "nothing
here"). The paper's reference code scored such slices 0, which lowers means on data with empty
slices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class ClassScores:
    """Scores of a multi-class segmentation ``(S, H, W)`` of class indices against its truth.

    ``foreground`` scores every class together against the truth's foreground (any label
    value); ``per_class`` maps each label value to the scores of its own mask against the
    truth's mask of that value (both empty on a slice: 1, as for binary masks). The means over
    classes weigh every class alike.
    """

    foreground: SegmentationScores
    per_class: Mapping[int, SegmentationScores]

    @property
    def n_slices(self) -> int:
        return self.foreground.n_slices

    @property
    def dice_mean(self) -> float:
        return self.foreground.dice_mean

    @property
    def dice_volume(self) -> float:
        return self.foreground.dice_volume

    @property
    def iou_mean(self) -> float:
        return self.foreground.iou_mean

    @property
    def dice_mean_over_classes(self) -> float:
        """The mean over classes of each class's mean per-slice Dice."""
        return float(np.mean([s.dice_mean for s in self.per_class.values()]))

    @property
    def dice_volume_mean_over_classes(self) -> float:
        """The mean over classes of each class's Dice of all voxels pooled."""
        return float(np.mean([s.dice_volume for s in self.per_class.values()]))

    @property
    def iou_mean_over_classes(self) -> float:
        """The mean over classes of each class's mean per-slice IoU."""
        return float(np.mean([s.iou_mean for s in self.per_class.values()]))

    def as_dict(self) -> dict[str, Any]:
        """:meth:`SegmentationScores.as_dict` of the foreground, plus per-class scores keyed
        by label value (as text, for JSON) and their means over classes."""
        return {
            **self.foreground.as_dict(),
            "dice_per_class": {str(v): s.dice_mean for v, s in self.per_class.items()},
            "dice_volume_per_class": {str(v): s.dice_volume for v, s in self.per_class.items()},
            "iou_per_class": {str(v): s.iou_mean for v, s in self.per_class.items()},
            "dice_mean_over_classes": self.dice_mean_over_classes,
            "dice_volume_mean_over_classes": self.dice_volume_mean_over_classes,
            "iou_mean_over_classes": self.iou_mean_over_classes,
        }

    @classmethod
    def pooled(cls, parts: Sequence[ClassScores]) -> ClassScores:
        """All slices of several volumes as one set, class by class."""
        values = parts[0].per_class.keys() if parts else ()
        return cls(
            SegmentationScores.pooled([p.foreground for p in parts]),
            {v: SegmentationScores.pooled([p.per_class[v] for p in parts]) for v in values},
        )


def class_scores(
    prediction: np.ndarray, target: np.ndarray, classes: tuple[int, ...]
) -> ClassScores:
    """:class:`ClassScores` of ``(S, H, W)`` class indices (0 background, ``i`` the label
    value ``classes[i - 1]``) against the truth's class indices."""
    pred, true = np.asarray(prediction), np.asarray(target)
    return ClassScores(
        segmentation_scores(pred != 0, true != 0),
        {
            value: segmentation_scores(pred == index, true == index)
            for index, value in enumerate(classes, start=1)
        },
    )


Scores = SegmentationScores | ClassScores
"""A binary model's scores, or a multi-class model's."""


def pooled_scores(parts: Sequence[Scores]) -> Scores:
    """All slices of several volumes as one set (scores of one kind: one model's)."""
    per_class = [p for p in parts if isinstance(p, ClassScores)]
    binary = [p for p in parts if isinstance(p, SegmentationScores)]
    if per_class and binary:
        raise ValueError(
            "cannot pool a binary model's scores with a multi-class model's; pool one model's"
        )
    return ClassScores.pooled(per_class) if per_class else SegmentationScores.pooled(binary)
