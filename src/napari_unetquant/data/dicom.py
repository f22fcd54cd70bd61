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

from .volume import InputError, SliceSource, one_line, reading

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _import_pydicom() -> Any:
    try:
        import pydicom
    except ImportError as error:
        raise InputError(
            "reading DICOM needs pydicom: pip install 'napari-unetquant[dicom]'"
        ) from error
    return pydicom


def _headers(folder: Path, files: list[Path]) -> list[tuple[Path, Any]]:
    """The image files of one series with their headers (pixels are not read here)."""
    pydicom = _import_pydicom()
    headers = []
    for file in files:
        try:
            dataset = pydicom.dcmread(file, stop_before_pixels=True)
        except Exception:  # not DICOM: ignore stray files such as notes
            continue
        if "Rows" in dataset and "Columns" in dataset:  # an image, not a report or a DICOMDIR
            _check_header(file, dataset)
            headers.append((file, dataset))
    if not headers:
        raise InputError(
            f"{folder}: no images found; give a folder of DICOM files or of PNG/JPEG/TIFF slices"
        )
    series = {getattr(ds, "SeriesInstanceUID", "") for _, ds in headers}
    if len(series) > 1:
        raise InputError(
            f"{folder}: holds {len(series)} DICOM series; put each series in its own folder"
        )
    return headers


def _check_header(file: Path, dataset: Any) -> None:
    """Refuse an image whose size, geometry or rescale fields are not numbers of the right
    count (a damaged file), before they are used."""
    try:
        int(dataset.Rows), int(dataset.Columns)
        _position(dataset, _geometry(dataset)[2])
        _row, _column = (float(v) for v in getattr(dataset, "PixelSpacing", [1, 1]))
        float(getattr(dataset, "RescaleSlope", 1)), float(getattr(dataset, "RescaleIntercept", 0))
    except Exception as error:
        raise InputError(
            f"{file}: damaged DICOM header ({one_line(error)}); check that the file is complete "
            f"or move it out of the series folder"
        ) from error


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


def open_dicom_series(folder: Path, files: list[Path]) -> SliceSource:
    """The DICOM images in ``folder`` as one streamed volume, slices ordered along their
    normal; headers are read now, pixels a run of slices at a time.

    Pixel values are rescaled to physical units (Hounsfield units for CT) with
    ``RescaleSlope`` and ``RescaleIntercept``; the spacing comes from ``PixelSpacing``.
    """
    headers = _headers(folder, files)
    normal = _geometry(headers[0][1])[2]
    headers.sort(key=lambda pair: _position(pair[1], normal))
    first, last = headers[0][1], headers[-1][1]
    plane = (int(first.Columns), int(first.Rows))  # NIfTI order: i along a DICOM row
    pydicom = _import_pydicom()

    def read(start: int, stop: int) -> np.ndarray:
        slices = []
        for file, header in headers[start:stop]:
            with reading(str(file), failed="DICOM pixel data could not be decoded"):
                pixels = pydicom.dcmread(file).pixel_array.astype(np.float32).T
            if pixels.shape != plane:
                raise InputError(
                    f"{file}: a {pixels.shape[1]} x {pixels.shape[0]} slice in a series of "
                    f"{plane[1]} x {plane[0]} slices; a series must hold slices of one size"
                )
            slope = float(getattr(header, "RescaleSlope", 1))
            slices.append(pixels * slope + float(getattr(header, "RescaleIntercept", 0)))
        return np.stack(slices)

    spacing = getattr(first, "PixelSpacing", None)
    return SliceSource(
        (len(headers), *plane),
        np.dtype(np.float32),
        read,
        spacing=(float(spacing[1]), float(spacing[0])) if spacing is not None else None,
        affine=_affine(first, last, len(headers)),
        source=str(folder),
    )
