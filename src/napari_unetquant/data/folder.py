"""A folder of PNG/JPEG/TIFF slices as one volume, in natural name order (2 before 10).

Each file is opened by the reader the entry chooses for it (:func:`napari_unetquant.data.io.
open_volume`, passed in as ``open_file``), so a damaged slice is named in the error. When each
file holds one slice, files are read as their slices are asked for; files holding stacks are
read now and joined.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .volume import (
    PICTURE_SUFFIXES,
    TIFF_SUFFIXES,
    InputError,
    SliceSource,
    array_source,
    suffix_of,
)

FileOpener = Callable[[Path], SliceSource]


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


def _natural_key(path: Path) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def open_slice_folder(path: Path, files: list[Path], open_file: FileOpener) -> SliceSource:
    """``files`` (in order, at least one) as the ``(S, H, W)`` slices of the volume ``path``.

    Every file's slices must have the first file's size; when the first file holds one slice,
    so must every file.
    """
    with open_file(files[0]) as first:
        shape, dtype = first.shape, first.dtype
    if shape[0] != 1:  # stacks in files: join them now
        stacks = [_slices_of(file, open_file, files[0], shape) for file in files]
        return array_source(np.concatenate(stacks), source=str(path))

    def read(start: int, stop: int) -> np.ndarray:
        return np.concatenate(
            [_slices_of(f, open_file, files[0], shape) for f in files[start:stop]]
        )

    return SliceSource((len(files), shape[1], shape[2]), dtype, read, source=str(path))


def _slices_of(
    file: Path, open_file: FileOpener, first: Path, shape: tuple[int, int, int]
) -> np.ndarray:
    """``file``'s slices ``(n, H, W)``, refused unless they have the size of ``first``'s
    (``shape``), and unless ``file`` holds one slice when ``first`` does."""
    with open_file(file) as source:
        if source.shape[1:] != shape[1:]:
            raise InputError(
                f"{file}: slices have different sizes: {source.shape[1]} x {source.shape[2]} "
                f"here, {shape[1]} x {shape[2]} in {first.name}; a folder must hold slices of "
                f"one size"
            )
        if shape[0] == 1 and source.shape[0] != 1:
            raise InputError(
                f"{file}: holds {source.shape[0]} slices but {first.name} holds one; a folder "
                f"holds one slice per file, or a stack in every file"
            )
        return source.slices(0, source.shape[0])
