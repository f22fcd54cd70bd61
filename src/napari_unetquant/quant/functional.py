"""Quantization primitives: pure functions with straight-through gradients.

Shapes are free: every function works elementwise on any tensor, with step/scale tensors that
broadcast against it (a per-output-channel step has shape ``(C, 1, 1, 1)`` for conv weights).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def straight_through(value: Tensor, surrogate: Tensor) -> Tensor:
    """Exactly ``value`` in the forward pass, the gradient of ``surrogate`` in the backward pass.

    Written as ``value + (surrogate - surrogate)`` with detached parts so that the forward result
    is bit-exact (``x + (q - x).detach()`` is not: it rounds).
    """
    return value.detach() + (surrogate - surrogate.detach())


# Dynamic formats of tiny (subnormal) tensors stop here: 2**f and 2**-f stay normal float32
# numbers, so scaling by them is exact (2**149 would overflow to inf and make 0 * inf = NaN).
MAX_FRAC_BITS = 126

STE_LIMIT = 1.0  # |x| beyond which clipped straight-through estimators pass no gradient


def _apply(function: type[torch.autograd.Function], *args: Any) -> Tensor:
    """``function.apply(*args)``, typed."""
    result: Tensor = function.apply(*args)  # type: ignore[no-untyped-call]
    return result


def fixed_point_code_range(magnitude_bits: int, *, signed: bool = True) -> tuple[int, int]:
    """The lowest and highest integer code of a sign-magnitude fixed-point format with
    ``magnitude_bits`` bits besides the sign (a ``b``-bit format has ``b - 1`` when ``signed``,
    ``b`` when not): ``(-(2**magnitude_bits - 1), 2**magnitude_bits - 1)`` when ``signed``,
    ``(0, 2**magnitude_bits - 1)`` when not. Its values are ``code * 2**-frac_bits``."""
    highest = 2**magnitude_bits - 1
    return (-highest if signed else 0), highest


def fixed_point_limit(magnitude_bits: int, frac_bits: int | Tensor) -> Tensor:
    """Largest magnitude of a sign-magnitude format: ``(2**magnitude_bits - 1) * 2**-frac_bits``."""
    frac = torch.as_tensor(frac_bits, dtype=torch.float32)
    _, highest = fixed_point_code_range(magnitude_bits)
    return float(highest) * torch.pow(2.0, -frac)


class _FixedPointSTE(torch.autograd.Function):
    """``round(clamp(x * 2**f, bottom, top)) * 2**-f`` in one pass of in-place ops; the backward
    pass is the identity, or a mask of the in-range inputs with ``clip_gradient``. Multiplying by
    powers of two is exact, so the result lies exactly on the grid."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, scale: float, bottom: float, top: float, clip_gradient: bool
    ) -> Tensor:
        codes = x * scale
        if clip_gradient:
            ctx.save_for_backward((codes >= bottom) & (codes <= top))
        ctx.clip_gradient = clip_gradient
        return codes.clamp_(bottom, top).round_().mul_(1.0 / scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.clip_gradient:
            (inside,) = ctx.saved_tensors
            grad = grad * inside
        return grad, None, None, None, None


def fixed_point_quantize(
    x: Tensor,
    magnitude_bits: int,
    frac_bits: int,
    *,
    signed: bool = True,
    clip_gradient: bool = False,
) -> Tensor:
    """Quantize to a fixed-point grid with ``magnitude_bits`` bits of which ``frac_bits`` are
    fractional (Q(i.f) with ``i = magnitude_bits - frac_bits``).

    Values are rounded (half to even) to the nearest multiple of ``2**-frac_bits`` and
    **saturate** at ``+-(2**magnitude_bits - 1) * 2**-frac_bits``. (The paper's reference code
    wraps integer parts that overflow around instead, e.g. 1.3 -> 0.3125 in Q0.4; that is a bug
    not reproduced here.) Unsigned formats clamp negative values to zero.

    The gradient is straight-through: identity everywhere, or, with ``clip_gradient``, zero
    where ``x`` lies outside the representable range.
    """
    bottom, top = fixed_point_code_range(magnitude_bits, signed=signed)
    return _apply(
        _FixedPointSTE, x, 2.0 ** int(frac_bits), float(bottom), float(top), clip_gradient
    )


def choose_frac_bits(x: Tensor, magnitude_bits: int, rule: str = "mse") -> int:
    """Pick the fractional bits of a dynamic fixed-point format for tensor ``x``.

    ``"max"``: the finest power-of-two step whose range still covers ``max|x|``. ``"mse"``: that
    step and the next two finer ones (which clip the largest values), keeping the one with the
    smallest squared quantization error. May be negative (steps larger than 1) or exceed
    ``magnitude_bits`` (all-fractional formats with leading zeros, for small tensors).
    """
    peak = float(x.detach().abs().max())
    return frac_bits_for_peak(x, peak, magnitude_bits, rule)


def frac_bits_for_peak(x: Tensor | None, peak: float, magnitude_bits: int, rule: str) -> int:
    """As :func:`choose_frac_bits` with the peak magnitude given (e.g. a running average)."""
    if not math.isfinite(peak):
        raise FloatingPointError(
            "cannot choose a fixed-point format for a tensor with NaN or Inf values; "
            "check the input data and the learning rate"
        )
    if peak <= 0.0:
        return magnitude_bits  # an all-zero tensor: any format is exact
    _, highest = fixed_point_code_range(magnitude_bits)
    covering = min(math.floor(math.log2(highest / peak)), MAX_FRAC_BITS)
    if rule == "max" or x is None:
        return covering
    detached = x.detach()
    candidates = finer_frac_bits(covering)
    errors = [
        float((fixed_point_quantize(detached, magnitude_bits, frac) - detached).pow(2).mean())
        for frac in candidates
    ]
    return candidates[errors.index(min(errors))]


def finer_frac_bits(covering: int) -> tuple[int, int, int]:
    """The ``"mse"`` rule's candidates: ``covering`` and the next two finer steps, at most
    :data:`MAX_FRAC_BITS`."""
    return covering, min(covering + 1, MAX_FRAC_BITS), min(covering + 2, MAX_FRAC_BITS)


class _LSQ(torch.autograd.Function):
    """Forward ``round(clamp(x / s, -Q_N, Q_P)) * s``; backward the LSQ gradients (see below)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, step: Tensor, q_negative: float, q_positive: float, grad_scale: float
    ) -> Tensor:
        ctx.save_for_backward(x, step)
        ctx.limits = (q_negative, q_positive, grad_scale)
        return (x / step).clamp_(-q_negative, q_positive).round_().mul_(step)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, step = ctx.saved_tensors
        q_negative, q_positive, grad_scale = ctx.limits
        v = x / step
        clamped = v.clamp(-q_negative, q_positive)
        inside = clamped == v
        grad_x = grad * inside
        # round(v) - v inside the range; the clamp limit -Q_N or Q_P outside it.
        per_value = torch.where(inside, clamped.round() - v, clamped)
        grad_step = (grad * per_value).sum_to_size(step.shape) * grad_scale
        return grad_x, grad_step, None, None, None


def lsq_quantize(
    x: Tensor, step: Tensor, q_negative: int, q_positive: int, grad_scale: float
) -> Tensor:
    """Learned-step-size quantization (Esser et al., ICLR 2020).

    ``round(clamp(x / step, -q_negative, q_positive)) * step`` with a straight-through rounding
    gradient for ``x`` (zero outside the clamp range) and, for ``step`` (any shape that
    broadcasts against ``x``), the LSQ gradient ``-x/s + round(x/s)`` inside the range and
    ``-q_negative`` / ``q_positive`` outside, multiplied by ``grad_scale``
    (``1 / sqrt(N * q_positive)`` in the paper).
    """
    return _apply(_LSQ, x, step, float(q_negative), float(q_positive), grad_scale)


def pow2_ste(step: Tensor) -> Tensor:
    """Round a positive step to the nearest power of two (in log space), identity gradient."""
    return straight_through(torch.pow(2.0, torch.round(torch.log2(step))), step)


class _MaskedSTE(torch.autograd.Function):
    """Forward a precomputed ``value``; backward the gradient to ``x`` where ``|x| <= limit``
    (everywhere when ``limit`` is ``None``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, value: Tensor, limit: Tensor | float | None) -> Tensor:
        ctx.limit = limit
        if limit is not None:
            ctx.save_for_backward(x.abs() <= limit)
        return value

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.limit is not None:
            (inside,) = ctx.saved_tensors
            grad = grad * inside
        return grad, None, None


def ternarize(
    x: Tensor, threshold: Tensor, scale: Tensor, *, clip_gradient: bool = False
) -> Tensor:
    """TWN-style ternary values ``{-scale, 0, +scale}``: zero where ``|x| <= threshold``.

    Straight-through gradient; with ``clip_gradient``, zero where ``|x| > 1`` (the hardtanh
    STE of binary nets). ``threshold`` and ``scale`` are constants.
    """
    with torch.no_grad():
        levels = torch.sign(x).mul_(x.abs() > threshold).mul_(scale)
    return _apply(_MaskedSTE, x, levels, STE_LIMIT if clip_gradient else None)


def twn_threshold_and_scale(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """TWN's threshold ``0.7 * mean|x|`` and scale ``mean(|x| over |x| > threshold)`` over ``dims``.

    Returns tensors with ``dims`` kept as size-1 axes so they broadcast against ``x``.
    """
    magnitude = x.detach().abs()
    threshold = 0.7 * magnitude.mean(dim=dims, keepdim=True)
    above = (magnitude > threshold).to(x.dtype)
    count = above.sum(dim=dims, keepdim=True).clamp_min(1.0)
    scale = (magnitude * above).sum(dim=dims, keepdim=True) / count
    return threshold, scale


def binarize(x: Tensor, scale: Tensor | float = 1.0) -> Tensor:
    """``scale * sign(x)`` with ``sign(0) = +1`` (exactly two levels) and the clipped STE of
    BNNs (hardtanh): the gradient passes where ``|x| <= 1`` and is zero elsewhere. ``scale`` (a
    constant) sets the output magnitude only, so weights above it keep learning."""
    if isinstance(scale, Tensor):
        scale = scale.detach()
    with torch.no_grad():
        levels = (x >= 0).to(x.dtype).mul_(2).sub_(1).mul_(scale)
    return _apply(_MaskedSTE, x, levels, STE_LIMIT)
