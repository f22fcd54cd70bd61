"""DICOM series (one folder per scan, as in the NIH pancreas set) through pydicom."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .io import InputError, Volume


def _import_pydicom() -> Any:
    try:
        import pydicom
    except ImportError as error:
        raise InputError(
            "reading DICOM needs pydicom: pip install 'napari-unetquant[dicom]'"
        ) from error
    return pydicom


def _slice_position(dataset: Any) -> float:
    position = getattr(dataset, "ImagePositionPatient", None)
    if position is not None:
        return float(position[2])
    return float(getattr(dataset, "InstanceNumber", 0))


def read_dicom_series(folder: Path, files: list[Path]) -> Volume:
    """Read every DICOM image in ``folder`` as one volume, slices ordered by position.

    Pixel values are rescaled to their physical units (Hounsfield units for CT) with
    ``RescaleSlope`` and ``RescaleIntercept``; the spacing comes from ``PixelSpacing``.
    """
    pydicom = _import_pydicom()
    datasets = []
    for file in files:
        try:
            dataset = pydicom.dcmread(file)
        except Exception:  # not DICOM: ignore stray files such as notes or thumbnails
            continue
        if "PixelData" in dataset:
            datasets.append(dataset)
    if not datasets:
        raise InputError(
            f"{folder}: no images found; give a folder of DICOM files or of PNG/JPEG/TIFF slices"
        )
    datasets.sort(key=_slice_position)
    try:
        slices = [
            ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1))
            + float(getattr(ds, "RescaleIntercept", 0))
            for ds in datasets
        ]
        array = np.stack(slices)
    except Exception as error:
        raise InputError(
            f"{folder}: DICOM pixel data could not be decoded or the slices differ in size "
            f"({type(error).__name__}: {error})"
        ) from error
    spacing = getattr(datasets[0], "PixelSpacing", None)
    return Volume(
        array,
        spacing=(float(spacing[0]), float(spacing[1])) if spacing is not None else None,
        source=str(folder),
    )
