"""Quantizer modules, each built from a :class:`~napari_unetquant.config.QuantizerConfig`.

A quantizer has a *role*: ``"weight"`` quantizers see a convolution's weight tensor
``(C_out, C_in, kH, kW)`` and keep per-output-channel scales where the method has scales;
``"act"`` quantizers see activations ``(N, C, H, W)`` and keep per-tensor statistics as running
averages, updated in training and frozen in evaluation (like BatchNorm).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..config import QuantizerConfig
from . import functional as qf
from .global_batch import batch_max, batch_sum, current_shard

ROLES = ("weight", "act")
_RUNNING_MOMENTUM = 0.1


class IntegerCodes(NamedTuple):
    """What a quantizer maps a weight tensor ``(C_out, ...)`` to: ``codes * step[c]``.

    ``codes`` are integer-valued (any integer or float dtype), shaped like the weights;
    ``step`` is ``(C_out,)`` float32; ``frac_bits`` is the fixed-point shift
    (``step == 2**-frac_bits``) or ``None`` for learned or statistic steps.
    """

    codes: Tensor
    step: Tensor
    frac_bits: int | None


def output_channel_view(weight: Tensor) -> tuple[int, ...]:
    """The shape that broadcasts a ``(C_out,)`` tensor against ``weight`` ``(C_out, ...)``."""
    return (-1,) + (1,) * (weight.dim() - 1)


class Quantizer(nn.Module):
    """Base class: ``forward`` returns the fake-quantized tensor (float, on the grid)."""

    def __init__(self, config: QuantizerConfig, role: str) -> None:
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"quantizer role must be one of {ROLES}, got {role!r}")
        self.config = config
        self.role = role

    @property
    def stored_bits(self) -> int:
        """Bits stored per value, sign included."""
        return self.config.bits

    @property
    def scale_count(self) -> int:
        """How many float scales (or shift exponents) this quantizer stores beside the codes."""
        return 0

    def quantize_(self, x: Tensor) -> Tensor:
        """Inference only: the quantized values of ``x``, computed in ``x``'s own memory where
        the method allows (the same arithmetic as ``forward``, so the same values)."""
        result: Tensor = self(x)
        return result

    def integer_codes(self, weight: Tensor) -> IntegerCodes:
        """Inference only: the integer codes and per-output-channel steps that this quantizer
        maps ``weight`` ``(C_out, ...)`` float32 to (``weight`` is left unchanged).

        Raises ``ValueError`` for a method without codes (full precision).
        """
        raise ValueError(
            f"a {self.config.label} weight quantizer stores float weights; there are no codes "
            f"to pack"
        )

    def _reduce_dims(self, x: Tensor) -> tuple[int, ...]:
        """Axes pooled into one statistic: all but the output channel for weights, all for acts."""
        return tuple(range(1, x.dim())) if self.role == "weight" else tuple(range(x.dim()))

    def extra_repr(self) -> str:
        return f"{self.config.label}, role={self.role}"


class FloatQuantizer(Quantizer):
    """Full precision: the identity."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class RunningStat(nn.Module):
    """A running average of a per-tensor statistic: set on first use, EMA while training."""

    value: Tensor
    initialized: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("value", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def update(self, batch_value: Tensor, training: bool) -> Tensor:
        batch_value = batch_value.detach().reshape(()).to(self.value.dtype)
        if not bool(self.initialized):
            self.value.copy_(batch_value)
            self.initialized.fill_(True)
        elif training:
            self.value.lerp_(batch_value, _RUNNING_MOMENTUM)
        return self.value


class FixedPointQuantizer(Quantizer):
    """Sign-magnitude fixed point: steps ``2**-f``, saturating at ``+-(2**(b-1) - 1) * 2**-f``.

    With an explicit Q(i.f) format ``f`` is fixed. Otherwise (dynamic fixed point) ``f`` is
    chosen from the tensor's range: from the weights at every forward, or from the running peak
    of the activations. The chosen ``f`` is kept in the ``frac_bits`` buffer for export.
    """

    frac_bits: Tensor

    def __init__(self, config: QuantizerConfig, role: str) -> None:
        super().__init__(config, role)
        self.magnitude_bits = config.bits - int(config.signed)
        initial = config.frac_bits if config.frac_bits is not None else 0
        self.register_buffer("frac_bits", torch.tensor(initial, dtype=torch.int32))
        self.peak = RunningStat() if config.is_dynamic and role == "act" else None

    @property
    def scale_count(self) -> int:
        return 1  # one shift exponent per tensor

    def forward(self, x: Tensor) -> Tensor:
        if self.config.is_dynamic:
            self.frac_bits.fill_(self._dynamic_frac_bits(x))
        return qf.fixed_point_quantize(
            x,
            self.magnitude_bits,
            int(self.frac_bits),
            signed=self.config.signed,
            clip_gradient=self.config.clip_gradient,
        )

    @property
    def frozen(self) -> bool:
        """True when the format no longer depends on the input (explicit, or frozen act)."""
        if not self.config.is_dynamic:
            return True
        return self.peak is not None and not self.training and bool(self.peak.initialized)

    def codes_(self, x: Tensor, *, prescaled: bool = False) -> Tensor:
        """Inference only, frozen formats: ``x`` overwritten by its integer codes (values
        ``codes * 2**-frac_bits`` are what ``forward`` returns; the scaling is exact).
        ``prescaled``: ``x`` already holds the values times ``2**frac_bits``."""
        bottom, top = qf.fixed_point_code_range(self.magnitude_bits, signed=self.config.signed)
        if not prescaled:
            x = x.mul_(2.0 ** int(self.frac_bits))
        return x.clamp_(float(bottom), float(top)).round_()

    def integer_codes(self, weight: Tensor) -> IntegerCodes:
        if self.config.is_dynamic:
            self(weight)  # a dynamic format chooses its shift here
        frac = int(self.frac_bits)
        codes = self.codes_(weight * 2.0**frac, prescaled=True)
        return IntegerCodes(codes, torch.full((weight.shape[0],), 2.0**-frac), frac)

    def _dynamic_frac_bits(self, x: Tensor) -> int:
        rule = self.config.dynamic_rule
        if self.peak is None:
            return qf.choose_frac_bits(x, self.magnitude_bits, rule)
        if not self.training and bool(self.peak.initialized):
            return int(self.frac_bits)  # frozen: the format training last chose
        peak = self.peak.update(batch_max(x.detach().abs().amax()), self.training)
        if rule == "mse" and current_shard() is not None and float(peak) > 0.0:
            return _frac_bits_by_batch_error(_subsample(x), float(peak), self.magnitude_bits)
        return qf.frac_bits_for_peak(_subsample(x), float(peak), self.magnitude_bits, rule)


def _subsample(x: Tensor, limit: int = 1 << 16) -> Tensor:
    """An evenly strided sample of at most ``limit`` values (for cheap error estimates); of a
    sharded batch, this share's part of the sample one process would take of the whole."""
    flat = x.detach().reshape(-1)
    shard = current_shard()
    index, count = (shard.index, shard.count) if shard is not None else (0, 1)
    stride = max(1, flat.numel() * count // limit)
    return flat[-(index * flat.numel()) % stride :: stride]


def _frac_bits_by_batch_error(sample: Tensor, peak: float, magnitude_bits: int) -> int:
    """The ``"mse"`` choice of :func:`~.functional.frac_bits_for_peak` with the squared
    errors summed over every share's sample (a sharded batch, positive ``peak``)."""
    covering = qf.frac_bits_for_peak(None, peak, magnitude_bits, "max")
    candidates = qf.finer_frac_bits(covering)
    errors = [
        (qf.fixed_point_quantize(sample, magnitude_bits, frac) - sample).pow(2).sum()
        for frac in candidates
    ]
    count = torch.tensor(float(sample.numel()), device=sample.device)
    totals = batch_sum(torch.stack([*errors, count]))
    return candidates[int(torch.argmin(totals[:3] / totals[3]))]


class LSQQuantizer(Quantizer):
    """Learned step size (Esser et al. 2020): per output channel for weights, per tensor for
    activations; signed levels ``-2**(b-1) .. 2**(b-1) - 1`` or unsigned ``0 .. 2**b - 1``.

    The step is initialised on the first batch to ``2 * mean|x| / sqrt(Q_P)`` and trained with
    the gradient scaled by ``1 / sqrt(N * Q_P)``, ``N`` the number of values sharing a step (per
    sample for activations). ``power_of_two`` rounds the step to ``2**k`` in the forward pass.
    """

    initialized: Tensor

    def __init__(self, config: QuantizerConfig, role: str, channels: int = 1) -> None:
        super().__init__(config, role)
        bits = config.bits
        self.q_negative = 2 ** (bits - 1) if config.signed else 0
        self.q_positive = 2 ** (bits - 1) - 1 if config.signed else 2**bits - 1
        size = channels if role == "weight" else 1
        self.step = nn.Parameter(torch.ones(size))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @property
    def scale_count(self) -> int:
        return self.step.numel()

    def forward(self, x: Tensor) -> Tensor:
        if not bool(self.initialized):
            self._initialize(x)
        step = self.step.abs().clamp_min(1e-8)
        if self.config.power_of_two:
            step = qf.pow2_ste(step)
        return qf.lsq_quantize(
            x, self._broadcast(step, x), self.q_negative, self.q_positive, self._grad_scale(x)
        )

    @torch.no_grad()
    def effective_step(self) -> Tensor:
        """The step(s) ``forward`` uses, without gradients: ``(channels,)`` or ``(1,)``."""
        step = self.step.detach().abs().clamp_min(1e-8)
        if self.config.power_of_two:
            step = torch.pow(2.0, torch.round(torch.log2(step)))
        return step

    def integer_codes(self, weight: Tensor) -> IntegerCodes:
        step = self.effective_step().float()
        step = step.expand(weight.shape[0]) if step.numel() == 1 else step
        codes = (weight / step.reshape(output_channel_view(weight))).clamp_(
            -self.q_negative, self.q_positive
        )
        return IntegerCodes(codes.round_(), step.clone(), None)

    def quantize_(self, x: Tensor) -> Tensor:
        if not bool(self.initialized):
            return super().quantize_(x)
        step = self._broadcast(self.effective_step(), x)
        return x.div_(step).clamp_(-self.q_negative, self.q_positive).round_().mul_(step)

    def _grad_scale(self, x: Tensor) -> float:
        per_step = x.numel() / self.step.numel()
        if self.role == "act":
            per_step /= max(x.shape[0], 1)
        return 1.0 / math.sqrt(per_step * self.q_positive)

    def _broadcast(self, step: Tensor, x: Tensor) -> Tensor:
        if self.role == "weight":
            return step.reshape(output_channel_view(x))
        return step.reshape(())

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        magnitude, shard = x.detach().abs(), current_shard()
        if self.role == "act" and shard is not None:  # the mean over the whole batch
            mean_abs = batch_sum(magnitude.sum()) / (magnitude.numel() * shard.count)
        else:
            mean_abs = magnitude.mean(dim=self._reduce_dims(x))
        initial = 2.0 * mean_abs / math.sqrt(self.q_positive)
        self.step.copy_(initial.clamp_min(1e-6).reshape(self.step.shape))
        self.initialized.fill_(True)


class TernaryQuantizer(Quantizer):
    """TWN / TernaryNet: ``{-a, 0, +a}``, threshold ``0.7 * mean|x|``, ``a`` the mean magnitude
    above the threshold; per output channel for weights, running per-tensor values for acts."""

    def __init__(self, config: QuantizerConfig, role: str, channels: int = 1) -> None:
        super().__init__(config, role)
        self.channels = channels
        self.threshold = RunningStat() if role == "act" else None
        self.scale = RunningStat() if role == "act" else None

    @property
    def scale_count(self) -> int:
        # weights: one scale per channel (codes are stored); activations: threshold and scale
        return self.channels if self.role == "weight" else 2

    def forward(self, x: Tensor) -> Tensor:
        if self.role == "act" and current_shard() is not None:
            threshold, scale = _batch_twn_threshold_and_scale(x)
        else:
            threshold, scale = qf.twn_threshold_and_scale(x, self._reduce_dims(x))
        if self.threshold is not None and self.scale is not None:
            threshold = self.threshold.update(threshold, self.training)
            scale = self.scale.update(scale, self.training)
        return qf.ternarize(x, threshold, scale, clip_gradient=self.config.clip_gradient)

    def integer_codes(self, weight: Tensor) -> IntegerCodes:
        dims = tuple(range(1, weight.dim()))
        threshold, scale = qf.twn_threshold_and_scale(weight, dims)
        codes = torch.sign(weight).mul_(weight.abs() > threshold)
        return IntegerCodes(codes, scale.reshape(-1), None)


def _batch_twn_threshold_and_scale(x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`~.functional.twn_threshold_and_scale` over every axis of a sharded batch (the
    per-tensor statistics of activations), as scalars."""
    shard = current_shard()
    count = x.numel() * (shard.count if shard is not None else 1)
    magnitude = x.detach().abs()
    threshold = 0.7 * batch_sum(magnitude.sum()) / count
    above = (magnitude > threshold).to(x.dtype)
    above_count, above_sum = batch_sum(torch.stack([above.sum(), (magnitude * above).sum()]))
    return threshold, above_sum / above_count.clamp_min(1.0)


class BinaryQuantizer(Quantizer):
    """Binary ``sign(x)`` with a clipped straight-through gradient; weights carry a
    per-output-channel scale ``mean|w|`` (so BatchNorm-free layers keep their magnitude),
    activations are plain ``+-1`` as in BNNs."""

    def __init__(self, config: QuantizerConfig, role: str, channels: int = 1) -> None:
        super().__init__(config, role)
        self.channels = channels

    @property
    def scale_count(self) -> int:
        return self.channels if self.role == "weight" else 0

    def forward(self, x: Tensor) -> Tensor:
        if self.role == "act":
            return qf.binarize(x)
        scale = x.detach().abs().mean(dim=self._reduce_dims(x), keepdim=True).clamp_min(1e-8)
        return qf.binarize(x, scale)

    def integer_codes(self, weight: Tensor) -> IntegerCodes:
        dims = tuple(range(1, weight.dim()))
        scale = weight.abs().mean(dim=dims).clamp_min(1e-8)
        codes = (weight >= 0).to(weight.dtype).mul_(2).sub_(1)
        return IntegerCodes(codes, scale, None)


def build_quantizer(config: QuantizerConfig, role: str, channels: int = 1) -> Quantizer:
    """The quantizer module for ``config``; ``channels`` is the output-channel count of weights."""
    if config.method == "float":
        return FloatQuantizer(config, role)
    if config.method == "fixed":
        return FixedPointQuantizer(config, role)
    if config.method == "lsq":
        return LSQQuantizer(config, role, channels)
    if config.method == "ternary":
        return TernaryQuantizer(config, role, channels)
    return BinaryQuantizer(config, role, channels)
