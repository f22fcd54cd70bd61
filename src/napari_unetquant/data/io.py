"""The one way in for image and label files: :func:`open_volume` streams, :func:`read_volume`
reads whole.

:func:`open_volume` checks the path, chooses the format's reader (by suffix; a folder is a DICOM
series or a folder of slices) and turns a library's error on a damaged file into one line that
names the file; every reader hands out ``(S, H, W)`` slices a run at a time
(:class:`~napari_unetquant.data.volume.SliceSource`). :func:`read_volume` is that source read
into memory. The names other modules import from here (the volume types and helpers, the
writers) are re-exported: see ``__all__``.

Formats: multi-page TIFF, PNG/JPEG pictures, NIfTI (``.nii``, ``.nii.gz``), NumPy ``.npy``,
zarr (``.zarr``), and folders (a DICOM series, or PNG/JPEG/TIFF slices in name order).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .arrays import open_npy, open_zarr
from .dicom import open_dicom_series
from .folder import folder_files, open_slice_folder
from .nifti import open_nifti
from .pictures import open_picture
from .preprocess import paint_label_layers
from .tiff import open_tiff
from .volume import (
    ARRAY_SUFFIXES,
    MASK_SUFFIXES,
    NIFTI_SUFFIXES,
    PICTURE_SUFFIXES,
    TIFF_SUFFIXES,
    Grid,
    InputError,
    SliceSource,
    Volume,
    array_source,
    check_readable,
    one_line,
    reading,
    suffix_of,
    volume_source,
)
from .write import (
    atomic_path,
    nifti_affine,
    remove_partial_writes,
    write_csv,
    write_mask,
    write_mask_stream,
)

__all__ = [
    "MASK_SUFFIXES",
    "NIFTI_SUFFIXES",
    "PICTURE_SUFFIXES",
    "TIFF_SUFFIXES",
    "VOLUME_SUFFIXES",
    "Grid",
    "InputError",
    "SliceSource",
    "Volume",
    "array_source",
    "atomic_path",
    "check_readable",
    "label_files",
    "labels_on_image_grid",
    "nifti_affine",
    "one_line",
    "open_volume",
    "read_labels",
    "read_volume",
    "remove_partial_writes",
    "suffix_of",
    "volume_source",
    "write_csv",
    "write_mask",
    "write_mask_stream",
]

_FILE_READERS: dict[str, Callable[[Path], SliceSource]] = {
    **dict.fromkeys(TIFF_SUFFIXES, open_tiff),
    **dict.fromkeys(PICTURE_SUFFIXES, open_picture),
    **dict.fromkeys(NIFTI_SUFFIXES, open_nifti),
    ".npy": open_npy,
    ".zarr": open_zarr,  # a folder, read as one array
}
VOLUME_SUFFIXES = TIFF_SUFFIXES + PICTURE_SUFFIXES + NIFTI_SUFFIXES + ARRAY_SUFFIXES
"""The suffixes of image files :func:`open_volume` reads (besides folders)."""


def open_volume(path: str | Path) -> SliceSource:
    """Open an image or label file without reading its pixels.

    Parameters
    ----------
    path
        A file in one of the :data:`VOLUME_SUFFIXES` formats, or a folder (a DICOM series, or
        PNG/JPEG/TIFF slices in natural name order).

    Returns
    -------
    SliceSource
        ``(S, H, W)`` slices read a run at a time (use it in a ``with`` block to close the
        file). Pictures and TIFFs that hold no stack of pages are read whole now.

    Raises
    ------
    InputError
        For a missing or unreadable path, an unsupported format, or a file that is damaged or
        unsuitable (colour, 4D, empty): one line that names the file and the fix.
    """
    path = Path(path)
    check_readable(path)
    reader = _reader_for(path)
    with reading(str(path)):
        return reader(path)


def read_volume(path: str | Path) -> Volume:
    """Every slice of :func:`open_volume`'s source, in memory, as an ``(S, H, W)``
    :class:`Volume` with the file's spacing and affine."""
    with open_volume(path) as source:
        return source.volume()


LAYER_JOIN = "+"
"""Joins label files painted into one label image: ``cord.nii.gz+gm.nii.gz``."""


def label_files(path: str | Path) -> list[str]:
    """The files a label path names: itself, or the files it joins with ``+`` when it is no
    file itself (``cord.nii.gz+gm.nii.gz``, see :func:`read_labels`)."""
    text = str(path)
    if Path(text).exists() or LAYER_JOIN not in text:
        return [text]
    return text.split(LAYER_JOIN)


def read_labels(path: str | Path) -> Volume:
    """A label file, or several joined by ``+`` (``cord.nii.gz+gm.nii.gz``, each an existing
    file) painted into one in order: file ``k``'s non-zero voxels take the value ``k``, later
    files over earlier ones (:func:`~.preprocess.paint_label_layers`), on the first file's
    grid. A path that exists as written is always one file."""
    parts = label_files(path)
    if len(parts) == 1:
        return read_volume(parts[0])
    missing = [part for part in parts if not Path(part).exists()]
    if missing:
        raise InputError(
            f"{path}: no such file, and read as label files joined by '{LAYER_JOIN}' "
            f"{', '.join(missing)} do not exist; give existing label files"
        )
    layers = [read_volume(part) for part in parts]
    painted = paint_label_layers([layer.array for layer in layers], parts)
    first = layers[0]
    return Volume(painted, first.spacing, first.affine, str(path))


def _reader_for(path: Path) -> Callable[[Path], SliceSource]:
    suffix = suffix_of(path)
    if path.is_dir() and suffix != ".zarr":
        return _open_folder
    reader = _FILE_READERS.get(suffix)
    if reader is None:
        raise InputError(
            f"{path}: unsupported file type {suffix!r}; use TIFF, PNG, JPEG, NIfTI (.nii, "
            f".nii.gz), NumPy (.npy), zarr (.zarr) or a folder of DICOM files or of slices"
        )
    return reader


def _open_folder(path: Path) -> SliceSource:
    slices, others = folder_files(path)
    if others:  # DICOM files win over stray pictures (thumbnails) in a scan's folder
        try:
            return open_dicom_series(path, others)
        except InputError:
            if not slices:
                raise
    return open_slice_folder(path, slices, open_volume)


def labels_on_image_grid(labels: Volume, image: Grid) -> np.ndarray:
    """``labels.array`` in ``image``'s voxel order.

    Where both files carry an affine (NIfTI, DICOM) and their axes differ in order or direction,
    the labels are flipped and transposed onto the image's axes; then their grids must agree.
    """
    if labels.affine is None or image.affine is None:
        return labels.array
    from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

    transform = ornt_transform(io_orientation(labels.affine), io_orientation(image.affine))
    voxels = np.moveaxis(labels.array, 0, 2)  # (i, j, slices): NIfTI voxel order
    aligned = np.moveaxis(apply_orientation(voxels, transform), 2, 0)
    if aligned.shape == image.shape and not np.allclose(
        _reoriented_affine(labels, transform), image.affine, atol=1e-2
    ):
        raise InputError(
            f"{labels.source} does not lie on the grid of {image.source} (their affines differ); "
            f"resample the labels onto the image first"
        )
    return np.asarray(aligned)


def _reoriented_affine(volume: Volume, transform: np.ndarray) -> np.ndarray:
    from nibabel.orientations import inv_ornt_aff

    assert volume.affine is not None
    shape = np.moveaxis(volume.array, 0, 2).shape
    return np.asarray(volume.affine @ inv_ornt_aff(transform, shape))
