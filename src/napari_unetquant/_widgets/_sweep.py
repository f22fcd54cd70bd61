"""Dock widget: the paper's accuracy-memory trade-off on the current data."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import napari
from magicgui.widgets import (
    FileEdit,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
    Table,
)
from napari.qt.threading import GeneratorWorker, thread_worker
from napari.utils.notifications import show_info

from ..config import QuantConfig, TrainConfig, UNetConfig
from ..data.io import atomic_path
from ..jobs import SweepResult, sweep
from . import _session
from ._common import Persistent, TrainingInputs, notify_error
from ._plot import PlotWidget

DEFAULT_SETTINGS = "FP, W8A8, W4A6, W4A4-lsq, W2A4, ternary, binary"


class SweepWidget(TrainingInputs):
    """Train or fine-tune a list of bit configurations and plot validation Dice against stored
    bits and model size; the table exports to CSV."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer)
        self.settings = LineEdit(value=DEFAULT_SETTINGS, label="settings")
        self.fp_steps = SpinBox(value=300, min=1, max=100_000, label="FP steps")
        self.quant_steps = SpinBox(value=150, min=1, max=100_000, label="fine-tune steps")
        self.start = PushButton(text="Run sweep")
        self.stop = PushButton(text="Stop", enabled=False)
        self.status = Label(value="", label="status")
        self.table = Table(value=[[]])
        self.csv_path = FileEdit(mode="w", filter="*.csv", label="CSV file")
        self.export = PushButton(text="Export CSV", enabled=False)
        self.extend(
            [
                self.settings,
                self.fp_steps,
                self.quant_steps,
                self.start,
                self.stop,
                self.status,
                self.table,
                self.csv_path,
                self.export,
            ]
        )
        self.by_bits = PlotWidget("Dice vs bits", "mean stored weight bits (log)", "Dice", False)
        self.by_size = PlotWidget("Dice vs size", "stored KiB (log)", "Dice", False)
        self.by_bits.log_x = self.by_size.log_x = True
        self.native.layout().addWidget(self.by_bits)
        self.native.layout().addWidget(self.by_size)
        self.persist = Persistent(
            "sweep",
            {
                "settings": self.settings,
                "fp_steps": self.fp_steps,
                "quant_steps": self.quant_steps,
            },
        )
        self.start.clicked.connect(self.run)
        self.stop.clicked.connect(lambda: self.worker and self.worker.quit())
        self.export.clicked.connect(self.export_csv)
        self.results: list[SweepResult] = []
        self.worker: GeneratorWorker | None = None

    def _settings(self) -> list[QuantConfig]:
        labels = [part for part in self.settings.value.split(",") if part.strip()]
        if not labels:
            raise ValueError(f"list the settings to compare, e.g. {DEFAULT_SETTINGS}")
        return [QuantConfig.from_label(label) for label in labels]

    def run(self) -> None:
        """Start the sweep in a worker thread."""
        try:
            settings = self._settings()
            image, labels = self.training_data()
        except ValueError as error:
            notify_error(error)
            return
        fp = [m for m in _session.models().values() if m.quant.is_float]
        fp_model = fp[-1] if fp else None
        unet = UNetConfig(base_width=self.network_width.value)

        def loop() -> Any:
            for quant in settings:  # each setting with its own step count
                steps = self.fp_steps.value if quant.is_float else self.quant_steps.value
                config = TrainConfig(
                    steps=steps,
                    validate_every=max(10, steps // 5),
                    learning_rate=1e-3 if quant.is_float else 5e-4,
                )
                yield from sweep(image, labels, [quant], config, self._fp(fp_model), unet)

        self.results = []
        self.by_bits.clear()
        self.by_size.clear()
        self.worker = thread_worker(
            loop, progress={"total": 0, "desc": "Bit-width sweep"}, ignore_errors=True
        )()
        self.worker.errored.connect(notify_error)  # a notification, not re-raised
        self.worker.yielded.connect(self._on_event)
        self.worker.finished.connect(self._finished)
        self.start.enabled, self.stop.enabled = False, True
        self.worker.start()

    def _fp(self, fallback: Any) -> Any:
        trained = [r.model for r in self.results if r.model.quant.is_float]
        return trained[-1] if trained else fallback

    def _on_event(self, event: Any) -> None:
        if isinstance(event, SweepResult):
            self.results.append(event)
            _session.add_model(f"{event.label} (sweep)", event.model)
            self.by_bits.add_point("Dice", event.mean_weight_bits, event.dice, event.label)
            self.by_size.add_point("Dice", event.stored_bytes / 1024, event.dice, event.label)
            rows = [r.row() for r in self.results]
            self.table.value = {key: [row[key] for row in rows] for key in rows[0]}
            self.status.value = f"{event.label}: validation Dice {event.dice:.3f}"
        elif hasattr(event, "loss"):
            self.status.value = f"step {event.step}/{event.steps}, loss {event.loss:.3f}"

    def _finished(self) -> None:
        self.start.enabled, self.stop.enabled = True, False
        self.export.enabled = bool(self.results)

    def export_csv(self) -> None:
        """Write the table to the chosen CSV file."""
        if not self.results:
            notify_error(ValueError("run a sweep first"))
            return
        path = Path(str(self.csv_path.value))
        if path.suffix.lower() != ".csv":
            path = path.with_suffix(".csv")
        try:
            with atomic_path(path) as temporary, temporary.open("w", newline="") as handle:
                rows = [r.row() for r in self.results]
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        except OSError as error:
            notify_error(error)
            return
        show_info(f"wrote {path}")
