"""napari reader and writer contributions over the core's readers and writers.

Images open as Image layers with the voxel spacing as ``scale`` and the affine's origin as
``translate``; files that hold a label mask (integer values, few of them) open as Labels. The
core's :class:`~napari_unetquant.data.io.Volume` travels in ``layer.metadata`` so segmentation
and writing keep the original grid.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..data.io import (
    MASK_SUFFIXES,
    NIFTI_SUFFIXES,
    PICTURE_SUFFIXES,
    TIFF_SUFFIXES,
    Volume,
    read_volume,
    suffix_of,
    write_mask,
)

LayerData = tuple[Any, dict[str, Any], str]
VOLUME_KEY = "unetquant_volume"
MAX_LABEL_VALUES = 16


def _readable(path: Path) -> bool:
    if path.is_dir():
        return any(f.is_file() for f in path.iterdir())
    return suffix_of(path) in TIFF_SUFFIXES + PICTURE_SUFFIXES + NIFTI_SUFFIXES


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """napari's reader hook: a reader for TIFF, PNG/JPEG, NIfTI files and DICOM/slice folders."""
    paths = [path] if isinstance(path, str) else path
    if not paths or not all(_readable(Path(p)) for p in paths):
        return None
    return read_layers


def is_label_mask(array: np.ndarray) -> bool:
    """Integer data with at most 16 distinct values (0 among them) is a label mask."""
    if array.dtype.kind not in "iub" and not (
        array.dtype.kind == "f" and np.array_equal(array, np.round(array))
    ):
        return False
    values = np.unique(array[:: max(1, array.size // 1_000_000)])
    return len(values) <= MAX_LABEL_VALUES and 0 in values


def layer_geometry(volume: Volume) -> dict[str, Any]:
    """``scale`` and ``translate`` for a ``(S, H, W)`` layer from the volume's affine."""
    if volume.affine is None:
        if volume.spacing is None:
            return {}
        return {"scale": (1.0, *volume.spacing)}
    zooms = np.sqrt((volume.affine[:3, :3] ** 2).sum(axis=0))  # voxel sizes along i, j, k
    origin = volume.affine[:3, 3]
    return {
        "scale": (float(zooms[2]), float(zooms[0]), float(zooms[1])),
        "translate": (float(origin[2]), float(origin[0]), float(origin[1])),
    }


def read_layers(path: str | list[str]) -> list[LayerData]:
    """Every path as one Image or Labels layer."""
    layers = []
    for one in [path] if isinstance(path, str) else path:
        volume = read_volume(one)
        array = volume.array if volume.array.shape[0] > 1 else volume.array[0]
        geometry = layer_geometry(volume)
        if array.ndim == 2:
            geometry = {key: value[1:] for key, value in geometry.items()}
        meta = {"name": Path(one).name.split(".")[0], **geometry, "metadata": {VOLUME_KEY: volume}}
        if is_label_mask(volume.array):
            layers.append((array.astype(np.int32), meta, "labels"))
        else:
            layers.append((array, meta, "image"))
    return layers


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """napari's single-layer writer: a Labels layer to NIfTI (with the source's affine when the
    layer came from a NIfTI/DICOM file) or TIFF."""
    if suffix_of(Path(path)) not in MASK_SUFFIXES:
        return []
    array = np.asarray(data)
    stack = array[None] if array.ndim == 2 else array
    source = meta.get("metadata", {}).get(VOLUME_KEY)
    like = source if isinstance(source, Volume) and source.array.shape == stack.shape else None
    dtype = np.uint8 if stack.max(initial=0) < 256 and stack.min(initial=0) >= 0 else np.int32
    write_mask(path, stack.astype(dtype), like=like)
    return [path]
