"""Multi-page TIFF as a streamed volume, through tifffile.

A stack of pages is read a run of pages at a time; a stack written page by page (one series per
page) likewise; an ImageJ stack in one IFD (as ImageJ writes stacks over 4 GiB) is memory-mapped.
Anything else (one page holding a whole stack, a single picture, grey RGB samples) is read
whole. Colour images are refused: the network reads one grey channel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .volume import InputError, SliceSource, array_source, as_slices, grey_channels


def open_tiff(path: Path) -> SliceSource:
    """A TIFF file's first series (or its one-page series, in order) as ``(S, H, W)``."""
    tiff = _tiff_file(path)
    try:
        paged = _paged_source(tiff, path)
    except BaseException:
        tiff.close()
        raise
    if paged is not None:
        return paged
    with tiff:
        series = tiff.series[0]
        shape = tuple(series.shape)
        if len(shape) != 3 or 0 in shape or series.axes.endswith("S") or series.dataoffset is None:
            return array_source(_whole(series, path), source=str(path))
    # uncompressed and contiguous in one IFD, as ImageJ writes stacks over 4 GiB: map it
    import tifffile

    return array_source(tifffile.memmap(path, series=0, mode="r"), source=str(path))


def _tiff_file(path: Path) -> Any:
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


def _paged_source(tiff: Any, path: Path) -> SliceSource | None:
    """A source reading pages on demand when page ``i`` is slice ``i``, else ``None``."""
    if _slices_as_series(tiff):  # one single-page series per slice
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
    if series.axes.endswith("S") or len(shape) != 3 or 0 in shape or len(pages) != shape[0]:
        return None
    if getattr(pages[0], "shape", ()) != shape[1:]:
        return None
    return SliceSource(
        (shape[0], shape[1], shape[2]),
        np.dtype(series.dtype),
        lambda start, stop: tiff.asarray(key=range(start, stop), series=0),
        source=str(path),
        close=tiff.close,
    )


def _slices_as_series(tiff: Any) -> bool:
    """Whether a TIFF holds its slices as several one-page series of one size (what writing a
    stack page by page without ImageJ or OME metadata gives): tifffile's first series would
    then be the first slice only."""
    series = tiff.series
    first = series[0]
    return len(series) > 1 and all(
        s.axes == "YX" and s.shape == first.shape and s.dtype == first.dtype and len(s.pages) == 1
        for s in series
    )


def _whole(series: Any, path: Path) -> np.ndarray:
    """A series read into memory as ``(S, H, W)``: ``(H, W, C)`` samples become one grey
    channel (refused unless the colours are equal); 4D and empty data are refused."""
    array = np.asarray(series.asarray())
    if series.axes.endswith("S"):  # samples per pixel: RGB(A), not slices
        array = grey_channels(array, path)
    return as_slices(array, path)
