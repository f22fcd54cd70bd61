"""Arrays saved as such: NumPy ``.npy`` files (memory-mapped) and zarr arrays (``.zarr``, read
a chunk at a time; needs the ``zarr`` package)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .volume import InputError, SliceSource, array_source


def open_npy(path: Path) -> SliceSource:
    """An ``(S, H, W)`` or ``(H, W)`` ``.npy`` array, mapped: only the slices asked for are
    read."""
    return array_source(np.load(path, mmap_mode="r"), source=str(path))


def open_zarr(path: Path) -> SliceSource:
    """An ``(S, H, W)`` or ``(H, W)`` zarr array; only the chunks of the slices asked for are
    read."""
    try:
        import zarr
    except ImportError as error:
        raise InputError(
            f"{path}: reading zarr needs the zarr package: pip install zarr"
        ) from error
    return array_source(zarr.open_array(str(path), mode="r"), source=str(path))
