"""napari reader and writer contributions over the core's readers and writers.

Images open as Image layers with the voxel size as ``scale``; files that hold a label mask
(integer values, few of them) open as Labels. The core's :class:`~napari_unetquant.data.io.
Volume` travels in ``layer.metadata`` so segmentation and writing keep the original grid.

Files with an affine (NIfTI, DICOM) are *shown* the radiological way: the layer's ``affine``
maps the untouched ``(S, H, W)`` array onto anatomical world axes in mm, so an axial slice has
the patient's anterior at the top and the patient's right on the screen's left, whatever order
the file stores its voxels in (see :data:`View`). Only the display changes: a mask painted or
predicted on that grid is written back with the source file's own affine.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

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

View = Literal["radiological", "neurological", "voxel"]
"""How a volume with an affine is shown. ``radiological`` (the default): the acquired plane as
radiologists read it, axial slices seen from the feet (anterior up, the patient's right on the
screen's left), coronal from the front, sagittal from the patient's left (anterior left);
``neurological``: axial slices seen from the head and coronal from behind (the patient's right
on the right); ``voxel``: the array as stored."""

# The world axes of each view as rows over RAS mm, for slices across R-L, A-P or S-I (the RAS
# axis the file's third voxel axis runs along). napari draws world axis 1 downwards and axis 2
# to the right, and axis 0 is the slider, so the acquired plane stays the displayed one. Every
# one is a rotation of RAS (no mirror): the 3D view shows the patient as they are.
_VIEWS: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {
    "radiological": (
        np.array([[-1, 0, 0], [0, 0, -1], [0, -1, 0]], dtype=np.float64),  # sagittal: L, I, P
        np.array([[0, 1, 0], [0, 0, -1], [-1, 0, 0]], dtype=np.float64),  # coronal: A, I, L
        np.array([[0, 0, -1], [0, -1, 0], [-1, 0, 0]], dtype=np.float64),  # axial: I, P, L
    ),
    "neurological": (
        np.array([[-1, 0, 0], [0, 0, -1], [0, -1, 0]], dtype=np.float64),  # sagittal: L, I, P
        np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]], dtype=np.float64),  # coronal: P, I, R
        np.array([[0, 0, 1], [0, -1, 0], [1, 0, 0]], dtype=np.float64),  # axial: S, P, R
    ),
}
_DICOM_MAGIC_AT = 128  # a DICOM file: 128-byte preamble, then b"DICM" (what pydicom requires)

# The volumes opened as layers, with their layer's grid and display transform: napari's "New
# labels layer" copies a layer's transform but not its metadata, and the writer finds the
# source's affine here. An entry goes when its volume (kept alive by its layers) goes.
_opened: list[tuple[weakref.ref[Volume], tuple[int, ...], list[np.ndarray]]] = []


def _holds_dicom(folder: Path) -> bool:
    """Whether any file in ``folder`` is DICOM (checked by its magic bytes, not its name:
    scanners often write files without an extension)."""
    for file in folder.iterdir():
        try:
            if file.is_file():
                with file.open("rb") as handle:
                    handle.seek(_DICOM_MAGIC_AT)
                    if handle.read(4) == b"DICM":
                        return True
        except OSError:
            continue
    return False


def _readable(path: Path) -> bool:
    """A file in one of our formats, or a folder holding a DICOM series or image slices (any
    other folder is left to other readers, such as napari's own)."""
    if path.is_dir():
        if suffix_of(path) == ".zarr":
            return True
        slices = TIFF_SUFFIXES + PICTURE_SUFFIXES
        try:
            if any(f.is_file() and suffix_of(f) in slices for f in path.iterdir()):
                return True
            return _holds_dicom(path)
        except OSError:  # unreadable: the core's reader says so, naming the folder
            return True
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


def display_axes(
    affine: np.ndarray, view: View = "radiological"
) -> tuple[np.ndarray, np.ndarray] | None:
    """The view's world axes for ``affine``'s slices (rows over RAS), and the signed
    permutation (world axis x voxel axis ``i, j, k``) that shows the voxels along them: each
    voxel axis goes to the world axis it points closest to (a slightly oblique scan is shown
    on its voxel grid, not resampled). None for the ``voxel`` view or a degenerate affine."""
    if view == "voxel":
        return None
    from nibabel.orientations import io_orientation

    orientation = io_orientation(affine)  # per voxel axis: (RAS axis, +1 or -1)
    if not np.all(np.isfinite(orientation)):
        return None
    ras = np.zeros((3, 3))
    for voxel_axis, (ras_axis, sign) in enumerate(orientation):
        ras[int(ras_axis), voxel_axis] = sign
    world = _VIEWS[view][int(orientation[2, 0])]  # by the axis the slices are stacked along
    return world, world @ ras


def layer_geometry(volume: Volume, view: View = "radiological", ndim: int = 3) -> dict[str, Any]:
    """``scale`` (and, for a volume with an affine, the display ``affine``) for the volume's
    ``(S, H, W)`` layer, or its ``(H, W)`` layer when ``ndim`` is 2.

    ``scale`` is the voxel size in mm along the layer's axes. The ``affine`` turns the voxel
    axes into the view's world axes and puts the volume's centre where the file's affine puts
    it, so a volume is shown the same whichever order its file stores the voxels in (for a
    slightly oblique scan, points away from the centre are off by the obliquity). The ``voxel``
    view shows the array as stored (``scale`` and a ``translate`` only).
    """
    if volume.affine is None:
        if volume.spacing is None:
            return {}
        return {"scale": (1.0, *volume.spacing)[-ndim:]}
    zooms = np.sqrt((volume.affine[:3, :3] ** 2).sum(axis=0))  # voxel sizes along i, j, k
    axes = [2, 0, 1][-ndim:]  # the layer's axes as voxel axes: (k, i, j), or (i, j)
    scale = np.array([zooms[a] for a in axes])
    axes_of_view = display_axes(volume.affine, view)
    if axes_of_view is None:
        origin = volume.affine[:3, 3]
        return {
            "scale": tuple(scale.tolist()),
            "translate": tuple(float(origin[a]) for a in axes),
        }
    world, permutation = axes_of_view
    linear = permutation[:, axes]  # world axis x layer axis
    rows = [w for w in range(3) if linear[w].any()]  # a 2D layer spans two world axes
    slices, height, width = volume.shape
    centre = (np.array([height, width, slices], dtype=np.float64) - 1) / 2  # voxel i, j, k
    world_centre = world @ (volume.affine[:3, :3] @ centre + volume.affine[:3, 3])
    affine = np.eye(ndim + 1)
    affine[:ndim, :ndim] = linear[rows]
    affine[:ndim, ndim] = world_centre[rows] - linear[rows] @ (scale * centre[axes])
    return {"scale": tuple(scale.tolist()), "affine": affine}


def _transform(meta: dict[str, Any], ndim: int) -> list[np.ndarray]:
    """A layer's ``scale``, ``translate`` and ``affine`` (napari's defaults where unset)."""
    return [
        np.broadcast_to(np.asarray(value, dtype=np.float64), size)
        for value, size in (
            (meta.get("scale", 1.0), (ndim,)),
            (meta.get("translate", 0.0), (ndim,)),
            (meta.get("affine", np.eye(ndim + 1)), (ndim + 1, ndim + 1)),
        )
    ]


def _remember(volume: Volume, shape: tuple[int, ...], meta: dict[str, Any]) -> None:
    if volume.affine is not None:
        _opened[:] = [entry for entry in _opened if entry[0]() is not None]
        _opened.append((weakref.ref(volume), shape, _transform(meta, len(shape))))


def _opened_on(shape: tuple[int, ...], meta: dict[str, Any]) -> Volume | None:
    """The one opened volume (or several with one affine) on this grid and transform."""
    transform = _transform(meta, len(shape))
    found = []
    for ref, grid, known in _opened:
        volume = ref()
        if (
            volume is not None
            and grid == shape
            and all(
                np.allclose(a, b, rtol=0, atol=1e-9) for a, b in zip(known, transform, strict=True)
            )
        ):
            found.append(volume)
    affines = {v.affine.tobytes() for v in found if v.affine is not None}
    return found[0] if len(affines) == 1 else None


def read_layers(path: str | list[str], view: View = "radiological") -> list[LayerData]:
    """Every path as one Image or Labels layer, shown in ``view`` (see :data:`View`)."""
    layers = []
    for one in [path] if isinstance(path, str) else path:
        volume = read_volume(one)
        array = volume.array if volume.array.shape[0] > 1 else volume.array[0]
        geometry = layer_geometry(volume, view, array.ndim)
        _remember(volume, array.shape, geometry)
        meta = {"name": Path(one).name.split(".")[0], **geometry, "metadata": {VOLUME_KEY: volume}}
        if is_label_mask(volume.array):
            layers.append((array.astype(np.int32), meta, "labels"))
        else:
            layers.append((array, meta, "image"))
    return layers


def _source_volume(array: np.ndarray, meta: dict[str, Any]) -> Volume | None:
    """The opened volume a labels layer lies on: from its metadata (layers this plugin made),
    or by its grid and transform (a new labels layer napari made over an opened image)."""
    source = meta.get("metadata", {}).get(VOLUME_KEY)
    if isinstance(source, Volume):
        return source
    return _opened_on(array.shape, meta)


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """napari's single-layer writer: a Labels layer to NIfTI (with the source's affine when the
    layer lies on a NIfTI/DICOM file's grid) or TIFF."""
    if suffix_of(Path(path)) not in MASK_SUFFIXES:
        return []
    array = np.asarray(data)
    stack = array[None] if array.ndim == 2 else array
    source = _source_volume(array, meta)
    like = source if source is not None and source.array.shape == stack.shape else None
    dtype = np.uint8 if stack.max(initial=0) < 256 and stack.min(initial=0) >= 0 else np.int32
    write_mask(path, stack.astype(dtype), like=like)
    return [path]
