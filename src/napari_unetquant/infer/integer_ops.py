"""Integer arithmetic on activation codes: formats, requantization, upsampling and pooling.

The pieces :class:`~napari_unetquant.infer.integer.IntegerUNet` is made of, free of any model:
an :class:`ActFormat` says what the codes of a tensor mean, a :class:`Requant` turns ``int32``
accumulators into the next layer's codes with one multiplier, one offset and a rounding shift
per channel, and :func:`upsample_codes` and :func:`max_pool` move codes between levels of the
U-Net. Every rounding is half to even, as ``torch.round`` does in the quantization-aware model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SettingError
from ..quant.functional import fixed_point_code_range
from ..quant.quantizers import FixedPointQuantizer, LSQQuantizer, Quantizer

MULTIPLIER_BITS = 31
UPSAMPLE_EXTRA_BITS = 16


@dataclass(frozen=True)
class ActFormat:
    """Input codes of a quantized convolution: ``value = code * step``, ``lo <= code <= hi``.

    ``frac_bits`` is set for fixed-point formats (``step == 2**-frac_bits``)."""

    step: float
    lo: int
    hi: int
    frac_bits: int | None
    step_tensor: Tensor

    @classmethod
    def of(cls, quantizer: Quantizer, where: str) -> ActFormat | None:
        """The format of an activation quantizer; ``None`` for full precision.

        Raises :class:`~napari_unetquant.errors.SettingError` for an activation method integer
        inference does not run, or a dynamic format that was never chosen (an untrained model).
        """
        config = quantizer.config
        if config.is_float:
            return None
        if isinstance(quantizer, FixedPointQuantizer):
            return cls._fixed_point(quantizer, where)
        if isinstance(quantizer, LSQQuantizer):
            step = quantizer.effective_step().reshape(()).float().cpu()
            return cls(float(step), -quantizer.q_negative, quantizer.q_positive, None, step)
        raise SettingError(
            f"{where}: integer inference supports fixed-point and learned-step activations, not "
            f"{config.label}; run this model without integer inference (the float simulation)",
            "integer",
        )

    @classmethod
    def _fixed_point(cls, quantizer: FixedPointQuantizer, where: str) -> ActFormat:
        if not quantizer.frozen:
            raise SettingError(
                f"{where}: the activation format was never chosen (an untrained model); train "
                f"the model, or run it once in training mode, before integer inference",
                "integer",
            )
        frac = int(quantizer.frac_bits)
        lo, hi = fixed_point_code_range(quantizer.magnitude_bits, signed=quantizer.config.signed)
        return cls(2.0**-frac, lo, hi, frac, torch.tensor(2.0**-frac))

    def codes(self, y: Tensor, scaled: Tensor | None = None) -> Tensor:
        """Codes ``(N, H, W, C)`` of float values ``(N, C, H, W)``, computed exactly as the
        quantizer does, in this format's integer dtype (``scaled``: scratch ``(N, H, W, C)``
        of ``y``'s dtype)."""
        n, c, h, w = y.shape
        if scaled is None:
            scaled = torch.empty(n, h, w, c, dtype=y.dtype)
        if self.frac_bits is not None:
            torch.mul(y, 2.0**self.frac_bits, out=scaled.permute(0, 3, 1, 2))
        else:
            torch.div(y, self.step_tensor, out=scaled.permute(0, 3, 1, 2))
        return scaled.clamp_(self.lo, self.hi).round_().to(self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        """``torch.int8`` when every code fits 8 bits, else ``torch.int32``."""
        fits = self.lo >= -128 and self.hi <= 127
        return torch.int8 if fits else torch.int32


def round_shift(values: Tensor, shift: int) -> Tensor:
    """``round(values / 2**shift)`` with ties to even, in place on an integer tensor."""
    if shift <= 0:
        return values.mul_(1 << -shift)
    odd = (values >> shift) & 1
    return values.add_(odd).add_((1 << (shift - 1)) - 1).bitwise_right_shift_(shift)


@dataclass(frozen=True)
class Requant:
    """``int32`` accumulators ``(pixels, C)`` -> codes of the next format, per channel ``c``:

    ``code = clamp(round((M[c] * acc + K[c]) / 2**shift), low[c], high[c])``

    with ``M = alpha * S / step`` and ``K = (alpha * bias + beta) / step``, both scaled by
    ``2**shift`` and rounded to integers (``S`` the accumulator's step, ``alpha, beta`` the
    folded BatchNorm, ``step`` the next format's), rounding half to even. ReLU is folded into
    ``low``/``high``: after it the output cannot go below (``M > 0``) or above (``M < 0``)
    ``round(beta / step)``. ``extra_bits`` keeps that many more fractional bits and skips the
    range clamp (for upsampling before the final rounding).

    ``shift`` is chosen so that ``|M| <= 2**30`` and ``|M * acc + K| < 2**52`` for every
    accumulator the layer can produce: :meth:`reference` evaluates the formula in ``int64``,
    ``__call__`` evaluates the same integers in ``float64``, where below ``2**53`` every
    product, sum and power-of-two scaling is exact, so both give identical codes (tested).
    """

    multiplier: Tensor  # int64 (C,)
    offset: Tensor  # int64 (C,)
    low: Tensor  # int64 (C,)
    high: Tensor  # int64 (C,)
    shift: int
    extra_bits: int

    def __post_init__(self) -> None:
        scale = 2.0 ** -(self.shift - self.extra_bits)
        object.__setattr__(self, "_m", self.multiplier.double() * scale)
        object.__setattr__(self, "_k", self.offset.double() * scale)
        object.__setattr__(self, "_lo", self.low.double())
        object.__setattr__(self, "_hi", self.high.double())

    def __call__(self, acc: Tensor, out: Tensor | None = None) -> Tensor:
        """Codes (``float64``, integer-valued) of accumulators ``acc``, into ``out`` if given."""
        m, k = self._m, self._k  # type: ignore[attr-defined]
        values = torch.addcmul(k, acc, m) if out is None else torch.addcmul(k, acc, m, out=out)
        return values.round_().clamp_(self._lo, self._hi)  # type: ignore[attr-defined]

    def reference(self, acc: Tensor) -> Tensor:
        """The same codes computed in ``int64`` integer arithmetic."""
        values = acc.to(torch.int64).mul_(self.multiplier).add_(self.offset)
        values = round_shift(values, self.shift - self.extra_bits)
        return values.clamp_(self.low, self.high)


@dataclass(frozen=True)
class Epilogue:
    """What a convolution computes after its accumulators, per output channel ``c``:
    ``relu(acc * scale[c] + bias[c]) * alpha[c] + beta[c]`` (without ``relu`` when ``relu`` is
    false; then ``alpha = 1, beta = 0``). ``scale`` is ``(C,)`` float64, the others ``(C,)``
    float32; ``accumulator_bound`` is the largest ``|acc|`` the layer can produce."""

    scale: Tensor
    bias: Tensor
    alpha: Tensor
    beta: Tensor
    relu: bool
    accumulator_bound: int

    def requant(self, fmt: ActFormat, extra_bits: int = 0) -> Requant:
        """The :class:`Requant` from the accumulators to codes of ``fmt`` (``extra_bits`` more
        fractional bits, unclamped, for upsampling sources)."""
        multiplier = self.alpha.double() * self.scale / fmt.step
        # the float bias enters at full precision: ReLU(acc * S + bias) = S * ReLU(acc + bias / S)
        relu_offset = self.beta.double() / fmt.step
        offset = relu_offset + self.alpha.double() * self.bias.double() / fmt.step
        shift = self._shift(multiplier, offset)
        # values kept with extra bits stay below 2**49, so upsampling them is exact in float64
        if shift - extra_bits < 3:
            raise ValueError(
                "a requantization multiplier or offset is too large to keep the step's "
                "precision; the network's BatchNorm scales or biases are out of range"
            )
        m, k = _scaled_integers(multiplier, shift), _scaled_integers(offset, shift)
        floor = round_shift(_scaled_integers(relu_offset, shift), shift - extra_bits)
        lo, hi = self._limits(m, floor, fmt, extra_bits)
        return Requant(m, k, lo, hi, shift, extra_bits)

    def _shift(self, multiplier: Tensor, offset: Tensor) -> int:
        """The largest shift keeping ``|M| <= 2**30`` and ``|M * acc + K| < 2**52``."""
        largest = max(float(multiplier.abs().max()), 2.0**-60)
        reach = largest * self.accumulator_bound + float(offset.abs().max()) + 1.0
        return min(
            MULTIPLIER_BITS - 1 - math.ceil(math.log2(largest)),
            52 - math.ceil(math.log2(reach)),
        )

    def _limits(
        self, m: Tensor, floor: Tensor, fmt: ActFormat, extra_bits: int
    ) -> tuple[Tensor, Tensor]:
        """``low``/``high`` of a :class:`Requant`: the format's range (none for upsampling
        sources, clamped after interpolation), narrowed by ReLU to one side of ``floor``."""
        unclamped = extra_bits > 0
        lo = torch.full_like(m, -(1 << 52) if unclamped else fmt.lo)
        hi = torch.full_like(m, (1 << 52) if unclamped else fmt.hi)
        if self.relu:
            lo = torch.where(m > 0, torch.maximum(lo, floor), lo)
            hi = torch.where(m < 0, torch.minimum(hi, floor), hi)
            lo = torch.minimum(lo, hi)
        return lo, hi


def _scaled_integers(values: Tensor, shift: int) -> Tensor:
    """``round(values * 2**shift)`` (half to even) as ``int64``."""
    return torch.round(values * 2.0**shift).to(torch.int64)


# --- tensors flowing through the network -----------------------------------------------------


@dataclass
class Codes:
    """Integer activations ``(N, H, W, C)`` in ``fmt``; with ``extra_bits`` more fractional
    bits (upsampling sources) they are integer-valued ``float64``."""

    values: Tensor
    fmt: ActFormat
    extra_bits: int = 0


Spec = tuple[str, ActFormat | None, int]  # (consumer name, its input format, extra bits)
Buffers = Callable[[str, tuple[int, ...], torch.dtype], Tensor]


def fresh(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A new, uninitialised tensor (the :data:`Buffers` that keeps nothing)."""
    return torch.empty(shape, dtype=dtype)


def upsample_codes(
    x: Codes, fmt: ActFormat, buffers: Buffers = fresh, key: str = "upsample"
) -> Tensor:
    """Bilinear 2x upsampling (``align_corners=False``) of codes with extra bits, rounded to
    ``fmt``'s codes: every output is ``(9a + 3b + 3c + d) / 16`` of its four neighbours.

    The integer sums are evaluated by PyTorch's bilinear kernel in float64, exactly: with the
    weights ``1/4`` and ``3/4`` per axis no product or sum of integers below ``2**49`` (see
    :meth:`Epilogue.requant`) is rounded. The one rounding is the final shift, half to even.
    """
    n, h, w, c = x.values.shape
    size = (n, 2 * h, 2 * w, c)
    upsampled = buffers(f"{key}.float64", size, x.values.dtype)  # NHWC memory
    torch.ops.aten.upsample_bilinear2d.out(
        x.values.permute(0, 3, 1, 2),
        [2 * h, 2 * w],
        False,
        2.0,
        2.0,
        out=upsampled.permute(0, 3, 1, 2),
    )  # what F.interpolate(scale_factor=2, mode="bilinear") computes, into the buffer
    upsampled.mul_(2.0**-x.extra_bits).round_().clamp_(fmt.lo, fmt.hi)
    codes = buffers(f"{key}.codes", size, fmt.dtype)
    return codes.copy_(upsampled)


def max_pool(x: Tensor | Codes) -> Tensor | Codes:
    """2x2 max pooling of float activations ``(N, C, H, W)``, or of codes ``(N, H, W, C)``
    (row pairs, then column pairs: quantization is monotone, so pooling commutes with it)."""
    if not isinstance(x, Codes):
        return F.max_pool2d(x, 2)
    n, h, w, c = x.values.shape
    rows = x.values.view(n, h // 2, 2, w, c)
    rows = torch.maximum(rows[:, :, 0], rows[:, :, 1]).view(n, h // 2, w // 2, 2, c)
    return Codes(torch.maximum(rows[:, :, :, 0], rows[:, :, :, 1]), x.fmt, x.extra_bits)


def as_float(x: Tensor | Codes) -> Tensor:
    """Float activations ``(N, C, H, W)`` float32 of codes (``code * step``), or ``x`` itself."""
    if isinstance(x, Codes):
        if x.extra_bits:
            raise AssertionError("float consumers get float tensors from their producers")
        return x.values.permute(0, 3, 1, 2).float() * x.fmt.step_tensor
    return x
