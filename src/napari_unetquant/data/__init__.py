"""Data: file readers and writers, preprocessing, augmentation and generated phantoms.

Files are read through one entry, :func:`open_volume` (streamed ``(S, H, W)`` slices) or
:func:`read_volume` (the same in memory); one module per format sits below it (``tiff``,
``pictures``, ``nifti``, ``dicom``, ``arrays``, ``folder``), and the shared types below those
(``volume``). Masks are written by ``write``.
"""

from .augment import AugmentConfig, sample_crop
from .io import VOLUME_SUFFIXES, open_volume, read_volume
from .phantom import em_phantom, em_phantom_stack
from .preprocess import foreground_mask, network_input, network_mask, normalize, zscore
from .volume import InputError, SliceSource, Volume, array_source, volume_source
from .write import write_mask, write_mask_stream

__all__ = [
    "VOLUME_SUFFIXES",
    "AugmentConfig",
    "InputError",
    "SliceSource",
    "Volume",
    "array_source",
    "em_phantom",
    "em_phantom_stack",
    "foreground_mask",
    "network_input",
    "network_mask",
    "normalize",
    "open_volume",
    "read_volume",
    "sample_crop",
    "volume_source",
    "write_mask",
    "write_mask_stream",
    "zscore",
]
