"""Writing masks: TIFF or NIfTI, slice runs written as they arrive, always atomically.

Every writer goes through :func:`atomic_path`: a temporary file beside the target that replaces
it only once complete, so an error or a crash part-way never leaves a half-written output and an
older file stays as it was.
"""

from __future__ import annotations

import csv
import glob
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .volume import MASK_SUFFIXES, TIFF_SUFFIXES, suffix_of


class Geometry(Protocol):
    """Where a mask is to lie: a volume's spacing and affine (either may be unknown)."""

    @property
    def spacing(self) -> tuple[float, float] | None: ...

    @property
    def affine(self) -> np.ndarray | None: ...


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


def write_safetensors(path: Path, tensors: Mapping[str, Any], metadata: dict[str, str]) -> None:
    """``tensors`` (``{name: torch.Tensor}``) and ``metadata`` as a safetensors file, atomically.

    The bytes are made in memory and written through :func:`atomic_path`: safetensors' own
    ``save_file`` writes a ``.tmpXXXXXX`` file beside its target first, which a process killed
    at that moment leaves behind where :func:`remove_partial_writes` does not look."""
    from safetensors.torch import save

    data = save(dict(tensors), metadata=metadata)
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        handle.write(data)


def write_csv(
    path: str | Path, rows: Sequence[Mapping[str, Any]], fields: Sequence[str] | None = None
) -> None:
    """Rows of a table as CSV, atomically; ``fields`` (default: the first row's keys) in order."""
    columns = list(fields) if fields is not None else list(rows[0]) if rows else []
    with atomic_path(Path(path)) as temporary, temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def remove_partial_writes(path: Path) -> list[Path]:
    """Delete the temporary files :func:`atomic_path` left beside ``path`` when a process was
    killed while writing it (only for files one process writes at a time); returns them."""
    left = sorted(path.parent.glob(f".{glob.escape(path.name)}.*.part{suffix_of(path)}"))
    for temporary in left:
        temporary.unlink(missing_ok=True)
    return left


def write_mask(path: str | Path, mask: np.ndarray, like: Geometry | None = None) -> None:
    """Write ``(S, H, W)`` ``mask`` as TIFF or NIfTI (by ``path``'s extension), atomically.

    NIfTI files get ``like``'s affine (or one from its spacing), so they overlay the source.
    """
    if mask.ndim != 3:
        raise ValueError(f"a mask is (S, H, W) slices, got shape {mask.shape}")
    shape = (mask.shape[0], mask.shape[1], mask.shape[2])
    write_mask_stream(path, [mask], shape, mask.dtype, like)


def nifti_affine(like: Geometry | None) -> np.ndarray:
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
    like: Geometry | None = None,
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
