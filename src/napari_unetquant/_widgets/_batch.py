"""Dock widget: segment a list of volume files into a folder, with Dice per volume."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import napari
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FileEdit,
    FloatSlider,
    Label,
    LineEdit,
    PushButton,
    Table,
)
from napari.qt.threading import GeneratorWorker

from ..batch import SegmentedFile, plan_batch, segment_batch, write_scores_csv
from ..config import InferConfig
from ._common import (
    DEVICES,
    INTENSITY_TIP,
    Dock,
    Persistent,
    model_file_preprocess,
    notify_error,
    show_rows,
    shown_intensity,
    start_worker,
)
from ._io import read_layers

CSV_NAME = "segment.csv"


BINARY = {"dice_volume", "dice_mean"}
"""The Dice columns of every row (for a multi-class model: of its foreground, any class)."""


class BatchWidget(Dock):
    """Segment many files with a model file, streamed a few slices at a time (volumes larger
    than memory work); masks and ``segment.csv`` go to the output folder, Dice per volume
    appears in the table when label files are given (same order as the images).

    The model decides the intensity mapping (its CT window or the z-score), shown read-only:
    a model only works on the values it was trained on. Unlike Segment, the files are not
    checked for Hounsfield units (the worker reads them, one after another)."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self._viewer = napari_viewer
        self.images = FileEdit(mode="rm", label="images")
        self.labels_files = FileEdit(mode="rm", label="labels (optional)")
        self.labels_files.tooltip = "one label file per image, in the same order"
        self.model_file = FileEdit(mode="r", filter="*.safetensors", label="model file")
        self.intensity = Label(value="", label="intensity")
        self.intensity.native.setWordWrap(True)
        self.intensity.tooltip = INTENSITY_TIP
        self.model_file.changed.connect(
            lambda path: setattr(
                self.intensity, "value", shown_intensity(model_file_preprocess(path))
            )
        )
        self.out_dir = FileEdit(mode="d", label="output folder")
        self.foreground_value = LineEdit(value="", label="foreground value")
        self.foreground_value.tooltip = "label value scored; empty: every non-zero label"
        self.threshold = FloatSlider(
            value=InferConfig.threshold, min=0.05, max=0.95, step=0.05, label="threshold"
        )
        self.device = ComboBox(choices=DEVICES, value="auto", label="device")
        self.integer = CheckBox(value=False, text="integer arithmetic (CPU)")
        self.open_masks = CheckBox(value=False, text="open each mask as a layer")
        self.start = PushButton(text="Segment all")
        self.stop = PushButton(text="Stop", enabled=False)
        self.status = Label(value="", label="status")
        self.table = Table(value=[[]])
        show_rows(self.table)
        self.extend(
            [
                self.images,
                self.labels_files,
                self.model_file,
                self.intensity,
                self.out_dir,
                self.foreground_value,
                self.threshold,
                self.device,
                self.integer,
                self.open_masks,
                self.start,
                self.stop,
                self.status,
                self.table,
            ]
        )
        self.persist = Persistent(
            "batch", {"threshold": self.threshold, "device": self.device, "integer": self.integer}
        )
        self.start.clicked.connect(self.run)
        self.stop.clicked.connect(lambda: self.worker and self.worker.quit())
        self.results: list[SegmentedFile] = []
        self.worker: GeneratorWorker | None = None

    def _paths(self, widget: FileEdit) -> list[str]:
        value = widget.value
        paths = value if isinstance(value, (list, tuple)) else [value]
        return [str(p) for p in paths if str(p) not in ("", ".")]

    def run(self) -> None:
        """Segment every image in a worker thread (the *Segment all* button)."""
        try:
            images = self._paths(self.images)
            labels = self._paths(self.labels_files) or None
            out_dir = str(self.out_dir.value)
            if out_dir in ("", "."):
                raise ValueError("choose an output folder for the masks")
            model = str(self.model_file.value)
            if not Path(model).is_file():
                raise ValueError(f"{model}: choose a model file (.safetensors)")
            items = plan_batch(images, out_dir, labels)
            foreground = self.foreground_value.value.strip()
            value = int(foreground) if foreground else None
            config = InferConfig(threshold=self.threshold.value, integer=self.integer.value)
            device = self.device.value  # read on the GUI thread, not in the worker
        except ValueError as error:
            notify_error(error)
            return
        self.results = []
        self.table.value = [[]]
        self.status.value = f"0 of {len(items)} volumes"

        def work() -> Generator[SegmentedFile, None, None]:
            yield from segment_batch(model, items, config, device, value)

        self.worker = start_worker(
            work,
            {"total": len(items), "desc": "Segmenting volumes"},
            (self.start, self.stop),
            on_yield=self._show,
            on_finish=lambda: self._finish(out_dir, len(items)),
        )

    def _show(self, result: SegmentedFile) -> None:
        self.results.append(result)
        rows = [result.row() for result in self.results]
        # a multi-class model's rows have a Dice column per class (dice_<label value>)
        per_class = sorted({k for row in rows for k in row if k.startswith("dice_")} - BINARY)
        keys = ["dice_volume", *per_class, "foreground_voxels", "error"]
        names = ["Dice", *(f"Dice {k.removeprefix('dice_')}" for k in per_class)]
        self.table.value = {
            "data": [[row.get(k, "") for k in keys] for row in rows],
            "index": [Path(row["image"]).name for row in rows],
            "columns": [*names, "foreground voxels", "error"],
        }
        if result.error is None and self.open_masks.value:
            for data, meta, _ in read_layers(result.out):
                self._viewer.add_labels(data, **meta)

    def _finish(self, out_dir: str, total: int) -> None:
        failed = sum(r.error is not None for r in self.results)
        if self.results:  # what finished is kept even when stopped part-way
            try:
                write_scores_csv(Path(out_dir) / CSV_NAME, self.results)
            except OSError as error:
                notify_error(error)
        self.status.value = (
            f"{len(self.results)} of {total} volumes done, {failed} failed; "
            f"masks and {CSV_NAME} in {out_dir}"
        )
        errors = [r.error for r in self.results if r.error is not None]
        if errors:  # the table says which; a notification makes sure it is seen
            notify_error(ValueError(f"{failed} of {total} volumes failed: {errors[0]}"))
        self.worker = None
