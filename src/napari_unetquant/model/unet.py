"""The paper's 2D U-Net with stable, readable layer names.

Convolutions are named ``enc1.conv1``, ``enc1.conv2``, ... ``bottleneck.conv1``,
``dec3.conv1``, ... ``dec1.conv2`` and ``head``, so per-layer bit widths, reports and exports
read naturally. ``build_unet`` returns the network with its convolutions quantized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import QuantConfig, UNetConfig
from ..quant.layers import QuantConv2d, prepare


def affine_channels(x: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """``x * alpha[c] + beta[c]`` over the channel axis of ``(N, C, H, W)``, in one pass
    (ATen's inference BatchNorm kernel with unit variance and zero mean)."""
    ones, zeros = torch.ones_like(alpha), torch.zeros_like(alpha)
    return F.batch_norm(x, zeros, ones, alpha, beta, False, 0.0, 0.0)


def fold_batch_norm(bn: nn.BatchNorm2d, *, detach: bool = True) -> tuple[Tensor, Tensor]:
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


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose inference pass is the folded form ``x * alpha + beta``, the
    same arithmetic a packed model file (:class:`FoldedBatchNorm2d`) runs, so both give
    bit-identical outputs. Training is unchanged."""

    def forward(self, input: Tensor) -> Tensor:
        if self.training or self.running_mean is None:
            return super().forward(input)
        alpha, beta = fold_batch_norm(self, detach=False)  # frozen statistics, trainable affine
        return affine_channels(input, alpha, beta)


class FoldedBatchNorm2d(nn.Module):
    """Inference-only BatchNorm stored as two vectors ``alpha`` and ``beta`` (``(C,)``)."""

    alpha: Tensor
    beta: Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("alpha", torch.ones(channels))
        self.register_buffer("beta", torch.zeros(channels))

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d) -> FoldedBatchNorm2d:
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


class ConvBlock(nn.Module):
    """Two 3x3 convolutions, each followed by ReLU then BatchNorm (the paper's order).

    ``(N, C_in, H, W)`` -> ``(N, C_out, H, W)``. Each convolution quantizes its own input, so
    with a quantized network every convolution reads activations on the quantizer's grid.
    """

    def __init__(self, in_channels: int, out_channels: int, config: UNetConfig) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.bn1: nn.Module = BatchNorm2d(out_channels, momentum=config.bn_momentum)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.bn2: nn.Module = BatchNorm2d(out_channels, momentum=config.bn_momentum)
        self.dropout = nn.Dropout2d(config.dropout) if config.dropout > 0 else nn.Identity()

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
        if isinstance(conv1, QuantConv2d) and overwrite_input:
            x = conv1.forward_overwriting_input(x)
        else:
            x = conv1(x)
        x = F.relu(x)
        if isinstance(conv2, QuantConv2d):
            scale = conv2.input_scale() if isinstance(self.bn1, FoldedBatchNorm2d) else 1.0
            x = self.bn1(x, scale) if scale != 1.0 else self.bn1(x)
            x = conv2.forward_overwriting_input(x, scale)
        else:
            x = conv2(self.bn1(x))
        out: Tensor = self.bn2(F.relu(x))
        return out


class UNet(nn.Module):
    """2D U-Net: ``(N, in_channels, H, W)`` float32 -> ``(N, out_classes, H, W)`` logits.

    Any ``H`` and ``W`` work: the input is padded (edge replication) up to a multiple of
    ``2**depth`` and the logits are cropped back to the input size.
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
        self.head = nn.Conv2d(previous, config.out_classes, 3, padding=1)

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
        height, width = x.shape[-2:]
        fast = self.fast_inference and not self.training and not torch.is_grad_enabled()
        x = _pad_to_multiple(x, self.config.size_multiple)
        skips = []
        for level in range(1, self.config.depth + 1):
            x = self._run_block(f"enc{level}", x, fast, fresh=level > 1)  # enc1: the caller's
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self._run_block("bottleneck", x, fast)
        for level in range(self.config.depth, 0, -1):
            skip = skips[level - 1]
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self._run_block(f"dec{level}", torch.cat([x, skip], dim=1), fast)
        logits: Tensor = self.head(x)
        return logits[..., :height, :width]

    def _check_input(self, x: Tensor) -> None:
        check_input(x, self.config)


def check_input(x: Tensor, config: UNetConfig) -> None:
    """Raise ``ValueError`` (saying the fix) unless ``x`` is a batch the U-Net can take."""
    if x.dim() != 4:
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
    if x.shape[-1] < 1 or x.shape[-2] < 1:
        raise ValueError(f"UNet got an empty image of shape {tuple(x.shape)}")


def _pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Pad height and width at the bottom and right (edge replication) to ``multiple``."""
    pad_h = -x.shape[-2] % multiple
    pad_w = -x.shape[-1] % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")


def build_unet(config: UNetConfig, quant: QuantConfig | None = None) -> UNet:
    """A U-Net whose convolutions are :class:`~napari_unetquant.quant.QuantConv2d` layers
    configured by ``quant`` (full precision when ``None``)."""
    model = UNet(config)
    prepare(model, quant or QuantConfig())
    return model
