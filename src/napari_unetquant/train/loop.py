"""A minimal training loop as a generator of progress events.

The core knows nothing of threads or GUIs: callers iterate, show the events, and stop by
breaking out of the loop between steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class StepEvent:
    """One finished optimisation step (1-based) and its loss."""

    step: int
    steps: int
    loss: float


def fit(
    model: nn.Module,
    next_batch: Callable[[], Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    steps: int,
    learning_rate: float = 1e-3,
) -> Iterator[StepEvent]:
    """Train ``model`` for ``steps`` Adam steps with a cosine learning-rate schedule.

    ``next_batch`` returns ``(images (B, C, H, W), targets (B, 1, H, W))`` on the model's device.
    Raises ``FloatingPointError`` if the loss stops being finite.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    for step in range(1, steps + 1):
        images, targets = next_batch()
        loss = loss_fn(model(images), targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss.item()} at step {step}; lower the learning rate"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        schedule.step()
        yield StepEvent(step=step, steps=steps, loss=float(loss.detach()))
