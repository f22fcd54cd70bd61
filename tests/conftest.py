"""Shared fixtures: seeding, the real data beside the checkout, small generated files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import HealthCheck, settings

from napari_unetquant.data import em_phantom_stack

# Property tests: "ci" (the default) is bounded and repeatable, so the suite stays fast and a
# failure reproduces; HYPOTHESIS_PROFILE=long searches far more (and differently each run).
settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "long",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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


@pytest.fixture
def w4a6_model_file(tmp_path: Path) -> Path:
    """A small W4A6 model file (untrained: its masks are arbitrary but deterministic), for
    tests of segmentation plumbing rather than of accuracy."""
    from napari_unetquant.config import PreprocessConfig, QuantConfig, UNetConfig
    from napari_unetquant.model import build_unet
    from napari_unetquant.modelio import SegmentationModel, save_model

    unet, quant = UNetConfig(base_width=4, depth=2), QuantConfig.from_bits(4, 6)
    bundle = SegmentationModel(build_unet(unet, quant).eval(), unet, quant, PreprocessConfig())
    path = tmp_path / "w4a6.safetensors"
    save_model(path, bundle)
    return path
