"""Data: generated phantoms, normalisation and training crops (file readers come with the CLI)."""

from .crops import random_crop_batch, zscore
from .phantom import em_phantom, em_phantom_stack

__all__ = ["em_phantom", "em_phantom_stack", "random_crop_batch", "zscore"]
