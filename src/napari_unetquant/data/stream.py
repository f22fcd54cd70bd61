"""Volumes larger than memory: slices read on demand, masks written as they are made.

:func:`open_volume` opens an image without reading its pixels and hands out runs of slices
(TIFF pages, NIfTI slice blocks, files of a slice folder, zarr or ``.npy`` chunks);
:func:`array_source` does the same for arrays already open (NumPy, memory maps, dask and zarr
arrays: whatever a napari layer may hold). :func:`write_mask_stream` writes a mask from an
iterator of slice runs into a temporary file that replaces the target only once complete.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .io import (
    MASK_SUFFIXES,
    NIFTI_SUFFIXES,
    NO_PIXELS,
    TIFF_SUFFIXES,
    TOO_LARGE,
    TOO_LARGE_FIX,
    InputError,
    Volume,
    atomic_path,
    check_readable,
    folder_files,
    one_line,
    open_tiff,
    read_volume,
    slices_as_series,
    suffix_of,
)

Reader = Callable[[int, int], Any]


@dataclass(frozen=True)
class SliceSource:
    """An ``(S, H, W)`` image read a run of slices at a time.

    ``spacing`` and ``affine`` mean what they mean in :class:`~napari_unetquant.data.io.Volume`.
    Use it as a context manager to close the file it reads (if any) when done.
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
        """Slices ``[start, stop)`` as an ``(stop - start, H, W)`` array."""
        start, stop = max(0, start), min(self.shape[0], stop)
        if start >= stop:
            raise IndexError(
                f"{self.source}: no slices in [{start}, {stop}); it has {self.shape[0]} slices"
            )
        try:
            run = np.asarray(self.read(start, stop))
            return run.reshape(stop - start, *self.shape[1:])
        except InputError:
            raise
        except MemoryError as error:  # a header declaring huge slices
            raise InputError(
                f"{self.source}: slices {start}-{stop - 1}: {TOO_LARGE} ({one_line(error)}); "
                f"{TOO_LARGE_FIX}"
            ) from error
        except Exception as error:  # a file that ends early or is damaged part-way
            raise InputError(
                f"{self.source}: slices {start}-{stop - 1} could not be read "
                f"({one_line(error)}); check that the file is complete"
            ) from error

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """Every slice in order, ``size`` at a time."""
        for start in range(0, self.shape[0], size):
            yield self.slices(start, start + size)

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


def open_volume(path: str | Path) -> SliceSource:
    """Open an image without reading its pixels: multi-page TIFF, NIfTI (``.nii`` reads only
    the slices asked for; ``.nii.gz`` decompresses forward as slices are asked for in order), a
    DICOM series or a folder of PNG/JPEG/TIFF slices (files read as their slices are asked
    for), a zarr array (``.zarr``, needs ``zarr``) or ``.npy``. Single pictures are read
    whole."""
    path = Path(path)
    check_readable(path)
    suffix = suffix_of(path)
    try:
        if suffix == ".zarr":
            return _open_zarr(path)
        if path.is_dir():
            return _open_folder(path)
        if suffix in TIFF_SUFFIXES:
            return _open_tiff(path)
        if suffix in NIFTI_SUFFIXES:
            return _open_nifti(path)
        if suffix == ".npy":
            return array_source(np.load(path, mmap_mode="r"), source=str(path))
    except InputError:
        raise
    except Exception as error:  # a library's own error on a damaged file
        raise InputError(
            f"{path}: could not be opened as {suffix or 'a folder'} ({one_line(error)}); "
            f"check that the file is complete and of that format"
        ) from error
    return volume_source(read_volume(path))


def _open_tiff(path: Path) -> SliceSource:
    import tifffile

    tiff = open_tiff(path)
    if slices_as_series(tiff):  # page i is slice i
        first = tiff.series[0]
        return SliceSource(
            (len(tiff.series), *first.shape),
            np.dtype(first.dtype),
            lambda start, stop: tiff.asarray(key=range(start, stop)),
            source=str(path),
            close=tiff.close,
        )
    series = tiff.series[0]
    shape = tuple(series.shape)
    pages = series.pages
    if series.axes.endswith("S") or 0 in shape:  # RGB samples or no pixels: the eager
        tiff.close()  # reader explains both
        return volume_source(read_volume(path))
    paged = (
        len(shape) == 3 and len(pages) == shape[0] and getattr(pages[0], "shape", ()) == shape[1:]
    )
    if not paged:
        tiff.close()
        if len(shape) == 3 and series.dataoffset is not None:
            # uncompressed and contiguous, as ImageJ writes stacks over 4 GiB (one IFD): map it
            memmap = tifffile.memmap(path, series=0, mode="r")
            return array_source(memmap, source=str(path))
        # one page holding a whole stack, or pictures: read as the eager reader does
        return volume_source(read_volume(path))

    def read(start: int, stop: int) -> np.ndarray:
        return np.asarray(tiff.asarray(key=range(start, stop), series=0))

    return SliceSource(
        (shape[0], shape[1], shape[2]),
        np.dtype(series.dtype),
        read,
        source=str(path),
        close=tiff.close,
    )


def _open_nifti(path: Path) -> SliceSource:
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


def _open_folder(path: Path) -> SliceSource:
    slices, others = folder_files(path)
    if others:  # a DICOM series (which wins over stray pictures, as in the eager reader)
        from .dicom import open_dicom_series

        try:
            return open_dicom_series(path, others)
        except InputError:
            if not slices:
                raise
    first = read_volume(slices[0]).array
    if first.shape[0] != 1:
        return volume_source(read_volume(path))

    def read(start: int, stop: int) -> np.ndarray:
        arrays = [read_volume(f).array for f in slices[start:stop]]
        for file, array in zip(slices[start:stop], arrays, strict=True):
            if array.shape != first.shape:
                raise InputError(
                    f"{file}: slice of shape {array.shape[1:]} in a folder of {first.shape[1:]} "
                    f"slices; a folder must hold slices of one size"
                )
        return np.concatenate(arrays)

    return SliceSource((len(slices), *first.shape[1:]), first.dtype, read, source=str(path))


def _open_zarr(path: Path) -> SliceSource:
    try:
        import zarr
    except ImportError as error:
        raise InputError(
            f"{path}: reading zarr needs the zarr package: pip install zarr"
        ) from error
    array = zarr.open_array(str(path), mode="r")
    return array_source(array, source=str(path))


class _Geometry(Protocol):
    @property
    def spacing(self) -> tuple[float, float] | None: ...

    @property
    def affine(self) -> np.ndarray | None: ...


def nifti_affine(like: _Geometry | None) -> np.ndarray:
    """The affine a mask written for ``like`` gets: its own, or one from its spacing."""
    if like is not None and like.affine is not None:
        return like.affine
    affine = np.eye(4)
    if like is not None and like.spacing is not None:
        affine[0, 0], affine[1, 1] = like.spacing
    return affine


def write_mask_stream(
    path: str | Path,
    chunks: Iterable[np.ndarray],
    shape: tuple[int, int, int],
    dtype: Any = np.uint8,
    like: _Geometry | None = None,
) -> None:
    """Write an ``(S, H, W)`` mask arriving as runs of slices (in order) to TIFF (one zlib page
    per slice) or NIfTI (slice blocks appended after the header; ``.nii.gz`` compressed as it
    goes), through a temporary file renamed into place once every slice is written: an error
    or a crash part-way leaves no file behind and an older ``path`` untouched."""
    path = Path(path)
    suffix = suffix_of(path)
    if suffix not in MASK_SUFFIXES:
        raise ValueError(
            f"{path}: cannot write masks as {suffix!r}; use .tif, .tiff, .nii or .nii.gz"
        )
    dtype = np.dtype(dtype)
    slices = _checked_slices(chunks, shape, dtype)
    with atomic_path(path) as temporary:
        if suffix in TIFF_SUFFIXES:
            import tifffile

            tifffile.imwrite(
                temporary,
                slices,
                shape=shape,
                dtype=dtype,
                photometric="minisblack",
                compression="zlib",
                bigtiff=int(np.prod(shape)) * dtype.itemsize > 2**31,
            )
        else:
            _write_nifti(temporary, slices, shape, dtype, nifti_affine(like))
        _exhausted(slices, path)


def _checked_slices(
    chunks: Iterable[np.ndarray], shape: tuple[int, int, int], dtype: np.dtype[Any]
) -> Iterator[np.ndarray]:
    """The chunks' slices one by one, checked against the announced shape."""
    written = 0
    for chunk in chunks:
        run = np.asarray(chunk)
        if run.ndim != 3 or run.shape[1:] != shape[1:] or written + len(run) > shape[0]:
            raise ValueError(
                f"a run of slices of shape {run.shape} does not fit a mask of shape {shape} "
                f"after {written} slices"
            )
        for one in run:
            written += 1
            yield one.astype(dtype, copy=False)
    if written != shape[0]:
        raise ValueError(f"only {written} of {shape[0]} mask slices arrived; nothing was written")


def _exhausted(slices: Iterator[np.ndarray], path: Path) -> None:
    """Raise unless the writer consumed every slice (and so ran the final count check)."""
    for _ in slices:
        raise ValueError(f"{path}: more mask slices arrived than the writer took")


def _write_nifti(
    path: Path,
    slices: Iterator[np.ndarray],
    shape: tuple[int, int, int],
    dtype: np.dtype[Any],
    affine: np.ndarray,
) -> None:
    """NIfTI-1 single file: the header, padding to the data offset, then ``data[:, :, s]`` for
    each slice ``s`` (NIfTI stores voxels column-major, so a slice is one contiguous block)."""
    import nibabel as nib
    from nibabel.openers import Opener

    header = nib.Nifti1Header(endianness="<")
    header.set_data_shape((shape[1], shape[2], shape[0]))
    header.set_data_dtype(dtype)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_data_offset(352)
    with ExitStack() as stack:
        file = stack.enter_context(Opener(str(path), "wb"))
        header.write_to(file)
        file.write(b"\0" * (352 - file.tell()))
        for one in slices:
            file.write(
                np.ascontiguousarray(one.T).astype(dtype.newbyteorder("<"), copy=False).tobytes()
            )
