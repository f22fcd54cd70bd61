"""PNG and JPEG pictures through imageio: one grey slice, read whole (pictures are small)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .volume import SliceSource, array_source, as_slices, grey_channels


def open_picture(path: Path) -> SliceSource:
    """A picture as one ``(1, H, W)`` slice: ``(H, W, C)`` pictures must be grey (equal colour
    channels; an alpha channel is dropped)."""
    import imageio.v3 as iio

    array = np.asarray(iio.imread(path))
    grey = grey_channels(array, path) if array.ndim == 3 else array
    return array_source(as_slices(grey, path), source=str(path))
