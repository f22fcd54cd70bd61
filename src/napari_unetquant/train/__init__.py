"""Training: losses, the trainer (a generator of progress events), data and checkpoints."""

from .checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from .dataset import (
    LabelledVolume,
    median_spacing,
    read_pairs,
    slice_set,
    split_validation,
    training_set,
    volume_set,
)
from .losses import bce_dice_loss, soft_dice_loss
from .trainer import (
    Event,
    SliceSet,
    StepEvent,
    Trainer,
    TrainingDiverged,
    ValidationEvent,
)
from .volumes import VolumeSet

__all__ = [
    "Event",
    "LabelledVolume",
    "SliceSet",
    "StepEvent",
    "Trainer",
    "TrainingDiverged",
    "ValidationEvent",
    "VolumeSet",
    "bce_dice_loss",
    "checkpoint_path",
    "load_checkpoint",
    "median_spacing",
    "read_pairs",
    "save_checkpoint",
    "slice_set",
    "soft_dice_loss",
    "split_validation",
    "training_set",
    "volume_set",
]
