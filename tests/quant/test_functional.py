"""Exact properties of the quantization primitives."""

from __future__ import annotations

import math

import pytest
import torch

from napari_unetquant.quant import functional as qf


@pytest.mark.parametrize("frac_bits", [0, 2, 4, -1])
@pytest.mark.parametrize("magnitude_bits", [1, 3, 6])
def test_fixed_point_grid_and_saturation(magnitude_bits: int, frac_bits: int) -> None:
    step = 2.0**-frac_bits
    top = (2**magnitude_bits - 1) * step
    x = torch.linspace(-3 * top - 1, 3 * top + 1, 5001)
    q = qf.fixed_point_quantize(x, magnitude_bits, frac_bits)
    codes = q / step
    assert torch.equal(codes, codes.round()), "every output is a multiple of the step"
    assert q.max().item() == top and q.min().item() == -top, "saturates at +-top"
    assert q.unique().numel() == 2 ** (magnitude_bits + 1) - 1
    inside = x.abs() <= top
    assert torch.all((q[inside] - x[inside]).abs() <= step / 2 + 1e-6), "rounds to nearest"


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("magnitude_bits", [1, 3, 6, 15])
def test_the_code_range_is_where_the_quantizer_saturates(magnitude_bits: int, signed: bool) -> None:
    lowest, highest = qf.fixed_point_code_range(magnitude_bits, signed=signed)
    assert highest == 2**magnitude_bits - 1 and lowest == (-highest if signed else 0)
    q = qf.fixed_point_quantize(torch.tensor([-1e9, 1e9]), magnitude_bits, 0, signed=signed)
    assert q.tolist() == [lowest, highest]


def test_fixed_point_saturates_instead_of_wrapping_like_the_reference_code() -> None:
    # The reference implementation maps 1.3 to 0.3125 in Q0.4 (the integer part wraps).
    x = torch.tensor([1.3, -1.3, 0.97, 100.0])
    q = qf.fixed_point_quantize(x, magnitude_bits=4, frac_bits=4)
    assert torch.equal(q, torch.tensor([15 / 16, -15 / 16, 15 / 16, 15 / 16]))


def test_fixed_point_unsigned_clamps_negatives_to_zero() -> None:
    q = qf.fixed_point_quantize(torch.tensor([-3.0, 0.26, 9.0]), 3, 2, signed=False)
    assert torch.equal(q, torch.tensor([0.0, 0.25, 1.75]))


def test_fixed_point_is_idempotent() -> None:
    x = torch.randn(10_000) * 3
    once = qf.fixed_point_quantize(x, 5, 2)
    assert torch.equal(qf.fixed_point_quantize(once, 5, 2), once)


def test_fixed_point_gradient_identity_or_clipped() -> None:
    x = torch.tensor([-5.0, -0.3, 0.2, 0.9, 5.0], requires_grad=True)
    qf.fixed_point_quantize(x, 4, 4).sum().backward()
    assert torch.equal(x.grad, torch.ones(5))
    x.grad = None
    qf.fixed_point_quantize(x, 4, 4, clip_gradient=True).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


@pytest.mark.parametrize("peak", [0.01, 0.1, 0.9, 1.0, 7.3, 300.0])
@pytest.mark.parametrize("magnitude_bits", [1, 3, 7])
def test_max_rule_picks_the_finest_covering_step(peak: float, magnitude_bits: int) -> None:
    x = torch.tensor([peak, -peak / 3, 0.0])
    frac = qf.choose_frac_bits(x, magnitude_bits, rule="max")
    assert float(qf.fixed_point_limit(magnitude_bits, frac)) >= peak
    assert float(qf.fixed_point_limit(magnitude_bits, frac + 1)) < peak


def test_mse_rule_clips_a_lone_outlier_for_finer_steps() -> None:
    x = torch.cat([torch.randn(10_000) * 0.1, torch.tensor([4.0])])
    by_max = qf.choose_frac_bits(x, 3, rule="max")
    by_mse = qf.choose_frac_bits(x, 3, rule="mse")
    assert by_mse > by_max

    def error(frac: int) -> float:
        return float((qf.fixed_point_quantize(x, 3, frac) - x).pow(2).mean())

    assert error(by_mse) < error(by_max)


def test_choose_frac_bits_rejects_non_finite() -> None:
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        qf.choose_frac_bits(torch.tensor([1.0, math.nan]), 3)


def test_lsq_gradients_match_the_formula() -> None:
    x = torch.tensor([-9.0, -1.26, -0.3, 0.0, 0.74, 1.5, 9.0], requires_grad=True)
    step = torch.tensor(0.5, requires_grad=True)
    q_negative, q_positive, grad_scale = 4, 3, 0.37
    y = qf.lsq_quantize(x, step, q_negative, q_positive, grad_scale)
    upstream = torch.arange(1.0, 8.0)
    (y * upstream).sum().backward()

    v = x.detach() / 0.5
    expected_values = torch.clamp(v, -4, 3).round() * 0.5
    assert torch.equal(y.detach(), expected_values)
    inside = (v >= -q_negative) & (v <= q_positive)
    assert torch.equal(x.grad, upstream * inside)
    # Esser et al.: -Q_N below the range, Q_P above it, round(v) - v inside (boundaries included).
    per_value = torch.where(
        v < -q_negative,
        torch.tensor(-float(q_negative)),
        torch.where(v > q_positive, torch.tensor(float(q_positive)), v.round() - v),
    )
    assert step.grad is not None
    assert step.grad.item() == pytest.approx(grad_scale * float((per_value * upstream).sum()))


def test_straight_through_is_exact_forward_and_surrogate_backward() -> None:
    x = torch.tensor([0.1, 0.7, 1e8], requires_grad=True)
    value = torch.tensor([0.3, 1.1, 3.0])
    y = qf.straight_through(value, x * 0.25)
    assert torch.equal(y, value)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 0.25))


def test_lsq_per_channel_step_gradients_match_plain_autograd() -> None:
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    step = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    (qf.lsq_quantize(x, step.reshape(3, 1, 1, 1), 8, 7, 0.3) * upstream).sum().backward()
    # reference: the LSQ formula written with autograd primitives
    x2 = x.detach().clone().requires_grad_(True)
    s2 = step.detach().clone().requires_grad_(True)
    s_scaled = s2 * 0.3 + (s2 - s2 * 0.3).detach()
    v = x2 / s_scaled.reshape(3, 1, 1, 1)
    clamped = torch.clamp(v, -8, 7)
    rounded = clamped + (clamped.round() - clamped).detach()
    ((rounded * s_scaled.reshape(3, 1, 1, 1)) * upstream).sum().backward()
    assert torch.allclose(x.grad, x2.grad) and torch.allclose(step.grad, s2.grad)


def test_pow2_ste_rounds_in_log_space() -> None:
    step = torch.tensor([0.3, 0.36, 1.0, 5.0], requires_grad=True)
    out = qf.pow2_ste(step)
    assert torch.equal(out.detach(), torch.tensor([0.25, 0.5, 1.0, 4.0]))
    out.sum().backward()
    assert torch.equal(step.grad, torch.ones(4))


def test_twn_threshold_and_scale_per_channel() -> None:
    w = torch.tensor([[1.0, -1.0, 0.1, 0.0], [4.0, 0.0, 0.0, -2.0]])
    threshold, scale = qf.twn_threshold_and_scale(w, dims=(1,))
    assert torch.allclose(threshold[:, 0], torch.tensor([0.7 * 0.525, 0.7 * 1.5]))
    assert torch.allclose(scale[:, 0], torch.tensor([1.0, 3.0]))
    q = qf.ternarize(w, threshold, scale)
    assert torch.equal(q, torch.tensor([[1.0, -1.0, 0.0, 0.0], [3.0, 0.0, 0.0, -3.0]]))


def test_binarize_values_and_clipped_gradient() -> None:
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    y = qf.binarize(x)
    assert torch.equal(y, torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
