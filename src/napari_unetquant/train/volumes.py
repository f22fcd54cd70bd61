"""Training data for 3D U-Nets: whole normalised volumes and their random 3D patches.

A 2D U-Net trains on :class:`~napari_unetquant.train.SliceSet` crops; a 3D one on
``(crop_depth, crop, crop)`` patches of a :class:`VolumeSet`, drawn here with the same rules:
a share of patches centred near a foreground voxel, the rest anywhere, each augmented
(:func:`~napari_unetquant.data.augment.sample_patch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import TrainConfig
from ..data.augment import AugmentConfig, sample_patch


@dataclass(frozen=True)
class VolumeSet:
    """Normalised volumes ``(S, H, W)`` (float32) and their masks (uint8 {0, 1}); shapes may
    differ between volumes."""

    images: tuple[np.ndarray, ...]
    masks: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError("no volumes to train on; give at least one image with labels")
        if len(self.images) != len(self.masks):
            raise ValueError(f"{len(self.images)} volumes but {len(self.masks)} masks")
        for index, (image, mask) in enumerate(zip(self.images, self.masks, strict=True)):
            if image.shape != mask.shape or image.ndim != 3:
                raise ValueError(
                    f"volume {index}: image {image.shape} and mask {mask.shape} must be 3D "
                    f"(slices, rows, columns) and of the same shape"
                )

    @classmethod
    def from_volumes(cls, images: list[np.ndarray], masks: list[np.ndarray]) -> VolumeSet:
        return cls(
            tuple(image.astype(np.float32) for image in images),
            tuple(mask.astype(np.uint8) for mask in masks),
        )

    def __len__(self) -> int:
        return len(self.images)


def check_volumetric(
    spatial_dims: int, train: object, validation: object, config: TrainConfig
) -> bool:
    """Whether training is 3D (a 3D U-Net on :class:`VolumeSet` data); raises ``ValueError``
    when the data do not fit the network or the settings do not fit 3D patches."""
    volumetric = spatial_dims == 3
    for data in (train, validation):
        if data is not None and isinstance(data, VolumeSet) != volumetric:
            kind = "volumes (a VolumeSet)" if volumetric else "slices (a SliceSet)"
            raise ValueError(
                f"a {spatial_dims}D U-Net trains on {kind}, got {type(data).__name__}; build "
                f"the data with training_set(pairs, preprocess, spatial_dims={spatial_dims})"
            )
    if volumetric and config.elastic:
        raise ValueError(
            "elastic deformation is for 2D U-Nets only; drop --elastic to train a 3D U-Net"
        )
    return volumetric


def _centre(
    foreground: np.ndarray, config: TrainConfig, rng: np.random.Generator
) -> np.ndarray | None:
    """A random foreground voxel of a volume, jittered (a share of patches), else ``None``."""
    if len(foreground) == 0 or rng.random() >= config.foreground_oversample:
        return None
    size = np.array([config.crop_depth, config.crop, config.crop], np.float64)
    jitter = rng.uniform(-0.25, 0.25, 3) * size
    centre: np.ndarray = foreground[rng.integers(len(foreground))] + jitter
    return centre


def volume_batch(
    volumes: VolumeSet,
    foreground: list[np.ndarray],
    config: TrainConfig,
    augment: AugmentConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """``config.batch_size`` augmented patches ``(N, 1, crop_depth, crop, crop)`` float32 and
    their masks (the same shape, float32 {0, 1}). ``foreground[i]``: the ``(k, 3)`` foreground
    voxels of volume ``i``."""
    patches = []
    for index in rng.integers(len(volumes), size=config.batch_size):
        centre = _centre(foreground[index], config, rng)
        shape = (config.crop_depth, config.crop)
        image, mask = volumes.images[index], volumes.masks[index]
        patches.append(sample_patch(image, mask, shape, augment, rng, centre))
    images = np.stack([patch[0] for patch in patches])[:, None]
    masks = np.stack([patch[1] for patch in patches])[:, None].astype(np.float32)
    return images, masks
