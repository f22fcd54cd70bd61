"""3D training: whole volumes, 3D patches, per-volume validation, and a real run that learns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_unetquant.config import PreprocessConfig, QuantConfig, TrainConfig, UNetConfig
from napari_unetquant.data import Volume
from napari_unetquant.data.augment import AugmentConfig, sample_patch
from napari_unetquant.metrics import dice_score
from napari_unetquant.model import build_unet
from napari_unetquant.train import (
    LabelledVolume,
    SliceSet,
    StepEvent,
    Trainer,
    ValidationEvent,
    VolumeSet,
    read_pairs,
    slice_set,
    split_validation,
    training_set,
)
from napari_unetquant.train.volumes import volume_batch

UNET_3D = UNetConfig(base_width=4, depth=2, spatial_dims=3)


def _cord(shared_data: Path) -> list[LabelledVolume]:
    folder = shared_data / "spinal-gm-tiny"
    return read_pairs([folder / "t2s.nii.gz"], [folder / "t2s_seg.nii.gz"])


def test_3d_training_learns_the_spinal_cord(shared_data: Path) -> None:
    """60 steps of 8x32x32 patches (about a second on two cores) segment the cord of the
    held-out slice far better than calling everything cord."""
    train, validation = split_validation(_cord(shared_data))
    preprocess = PreprocessConfig()
    volumes, held_out = training_set(train, preprocess, 3), training_set(validation, preprocess, 3)
    assert isinstance(volumes, VolumeSet) and isinstance(held_out, VolumeSet)
    assert [v.shape for v in volumes.images + held_out.images] == [(8, 49, 54), (1, 49, 54)]
    config = TrainConfig(
        steps=60, batch_size=2, crop=32, crop_depth=8, validate_every=30, learning_rate=3e-3
    )
    trainer = Trainer(build_unet(UNET_3D), volumes, held_out, config)
    events = list(trainer.run())
    losses = [e.loss for e in events if isinstance(e, StepEvent)]
    assert [e.step for e in events if isinstance(e, ValidationEvent)] == [30, 60]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    everything = dice_score(np.ones_like(held_out.masks[0]), held_out.masks[0])
    assert everything < 0.25  # the trivial baseline
    assert trainer.best_dice > everything + 0.25
    on_training_volume = Trainer(trainer.best_model(), volumes, None, config).validation_dice()
    assert on_training_volume > 0.6


def test_validation_scores_dice_per_volume() -> None:
    """Two volumes, one predicted perfectly and one not at all: the mean of their Dice (not of
    slices, not of pooled voxels)."""

    class Oracle(torch.nn.Module):
        config = UNET_3D

        def __init__(self) -> None:
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x - 0.5) * 100 + self.bias  # the input is its own mask

    truth = np.zeros((3, 8, 8), np.uint8)
    truth[:, 2:5, 2:5] = 1
    right = VolumeSet.from_volumes([truth.astype(np.float32)], [truth])
    both = VolumeSet.from_volumes([truth.astype(np.float32), 1.0 - truth], [truth, truth])
    config = TrainConfig(steps=1, crop=16, crop_depth=2)
    assert Trainer(Oracle(), right, right, config).validation_dice() == 1.0
    assert Trainer(Oracle(), right, both, config).validation_dice() == pytest.approx(0.5)


def test_volume_batches_are_3d_patches_drawn_by_the_seed() -> None:
    rng = np.random.default_rng(0)
    volume = rng.random((5, 40, 30)).astype(np.float32)
    mask = np.zeros((5, 40, 30), np.uint8)
    mask[4, 35, 25] = 1  # one foreground voxel, in a corner
    volumes = VolumeSet.from_volumes([volume], [mask])
    config = TrainConfig(batch_size=3, crop=16, crop_depth=6, foreground_oversample=1.0)
    foreground = [np.argwhere(mask).astype(np.float64)]

    def draw(seed: int, augment: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
        return volume_batch(volumes, foreground, config, augment, np.random.default_rng(seed))

    images, masks = draw(1, AugmentConfig())
    assert images.shape == masks.shape == (3, 1, 6, 16, 16)
    assert images.dtype == masks.dtype == np.float32
    assert set(np.unique(masks)) <= {0.0, 1.0}
    again = draw(1, AugmentConfig())
    assert np.array_equal(images, again[0]) and np.array_equal(masks, again[1])
    assert not np.array_equal(images, draw(2, AugmentConfig())[0])
    plain_masks = draw(3, AugmentConfig.none())[1]  # centred near the voxel: every patch has it
    assert all(patch.sum() >= 1 for patch in plain_masks)


def test_patches_of_thin_volumes_take_whole_mirrored_slices() -> None:
    volume = np.arange(3 * 6 * 6, dtype=np.float32).reshape(3, 6, 6)
    mask = (volume % 2).astype(np.uint8)
    centre = np.array([1.0, 2.5, 2.5])  # integer pixel positions: no in-plane interpolation
    patch, patch_mask = sample_patch(
        volume, mask, (7, 6), AugmentConfig.none(), np.random.default_rng(0), centre
    )
    mirrored = np.pad(volume, ((3, 3), (0, 0), (0, 0)), mode="reflect")[1:8]  # slices -2..4
    assert np.array_equal(patch, mirrored)
    assert np.array_equal(patch_mask, (mirrored % 2).astype(np.uint8))


def test_patch_augmentation_turns_and_flips_whole_slices_and_their_order() -> None:
    volume = np.random.default_rng(0).random((3, 6, 6)).astype(np.float32)
    mask = (volume > 0.5).astype(np.uint8)
    turns_only = AugmentConfig(max_rotation_degrees=0.0, scale_range=0.0, intensity=0.0)
    centre = np.array([1.0, 2.5, 2.5])
    seen = set()
    for seed in range(16):
        patch, _ = sample_patch(
            volume, mask, (3, 6), turns_only, np.random.default_rng(seed), centre
        )
        for order in (1, -1):
            for turn in range(4):
                for flip in (False, True):
                    slices = [np.rot90(s, turn) for s in volume[::order]]
                    slices = [np.fliplr(s) if flip else s for s in slices]
                    if np.allclose(patch, np.stack(slices), atol=1e-6):
                        seen.add((order, turn, flip))
    assert {order for order, _, _ in seen} == {1, -1}  # the slice order is flipped at times
    assert len({(turn, flip) for _, turn, flip in seen}) >= 5  # in-plane turns and flips


def test_volume_set_keeps_whole_volumes_normalised_like_slices() -> None:
    rng = np.random.default_rng(0)
    pairs = [
        LabelledVolume(Volume(rng.random((4, 12, 10)) * 100, None), np.ones((4, 12, 10), np.uint8)),
        LabelledVolume(Volume(rng.random((2, 9, 9)), None), np.zeros((2, 9, 9), np.uint8)),
    ]
    volumes = training_set(pairs, PreprocessConfig(), 3)
    slices = slice_set(pairs, PreprocessConfig())
    assert isinstance(volumes, VolumeSet)
    assert isinstance(training_set(pairs, PreprocessConfig()), SliceSet)
    assert [v.shape for v in volumes.images] == [(4, 12, 10), (2, 9, 9)]
    flat = [s for volume in volumes.images for s in volume]
    assert all(np.array_equal(a, b) for a, b in zip(flat, slices.images, strict=True))


def test_3d_training_errors_say_the_fix() -> None:
    volumes = VolumeSet.from_volumes([np.zeros((4, 16, 16))], [np.ones((4, 16, 16))])
    slices = SliceSet.from_stacks(np.zeros((2, 16, 16)), np.ones((2, 16, 16)))
    config = TrainConfig(steps=1, crop=16, crop_depth=4)
    with pytest.raises(ValueError, match=r"a 3D U-Net trains on volumes .* spatial_dims=3"):
        Trainer(build_unet(UNET_3D), slices, None, config)
    with pytest.raises(ValueError, match=r"a 2D U-Net trains on slices .* spatial_dims=2"):
        Trainer(build_unet(UNetConfig(base_width=4, depth=2)), slices, volumes, config)
    elastic = TrainConfig(steps=1, crop=16, crop_depth=4, elastic=True)
    with pytest.raises(ValueError, match="turn it off to train a 3D U-Net"):
        Trainer(build_unet(UNET_3D, QuantConfig()), volumes, None, elastic)
    with pytest.raises(ValueError, match="crop_depth must be a positive integer"):
        TrainConfig(crop_depth=0)
    with pytest.raises(ValueError, match=r"must be 3D \(slices, rows, columns\)"):
        VolumeSet.from_volumes([np.zeros((16, 16))], [np.zeros((16, 16))])
    with pytest.raises(ValueError, match="no volumes to train on"):
        VolumeSet((), ())
    with pytest.raises(ValueError, match="2D only"):
        sample_patch(
            volumes.images[0],
            volumes.masks[0],
            (4, 8),
            AugmentConfig(elastic_alpha=8.0),
            np.random.default_rng(0),
        )
