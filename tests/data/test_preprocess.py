"""Masks, normalisation, resampling and augmented crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_unetquant.config import PreprocessConfig
from napari_unetquant.data import (
    AugmentConfig,
    Volume,
    foreground_mask,
    network_input,
    network_mask,
    normalize,
    read_volume,
    sample_crop,
)
from napari_unetquant.data.preprocess import resize_slices


def test_foreground_mask_rules() -> None:
    labels = np.array([[0, 255], [3, 0]])
    assert np.array_equal(foreground_mask(labels), [[0, 1], [1, 0]])
    assert np.array_equal(foreground_mask(labels, foreground_value=0), [[1, 0], [0, 1]])
    assert np.array_equal(foreground_mask(labels.astype(np.float32), 3), [[0, 0], [1, 0]])


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([[0.5, 1.0]]), "must be an integer mask"),
        (np.array([[np.nan, 1.0]]), "must be an integer mask"),
        (np.array([["a", "b"]]), "not an integer mask"),
    ],
)
def test_foreground_mask_refuses_non_masks(labels: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        foreground_mask(labels)


def test_zscore_per_slice_and_ct_window() -> None:
    slices = np.stack([np.arange(16.0).reshape(4, 4), 100 + 5 * np.arange(16.0).reshape(4, 4)])
    out = normalize(slices, PreprocessConfig())
    assert out.dtype == np.float32
    assert np.allclose(out.mean(axis=(1, 2)), 0, atol=1e-6)
    assert np.allclose(out.std(axis=(1, 2)), 1, atol=1e-6)
    hu = np.array([[[-1000.0, -160.0, 40.0, 240.0, 3000.0]]])
    windowed = normalize(hu, PreprocessConfig(ct_window=(40, 400)))
    assert np.allclose(windowed, [[[-1, -1, 0, 1, 1]]])


def test_zscore_follows_the_documented_rule_to_the_bit() -> None:
    """docs/integer-format.md: mean and population SD in float64 (here: exactly, with
    math.fsum), rounded to float32, then one float32 subtraction and division per pixel."""
    import math

    from napari_unetquant.data.preprocess import zscore

    image = np.random.default_rng(5).integers(0, 4096, size=(97, 131)).astype(np.uint16)
    values = [float(v) for v in image.ravel()]
    mean = math.fsum(values) / len(values)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
    expected = (image.astype(np.float32) - np.float32(mean)) / np.float32(std)
    assert np.array_equal(zscore(image), expected)
    per_slice = normalize(image[None], PreprocessConfig())[0]
    assert np.array_equal(per_slice, expected)


def test_nan_pixels_are_refused() -> None:
    with pytest.raises(ValueError, match="NaN or Inf"):
        normalize(np.array([[[1.0, np.inf]]]), PreprocessConfig())


def test_resampling_to_a_common_spacing_and_back(shared_data: Path) -> None:
    volume = read_volume(shared_data / "spinal-gm" / "sub-9709Ses1" / "image.nii.gz")
    assert volume.spacing is not None
    config = PreprocessConfig(spacing=(volume.spacing[0] / 2, volume.spacing[1] / 2))
    inputs = network_input(volume, config)
    assert inputs.shape == (20, 512, 384)
    labels = read_volume(shared_data / "spinal-gm" / "sub-9709Ses1" / "gm.nii.gz").array
    mask = network_mask(foreground_mask(labels), volume, config)
    assert mask.shape == inputs.shape and mask.dtype == np.uint8
    assert abs(int(mask.sum()) - 4 * int(foreground_mask(labels).sum())) < 0.1 * mask.sum()
    back = resize_slices(mask, (256, 192), order=0)
    assert np.array_equal(back, foreground_mask(labels))


def test_ct_volume_with_window(shared_data: Path) -> None:
    volume = read_volume(shared_data / "ct-spleen" / "image.nii.gz")
    inputs = network_input(volume, PreprocessConfig(ct_window=(40, 400)))
    assert inputs.shape == (26, 164, 166)
    assert inputs.min() == -1.0 and inputs.max() == 1.0


def test_unaugmented_crop_is_the_window_itself() -> None:
    image = np.arange(40 * 50, dtype=np.float32).reshape(40, 50)
    mask = (image % 7 == 0).astype(np.uint8)
    crop_image, crop_mask = sample_crop(
        image, mask, 16, AugmentConfig.none(), np.random.default_rng(0), np.array([20.5, 30.5])
    )
    assert np.array_equal(crop_image, image[13:29, 23:39])
    assert np.array_equal(crop_mask, mask[13:29, 23:39])


def test_augmented_crops_keep_image_and_mask_aligned() -> None:
    rng = np.random.default_rng(0)
    mask = (rng.random((60, 60)) > 0.7).astype(np.uint8)
    mask = np.kron(mask, np.ones((4, 4), np.uint8))  # blocks, so interpolation has room
    config = AugmentConfig(elastic_alpha=8.0, intensity=0.0)
    for _ in range(5):
        image_crop, mask_crop = sample_crop(mask.astype(np.float32), mask, 64, config, rng)
        assert np.mean((image_crop > 0.5) == mask_crop) > 0.97


def test_crops_larger_than_the_slice_are_mirrored() -> None:
    image = np.random.default_rng(0).random((20, 12)).astype(np.float32)
    crop_image, crop_mask = sample_crop(
        image, np.zeros((20, 12), np.uint8), 32, AugmentConfig(), np.random.default_rng(1)
    )
    assert crop_image.shape == crop_mask.shape == (32, 32)
    assert np.isfinite(crop_image).all()


def test_volume_slices_must_match_for_masks() -> None:
    volume = Volume(np.zeros((2, 8, 8)), spacing=(1.0, 1.0))
    mask = network_mask(np.ones((2, 8, 8), np.uint8), volume, PreprocessConfig(spacing=(2.0, 2.0)))
    assert mask.shape == (2, 4, 4)


def test_local_normalisation_ignores_field_of_view_gain_and_offset() -> None:
    """The same tissue gives the same values whatever surrounds it: a crop of the slice, a
    padded field of view or another scanner gain and offset change the slice z-score of the
    centre but not the local one (away from the borders the neighbourhood reaches)."""
    rng = np.random.default_rng(0)
    tissue = ndimage_smooth(rng.normal(size=(96, 96)))
    wide = np.pad(tissue, 64, constant_values=0.0) + np.pad(np.ones((96, 96)), 64) * 3
    local = PreprocessConfig(intensity="local", local_mm=4.0)  # 8 px at 0.5 mm
    centre = (slice(40, 56), slice(40, 56))

    def value(image: np.ndarray, config: PreprocessConfig, gain: float = 1.0) -> np.ndarray:
        out = normalize((image * gain + 7.0)[None], config, spacing=(0.5, 0.5))[0]
        middle = (image.shape[0] - 96) // 2
        return out[middle : middle + 96, middle : middle + 96][centre]

    assert np.allclose(value(tissue, local), value(wide, local, gain=3.0), atol=1e-3)
    assert not np.allclose(value(tissue, PreprocessConfig()), value(wide, PreprocessConfig()), 0.1)


def test_local_neighbourhood_is_in_millimetres() -> None:
    """Resampled or not, ``local_mm`` is a physical size: half the pixel size, twice the
    pixels; images without a spacing use a fixed number of pixels per mm."""
    rng = np.random.default_rng(1)
    image = rng.normal(size=(1, 64, 64)).astype(np.float32)
    config = PreprocessConfig(intensity="local", local_mm=5.0)
    assert np.allclose(
        normalize(image, config, spacing=(0.25, 0.25)),
        normalize(image, PreprocessConfig(intensity="local", local_mm=10.0), spacing=(0.5, 0.5)),
    )
    assert np.allclose(normalize(image, config), normalize(image, config, spacing=(0.5, 0.5)))
    flat = normalize(np.zeros((1, 8, 8)), config)
    assert np.all(flat == 0)  # no division by zero on a constant image


def test_unknown_intensity_normalisation_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"choose one of \('slice', 'local'\)"):
        PreprocessConfig(intensity="histogram")
    with pytest.raises(ValueError, match=r"between 0\.5 and 200 mm"):
        PreprocessConfig(intensity="local", local_mm=0.0)


def ndimage_smooth(noise: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    smooth: np.ndarray = ndimage.gaussian_filter(noise, 2.0)
    return smooth
