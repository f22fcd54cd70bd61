"""Shared fixtures: seeding, the real data beside the checkout, small generated files."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


@pytest.fixture(autouse=True)
def _engine_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Engine measurements are remembered in the test's own folder, never the user's cache
    (and no test sees another's)."""
    monkeypatch.setenv("UNETQUANT_CACHE_DIR", str(tmp_path / "unetquant-cache"))


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


FAST_TRAIN = [
    "--steps",
    "4",
    "--crop",
    "32",
    "--batch-size",
    "2",
    "--validate-every",
    "2",
    "--base-width",
    "4",
    "--depth",
    "2",
]
"""``unetquant train`` options for a run of seconds: a tiny network, four steps."""


@pytest.fixture
def fast_train() -> list[str]:
    return list(FAST_TRAIN)


def write_ct_series(
    folder: Path,
    slices: np.ndarray,
    name: str = "f{}.dcm",
    position: Callable[[int], list[float]] = lambda index: [0.0, 0.0, 10 - 2.5 * index],
) -> None:
    """``slices`` (S, rows, columns) in HU as an axial CT series (0.7 x 0.8 mm pixels), one
    file per slice named ``name.format(index)`` at ``position(index)``, plus a text note."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    for index in range(len(slices)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / name.format(index)
        dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        dataset.Modality = "CT"
        dataset.Rows, dataset.Columns = slices.shape[1:]
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
        dataset.PixelRepresentation = 0
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.RescaleSlope, dataset.RescaleIntercept = 1, -1024
        dataset.PixelSpacing = [0.7, 0.8]
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        dataset.ImagePositionPatient = position(index)
        dataset.SeriesInstanceUID = "1.2.3"
        dataset.PixelData = (slices[index] + 1024).astype(np.uint16).tobytes()
        dataset.save_as(path, enforce_file_format=True)
    (folder / "notes.txt").write_text("not an image")


@pytest.fixture
def ct_series() -> Callable[..., None]:
    """:func:`write_ct_series`, for tests that write DICOM folders."""
    return write_ct_series


@pytest.fixture
def bad_file(
    tmp_path: Path, w4a6_model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[str], Path]:
    """``bad_file(case)``: a damaged or unsuitable input of ``(3, 64, 64)`` (the shape of
    ``phantom_files``) or a model file that is not usable, made in a fresh folder. The cases
    are the rows of the bad-input tables (``tests/test_bad_input.py``).

    Root reads any file whatever its mode, so when the tests run as root ``os.access`` is made
    to answer for ``chmod 000`` files as it would for any other user (the code under test asks
    it before reading)."""
    folder = tmp_path / "bad"
    folder.mkdir()
    if os.geteuid() == 0:
        real_access = os.access

        def access_as_a_user(path: Any, mode: int, *args: Any, **kwargs: Any) -> bool:
            try:
                unreadable = os.stat(path).st_mode & 0o777 == 0
            except OSError:
                unreadable = False
            if unreadable and mode & os.R_OK:
                return False
            return real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access_as_a_user)

    def make(case: str) -> Path:
        path = folder / case.replace("model-", "").replace("/", "-")
        _BAD_FILES[case](path, w4a6_model_file)
        return path

    return make


def _truncated(path: Path, write: Callable[[Path], None]) -> None:
    write(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _nifti(path: Path, data: np.ndarray) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


def _unreadable(path: Path, _: Path) -> None:
    _tiff(path, np.zeros((3, 64, 64), np.uint8))
    path.chmod(0)


def _dicom_series(path: Path, _: Path) -> None:
    """Three 64 x 64 CT slices, the last one cut short in its pixel data."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path.mkdir()
    series = generate_uid()
    for index in range(3):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID, ds.Rows, ds.Columns = series, 64, 64
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, index], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [1, 1]
        ds.PixelData = np.zeros((64, 64), np.int16).tobytes()
        ds.save_as(path / f"{index}.dcm", enforce_file_format=True)
    _truncated(path / "2.dcm", lambda _: None)


def _model_with(path: Path, good: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """``good``'s tensors with its metadata changed by ``change``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(good), framework="pt") as handle:
        metadata = dict(handle.metadata())
    change(metadata)
    save_file(load_file(str(good)), str(path), metadata=metadata)


def _config_with(key: str, part: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(metadata: dict[str, Any]) -> None:
        config = json.loads(metadata["config"])
        config[key][part] = value
        metadata["config"] = json.dumps(config)

    return change


def _two_channel_model(path: Path, _: Path) -> None:
    from napari_unetquant.config import QuantConfig, UNetConfig
    from napari_unetquant.model import build_unet
    from napari_unetquant.modelio import SegmentationModel, save_model

    unet, quant = UNetConfig(in_channels=2, base_width=4, depth=2), QuantConfig.from_bits(4, 6)
    save_model(path, SegmentationModel(build_unet(unet, quant).eval(), unet, quant))


def _foreign_model(path: Path, _: Path) -> None:
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(path))


def _tiff(path: Path, data: np.ndarray) -> None:
    tifffile.imwrite(path, data, photometric="minisblack")


def _png(path: Path) -> None:
    import imageio.v3 as iio

    iio.imwrite(path, _stack()[0], extension=".png")


def _stack(dtype: Any = np.uint8) -> np.ndarray:
    return (np.arange(3 * 64 * 64).reshape(3, 64, 64) % 7).astype(dtype)


def _with_values(values: np.ndarray) -> np.ndarray:
    stack = _stack(np.float32)
    stack[1, 10:20, 10:20] = values
    return stack


_BAD_FILES: dict[str, Callable[[Path, Path], None]] = {
    "missing.tif": lambda path, _: None,
    "unreadable.tif": _unreadable,
    "truncated.tif": lambda path, _: _truncated(path, lambda p: _tiff(p, _stack())),
    "truncated.nii.gz": lambda path, _: _truncated(path, lambda p: _nifti(p, _stack())),
    "truncated.png": lambda path, _: _truncated(path, _png),
    "corrupt.tif": lambda path, _: path.write_bytes(b"II*\x00 this is not a TIFF"),
    "truncated-dicom": _dicom_series,
    "rgb.tif": lambda path, _: tifffile.imwrite(
        path, np.stack([_stack()[0], _stack()[0] * 2, _stack()[0]], axis=-1), photometric="rgb"
    ),
    "4d.tif": lambda path, _: _tiff(path, np.zeros((2, 3, 64, 64), np.uint8)),
    "4d.nii.gz": lambda path, _: _nifti(path, np.zeros((64, 64, 3, 2), np.float32)),
    "empty.nii.gz": lambda path, _: _nifti(path, np.zeros((64, 64, 0), np.float32)),
    "nan.tif": lambda path, _: _tiff(path, _with_values(np.nan)),
    "inf.nii.gz": lambda path, _: _nifti(path, np.moveaxis(_with_values(np.inf), 0, 2)),
    "labels-shape.tif": lambda path, _: _tiff(path, np.ones((3, 32, 64), np.uint8)),
    "labels-fraction.tif": lambda path, _: _tiff(path, _with_values(0.5)),
    "labels-nan.tif": lambda path, _: _tiff(path, _with_values(np.nan)),
    "labels-empty.tif": lambda path, _: _tiff(path, np.zeros((3, 64, 64), np.uint8)),
    "model-missing.safetensors": lambda path, _: None,
    "model-unreadable.safetensors": _unreadable,
    "model-text.safetensors": lambda path, _: path.write_text("weights: none\n"),
    "model-png.safetensors": lambda path, _: _png(path),
    "model-foreign.safetensors": _foreign_model,
    "model-future.safetensors": lambda path, good: _model_with(
        path, good, lambda metadata: metadata.update(version="3")
    ),
    "model-truncated.safetensors": lambda path, good: _truncated(
        path, lambda p: p.write_bytes(good.read_bytes())
    ),
    "model-no-config.safetensors": lambda path, good: _model_with(
        path, good, lambda metadata: metadata.pop("config")
    ),
    "model-bits.safetensors": lambda path, good: _model_with(
        path, good, _config_with("quant", "weight", {"method": "fixed", "bits": 12})
    ),
    "model-depth.safetensors": lambda path, good: _model_with(
        path, good, _config_with("unet", "depth", 3)
    ),
    "model-2-channels.safetensors": _two_channel_model,
}
