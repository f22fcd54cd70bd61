"""A small Qt plot (lines or labelled points) drawn with QPainter: no plotting library needed."""

from __future__ import annotations

import itertools
import math

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPaintEvent, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

COLOURS = ("#f0a030", "#40a0f0", "#60d060", "#e05050")


class PlotWidget(QWidget):
    """Series of (x, y) points drawn as lines (``lines=True``) or labelled dots."""

    def __init__(self, title: str, x_label: str, y_label: str, lines: bool = True) -> None:
        super().__init__()
        self.title, self.x_label, self.y_label, self.lines = title, x_label, y_label, lines
        self.series: dict[str, list[tuple[float, float, str]]] = {}
        self.log_x = False
        self.setMinimumHeight(160)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)

    def add_point(self, name: str, x: float, y: float, label: str = "") -> None:
        if math.isfinite(x) and math.isfinite(y):
            self.series.setdefault(name, []).append((x, y, label))
            self.update()

    def clear(self) -> None:
        self.series.clear()
        self.update()

    def _x(self, x: float) -> float:
        return math.log2(max(x, 1e-9)) if self.log_x else x

    def paintEvent(self, event: QPaintEvent | None) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        area = QRectF(self.rect()).adjusted(44, 22, -10, -28)
        painter.setPen(QPen(QColor("#888888")))
        painter.drawRect(area)
        painter.drawText(QRectF(0, 0, self.width(), 20), Qt.AlignmentFlag.AlignCenter, self.title)
        painter.drawText(
            QRectF(0, self.height() - 20, self.width(), 20),
            Qt.AlignmentFlag.AlignCenter,
            self.x_label,
        )
        points = [p for values in self.series.values() for p in values]
        if not points:
            painter.end()
            return
        xs, ys = [self._x(p[0]) for p in points], [p[1] for p in points]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
        painter.drawText(
            QRectF(0, area.top() - 6, 42, 14), Qt.AlignmentFlag.AlignRight, f"{y1:.3g}"
        )
        painter.drawText(
            QRectF(0, area.bottom() - 8, 42, 14), Qt.AlignmentFlag.AlignRight, f"{y0:.3g}"
        )

        def place(x: float, y: float) -> QPointF:
            return QPointF(
                area.left() + (self._x(x) - x0) / (x1 - x0) * area.width(),
                area.bottom() - (y - y0) / (y1 - y0) * area.height(),
            )

        for index, (name, values) in enumerate(self.series.items()):
            colour = QColor(COLOURS[index % len(COLOURS)])
            painter.setPen(QPen(colour, 2))
            placed = [place(x, y) for x, y, _ in values]
            if self.lines:
                for a, b in itertools.pairwise(placed):
                    painter.drawLine(a, b)
            else:
                for point, (_, _, label) in zip(placed, values, strict=True):
                    painter.drawEllipse(point, 3, 3)
                    painter.drawText(point + QPointF(5, -4), label)
            painter.drawText(QPointF(area.right() - 90, area.top() + 14 + 14 * index), name)
        painter.end()
