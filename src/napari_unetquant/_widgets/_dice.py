"""Dock widget: Dice and IoU of prediction Labels layers against a ground-truth layer."""

from __future__ import annotations

from typing import Any

import napari
from magicgui.widgets import Label, LineEdit, PushButton, Select, Table, create_widget

from ..data.preprocess import class_indices
from ..metrics import ClassScores, SegmentationScores, class_scores, segmentation_scores
from ._common import (
    PREDICTION_KEY,
    Dock,
    foreground,
    label_classes,
    layer_volume,
    notify_error,
    show_rows,
    values_label,
)

PREDICTION_LIST_HEIGHT = 90
"""Pixels of the predictions list (about four names; it scrolls): the summary and the table
below it stay on screen after Compute."""


class DiceWidget(Dock):
    """Mean Dice, pooled Dice and IoU for one or more predictions (e.g. FP and W4A6) side by
    side, and a per-slice table: clicking a row moves the viewer to that slice."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self._viewer = napari_viewer
        self.truth = create_widget(annotation=napari.layers.Labels, label="ground truth")
        self.foreground_value = LineEdit(value="", label="foreground value")
        self.foreground_value.tooltip = (
            "ground-truth label of the object; empty: non-zero (or the classes the predictions' "
            "model learnt); several values separated by commas (1, 2): a column per class"
        )
        self.values_held = values_label(self.truth)
        self.predictions = Select(choices=self._labels_layers, label="predictions")
        self.predictions.native.setMaximumHeight(PREDICTION_LIST_HEIGHT)  # results stay in view
        self.truth.changed.connect(self.predictions.reset_choices)
        self.compute = PushButton(text="Compute Dice")
        self.summary = Label(value="", label="summary")
        self.summary.native.setWordWrap(True)  # long layer names must not widen the dock
        self.table = Table(value=[[]])
        show_rows(self.table)
        self.extend(
            [
                self.truth,
                self.foreground_value,
                self.values_held,
                self.predictions,
                self.compute,
                self.summary,
                self.table,
            ]
        )
        self.compute.clicked.connect(self.run)
        self.table.native.cellClicked.connect(self.go_to_slice)
        self.scores: dict[str, SegmentationScores | ClassScores] = {}
        self.scored = ""
        self._scored_truth: str | None = None
        napari_viewer.layers.events.removed.connect(self._forget_removed)
        self.native.destroyed.connect(
            lambda *_: napari_viewer.layers.events.removed.disconnect(self._forget_removed)
        )

    def _labels_layers(self, *_: Any) -> list[napari.layers.Labels]:
        """The Labels layers of this dock's viewer but the ground truth (the predictions to
        choose from)."""
        layers = self._viewer.layers
        truth = self.truth.value if hasattr(self, "truth") else None
        return [
            layer
            for layer in layers
            if isinstance(layer, napari.layers.Labels) and layer is not truth
        ]

    def run(self) -> None:
        """Score every chosen prediction (the Compute button): the object's mask, or each
        class of a multi-class model (label values typed as ``1, 2``, or those the chosen
        predictions' model learnt) with a column per class."""
        try:
            if self.truth.value is None or not self.predictions.value:
                raise ValueError("choose a ground-truth layer and at least one prediction")
            value, self.scored = self._foreground_value()
            classes = label_classes(value)
            truth = foreground(layer_volume(self.truth.value).array, value)
            self.scores = {}
            for layer in self.predictions.value:
                labels = layer_volume(layer).array
                if labels.shape != truth.shape:
                    raise ValueError(
                        f"{layer.name!r} has shape {labels.shape} but the ground truth has "
                        f"{truth.shape}; compare layers of the same image"
                    )
                if classes is None:
                    self.scores[layer.name] = segmentation_scores(labels != 0, truth)
                else:
                    predicted = class_indices(labels, classes, layer.name)
                    self.scores[layer.name] = class_scores(predicted, truth, classes)
        except ValueError as error:
            notify_error(error)
            return
        self._scored_truth = self.truth.value.name
        self._show()

    def _foreground_value(self) -> tuple[str, str]:
        """The ground-truth value(s) to score and how to say it: those typed, else what the
        chosen predictions' model was trained on (when they agree: its classes, or its
        foreground value), else non-zero."""
        typed = self.foreground_value.value.strip()
        if typed:
            return typed, f"ground-truth value {typed}"
        made_by = [layer.metadata.get(PREDICTION_KEY, {}) for layer in self.predictions.value]
        learnt = {tuple(m["classes"]) if m.get("classes") else None for m in made_by}
        if len(learnt) == 1 and (classes := learnt.pop()) is not None:
            text = ", ".join(map(str, classes))
            return text, f"ground-truth values {text} (the classes the model learnt)"
        trained = {m.get("foreground_value") for m in made_by}
        if len(trained) == 1 and (value := trained.pop()) is not None:
            return str(value), f"ground-truth value {value} (the value the model was trained on)"
        return "", "non-zero ground truth"

    def _forget_removed(self, event: Any) -> None:
        """A removed layer's scores leave the readout (all of them with the ground truth)."""
        name = event.value.name
        if name == self._scored_truth:
            self.scores = {}
        self.scores.pop(name, None)
        if self.scores:
            self._show()
        else:
            self.summary.value, self.table.value = "", [[]]

    def _show(self) -> None:
        lines = []
        columns: dict[str, list[float]] = {}
        for name, s in self.scores.items():
            if isinstance(s, ClassScores):
                each = ", ".join(f"{value}: {c.dice_mean:.4f}" for value, c in s.per_class.items())
                lines.append(
                    f"{name}: mean Dice over classes {s.dice_mean_over_classes:.4f} ({each}), "
                    f"IoU {s.iou_mean_over_classes:.4f}"
                )
                for value, c in s.per_class.items():
                    columns[f"Dice {name} [{value}]"] = [round(d, 4) for d in c.dice_per_slice]
            else:
                lines.append(
                    f"{name}: mean Dice {s.dice_mean:.4f}, volume Dice {s.dice_volume:.4f}, "
                    f"IoU {s.iou_mean:.4f}"
                )
                columns[f"Dice {name}"] = [round(d, 4) for d in s.dice_per_slice]
        self.summary.value = f"scoring {self.scored}\n" + "\n".join(lines)
        slices = next(iter(self.scores.values())).n_slices
        self.table.value = {"slice": list(range(slices)), **columns}

    def go_to_slice(self, row: int, _column: int = 0) -> None:
        """Move the viewer to slice ``row`` of the ground truth (a table click)."""
        layer = self.truth.value
        if layer is None or layer.data.ndim < 3:
            return
        world = layer.translate[0] + row * layer.scale[0]
        self._viewer.dims.set_point(0, float(world))
