"""The U-Net and its building blocks."""

from .unet import (
    BATCH_NORMS,
    BatchNorm2d,
    BatchNorm3d,
    ConvBlock,
    FoldedBatchNorm,
    FoldedInferenceBatchNorm,
    UNet,
    affine_channels,
    build_unet,
    fold_batch_norm,
)

__all__ = [
    "BATCH_NORMS",
    "BatchNorm2d",
    "BatchNorm3d",
    "ConvBlock",
    "FoldedBatchNorm",
    "FoldedInferenceBatchNorm",
    "UNet",
    "affine_channels",
    "build_unet",
    "fold_batch_norm",
]
