"""The paper's 2D U-Net, and its 3D variant, with stable, readable layer names.

Convolutions are named ``enc1.conv1``, ``enc1.conv2``, ... ``bottleneck.conv1``,
``dec3.conv1``, ... ``dec1.conv2`` and ``head``, so per-layer bit widths, reports and exports
read naturally (the same names in 2D and 3D). ``build_unet`` returns the network with its
convolutions quantized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..config import QuantConfig, UNetConfig
from ..quant.global_batch import current_shard, sharded_batch_norm
from ..quant.layers import QuantConvNd, prepare


def affine_channels(x: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """``x * alpha[c] + beta[c]`` over the channel axis of ``(N, C, *spatial)``, in one pass
    (ATen's inference BatchNorm kernel with unit variance and zero mean)."""
    ones, zeros = torch.ones_like(alpha), torch.zeros_like(alpha)
    return F.batch_norm(x, zeros, ones, alpha, beta, False, 0.0, 0.0)


def fold_batch_norm(bn: _BatchNorm, *, detach: bool = True) -> tuple[Tensor, Tensor]:
    """Inference BatchNorm as one scale and shift per channel: ``alpha = gamma / sqrt(var +
    eps)``, ``beta = beta_bn - mean * alpha`` (``detach=False`` keeps their gradients)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    alpha = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        alpha = alpha * bn.weight
    beta = -bn.running_mean * alpha
    if bn.bias is not None:
        beta = beta + bn.bias
    if detach:
        return alpha.detach(), beta.detach()
    return alpha, beta


class FoldedInferenceBatchNorm(_BatchNorm):
    """BatchNorm whose inference pass is the folded form ``x * alpha + beta``, the same
    arithmetic a packed model file (:class:`FoldedBatchNorm`) runs, so both give bit-identical
    outputs. Training is unchanged. :class:`BatchNorm2d` and :class:`BatchNorm3d` are it."""

    def forward(self, input: Tensor) -> Tensor:
        if self.training and current_shard() is not None:  # data-parallel: whole-batch stats
            return sharded_batch_norm(self, input)
        if self.training or self.running_mean is None:
            return super().forward(input)
        alpha, beta = fold_batch_norm(self, detach=False)  # frozen statistics, trainable affine
        return affine_channels(input, alpha, beta)


class BatchNorm2d(FoldedInferenceBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with the folded inference pass of :class:`FoldedInferenceBatchNorm`."""


class BatchNorm3d(FoldedInferenceBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with the folded inference pass of :class:`FoldedInferenceBatchNorm`."""


BATCH_NORMS = (nn.BatchNorm2d, nn.BatchNorm3d)
"""The BatchNorm kinds a U-Net holds (packing folds them)."""


class FoldedBatchNorm(nn.Module):
    """Inference-only BatchNorm stored as two vectors ``alpha`` and ``beta`` (``(C,)``), for
    inputs ``(N, C, *spatial)`` (2D and 3D networks alike)."""

    alpha: Tensor
    beta: Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("alpha", torch.ones(channels))
        self.register_buffer("beta", torch.zeros(channels))

    @classmethod
    def from_batch_norm(cls, bn: _BatchNorm) -> FoldedBatchNorm:
        folded = cls(bn.num_features)
        alpha, beta = fold_batch_norm(bn)
        folded.alpha.copy_(alpha)
        folded.beta.copy_(beta)
        return folded.to(alpha.device)

    def forward(self, x: Tensor, scale: float = 1.0) -> Tensor:
        """``x * alpha + beta``, times ``scale`` (a power of two: exact, because scaling by a
        power of two commutes with every floating-point rounding)."""
        if scale != 1.0:
            return affine_channels(x, self.alpha * scale, self.beta * scale)
        return affine_channels(x, self.alpha, self.beta)


def _conv(in_channels: int, out_channels: int, spatial_dims: int) -> nn.Module:
    """A 3x3 (3x3x3) convolution keeping the spatial size."""
    if spatial_dims == 3:
        return nn.Conv3d(in_channels, out_channels, 3, padding=1)
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


def _batch_norm(channels: int, config: UNetConfig) -> nn.Module:
    if config.spatial_dims == 3:
        return BatchNorm3d(channels, momentum=config.bn_momentum)
    return BatchNorm2d(channels, momentum=config.bn_momentum)


def _dropout(config: UNetConfig) -> nn.Module:
    if config.dropout == 0:
        return nn.Identity()
    if config.spatial_dims == 3:
        return nn.Dropout3d(config.dropout)
    return nn.Dropout2d(config.dropout)


class ConvBlock(nn.Module):
    """Two 3x3 (3D: 3x3x3) convolutions, each followed by ReLU then BatchNorm (the paper's
    order).

    ``(N, C_in, H, W)`` -> ``(N, C_out, H, W)`` (3D: ``(N, C, D, H, W)``). Each convolution
    quantizes its own input, so with a quantized network every convolution reads activations
    on the quantizer's grid.
    """

    def __init__(self, in_channels: int, out_channels: int, config: UNetConfig) -> None:
        super().__init__()
        dims = config.spatial_dims
        self.conv1 = _conv(in_channels, out_channels, dims)
        self.bn1: nn.Module = _batch_norm(out_channels, config)
        self.conv2 = _conv(out_channels, out_channels, dims)
        self.bn2: nn.Module = _batch_norm(out_channels, config)
        self.dropout = _dropout(config)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dropout(self.bn1(F.relu(self.conv1(x))))
        out: Tensor = self.dropout(self.bn2(F.relu(self.conv2(x))))
        return out

    @torch.no_grad()
    def fast_forward(self, x: Tensor, overwrite_input: bool) -> Tensor:
        """Inference of a packed block (folded BatchNorm): the outputs of :meth:`forward` in
        evaluation mode, with fewer passes over memory. Intermediate tensors are quantized in
        place, and the first BatchNorm applies the second convolution's power-of-two input
        scale. ``overwrite_input``: ``x`` is a tensor nothing else reads (a pooling or
        concatenation output) and may be quantized in place too."""
        conv1, conv2 = self.conv1, self.conv2
        if isinstance(conv1, QuantConvNd) and overwrite_input:
            x = conv1.forward_overwriting_input(x)
        else:
            x = conv1(x)
        x = F.relu(x)
        if isinstance(conv2, QuantConvNd):
            scale = conv2.input_scale() if isinstance(self.bn1, FoldedBatchNorm) else 1.0
            x = self.bn1(x, scale) if scale != 1.0 else self.bn1(x)
            x = conv2.forward_overwriting_input(x, scale)
        else:
            x = conv2(self.bn1(x))
        out: Tensor = self.bn2(F.relu(x))
        return out


class UNet(nn.Module):
    """2D U-Net: ``(N, in_channels, H, W)`` float32 -> ``(N, out_classes, H, W)`` logits;
    with ``config.spatial_dims == 3``: ``(N, in_channels, D, H, W)`` -> ``(N, out_classes, D,
    H, W)`` (pooling by 2 along every axis, trilinear upsampling).

    Any ``H`` and ``W`` (and ``D``) work: the input is padded (edge replication) up to a
    multiple of ``2**depth`` and the logits are cropped back to the input size.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        widths = config.widths
        previous = config.in_channels
        for level, width in enumerate(widths, start=1):
            self.add_module(f"enc{level}", ConvBlock(previous, width, config))
            previous = width
        self.bottleneck = ConvBlock(previous, previous, config)
        for level in range(config.depth, 0, -1):
            width = widths[level - 1]
            self.add_module(f"dec{level}", ConvBlock(previous + width, width, config))
            previous = width
        self.head = _conv(previous, config.out_classes, config.spatial_dims)

    def _block(self, name: str) -> ConvBlock:
        block = self.get_submodule(name)
        assert isinstance(block, ConvBlock)
        return block

    fast_inference = False
    """Set on packed (deployment) networks: inference (evaluation, no gradients) runs every
    block's :meth:`ConvBlock.fast_forward` (same outputs, fewer passes over memory)."""

    def _run_block(self, name: str, x: Tensor, fast: bool, fresh: bool = True) -> Tensor:
        block = self._block(name)
        return block.fast_forward(x, overwrite_input=fresh) if fast else block(x)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        size = x.shape[2:]
        fast = self.fast_inference and not self.training and not torch.is_grad_enabled()
        volumetric = self.config.spatial_dims == 3
        pool = F.max_pool3d if volumetric else F.max_pool2d
        mode = self.config.upsample
        if mode == "bilinear" and volumetric:
            mode = "trilinear"
        corners = None if mode == "nearest" else False
        x = _pad_to_multiple(x, self.config.size_multiple)
        skips = []
        for level in range(1, self.config.depth + 1):
            x = self._run_block(f"enc{level}", x, fast, fresh=level > 1)  # enc1: the caller's
            skips.append(x)
            x = pool(x, 2)
        x = self._run_block("bottleneck", x, fast)
        for level in range(self.config.depth, 0, -1):
            skip = skips[level - 1]
            x = F.interpolate(x, size=skip.shape[2:], mode=mode, align_corners=corners)
            x = self._run_block(f"dec{level}", torch.cat([x, skip], dim=1), fast)
        logits: Tensor = self.head(x)
        crop = tuple(slice(0, extent) for extent in size)
        return logits[(slice(None), slice(None), *crop)]

    def _check_input(self, x: Tensor) -> None:
        check_input(x, self.config)


def check_input(x: Tensor, config: UNetConfig) -> None:
    """Raise ``ValueError`` (saying the fix) unless ``x`` is a batch the U-Net can take."""
    if config.spatial_dims == 3 and x.dim() != 5:
        raise ValueError(
            f"a 3D UNet expects a batch of volumes shaped (N, C, D, H, W), got shape "
            f"{tuple(x.shape)}; add batch and channel axes, e.g. volume[None, None]"
        )
    if config.spatial_dims == 2 and x.dim() != 4:
        raise ValueError(
            f"UNet expects a batch shaped (N, C, H, W), got shape {tuple(x.shape)}; "
            f"add batch and channel axes, e.g. image[None, None]"
        )
    if x.shape[1] != config.in_channels:
        raise ValueError(
            f"UNet was built for {config.in_channels} input channel(s) but the input "
            f"has {x.shape[1]} (shape {tuple(x.shape)}); convert the image or build the "
            f"model with UNetConfig(in_channels={x.shape[1]})"
        )
    if min(x.shape[2:]) < 1:
        raise ValueError(f"UNet got an empty image of shape {tuple(x.shape)}")


def _pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Pad every spatial axis of ``(N, C, *spatial)`` at its end (edge replication: bottom,
    right, and back in 3D) to a multiple of ``multiple``."""
    pads = [-extent % multiple for extent in x.shape[2:]]
    if not any(pads):
        return x
    return F.pad(x, [side for pad in reversed(pads) for side in (0, pad)], mode="replicate")


def build_unet(config: UNetConfig, quant: QuantConfig | None = None) -> UNet:
    """A U-Net whose convolutions are :class:`~napari_unetquant.quant.QuantConv2d` (3D:
    :class:`~napari_unetquant.quant.QuantConv3d`) layers configured by ``quant`` (full
    precision when ``None``)."""
    model = UNet(config)
    prepare(model, quant or QuantConfig())
    return model
