"""Reading images and labels in the formats users have, and writing masks back.

Every reader returns a :class:`Volume`: a stack of 2D slices ``(S, H, W)`` for the 2D network,
with the in-plane spacing (mm) and the NIfTI affine when the file carries them, so results can be
written back on the original grid. Writers go through a temporary file and a rename, so a crash
never leaves a half-written output.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

TIFF_SUFFIXES = (".tif", ".tiff")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MASK_SUFFIXES = TIFF_SUFFIXES + NIFTI_SUFFIXES
NO_PIXELS = "give an image with at least one slice of at least one pixel"


class InputError(ValueError):
    """A file that cannot be used as it is; the message names the file and the fix."""


@dataclass(frozen=True)
class Volume:
    """Slices ``(S, H, W)`` of an image or label file.

    ``spacing`` is the in-plane pixel size in mm (rows, columns) when the format records it
    (NIfTI, DICOM); ``affine`` is the NIfTI voxel-to-world matrix of the original file, whose
    third axis is the slice axis here (``array[s] == data[:, :, s]``).
    """

    array: np.ndarray
    spacing: tuple[float, float] | None = None
    affine: np.ndarray | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"a Volume holds (S, H, W) slices, got shape {self.array.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        shape = self.array.shape
        return (shape[0], shape[1], shape[2])


class Grid(Protocol):
    """Where an image's voxels lie: :class:`Volume` and a streamed source both have these."""

    @property
    def shape(self) -> tuple[int, int, int]: ...

    @property
    def affine(self) -> np.ndarray | None: ...

    @property
    def source(self) -> str: ...


def suffix_of(path: Path) -> str:
    """The lower-case suffix, with ``.nii.gz`` as one suffix."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def read_volume(path: str | Path) -> Volume:
    """Read an image or label file (TIFF, PNG/JPEG, NIfTI) or a folder (DICOM series, or PNG /
    JPEG / TIFF slices in name order) as a :class:`Volume`."""
    path = Path(path)
    check_readable(path)
    if path.is_dir():
        return _read_folder(path)
    readers: dict[str, Callable[[Path], Volume]] = {
        **dict.fromkeys(TIFF_SUFFIXES, _read_tiff),
        **dict.fromkeys(PICTURE_SUFFIXES, _read_picture),
        **dict.fromkeys(NIFTI_SUFFIXES, _read_nifti),
    }
    reader = readers.get(suffix_of(path))
    if reader is None:
        raise ValueError(
            f"{path}: unsupported file type {suffix_of(path)!r}; use TIFF, PNG, JPEG, NIfTI "
            f"(.nii, .nii.gz) or a folder of DICOM files"
        )
    try:
        return reader(path)
    except InputError:
        raise
    except MemoryError as error:  # a header declaring a huge image (damaged, or really huge)
        raise InputError(f"{path}: {TOO_LARGE} ({one_line(error)}); {TOO_LARGE_FIX}") from error
    except Exception as error:  # a library's own error on a damaged file
        raise InputError(
            f"{path}: could not be read as {suffix_of(path)} ({one_line(error)}); "
            f"check that the file is complete and of that format"
        ) from error


TOO_LARGE = "the image does not fit in memory"
TOO_LARGE_FIX = (
    "if the file is not that large it is damaged; otherwise segment it streamed "
    "('unetquant segment' reads a few slices at a time)"
)


def one_line(error: BaseException) -> str:
    """``Type: message`` of a library's error on one line (some libraries' span several)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def check_readable(path: Path) -> None:
    """Refuse a path that does not exist or that this user may not read, before any reader
    turns that into a vaguer error."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; check the path")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise InputError(
            f"{path}: permission denied; make it readable for this user (chmod +r) or copy it "
            f"somewhere readable"
        )


def _as_slices(array: np.ndarray, path: Path) -> np.ndarray:
    """``(H, W)`` -> ``(1, H, W)``; ``(S, H, W)`` stays; anything else is refused."""
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise InputError(
            f"{path}: {array.ndim}D data of shape {array.shape}; give 2D images or 3D stacks"
        )
    if array.size == 0:
        raise InputError(f"{path}: the image is empty (shape {array.shape}); {NO_PIXELS}")
    return array


def _grey_picture(array: np.ndarray, path: Path) -> np.ndarray:
    """A PNG/JPEG as one grey channel: ``(H, W, C)`` pictures must be grey (equal colour
    channels; an alpha channel is dropped)."""
    return _as_slices(_grey_channels(array, path) if array.ndim == 3 else array, path)


def _grey_channels(array: np.ndarray, path: Path) -> np.ndarray:
    """``(..., C)`` colour samples as one grey channel ``(...)``: the colours must be equal
    (a grey picture saved as RGB); an alpha channel is dropped."""
    colour = array[..., : 3 if array.shape[-1] >= 3 else 1]
    if any(not np.array_equal(colour[..., 0], colour[..., c]) for c in range(1, colour.shape[-1])):
        raise InputError(
            f"{path}: colour (RGB) image of shape {array.shape}; the network reads one "
            f"grey channel, so convert it to greyscale first"
        )
    return colour[..., 0]


def open_tiff(path: Path) -> Any:
    """``tifffile.TiffFile(path)`` after walking its chain of pages to the end, where tifffile
    notices a chain that loops back on itself: without that walk, tifffile 2026.3 parsed the
    series of such a file for ever (found by fuzzing). A chain with no end is refused."""
    import tifffile

    tiff = tifffile.TiffFile(path)
    try:
        tiff.pages[len(tiff.pages)]  # one past the last page must not exist
    except IndexError:
        return tiff
    tiff.close()
    raise InputError(
        f"{path}: its TIFF pages link back to one another in a loop (a damaged file); "
        f"check that the file is complete, or save it again"
    )


def slices_as_series(tiff: Any) -> bool:
    """Whether a TIFF holds its slices as several one-page series of one size (what writing a
    stack page by page without ImageJ or OME metadata gives): tifffile's first series would
    then be the first slice only."""
    series = tiff.series
    first = series[0]
    return len(series) > 1 and all(
        s.axes == "YX" and s.shape == first.shape and s.dtype == first.dtype and len(s.pages) == 1
        for s in series
    )


def _read_tiff(path: Path) -> Volume:
    with open_tiff(path) as tiff:
        if slices_as_series(tiff):
            return Volume(np.stack([s.asarray() for s in tiff.series]), source=str(path))
        series = tiff.series[0]
        array = np.asarray(series.asarray())
        if series.axes.endswith("S"):  # samples per pixel: RGB(A), not slices
            array = _grey_channels(array, path)
    return Volume(_as_slices(array, path), source=str(path))


def _read_picture(path: Path) -> Volume:
    import imageio.v3 as iio

    return Volume(_grey_picture(np.asarray(iio.imread(path)), path), source=str(path))


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    image = nib.load(path)
    if 0 in image.shape:
        raise InputError(f"{path}: the image is empty (shape {image.shape}); {NO_PIXELS}")
    data = np.asanyarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise InputError(
            f"{path}: NIfTI data of shape {data.shape}; give one 3D volume (split 4D series first)"
        )
    zooms = image.header.get_zooms()
    return Volume(
        _as_slices(np.moveaxis(data, 2, 0), path),
        spacing=(float(zooms[0]), float(zooms[1])),
        affine=np.asarray(image.affine, dtype=np.float64),
        source=str(path),
    )


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


def _natural_key(path: Path) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def folder_files(path: Path) -> tuple[list[Path], list[Path]]:
    """A folder's picture/TIFF slices and its other files (a DICOM series), in natural name
    order; an empty folder is refused."""
    files = sorted((f for f in path.iterdir() if f.is_file()), key=_natural_key)
    if not files:
        raise InputError(
            f"{path}: no images found; give a folder of DICOM files or of PNG/JPEG/TIFF slices"
        )
    slices = [f for f in files if suffix_of(f) in PICTURE_SUFFIXES + TIFF_SUFFIXES]
    return slices, [f for f in files if f not in slices]


def _read_folder(path: Path) -> Volume:
    slices, others = folder_files(path)
    if others:  # DICOM files win over stray pictures (thumbnails) in a scan's folder
        from .dicom import read_dicom_series

        try:
            return read_dicom_series(path, others)
        except InputError:
            if not slices:
                raise
    arrays = [read_volume(f).array for f in slices]
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) != 1:
        raise InputError(
            f"{path}: slices have different sizes {sorted(shapes)}; a folder must hold slices "
            f"of one size"
        )
    return Volume(np.concatenate(arrays), source=str(path))


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix) that replaces ``path`` on success only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".part{suffix_of(path)}", dir=path.parent
    )
    os.close(handle)
    try:
        yield Path(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 would make outputs private
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())  # the data is on disk before the name points to it
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def remove_partial_writes(path: Path) -> list[Path]:
    """Delete the temporary files :func:`atomic_path` left beside ``path`` when a process was
    killed while writing it (only for files one process writes at a time); returns them."""
    left = sorted(path.parent.glob(f".{glob.escape(path.name)}.*.part{suffix_of(path)}"))
    for temporary in left:
        temporary.unlink(missing_ok=True)
    return left


def write_mask(path: str | Path, mask: np.ndarray, like: Volume | None = None) -> None:
    """Write ``(S, H, W)`` ``mask`` as TIFF or NIfTI (by ``path``'s extension), atomically.

    NIfTI files get ``like``'s affine (or one from its spacing), so they overlay the source.
    """
    from .stream import write_mask_stream

    if mask.ndim != 3:
        raise ValueError(f"a mask is (S, H, W) slices, got shape {mask.shape}")
    shape = (mask.shape[0], mask.shape[1], mask.shape[2])
    write_mask_stream(path, [mask], shape, mask.dtype, like)
