"""The docks' plots: matplotlib's Qt canvas with axes, ticks, a legend and PNG/SVG export."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtWidgets import QFileDialog, QPushButton, QSizePolicy, QVBoxLayout, QWidget

from ._common import notify_error

FORMATS = (".png", ".svg", ".pdf")
MIN_HEIGHT = 130
"""The canvas's least height: with its Save button, no taller than the plot it replaced."""


class PlotWidget(QWidget):
    """Series of (x, y) points drawn as lines (``lines=True``) or labelled dots; with
    ``pareto``, the front of the points no other beats on both axes (smaller x, higher y)."""

    def __init__(
        self, title: str, x_label: str, y_label: str, lines: bool = True, pareto: bool = False
    ) -> None:
        super().__init__()
        self.title, self.x_label, self.y_label = title, x_label, y_label
        self.lines, self.pareto = lines, pareto
        self.series: dict[str, list[tuple[float, float, str]]] = {}
        self.log_x = False
        self.figure = Figure(figsize=(4.0, 2.8), layout="constrained")
        self.axes = self.figure.add_subplot()
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(MIN_HEIGHT)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.export = QPushButton("Save plot...")
        self.export.clicked.connect(self._ask_and_save)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        layout.addWidget(self.export)
        self._draw()

    def add_point(self, name: str, x: float, y: float, label: str = "") -> None:
        if math.isfinite(x) and math.isfinite(y):
            self.series.setdefault(name, []).append((x, y, label))
            self._draw()

    def clear(self) -> None:
        self.series.clear()
        self._draw()

    def save(self, path: str | Path) -> Path:
        """The figure as PNG, SVG or PDF (by suffix; ``.png`` added when there is none)."""
        target = Path(path)
        if target.suffix.lower() not in FORMATS:
            target = target.with_name(target.name + ".png")
        self.figure.savefig(target, dpi=150)
        return target

    def pareto_front(self) -> list[tuple[float, float, str]]:
        """The points no other point beats on both axes (no smaller x with a y as high)."""
        points = sorted(p for values in self.series.values() for p in values)
        front: list[tuple[float, float, str]] = []
        for point in points:
            if not front or point[1] > front[-1][1]:
                front.append(point)
        return front

    def _ask_and_save(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Save plot", f"{self.title}.png", "Images (*.png *.svg *.pdf)"
        )
        if path:
            try:
                self.save(path)
            except (OSError, ValueError) as error:
                notify_error(error)

    def _draw(self) -> None:
        axes = self.axes
        axes.clear()
        axes.set_title(self.title, fontsize=10)
        axes.set_xlabel(self.x_label, fontsize=9)
        axes.set_ylabel(self.y_label, fontsize=9)
        axes.tick_params(labelsize=8)
        axes.grid(alpha=0.3)
        for name, values in self.series.items():
            xs, ys = [v[0] for v in values], [v[1] for v in values]
            if self.lines:
                axes.plot(xs, ys, label=name, marker="." if len(xs) < 3 else None)
                continue
            axes.scatter(xs, ys, label=name, zorder=3)
            for x, y, text in values:
                axes.annotate(text, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8)
        if self.pareto and len(self.pareto_front()) > 1:
            front = self.pareto_front()
            axes.plot(
                [p[0] for p in front],
                [p[1] for p in front],
                "--",
                color="grey",
                label="Pareto front",
            )
        if self.log_x and any(self.series.values()):
            axes.set_xscale("log", base=2)
        if len(axes.get_legend_handles_labels()[0]) > 1:  # one series needs no legend
            axes.legend(fontsize=8, loc="best")
        elif not self.series:  # no made-up axis range before the first point
            axes.set_xticks([])
            axes.set_yticks([])
            axes.text(0.5, 0.5, "no points yet", ha="center", va="center", transform=axes.transAxes)
        axes.margins(x=0.15, y=0.2)  # room for the point labels at the edges
        self.canvas.draw_idle()
