"""Integer weight codes: what a quantized convolution really stores, and the way back.

Every weight quantizer produces values ``codes * scale`` with integer ``codes`` and one scale
per output channel (fixed point: ``2**-f`` for the whole layer). :func:`weight_codes` reads
them out of a quantization-aware layer, :func:`dequantize` rebuilds the float weights, and the
two agree bit for bit with the quantizer's own forward pass (tests check every method).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import QuantizerConfig
from . import functional as qf
from .quantizers import (
    BinaryQuantizer,
    FixedPointQuantizer,
    LSQQuantizer,
    Quantizer,
    TernaryQuantizer,
)


@dataclass(frozen=True)
class WeightCodes:
    """Weights ``(C_out, C_in, kH, kW)`` as ``codes * scale[c]``.

    ``codes`` are ``int32``; ``scale`` is ``(C_out,)`` float32; ``frac_bits`` is the fixed-point
    shift (``scale == 2**-frac_bits`` everywhere) or ``None`` for learned or statistic scales.
    ``offset`` is subtracted before packing so that unsigned codes fit ``bits`` signed bits.
    """

    codes: Tensor
    scale: Tensor
    bits: int
    frac_bits: int | None = None
    offset: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)


@torch.no_grad()
def weight_codes(quantizer: Quantizer, weight: Tensor) -> WeightCodes:
    """The integer codes and per-channel scales that ``quantizer`` maps ``weight`` to (for a
    :class:`FrozenWeight`, the codes it was loaded from).

    Raises ``ValueError`` for a full-precision quantizer (nothing to pack).
    """
    if isinstance(quantizer, FrozenWeight):
        return quantizer.codes
    weight = weight.detach().float()
    channels = weight.shape[0]
    per_channel = (-1,) + (1,) * (weight.dim() - 1)
    config = quantizer.config
    if isinstance(quantizer, FixedPointQuantizer):
        quantizer(weight)  # dynamic formats choose their shift here
        frac = int(quantizer.frac_bits)
        top = float(2**quantizer.magnitude_bits - 1)
        bottom = -top if config.signed else 0.0
        codes = (weight * 2.0**frac).clamp_(bottom, top).round_()
        scale = torch.full((channels,), 2.0**-frac)
        return _codes(codes, scale, config, frac)
    if isinstance(quantizer, LSQQuantizer):
        step = quantizer.effective_step().float()
        step = step.expand(channels) if step.numel() == 1 else step
        codes = (weight / step.reshape(per_channel)).clamp_(
            -quantizer.q_negative, quantizer.q_positive
        )
        return _codes(codes.round_(), step.clone(), config, None)
    if isinstance(quantizer, TernaryQuantizer):
        dims = tuple(range(1, weight.dim()))
        threshold, scale = qf.twn_threshold_and_scale(weight, dims)
        codes = torch.sign(weight).mul_(weight.abs() > threshold)
        return _codes(codes, scale.reshape(-1), config, None)
    if isinstance(quantizer, BinaryQuantizer):
        dims = tuple(range(1, weight.dim()))
        scale = weight.abs().mean(dim=dims).clamp_min(1e-8)
        codes = (weight >= 0).to(weight.dtype).mul_(2).sub_(1)
        return _codes(codes, scale, config, None)
    raise ValueError(
        f"a {config.label} weight quantizer stores float weights; there are no codes to pack"
    )


def _codes(codes: Tensor, scale: Tensor, config: QuantizerConfig, frac: int | None) -> WeightCodes:
    offset = 2 ** (config.bits - 1) if not config.signed else 0
    return WeightCodes(codes.to(torch.int32), scale.float(), config.bits, frac, offset)


def dequantize(codes: WeightCodes) -> Tensor:
    """The float weights ``codes * scale`` (bit-identical to the quantizer's output)."""
    view = (-1,) + (1,) * (codes.codes.dim() - 1)
    return codes.codes.to(torch.float32).mul_(codes.scale.reshape(view))


class FrozenWeight(Quantizer):
    """The weight quantizer of a layer loaded from a packed file: its weights already lie on
    the grid (dequantized once at load), so the forward pass is the identity. It keeps the
    original configuration for reports and the codes for re-export."""

    def __init__(self, config: QuantizerConfig, codes: WeightCodes, scale_count: int) -> None:
        super().__init__(config, "weight")
        self.codes = codes
        self._scale_count = scale_count

    @property
    def scale_count(self) -> int:
        return self._scale_count

    def forward(self, x: Tensor) -> Tensor:
        return x
