"""Training data for 3D U-Nets: whole normalised volumes and their random 3D patches.

A 2D U-Net trains on :class:`~napari_unetquant.train.SliceSet` crops; a 3D one on
``(crop_depth, crop, crop)`` patches of a :class:`VolumeSet`, drawn here with the same rules:
a share of patches centred near a foreground voxel, the rest anywhere, each augmented
(:func:`~napari_unetquant.data.augment.sample_patch`).
"""

from __future__ import annotations

import numpy as np

from ..config import TrainConfig
from ..data.augment import AugmentConfig, sample_patch
from ..errors import SettingError
from .sets import VolumeSet, foreground_centre


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
        raise SettingError(
            "elastic deformation is for 2D U-Nets only; turn it off to train a 3D U-Net",
            "elastic",
        )
    return volumetric


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
        size = np.array([config.crop_depth, config.crop, config.crop], np.float64)
        centre = foreground_centre(foreground[index], size, config.foreground_oversample, rng)
        shape = (config.crop_depth, config.crop)
        image, mask = volumes.images[index], volumes.masks[index]
        patches.append(sample_patch(image, mask, shape, augment, rng, centre))
    images = np.stack([patch[0] for patch in patches])[:, None]
    masks = np.stack([patch[1] for patch in patches])[:, None].astype(np.float32)
    return images, masks
