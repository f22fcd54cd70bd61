"""Data: file readers and writers, preprocessing, augmentation and generated phantoms."""

from .augment import AugmentConfig, sample_crop
from .io import Volume, read_volume, write_mask
from .phantom import em_phantom, em_phantom_stack
from .preprocess import foreground_mask, network_input, network_mask, normalize, zscore

__all__ = [
    "AugmentConfig",
    "Volume",
    "em_phantom",
    "em_phantom_stack",
    "foreground_mask",
    "network_input",
    "network_mask",
    "normalize",
    "read_volume",
    "sample_crop",
    "write_mask",
    "zscore",
]
