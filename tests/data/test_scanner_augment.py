"""Scanner-like intensity augmentation: what other sites change, drawn from the seed, with the
normalised statistics kept; off, training draws exactly the crops it drew before."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unetquant.config import TrainConfig
from napari_unetquant.data.augment import AugmentConfig, sample_crop, sample_patch

rng = np.random.default_rng(0)
IMAGE = rng.normal(size=(64, 64)).astype(np.float32)
MASK = (IMAGE > 0.5).astype(np.uint8)


def _crop(config: AugmentConfig, seed: int) -> np.ndarray:
    return sample_crop(IMAGE, MASK, 32, config, np.random.default_rng(seed))[0]


def test_off_it_changes_nothing_and_draws_nothing() -> None:
    plain = AugmentConfig()
    assert np.array_equal(_crop(plain, 3), _crop(AugmentConfig(scanner=0.0), 3))


def test_on_it_changes_the_crop_by_the_seed_and_keeps_mean_and_sd() -> None:
    geometry_only = AugmentConfig(intensity=0.0)
    scanner = AugmentConfig(intensity=0.0, scanner=1.0)
    before, after = _crop(geometry_only, 5), _crop(scanner, 5)
    assert after.dtype == np.float32 and after.shape == before.shape
    assert not np.allclose(before, after, atol=1e-3)
    assert np.array_equal(after, _crop(scanner, 5))  # the seed decides
    assert not np.array_equal(after, _crop(scanner, 6))
    assert after.mean() == pytest.approx(before.mean(), abs=1e-4)
    assert after.std() == pytest.approx(before.std(), rel=1e-3)
    # the structure survives: the augmented crop still correlates with the plain one
    assert np.corrcoef(before.ravel(), after.ravel())[0, 1] > 0.5


def test_3d_patches_get_it_slice_for_slice_in_plane() -> None:
    volume = rng.normal(size=(6, 40, 40)).astype(np.float32)
    mask = np.zeros((6, 40, 40), np.uint8)
    patch, labels = sample_patch(
        volume, mask, (4, 24), AugmentConfig(scanner=1.0), np.random.default_rng(1)
    )
    assert patch.shape == labels.shape == (4, 24, 24) and np.isfinite(patch).all()


@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_train_config_refuses_strengths_outside_0_to_1(strength: float) -> None:
    with pytest.raises(ValueError, match="scanner_augment must be in"):
        TrainConfig(scanner_augment=strength)
