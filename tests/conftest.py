"""Shared fixtures: seeding, the real data beside the checkout, small generated files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_unetquant.data import em_phantom_stack

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same random state."""
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data``: real images with ground truth (present on CI and developer machines)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the real-data tests need ../shared/data")
    return SHARED_DATA


@pytest.fixture
def phantom_files(tmp_path: Path) -> tuple[Path, Path]:
    """A small EM-like stack as multi-page TIFF files: (image uint8, membranes uint8)."""
    images, membranes = em_phantom_stack(3, 64, 64, seed=7)
    image_path, label_path = tmp_path / "em.tif", tmp_path / "em-labels.tif"
    tifffile.imwrite(image_path, (images * 255).astype(np.uint8), photometric="minisblack")
    tifffile.imwrite(label_path, membranes, photometric="minisblack")
    return image_path, label_path
