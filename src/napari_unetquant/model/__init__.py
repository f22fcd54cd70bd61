"""The U-Net and its building blocks."""

from .unet import (
    BatchNorm2d,
    ConvBlock,
    FoldedBatchNorm2d,
    UNet,
    affine_channels,
    build_unet,
    fold_batch_norm,
)

__all__ = [
    "BatchNorm2d",
    "ConvBlock",
    "FoldedBatchNorm2d",
    "UNet",
    "affine_channels",
    "build_unet",
    "fold_batch_norm",
]
