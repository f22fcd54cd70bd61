"""The U-Net and its building blocks."""

from .unet import ConvBlock, UNet, build_unet

__all__ = ["ConvBlock", "UNet", "build_unet"]
