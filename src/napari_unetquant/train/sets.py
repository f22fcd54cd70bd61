"""Training data held in memory: normalised 2D slices or 3D volumes with their masks, and
where crops and patches are centred.

A 2D U-Net trains on crops of a :class:`SliceSet`, a 3D one on patches of a :class:`VolumeSet`;
both are drawn with one rule (:func:`foreground_centre`): a share of them centred near a random
foreground pixel or voxel, the rest anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import numpy as np

Labelled = TypeVar("Labelled", bound="_LabelledArrays")


@dataclass(frozen=True)
class _LabelledArrays:
    """Normalised images (float32) and their masks (uint8 {0, 1}) of ``item_ndim``
    dimensions each; sizes may differ between items."""

    images: tuple[np.ndarray, ...]
    masks: tuple[np.ndarray, ...]
    item_ndim: ClassVar[int] = 2
    item_name: ClassVar[str] = "slice"
    item_shape: ClassVar[str] = "2D"

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError(
                f"no {self.item_name}s to train on; give at least one image with labels"
            )
        if len(self.images) != len(self.masks):
            raise ValueError(
                f"{len(self.images)} {self.item_name}s of images but {len(self.masks)} masks"
            )
        for index, (image, mask) in enumerate(zip(self.images, self.masks, strict=True)):
            if image.shape != mask.shape or image.ndim != self.item_ndim:
                raise ValueError(
                    f"{self.item_name} {index}: image {image.shape} and mask {mask.shape} must "
                    f"be {self.item_shape} and of the same shape"
                )

    @classmethod
    def from_arrays(
        cls: type[Labelled], images: Sequence[np.ndarray], masks: Sequence[np.ndarray]
    ) -> Labelled:
        """From images and masks of any float and integer types."""
        return cls(
            tuple(image.astype(np.float32) for image in images),
            tuple(mask.astype(np.uint8) for mask in masks),
        )

    @classmethod
    def concat(cls: type[Labelled], parts: Sequence[Labelled]) -> Labelled:
        return cls(
            tuple(i for p in parts for i in p.images), tuple(m for p in parts for m in p.masks)
        )

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class SliceSet(_LabelledArrays):
    """Normalised 2D slices ``(H, W)`` and their masks, for a 2D U-Net."""

    @classmethod
    def from_stacks(cls, images: np.ndarray, masks: np.ndarray) -> SliceSet:
        """From ``(S, H, W)`` stacks: one item per slice."""
        return cls.from_arrays(list(images), list(masks))


@dataclass(frozen=True)
class VolumeSet(_LabelledArrays):
    """Normalised volumes ``(S, H, W)`` and their masks, for a 3D U-Net."""

    item_ndim: ClassVar[int] = 3
    item_name: ClassVar[str] = "volume"
    item_shape: ClassVar[str] = "3D (slices, rows, columns)"

    @classmethod
    def from_volumes(cls, images: list[np.ndarray], masks: list[np.ndarray]) -> VolumeSet:
        return cls.from_arrays(images, masks)


def foreground_centre(
    foreground: np.ndarray, size: np.ndarray, share: float, rng: np.random.Generator
) -> np.ndarray | None:
    """With probability ``share``, a random row of ``foreground`` (``(k, d)`` pixel or voxel
    indices) jittered by up to a quarter of the crop ``size`` ``(d,)``; else (or without
    foreground) ``None``: the crop goes anywhere."""
    if len(foreground) == 0 or rng.random() >= share:
        return None
    jitter = rng.uniform(-0.25, 0.25, len(size)) * size
    centre: np.ndarray = foreground[rng.integers(len(foreground))] + jitter
    return centre
