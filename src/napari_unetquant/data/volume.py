"""What every reader and writer shares: the volume types, the suffixes, the error messages.

A reader turns a file into a :class:`SliceSource`: an ``(S, H, W)`` stack of 2D slices read a
run at a time, with the in-plane spacing (mm) and the NIfTI affine when the file carries them.
:class:`Volume` is the same stack held in memory. This module imports no other data module: the
format readers, the writers and the entry (:mod:`napari_unetquant.data.io`) sit above it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

TIFF_SUFFIXES = (".tif", ".tiff")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ARRAY_SUFFIXES = (".npy", ".zarr")
MASK_SUFFIXES = TIFF_SUFFIXES + NIFTI_SUFFIXES
NO_PIXELS = "give an image with at least one slice of at least one pixel"
TOO_LARGE = "the image does not fit in memory"
TOO_LARGE_FIX = (
    "if the file is not that large it is damaged; otherwise segment it streamed: "
    "segmentation reads a few slices at a time"
)
CHECK_FILE = "check that the file is complete and of that format"

Reader = Callable[[int, int], Any]


class InputError(ValueError):
    """A file that cannot be used as it is; the message names the file and the fix."""


class Grid(Protocol):
    """Where an image's voxels lie: :class:`Volume` and :class:`SliceSource` both have these."""

    @property
    def shape(self) -> tuple[int, int, int]: ...

    @property
    def affine(self) -> np.ndarray | None: ...

    @property
    def source(self) -> str: ...


@dataclass(frozen=True)
class Volume:
    """Slices ``(S, H, W)`` of an image or label file, in memory.

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


@dataclass(frozen=True)
class SliceSource:
    """An ``(S, H, W)`` image read a run of slices at a time.

    ``read(start, stop)`` returns slices ``[start, stop)`` (any array-like of that many slices);
    ``spacing`` and ``affine`` mean what they mean in :class:`Volume`. Use it as a context
    manager to close the file it reads (if any) when done.
    """

    shape: tuple[int, int, int]
    dtype: np.dtype[Any]
    read: Reader = field(repr=False)
    spacing: tuple[float, float] | None = None
    affine: np.ndarray | None = field(default=None, repr=False)
    source: str = ""
    close: Callable[[], None] = field(default=lambda: None, repr=False)

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise InputError(
                f"{self.source}: the image is empty or not (S, H, W): {self.shape}; {NO_PIXELS}"
            )

    def slices(self, start: int, stop: int) -> np.ndarray:
        """Slices ``[start, stop)`` (clipped to the volume) as an ``(n, H, W)`` array."""
        start, stop = max(0, start), min(self.shape[0], stop)
        if start >= stop:
            raise IndexError(
                f"{self.source}: no slices in [{start}, {stop}); it has {self.shape[0]} slices"
            )
        with reading(self.source or "the image", f"slices {start}-{stop - 1}: "):
            run = np.asarray(self.read(start, stop))
            return run.reshape(stop - start, *self.shape[1:])

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """Every slice in order, ``size`` at a time."""
        for start in range(0, self.shape[0], size):
            yield self.slices(start, start + size)

    def volume(self) -> Volume:
        """Every slice read into memory, with this source's spacing, affine and name."""
        array = self.slices(0, self.shape[0])
        if not array.flags.writeable:  # a read-only memory map of the file: copy it in
            array = array.copy()
        return Volume(array, self.spacing, self.affine, self.source)

    def __enter__(self) -> SliceSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SlicedArray(Protocol):
    """What :func:`array_source` needs: NumPy, dask and zarr arrays all qualify."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> Any: ...

    def __getitem__(self, key: Any) -> Any: ...


def array_source(
    array: SlicedArray,
    spacing: tuple[float, float] | None = None,
    affine: np.ndarray | None = None,
    source: str = "",
) -> SliceSource:
    """A source over an ``(S, H, W)`` or ``(H, W)`` array; only the slices asked for are
    computed (dask) or read (zarr, memory maps)."""
    shape = tuple(int(n) for n in array.shape)
    if len(shape) == 2:
        return SliceSource(
            (1, *shape), np.dtype(array.dtype), lambda a, b: array[None], spacing, affine, source
        )
    if len(shape) != 3:
        raise InputError(
            f"{source or 'the image'}: {len(shape)}D data of shape {shape}; give 2D images or "
            f"3D stacks"
        )
    return SliceSource(
        (shape[0], shape[1], shape[2]),
        np.dtype(array.dtype),
        lambda a, b: array[a:b],
        spacing,
        affine,
        source,
    )


def volume_source(volume: Volume) -> SliceSource:
    """A source over a volume held in memory."""
    return array_source(volume.array, volume.spacing, volume.affine, volume.source)


def suffix_of(path: Path) -> str:
    """The lower-case suffix, with ``.nii.gz`` as one suffix."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


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


@contextmanager
def reading(name: str, where: str = "", failed: str = "") -> Iterator[None]:
    """Turn a library's error while reading ``name`` into one :class:`InputError` line that
    names it: the library's own message (after ``where``, e.g. ``"slices 3-5: "``) in
    parentheses, and the fix. ``failed`` says what went wrong (default: ``could not be read
    as`` the file's suffix). An image too large for memory (or a damaged header declaring one)
    says so; an :class:`InputError` passes unchanged."""
    try:
        yield
    except InputError:
        raise
    except MemoryError as error:
        detail = f"{where}{one_line(error)}"
        raise InputError(f"{name}: {TOO_LARGE} ({detail}); {TOO_LARGE_FIX}") from error
    except Exception as error:
        suffix = suffix_of(Path(name))
        failed = failed or (f"could not be read as {suffix}" if suffix else "could not be read")
        detail = f"{where}{one_line(error)}"
        raise InputError(f"{name}: {failed} ({detail}); {CHECK_FILE}") from error


def as_slices(array: np.ndarray, path: Path) -> np.ndarray:
    """``(H, W)`` -> ``(1, H, W)``; ``(S, H, W)`` stays; anything else, or no pixels, is
    refused."""
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise InputError(
            f"{path}: {array.ndim}D data of shape {array.shape}; give 2D images or 3D stacks"
        )
    if array.size == 0:
        raise InputError(f"{path}: the image is empty (shape {array.shape}); {NO_PIXELS}")
    return array


def grey_channels(array: np.ndarray, path: Path) -> np.ndarray:
    """``(..., C)`` colour samples as one grey channel ``(...)``: the colours must be equal
    (a grey picture saved as RGB); an alpha channel is dropped."""
    colour = array[..., : 3 if array.shape[-1] >= 3 else 1]
    if any(not np.array_equal(colour[..., 0], colour[..., c]) for c in range(1, colour.shape[-1])):
        raise InputError(
            f"{path}: colour (RGB) image of shape {array.shape}; the network reads one "
            f"grey channel, so convert it to greyscale first"
        )
    return colour[..., 0]
