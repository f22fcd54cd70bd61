"""Dock widget: the paper's accuracy-memory trade-off on the current data."""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

import napari
from magicgui.widgets import (
    FileEdit,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
    Table,
)
from napari.qt.threading import GeneratorWorker
from napari.utils.notifications import show_info

from ..config import QuantConfig, UNetConfig
from ..errors import SettingError
from ..events import Event, StepEvent
from ..jobs import SweepJob, SweepResult, sweep, write_sweep_csv
from ..modelio import SegmentationModel
from ..recipes import DOCK_FINE_TUNE_STEPS, DOCK_STEPS
from . import _session
from ._common import (
    Persistent,
    TrainingInputs,
    foreground_number,
    label_classes,
    notify_error,
    show_rows,
    start_worker,
)
from ._plot import PlotWidget

DEFAULT_SETTINGS = "FP, W8A8, W4A6, W4A4-lsq, W2A4, ternary, binary"


TABLE_HEADERS = {
    "setting": "setting",
    "validation_dice": "validation Dice",
    "mean_weight_bits": "bits per weight",
    "stored_bytes": "stored KiB",
    "fp32_bytes": "FP32 KiB",
    "compression": "x smaller",
    "packed_file_bytes": "packed file KiB",
    "size_budget_bytes": "budget KiB",
    "fine_tuned_from": "fine-tuned from",
}
"""The table's headers for the CSV's columns (the CSV keeps its machine-readable names)."""


def table_columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The sweep's CSV rows as the dock's table shows them: readable headers, sizes in KiB."""
    columns: dict[str, list[Any]] = {}
    for key, header in TABLE_HEADERS.items():
        values = [row[key] for row in rows]
        if key.endswith("_bytes"):  # sizes in KiB; a budget's cell is empty without one
            values = [round(v / 1024, 1) if isinstance(v, int) else v for v in values]
        columns[header] = values
    return columns


def budget_bytes(text: str) -> tuple[int, ...]:
    """The sizes typed as ``40, 60.5`` KiB, in bytes (nothing typed: none)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        sizes = tuple(round(float(part) * 1024) for part in parts)
    except (ValueError, OverflowError):  # not a number, or infinite
        sizes = (0,)
    if any(size <= 0 for size in sizes):
        raise SettingError(
            f"size budgets {text!r}: give positive sizes in KiB separated by commas, e.g. 40, 60",
            "size_budget",
        )
    return sizes


class SweepWidget(TrainingInputs):
    """Train or fine-tune a list of bit configurations (and size budgets) and plot validation
    Dice against stored bits and against the packed file's size, with the Pareto front; the
    table exports to CSV.

    Full-precision settings train first; quantized ones are fine-tuned from the sweep's FP
    model (or, when the list has none, from this session's last 2D FP model).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer)
        self.settings = LineEdit(value=DEFAULT_SETTINGS, label="settings")
        self.budgets = LineEdit(value="", label="size budgets (KiB)")
        self.budgets.tooltip = (
            "packed file sizes, e.g. 40, 60: one fine-tune of the FP model per size, each "
            "layer's weight bits chosen to fit (activations 6-bit fixed point)"
        )
        self.fp_steps = SpinBox(value=DOCK_STEPS, min=1, max=100_000, label="FP steps")
        self.quant_steps = SpinBox(
            value=DOCK_FINE_TUNE_STEPS, min=1, max=100_000, label="fine-tune steps"
        )
        self.start = PushButton(text="Run sweep")
        self.stop = PushButton(text="Stop", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, label="progress")
        self.status = Label(value="", label="status")
        self.table = Table(value=[[]])
        self.csv_path = FileEdit(mode="w", filter="*.csv", label="CSV file")
        self.export = PushButton(text="Export CSV", enabled=False)
        self.extend(
            [
                self.settings,
                self.budgets,
                self.fp_steps,
                self.quant_steps,
                self.start,
                self.stop,
                self.progress,
                self.status,
                self.table,
                self.csv_path,
                self.export,
            ]
        )
        self.by_bits = PlotWidget(
            "Dice vs bits", "mean stored bits per weight (log scale)", "validation Dice", False
        )
        self.by_size = PlotWidget(
            "Dice vs size",
            "packed model file (KiB, log scale)",
            "validation Dice",
            False,
            pareto=True,
        )
        self.by_bits.log_x = self.by_size.log_x = True
        self.add_native(self.by_bits)
        self.add_native(self.by_size)
        show_rows(self.table)
        self.persist = Persistent(
            "sweep",
            {
                "settings": self.settings,
                "budgets": self.budgets,
                "fp_steps": self.fp_steps,
                "quant_steps": self.quant_steps,
            },
        )
        self.start.clicked.connect(self.run)
        self.stop.clicked.connect(lambda: self.worker and self.worker.quit())
        self.export.clicked.connect(self.export_csv)
        self.results: list[SweepResult] = []
        self._steps_done, self._started = 0, time.monotonic()
        self.worker: GeneratorWorker | None = None

    def job(self) -> SweepJob:
        """The sweep the controls ask for (read here, on the GUI thread)."""
        classes = label_classes(self.foreground_value.value)
        labels = [part for part in self.settings.value.split(",") if part.strip()]
        budgets = budget_bytes(self.budgets.value)
        if not labels and not budgets:
            raise ValueError(f"list the settings to compare, e.g. {DEFAULT_SETTINGS}")
        return SweepJob(
            settings=tuple(QuantConfig.from_label(label) for label in labels),
            budgets=budgets,
            fp_steps=self.fp_steps.value,
            fine_tune_steps=self.quant_steps.value,
            unet=UNetConfig(base_width=self.network_width.value),
            foreground_value=None if classes else foreground_number(self.foreground_value.value),
            classes=classes,
        )

    @staticmethod
    def _session_fp_model() -> SegmentationModel | None:
        models = [
            m for m in _session.models().values() if m.quant.is_float and m.unet.spatial_dims == 2
        ]
        return models[-1] if models else None

    def run(self) -> None:
        """Start the sweep in a worker thread (the *Run sweep* button)."""
        try:
            job = self.job()
            image, labels = self.training_data()
        except ValueError as error:
            notify_error(error)
            return
        fp_model = self._session_fp_model()

        def work() -> Generator[Event | SweepResult, None, None]:
            yield from sweep(image, labels, job, fp_model)

        self.results = []
        self.by_bits.clear()
        self.by_size.clear()
        self._steps_done, self._started = 0, time.monotonic()
        self.progress.max, self.progress.value = self._total_steps(job), 0
        self.worker = start_worker(
            work,
            {"total": 0, "desc": "Bit-width sweep"},
            (self.start, self.stop),
            on_yield=self._on_event,
            on_finish=self._finished,
        )

    def _on_event(self, event: Event | SweepResult) -> None:
        if isinstance(event, SweepResult):
            self.results.append(event)
            _session.add_model(f"{event.label} (sweep)", event.model)
            self.by_bits.add_point("Dice", event.mean_weight_bits, event.dice, event.label)
            series = "Dice" if event.size_budget is None else "size budget"
            self.by_size.add_point(series, event.packed_bytes / 1024, event.dice, event.label)
            self.table.value = table_columns([r.row() for r in self.results])
            self.status.value = f"{event.label}: validation Dice {event.dice:.3f}"
        elif isinstance(event, StepEvent):
            done = self._steps_done + event.step
            self.progress.value = done
            rate = (time.monotonic() - self._started) / done
            minutes, seconds = divmod(int(rate * (self.progress.max - done)), 60)
            setting = len(self.results) + 1
            self.status.value = (
                f"setting {setting}: step {event.step}/{event.steps}, loss {event.loss:.3f}; "
                f"sweep ETA {minutes}m{seconds:02d}s"
            )
            if event.step == event.steps:
                self._steps_done += event.steps

    @staticmethod
    def _total_steps(job: SweepJob) -> int:
        """Every step of the sweep, for one progress bar over all its settings."""
        steps = [job.fp_steps if q.is_float else job.fine_tune_steps for q in job.settings]
        steps += [job.fine_tune_steps] * len(job.budgets)
        return max(1, sum(s or 0 for s in steps))

    def _finished(self) -> None:
        self.export.enabled = bool(self.results)

    def export_csv(self) -> None:
        """Write the table to the chosen CSV file."""
        if not self.results:
            notify_error(ValueError("run a sweep first"))
            return
        try:
            path = write_sweep_csv(str(self.csv_path.value), self.results)
        except OSError as error:
            notify_error(error)
            return
        show_info(f"wrote {path}")
