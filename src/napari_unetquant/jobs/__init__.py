"""Whole jobs, as the shells (command line, napari docks, benchmarks) run them: train a model
file or a model in memory, sweep bit widths, segment and evaluate images, export models.

Each job reads what it needs, calls the core, and writes its results atomically. Long jobs are
generators of progress events, so the caller shows progress and may stop between steps.
"""

from .exporting import Export, export_model
from .segmenting import evaluate_files, segment_array, segment_to_file
from .sweep import SweepJob, SweepResult, sweep, write_sweep_csv
from .train_file import ALL_CLASSES, TrainJob, train_model
from .training import (
    TrainingRun,
    check_training_data,
    model_name,
    requantized,
    start_training,
)

__all__ = [
    "ALL_CLASSES",
    "Export",
    "SweepJob",
    "SweepResult",
    "TrainJob",
    "TrainingRun",
    "check_training_data",
    "evaluate_files",
    "export_model",
    "model_name",
    "requantized",
    "segment_array",
    "segment_to_file",
    "start_training",
    "sweep",
    "train_model",
    "write_sweep_csv",
]
