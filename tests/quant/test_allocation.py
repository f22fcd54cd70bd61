"""The pieces of a size budget: sizes in words, the exact allocation, Hutchinson's trace and
the quantization errors it is multiplied by."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_unetquant.config import QuantizerConfig
from napari_unetquant.quant.allocation import (
    BIT_CHOICES,
    allocate,
    code_bytes,
    hessian_traces,
    parse_size,
    quantization_errors,
)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("100KiB", 102400),
        ("100 KiB", 102400),
        ("0.5MiB", 524288),
        ("40kB", 40000),
        ("40000", 40000),
        ("1.5 MB", 1500000),
        ("64k", 65536),
    ],
)
def test_sizes_in_words(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "abc", "-5KiB", "0", "10GB", "nanKiB", "KiB"])
def test_unreadable_sizes_say_how_to_write_one(text: str) -> None:
    with pytest.raises(ValueError, match=r"e\.g\. 100KiB"):
        parse_size(text)


def _brute_force(costs: list[list[int]], scores: list[list[float]], capacity: int) -> float:
    best = np.inf
    for choice in itertools.product(*(range(len(row)) for row in costs)):
        if sum(costs[i][k] for i, k in enumerate(choice)) <= capacity:
            best = min(best, sum(scores[i][k] for i, k in enumerate(choice)))
    return float(best)


@pytest.mark.parametrize("seed", range(12))
def test_the_allocation_is_the_exact_optimum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    layers = int(rng.integers(1, 5))
    weights = rng.integers(5, 60, layers)
    costs = [[code_bytes(int(n), b) for b in BIT_CHOICES] for n in weights]
    # sensitivities fall with the bits, as quantization errors do, at different rates
    scores = [sorted(rng.exponential(1.0, len(BIT_CHOICES)), reverse=True) for _ in weights]
    cheapest, dearest = sum(r[0] for r in costs), sum(r[-1] for r in costs)
    for capacity in {
        cheapest,
        (cheapest + dearest) // 2,
        dearest + 3,
        int(rng.integers(cheapest, dearest + 1)),
    }:
        choice = allocate(costs, scores, capacity)
        assert sum(costs[i][k] for i, k in enumerate(choice)) <= capacity
        total = sum(scores[i][k] for i, k in enumerate(choice))
        assert total == pytest.approx(_brute_force(costs, scores, capacity), abs=1e-12)
    with pytest.raises(ValueError, match=f"need {cheapest} bytes, over {cheapest - 1}"):
        allocate(costs, scores, cheapest - 1)


def test_a_large_budget_takes_the_widest_and_a_tight_one_the_narrowest() -> None:
    costs = [[code_bytes(1000, b) for b in BIT_CHOICES]] * 3
    scores = [[2.0**-b for b in BIT_CHOICES]] * 3
    assert allocate(costs, scores, 10**6) == [len(BIT_CHOICES) - 1] * 3
    assert allocate(costs, scores, 3 * code_bytes(1000, 2)) == [0, 0, 0]


def test_a_huge_capacity_costs_no_more_than_the_widest_choice() -> None:
    """A budget far beyond the widest choices (a gigabyte) is solved in a table as long as
    their bytes, not one entry per byte of budget."""
    costs = [[code_bytes(10_000, b) for b in BIT_CHOICES]] * 4
    scores = [[2.0**-b for b in BIT_CHOICES]] * 4
    assert allocate(costs, scores, 10**9) == [len(BIT_CHOICES) - 1] * 4


def test_packed_code_bytes() -> None:
    assert code_bytes(9, 3) == 4 and code_bytes(8, 3) == 3 and code_bytes(16, 8) == 16


class _Scaled(nn.Module):
    """``y_c = w_c * x``: the squared error's Hessian in ``w`` is diagonal, ``2 sum x^2``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Conv2d(1, 3, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def test_hutchinson_is_exact_for_a_diagonal_hessian() -> None:
    """Rademacher entries square to 1, so one sample gives a diagonal Hessian's trace."""
    model = _Scaled()
    x = torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    target = torch.randn(2, 3, 5, 5)
    traces = hessian_traces(
        model, ["layer"], [(x, target)], lambda y, t: ((y - t) ** 2).sum(), samples=1
    )
    assert traces["layer"] == pytest.approx(2 * float((x**2).sum()), rel=1e-5)
    assert model.training, "the model's mode is restored"


def test_hutchinson_converges_to_the_exact_trace() -> None:
    """A convolution with a non-linear loss: the estimate from many samples is within a few
    percent of the trace of the Hessian computed entry by entry."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 1, 3, padding=1))
    x = torch.randn(4, 1, 8, 8)
    target = (x > 0).float()
    loss_fn = F.binary_cross_entropy_with_logits
    first = model[0].weight

    def loss_of(weight: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(F.conv2d(x, weight, model[0].bias, padding=1))
        return loss_fn(model[2](hidden), target)

    hessian = torch.autograd.functional.hessian(loss_of, first.detach())
    exact = float(hessian.reshape(first.numel(), first.numel()).trace()) / first.numel()
    estimate = hessian_traces(model, ["0"], [(x, target)], loss_fn, samples=400, seed=1)["0"]
    assert estimate == pytest.approx(exact, rel=0.1)


@pytest.mark.parametrize("method", ["fixed", "lsq"])
def test_quantization_errors_fall_with_the_bits(method: str) -> None:
    weight = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.1
    errors = quantization_errors(weight, QuantizerConfig.from_bits(method, 8))
    assert len(errors) == len(BIT_CHOICES) and all(e >= 0 for e in errors)
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-2 * float((weight**2).sum())  # 8 bits: under 1% of the energy
