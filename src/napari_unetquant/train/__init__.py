"""Training: losses and the loop as a generator of progress events."""

from .loop import Batch, StepEvent, fit
from .losses import bce_dice_loss, soft_dice_loss

__all__ = ["Batch", "StepEvent", "bce_dice_loss", "fit", "soft_dice_loss"]
