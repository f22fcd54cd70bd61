"""Generated phantoms and normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unetquant.data import em_phantom, em_phantom_stack, zscore


def test_phantom_is_reproducible_and_em_like() -> None:
    image, membranes = em_phantom(128, 96, seed=5)
    again, _ = em_phantom(128, 96, seed=5)
    assert image.shape == membranes.shape == (128, 96)
    assert image.dtype == np.float32 and membranes.dtype == np.uint8
    assert np.array_equal(image, again)
    assert set(np.unique(membranes)) == {0, 1}
    assert 0.1 < membranes.mean() < 0.4, "membranes are thin walls, not most of the image"
    assert image[membranes == 1].mean() < image[membranes == 0].mean() - 0.2, "membranes are dark"


def test_phantom_stack_slices_differ() -> None:
    images, labels = em_phantom_stack(3, 64, 64, seed=1)
    assert images.shape == labels.shape == (3, 64, 64)
    assert not np.array_equal(images[0], images[1])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: em_phantom(4, 64), "at least 8 x 8"),
        (lambda: em_phantom(64, 64, cell_size=2), "cell_size must be at least 4"),
        (lambda: em_phantom_stack(0), "slices must be at least 1"),
    ],
)
def test_phantom_errors(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]


def test_zscore() -> None:
    out = zscore(np.array([[1, 2], [3, 4]], dtype=np.uint16))
    assert out.dtype == np.float32
    assert out.mean() == pytest.approx(0.0) and out.std() == pytest.approx(1.0)
    assert np.array_equal(zscore(np.full((2, 2), 7.0)), np.zeros((2, 2), dtype=np.float32))
