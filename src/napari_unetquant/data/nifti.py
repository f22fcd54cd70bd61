"""NIfTI-1 and NIfTI-2 (``.nii``, ``.nii.gz``) through nibabel, a block of slices at a time.

The slice axis is the third voxel axis (``array[s] == data[:, :, s]``); the in-plane spacing and
the affine come from the header. ``.nii`` reads only the slices asked for; ``.nii.gz``
decompresses forward through one open handle as slices are asked for in order.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .volume import NO_PIXELS, InputError, SliceSource


def open_nifti(path: Path) -> SliceSource:
    """A NIfTI file's one 3D volume (or 2D image, or 4D series of one volume) as
    ``(S, H, W)`` slices along its third axis; 4D series of several volumes are refused."""
    import nibabel as nib
    from nibabel.openers import Opener

    kind = type(nib.load(path))  # NIfTI-1 or NIfTI-2, as the header says
    opener = Opener(str(path), "rb")  # one handle for every read: .nii.gz decompresses forward
    try:
        return _nifti_source(path, kind.from_stream(opener.fobj), opener.close)
    except BaseException:
        opener.close()
        raise


def _nifti_source(path: Path, image: Any, close: Callable[[], None]) -> SliceSource:
    shape = tuple(image.shape)
    if 0 in shape:
        raise InputError(f"{path}: the image is empty (shape {shape}); {NO_PIXELS}")
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3:
        raise InputError(
            f"{path}: NIfTI data of shape {image.shape}; give one 3D volume (split 4D series first)"
        )
    proxy = image.dataobj
    extra = (0,) * (len(image.shape) - 3)

    def read(start: int, stop: int) -> np.ndarray:
        if len(image.shape) == 2:
            block = np.asanyarray(proxy[:, :])[:, :, None]
        else:
            block = np.asanyarray(proxy[(slice(None), slice(None), slice(start, stop), *extra)])
        return np.moveaxis(block, 2, 0)

    zooms = image.header.get_zooms()
    return SliceSource(
        (shape[2], shape[0], shape[1]),
        _nifti_dtype(proxy),
        read,
        spacing=(float(zooms[0]), float(zooms[1])),
        affine=np.asarray(image.affine, dtype=np.float64),
        source=str(path),
        close=close,
    )


def _nifti_dtype(proxy: Any) -> np.dtype[Any]:
    """The type nibabel reads: the stored type, or float with intensity scaling. Loading moves
    the scaling from the header (then ``(None, None)``) into the data proxy, so ask the proxy."""
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    if slope == 1.0 and inter == 0.0:
        stored: np.dtype[Any] = np.dtype(proxy.dtype)
        return stored
    corner: np.ndarray = np.asanyarray(proxy[(slice(0, 1),) * len(proxy.shape)])
    return corner.dtype
