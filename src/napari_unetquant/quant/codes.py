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
from .quantizers import IntegerCodes, Quantizer, output_channel_view


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
    """The integer codes and per-channel scales that ``quantizer`` maps ``weight``
    ``(C_out, ...)`` to (for a :class:`FrozenWeight`, the codes it was loaded from), as each
    quantizer's :meth:`~.quantizers.Quantizer.integer_codes` gives them.

    Raises ``ValueError`` for a full-precision quantizer (nothing to pack).
    """
    codes, step, frac = quantizer.integer_codes(weight.detach().float())
    config = quantizer.config
    return WeightCodes(codes.to(torch.int32), step.float(), config.bits, frac, code_offset(config))


def code_offset(config: QuantizerConfig) -> int:
    """What :class:`WeightCodes` subtracts before packing: ``2**(bits - 1)`` for unsigned
    codes (so ``0 .. 2**bits - 1`` fits ``bits`` signed bits), 0 for signed ones."""
    return 0 if config.signed else 2 ** (config.bits - 1)


def dequantize(codes: WeightCodes) -> Tensor:
    """The float weights ``codes * scale`` (bit-identical to the quantizer's output)."""
    view = output_channel_view(codes.codes)
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

    def integer_codes(self, weight: Tensor) -> IntegerCodes:
        """The codes this layer was loaded from (``weight`` is their dequantized values)."""
        return IntegerCodes(self.codes.codes, self.codes.scale, self.codes.frac_bits)
