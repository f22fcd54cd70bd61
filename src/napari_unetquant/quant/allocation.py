"""Mixed precision under a size budget: each quantized layer's weight bits, chosen to minimise
a second-order estimate of the loss increase while the codes fit a number of bytes.

Sensitivity (HAWQ-V2/V3, Dong et al. 2019-2021). Quantizing layer ``l``'s weights moves them by
``dW = Q_b(W) - W``; near a trained minimum the loss rises by about ``dW^T H dW / 2``, and with
``H`` replaced by its average diagonal ``Tr(H_l) / n_l`` that is ``Tr(H_l) / n_l * ||dW||^2 / 2``.
``Tr(H_l)`` is estimated by Hutchinson's method: ``E[v^T H v]`` over Rademacher vectors ``v``,
each ``H v`` one double backward pass through the float network (:func:`hessian_traces`).
``||dW||^2`` is measured with the quantizer training would use at each width
(:func:`quantization_errors`).

Allocation: one width per layer from the choices, minimising the summed sensitivity with the
summed code bytes within a capacity, solved exactly by dynamic programming over bytes
(:func:`allocate`): a multiple-choice knapsack, whose table has one entry per byte of capacity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn

from ..config import QuantizerConfig
from .quantizers import build_quantizer

BIT_CHOICES = (2, 3, 4, 5, 6, 8)
"""The weight widths a budget chooses from (the issue's set: 7 bits saves little over 8)."""

UNITS = {"B": 1, "KB": 1000, "KIB": 1024, "MB": 1000**2, "MIB": 1024**2}


def parse_size(text: str) -> int:
    """Bytes from ``"100KiB"``, ``"0.5 MiB"``, ``"40000"`` or ``"40 kB"`` (KiB and MiB are
    1024-based, kB and MB 1000-based; a bare number is bytes)."""
    cleaned = text.strip().replace(" ", "")
    number = cleaned.rstrip("BbKkIiMm")
    unit = cleaned[len(number) :].upper() or "B"
    if unit == "K":
        unit = "KIB"
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if unit not in UNITS or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"cannot read the size {text!r}; write a positive number of bytes with a unit, "
            f"e.g. 100KiB, 0.5MiB or 40000"
        )
    return int(value * UNITS[unit])


def hessian_traces(
    model: nn.Module,
    layers: Sequence[str],
    batches: Sequence[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    samples: int = 16,
    seed: int = 0,
) -> dict[str, float]:
    """Hutchinson estimates of ``Tr(H_l) / n_l``, the average diagonal entry of the Hessian of
    ``loss_fn(model(images), masks)`` (summed over ``batches``) with respect to each layer's
    weights, from ``samples`` Rademacher vectors. ``model`` runs in evaluation mode (BatchNorm
    statistics fixed, so the loss is a function of the weights alone) and is left unchanged."""
    if samples < 1:
        raise ValueError(f"{samples} Hutchinson samples: use at least 1")
    modules = dict(model.named_modules())
    weights = [modules[name].weight for name in layers]
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    totals = [0.0] * len(layers)
    try:
        for _ in range(samples):
            vectors = [
                (torch.randint(0, 2, w.shape, generator=generator) * 2 - 1).to(w) for w in weights
            ]
            for images, masks in batches:
                loss = loss_fn(model(images), masks)
                grads = torch.autograd.grad(loss, weights, create_graph=True)
                projection = torch.stack(
                    [(g * v).sum() for g, v in zip(grads, vectors, strict=True)]
                ).sum()
                products = torch.autograd.grad(projection, weights)
                for i, (hv, v) in enumerate(zip(products, vectors, strict=True)):
                    totals[i] += float((hv * v).sum())
    finally:
        model.train(was_training)
    return {
        name: total / samples / weight.numel()
        for name, total, weight in zip(layers, totals, weights, strict=True)
    }


@torch.no_grad()
def quantization_errors(
    weight: Tensor, config: QuantizerConfig, choices: Sequence[int] = BIT_CHOICES
) -> list[float]:
    """``||Q_b(W) - W||^2`` for each width ``b`` of ``choices``, ``Q_b`` the weight quantizer
    ``config`` at ``b`` bits as training builds it (dynamic fixed point chooses its step from
    ``weight``, a learned step starts from its initial value)."""
    errors = []
    for bits in choices:
        chosen = replace(config, bits=bits)
        quantizer = build_quantizer(chosen, "weight", weight.shape[0]).train()
        errors.append(float(((quantizer(weight) - weight) ** 2).sum()))
    return errors


def allocate(
    costs: Sequence[Sequence[int]], scores: Sequence[Sequence[float]], capacity: int
) -> list[int]:
    """The choice per item (an index into its row) minimising the summed ``scores`` with the
    summed ``costs`` (bytes, non-negative integers) at most ``capacity``: exact, by dynamic
    programming over every capacity from 0 to ``capacity``. Ties keep the smaller cost. Raises
    ``ValueError`` when even the cheapest choices do not fit."""
    cheapest = sum(min(row) for row in costs)
    if capacity < cheapest:
        raise ValueError(f"the cheapest choices need {cheapest} bytes, over {capacity}")
    capacity = min(capacity, sum(max(row) for row in costs))  # more changes nothing
    best = np.zeros(capacity + 1)  # best[c]: the least score of the items so far within c bytes
    picks = []
    for row_costs, row_scores in zip(costs, scores, strict=True):
        candidates = np.full((len(row_costs), capacity + 1), np.inf)
        for k, (cost, score) in enumerate(zip(row_costs, row_scores, strict=True)):
            if cost <= capacity:
                candidates[k, cost:] = best[: capacity + 1 - cost] + score
        order = np.argsort(np.asarray(row_costs), kind="stable")  # ties: the cheaper choice
        chosen = order[np.argmin(candidates[order], axis=0)]
        best = candidates[chosen, np.arange(capacity + 1)]
        picks.append(chosen.astype(np.int8))
    choice, left = [], capacity
    for row_costs, chosen in zip(reversed(costs), reversed(picks), strict=True):
        k = int(chosen[left])
        choice.append(k)
        left -= int(row_costs[k])
    return choice[::-1]


@dataclass(frozen=True)
class LayerChoice:
    """One layer of an allocation: its weights, sensitivity and the width chosen (32: float)."""

    name: str
    weights: int
    trace: float  # Tr(H) / n: the average Hessian diagonal
    bits: int


def code_bytes(weights: int, bits: int) -> int:
    """Bytes of ``weights`` codes packed at ``bits`` bits each (the packed layout's)."""
    return -(-weights * bits // 8)
