"""What a training run reports as it goes: the trainer yields these, the shells show them.

Kept apart from the trainer so the napari docks, which never import the training internals,
can tell the events apart with ``isinstance``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepEvent:
    """One finished optimisation step (1-based)."""

    step: int
    steps: int
    loss: float
    elapsed_seconds: float
    eta_seconds: float


@dataclass(frozen=True)
class ValidationEvent:
    """Mean per-slice Dice on the validation slices after ``step``."""

    step: int
    steps: int
    dice: float
    best_dice: float
    best_step: int
    improved: bool


Event = StepEvent | ValidationEvent
