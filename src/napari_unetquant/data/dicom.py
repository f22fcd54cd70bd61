"""DICOM series (one folder per scan, as in the NIH pancreas set) through pydicom.

Slices are presented in NIfTI voxel order, like every other volume here: ``array[s]`` has the
DICOM *columns* along its rows (NIfTI's i axis) and the DICOM rows along its columns (j), and
the affine maps voxel (i, j, s) to RAS millimetres. NIfTI label files converted from the same
series (dcm2niix, as in the NIH pancreas set) then line up voxel for voxel, or are reoriented
onto the image by :func:`~napari_unetquant.data.io.labels_on_image_grid`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .io import InputError, Volume

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _import_pydicom() -> Any:
    try:
        import pydicom
    except ImportError as error:
        raise InputError(
            "reading DICOM needs pydicom: pip install 'napari-unetquant[dicom]'"
        ) from error
    return pydicom


def _images(folder: Path, files: list[Path]) -> list[Any]:
    pydicom = _import_pydicom()
    datasets = []
    for file in files:
        try:
            dataset = pydicom.dcmread(file)
        except Exception:  # not DICOM: ignore stray files such as notes
            continue
        if "PixelData" in dataset:
            datasets.append(dataset)
    if not datasets:
        raise InputError(
            f"{folder}: no images found; give a folder of DICOM files or of PNG/JPEG/TIFF slices"
        )
    series = {getattr(ds, "SeriesInstanceUID", "") for ds in datasets}
    if len(series) > 1:
        raise InputError(
            f"{folder}: holds {len(series)} DICOM series; put each series in its own folder"
        )
    return datasets


def _geometry(dataset: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors along a row (increasing column), along a column, and the slice normal."""
    orientation = getattr(dataset, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0])
    along_row = np.asarray(orientation[:3], dtype=np.float64)
    along_column = np.asarray(orientation[3:], dtype=np.float64)
    return along_row, along_column, np.cross(along_row, along_column)


def _position(dataset: Any, normal: np.ndarray) -> float:
    position = getattr(dataset, "ImagePositionPatient", None)
    if position is None:
        return float(getattr(dataset, "InstanceNumber", 0))
    return float(np.dot(np.asarray(position, dtype=np.float64), normal))


def _affine(first: Any, last: Any, count: int) -> np.ndarray:
    along_row, along_column, normal = _geometry(first)
    row_spacing, column_spacing = (float(v) for v in getattr(first, "PixelSpacing", [1, 1]))
    origin = np.asarray(getattr(first, "ImagePositionPatient", [0, 0, 0]), dtype=np.float64)
    end = np.asarray(getattr(last, "ImagePositionPatient", origin), dtype=np.float64)
    step = (end - origin) / (count - 1) if count > 1 else normal
    affine = np.eye(4)
    affine[:3, 0] = along_row * column_spacing  # i: along a row, i.e. increasing column index
    affine[:3, 1] = along_column * row_spacing  # j: increasing row index
    affine[:3, 2] = step
    affine[:3, 3] = origin
    affine[:3] = _LPS_TO_RAS @ affine[:3]
    return affine


def read_dicom_series(folder: Path, files: list[Path]) -> Volume:
    """Read the DICOM images in ``folder`` as one volume, slices ordered along their normal.

    Pixel values are rescaled to physical units (Hounsfield units for CT) with
    ``RescaleSlope`` and ``RescaleIntercept``; the spacing comes from ``PixelSpacing``.
    """
    datasets = _images(folder, files)
    normal = _geometry(datasets[0])[2]
    datasets.sort(key=lambda ds: _position(ds, normal))
    try:
        slices = [
            ds.pixel_array.astype(np.float32).T * float(getattr(ds, "RescaleSlope", 1))
            + float(getattr(ds, "RescaleIntercept", 0))
            for ds in datasets
        ]
        array = np.stack(slices)
    except Exception as error:
        raise InputError(
            f"{folder}: DICOM pixel data could not be decoded or the slices differ in size "
            f"({type(error).__name__}: {error})"
        ) from error
    affine = _affine(datasets[0], datasets[-1], len(datasets))
    spacing = getattr(datasets[0], "PixelSpacing", None)
    return Volume(
        array,
        spacing=(float(spacing[1]), float(spacing[0])) if spacing is not None else None,
        affine=affine,
        source=str(folder),
    )
