"""Quantizer modules built from configs: levels, formats, state, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from napari_unetquant.config import QuantizerConfig
from napari_unetquant.quant import (
    BinaryQuantizer,
    FixedPointQuantizer,
    FloatQuantizer,
    LSQQuantizer,
    TernaryQuantizer,
    build_quantizer,
)


def _configs() -> list[QuantizerConfig]:
    configs = [QuantizerConfig.from_bits(m, b) for m in ("fixed", "lsq") for b in range(2, 9)]
    configs += [QuantizerConfig(method="lsq", bits=b, signed=False) for b in (2, 4)]
    configs += [QuantizerConfig(method="lsq", bits=4, power_of_two=True)]
    configs += [QuantizerConfig(method="ternary", bits=2), QuantizerConfig(method="binary", bits=1)]
    return configs


@pytest.mark.parametrize("config", _configs(), ids=lambda c: c.label)
@pytest.mark.parametrize("role", ["weight", "act"])
def test_distinct_levels_fit_the_stored_bits(config: QuantizerConfig, role: str) -> None:
    quantizer = build_quantizer(config, role, channels=3)
    x = torch.randn(3, 8, 16, 16) * 2
    q = quantizer(x)
    levels_per_scale = (
        [q[c].unique().numel() for c in range(3)] if role == "weight" else [q.unique().numel()]
    )
    assert max(levels_per_scale) <= 2**config.bits
    assert quantizer.stored_bits == config.bits


@pytest.mark.parametrize("config", _configs(), ids=lambda c: c.label)
def test_quantizers_are_idempotent_once_their_statistics_are_frozen(
    config: QuantizerConfig,
) -> None:
    quantizer = build_quantizer(config, "act")
    x = torch.randn(2, 4, 8, 8)
    quantizer.train()
    quantizer(x)  # settle running statistics / learned step
    quantizer.eval()
    once = quantizer(x)
    assert torch.equal(quantizer(once), once)


def test_paper_weight_format_q0_4_grid_exactly() -> None:
    quantizer = build_quantizer(QuantizerConfig.from_format("Q0.4"), "weight", 1)
    x = torch.linspace(-2, 2, 4001).reshape(1, -1)
    q = quantizer(x)
    expected = torch.arange(-15, 16, dtype=torch.float32) / 16
    assert torch.equal(q.unique(), expected)
    assert QuantizerConfig.from_format("Q0.4").bits == 5


def test_paper_activation_format_q6_0_grid_exactly() -> None:
    quantizer = build_quantizer(QuantizerConfig.from_format("Q6.0"), "act")
    x = torch.linspace(-100, 100, 20001)
    q = quantizer(x)
    assert torch.equal(q.unique(), torch.arange(-63, 64, dtype=torch.float32))
    assert QuantizerConfig.from_format("Q6.0").bits == 7


def test_dynamic_fixed_point_weights_choose_their_own_format_per_layer() -> None:
    config = QuantizerConfig(method="fixed", bits=4, dynamic_rule="max")
    small = build_quantizer(config, "weight", 1)
    large = build_quantizer(config, "weight", 1)
    small(torch.tensor([[0.1, -0.05]]))
    large(torch.tensor([[12.0, -3.0]]))
    assert isinstance(small, FixedPointQuantizer) and isinstance(large, FixedPointQuantizer)
    assert int(small.frac_bits) == 6  # 7 / 64 >= 0.1 > 7 / 128
    assert int(large.frac_bits) == -1  # steps of 2: 14 >= 12 > 7


def test_dynamic_activation_format_follows_running_peak_in_training_only() -> None:
    quantizer = build_quantizer(QuantizerConfig(method="fixed", bits=6, dynamic_rule="max"), "act")
    assert isinstance(quantizer, FixedPointQuantizer) and quantizer.peak is not None
    quantizer.train()
    quantizer(torch.full((4,), 3.0))
    assert float(quantizer.peak.value) == 3.0
    quantizer(torch.full((4,), 13.0))
    assert float(quantizer.peak.value) == pytest.approx(3.0 + 0.1 * 10.0)
    frozen = int(quantizer.frac_bits)
    quantizer.eval()
    out = quantizer(torch.full((4,), 100.0))
    assert int(quantizer.frac_bits) == frozen
    assert float(quantizer.peak.value) == pytest.approx(4.0)
    assert out.max().item() == (2**5 - 1) * 2.0**-frozen, "saturates at the frozen format"


@pytest.mark.parametrize("bits", range(2, 9))
def test_fixed_point_uses_exactly_its_levels_when_saturated(bits: int) -> None:
    config = QuantizerConfig(method="fixed", bits=bits, int_bits=0, frac_bits=bits - 1)
    x = torch.linspace(-2, 2, 40_001)
    assert build_quantizer(config, "act")(x).unique().numel() == 2**bits - 1


def test_dynamic_mse_format_chosen_in_training_is_kept_in_evaluation() -> None:
    quantizer = build_quantizer(QuantizerConfig(method="fixed", bits=4), "act")
    assert isinstance(quantizer, FixedPointQuantizer)
    x = torch.randn(4, 8, 16, 16)
    quantizer.train()
    for _ in range(5):
        trained = quantizer(x)
    chosen = int(quantizer.frac_bits)
    quantizer.eval()
    assert torch.equal(quantizer(x), trained)
    assert int(quantizer.frac_bits) == chosen


def test_binary_weights_beyond_their_scale_still_get_gradients() -> None:
    quantizer = build_quantizer(QuantizerConfig(method="binary", bits=1), "weight", channels=1)
    w = torch.tensor([[0.1, -0.2, 0.9, -3.0]], requires_grad=True)
    quantizer(w).sum().backward()
    assert torch.equal(w.grad, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


def test_running_statistics_accept_other_dtypes() -> None:
    quantizer = build_quantizer(QuantizerConfig(method="fixed", bits=6), "act")
    quantizer.train()
    quantizer(torch.randn(100))
    out = quantizer(torch.randn(100, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_lsq_initialisation_and_per_channel_steps() -> None:
    config = QuantizerConfig(method="lsq", bits=4)
    quantizer = build_quantizer(config, "weight", channels=2)
    assert isinstance(quantizer, LSQQuantizer)
    w = torch.stack([torch.full((3, 3, 3), 0.7), torch.full((3, 3, 3), -0.07)])
    quantizer(w)
    expected = 2 * torch.tensor([0.7, 0.07]) / math.sqrt(7)
    assert torch.allclose(quantizer.step.detach(), expected)
    assert (quantizer.q_negative, quantizer.q_positive) == (8, 7)


def test_lsq_gradient_scale_uses_values_per_step() -> None:
    weights = build_quantizer(QuantizerConfig(method="lsq", bits=3), "weight", channels=4)
    acts = build_quantizer(QuantizerConfig(method="lsq", bits=3, signed=False), "act")
    assert isinstance(weights, LSQQuantizer) and isinstance(acts, LSQQuantizer)
    w = torch.randn(4, 2, 3, 3)
    a = torch.randn(5, 2, 6, 6)
    assert weights._grad_scale(w) == pytest.approx(1 / math.sqrt(18 * 3))
    assert acts._grad_scale(a) == pytest.approx(1 / math.sqrt(72 * 7))


def test_lsq_power_of_two_steps_give_power_of_two_grids() -> None:
    quantizer = build_quantizer(QuantizerConfig(method="lsq", bits=5, power_of_two=True), "act")
    q = quantizer(torch.randn(1000))
    step = (q.unique().diff()).min().item()
    assert math.log2(step) == round(math.log2(step))


def test_lsq_step_learns() -> None:
    quantizer = build_quantizer(QuantizerConfig(method="lsq", bits=2), "act")
    x = torch.randn(4096)
    quantizer(x)
    assert isinstance(quantizer, LSQQuantizer)
    optimizer = torch.optim.SGD(quantizer.parameters(), lr=0.5)
    errors = []
    for _ in range(60):
        error = (quantizer(x) - x).pow(2).mean()
        optimizer.zero_grad()
        error.backward()
        optimizer.step()
        errors.append(error.item())
    assert errors[-1] < errors[0]


def test_ternary_and_binary_value_sets() -> None:
    w = torch.randn(3, 4, 3, 3)
    ternary = build_quantizer(QuantizerConfig(method="ternary", bits=2), "weight", 3)
    binary = build_quantizer(QuantizerConfig(method="binary", bits=1), "weight", 3)
    assert isinstance(ternary, TernaryQuantizer) and isinstance(binary, BinaryQuantizer)
    qt, qb = ternary(w), binary(w)
    for channel in range(3):
        magnitudes = qt[channel].abs().unique()
        assert magnitudes.numel() == 2 and magnitudes[0] == 0
        assert set(qt[channel].sign().unique().tolist()) == {-1.0, 0.0, 1.0}
        scale = w[channel].abs().mean()
        assert torch.allclose(qb[channel].abs(), scale.expand_as(qb[channel]))
        assert torch.equal(qb[channel].sign(), torch.where(w[channel] >= 0, 1.0, -1.0))
    acts = build_quantizer(QuantizerConfig(method="binary", bits=1), "act")(torch.randn(100))
    assert set(acts.unique().tolist()) == {-1.0, 1.0}


def test_float_quantizer_is_identity() -> None:
    quantizer = build_quantizer(QuantizerConfig(), "act")
    x = torch.randn(10)
    assert isinstance(quantizer, FloatQuantizer)
    assert quantizer(x) is x


def test_unknown_role_is_rejected() -> None:
    with pytest.raises(ValueError, match="role must be one of"):
        build_quantizer(QuantizerConfig(), "bias")
