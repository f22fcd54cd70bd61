"""Training: losses, the trainer (a generator of progress events), data and checkpoints."""

from ..events import Event, StepEvent, ValidationEvent
from .checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from .dataset import (
    LabelledVolume,
    median_spacing,
    present_classes,
    read_pairs,
    slice_set,
    split_validation,
    training_set,
    volume_set,
)
from .losses import bce_dice_loss, soft_dice_loss
from .sets import SliceSet, VolumeSet
from .trainer import Trainer, TrainingDiverged

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
    "present_classes",
    "read_pairs",
    "save_checkpoint",
    "slice_set",
    "soft_dice_loss",
    "split_validation",
    "training_set",
    "volume_set",
]
