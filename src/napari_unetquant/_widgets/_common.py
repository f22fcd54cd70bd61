"""What the widgets share: layers to volumes, settings that persist, error notifications."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable, Generator
from typing import Any

import napari
import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
    Table,
    create_widget,
)
from magicgui.widgets.bases import ValueWidget
from napari.layers import Image, Labels
from napari.qt.threading import GeneratorWorker, thread_worker
from napari.utils.notifications import show_error
from qtpy.QtCore import QEvent, QObject, QSettings, Qt, QTimer
from qtpy.QtWidgets import QDockWidget, QFrame, QMainWindow, QScrollArea, QWidget

from ..config import PreprocessConfig, UNetConfig
from ..data.io import SliceSource, Volume, array_source
from ..data.preprocess import check_classes, class_indices, foreground_mask, label_values
from ..errors import settings_hint
from ..modelio import _preprocess_from_dict, read_metadata
from ..recipes import QuantChoice
from ._io import VOLUME_KEY

QUANTIZERS = [
    ("fixed point", "fixed"),
    ("learned step (LSQ)", "lsq"),
    ("ternary", "ternary"),
    ("binary", "binary"),
    ("full precision", "float"),
]
BIT_METHODS = ("fixed", "lsq")
"""Quantizers whose bit widths the user chooses."""
DEVICES = ["auto", "cpu", "cuda", "mps"]
PREDICTION_KEY = "napari_unetquant_prediction"
"""Layer metadata of a Segment result: the model's label and the foreground value it was
trained on (the Dice readout scores that value of the ground truth by default)."""


def layer_volume(layer: Image | Labels) -> Volume:
    """A layer's data as ``(S, H, W)`` slices, with the spacing the file had (or the layer's
    scale) so resampling matches the command line."""
    if isinstance(layer, Image) and layer.rgb:
        raise ValueError(f"layer {layer.name!r} is colour (RGB); choose a greyscale image")
    data = np.asarray(layer.data)
    if data.ndim not in (2, 3):
        raise ValueError(
            f"layer {layer.name!r} has {data.ndim} dimensions; choose a 2D image or a 3D stack"
        )
    stack = data[None] if data.ndim == 2 else data
    source = layer.metadata.get(VOLUME_KEY)
    if isinstance(source, Volume) and source.array.shape == stack.shape:
        return Volume(stack, source.spacing, source.affine, source.source)
    scale = tuple(float(s) for s in layer.scale[-2:])
    spacing = scale if scale != (1.0, 1.0) else None
    return Volume(stack, spacing, None, layer.name)  # type: ignore[arg-type]


def layer_source(layer: Image) -> SliceSource:
    """An image layer's data as a streamed ``(S, H, W)`` source: NumPy, dask or zarr data is
    read (or computed) a run of slices at a time, never all at once; multiscale layers use
    their full-resolution level."""
    if layer.rgb:
        raise ValueError(f"layer {layer.name!r} is colour (RGB); choose a greyscale image")
    data = layer.data[0] if layer.multiscale else layer.data
    if data.ndim not in (2, 3):
        raise ValueError(
            f"layer {layer.name!r} has {data.ndim} dimensions; choose a 2D image or a 3D stack"
        )
    shape = tuple(data.shape) if data.ndim == 3 else (1, *data.shape)
    source = layer.metadata.get(VOLUME_KEY)
    if isinstance(source, Volume) and source.shape == shape:
        return array_source(data, source.spacing, source.affine, source.source)
    scale = tuple(float(s) for s in layer.scale[-2:])
    spacing = scale if scale != (1.0, 1.0) else None
    return array_source(data, spacing, None, layer.name)  # type: ignore[arg-type]


def foreground_number(value: str) -> int | None:
    """The foreground value typed in a dock: ``None`` (empty: every non-zero label) or a
    whole number."""
    text = value.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"foreground value {value!r} is not a whole number; leave it empty for non-zero, "
            f"or give several values separated by commas (1, 2) for several classes"
        ) from None


def label_classes(value: str) -> tuple[int, ...] | None:
    """Several label values typed in a training dock (``1, 2``): the classes of one
    multi-class model; ``None`` for one value or none (a binary model)."""
    if "," not in value:
        foreground_number(value)  # the same checks and message
        return None
    classes = tuple(foreground_number(part) for part in value.split(",") if part.strip())
    if any(number is None for number in classes):
        raise ValueError(f"label values {value!r}: give whole numbers separated by commas")
    found = tuple(int(number) for number in classes if number is not None)
    check_classes(found)
    return found if len(found) > 1 else None


def foreground(labels: np.ndarray, value: str) -> np.ndarray:
    """The training target of a labels array: the object mask (``value`` empty means every
    non-zero label), or class indices for several values (:func:`label_classes`)."""
    classes = label_classes(value)
    if classes is not None:
        missing = [v for v in classes if not (np.asarray(labels) == v).any()]
        if missing:
            raise ValueError(
                f"no pixel of the labels has the value {', '.join(map(str, missing))}; they "
                f"hold {label_values(labels)}; choose among those"
            )
        return class_indices(labels, classes)
    number = foreground_number(value)
    if number is None:
        return foreground_mask(labels)
    mask = foreground_mask(labels, number)
    if not mask.any():
        raise ValueError(
            f"no pixel of the labels has the value {number}; they hold {label_values(labels)}; "
            f"choose one of those"
        )
    return mask


VALUES_LIMIT = 50_000_000
"""Labels layers up to this many pixels show the values they hold (larger ones: not read)."""


def values_text(layer: Labels | None) -> str:
    """What a Labels layer holds, for the dock to show beside its foreground value."""
    if layer is None:
        return ""
    if int(np.prod(layer.data.shape)) > VALUES_LIMIT:
        return "(too large to list)"
    return label_values(np.asarray(layer.data))


def values_label(labels: ValueWidget[Any]) -> Label:
    """A label showing the values the chosen Labels layer holds (an ISBI mask: 0 = membrane
    and 255 = interior; the default foreground, non-zero, is the interior)."""
    held = Label(value=values_text(labels.value), label="values held")
    held.native.setWordWrap(True)
    labels.changed.connect(lambda layer: setattr(held, "value", values_text(layer)))
    return held


def quant_choice(method: str, weight_bits: int, act_bits: int, paper: bool) -> QuantChoice:
    """The dock's quantization controls as the recipe's choice: the bit boxes count for fixed
    point and LSQ only (ternary, binary and full precision have their own widths)."""
    if paper:
        return QuantChoice.paper()
    if method in BIT_METHODS:
        return QuantChoice(method, weight_bits, act_bits)
    return QuantChoice(method)


CT_PRESETS = {
    "soft tissue": (40.0, 400.0),
    "abdomen": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
"""Common CT windows, ``(level, width)`` in Hounsfield units."""
ZSCORE, CUSTOM = "z-score", "custom"
INTENSITIES = [
    ("z-score (MRI, EM)", ZSCORE),
    *((f"CT window: {name} {lw[0]:g}/{lw[1]:g}", name) for name, lw in CT_PRESETS.items()),
    ("CT window: custom level/width", CUSTOM),
]
AIR_HU = -500.0
"""CT in Hounsfield units holds air (about -1000 HU) around the body, or the scanner's padding
(-1024 or lower) outside its field of view: an image with nothing below this is most likely
not in HU (an MRI or EM image, or CT stored without its rescale)."""


class IntensityChoice:
    """The Train dock's intensity mapping: the per-slice z-score, or a CT window from a preset
    (its level and width shown, greyed) or typed in (custom). The network learns the values
    this mapping gives, so a model keeps it: Segment and Batch show it, never change it."""

    def __init__(self) -> None:
        self.intensity = ComboBox(choices=INTENSITIES, value=ZSCORE, label="intensity")
        self.intensity.tooltip = (
            "z-score: images with a pixel size (NIfTI, DICOM) get a local z-score in a 10 mm "
            "neighbourhood (independent of the field of view and the scanner's gain), others "
            "each slice to mean 0, SD 1; CT window: HU clipped to it"
        )
        self.level = SpinBox(value=40, min=-2000, max=4000, step=10, label="CT level (HU)")
        self.width = SpinBox(value=400, min=1, max=8000, step=10, label="CT width (HU)")
        self.intensity.changed.connect(self.refresh)

    @property
    def widgets(self) -> list[ValueWidget[Any]]:
        return [self.intensity, self.level, self.width]

    def refresh(self, *_: Any) -> None:
        """A preset's level and width in the (greyed) boxes; the boxes only for CT windows."""
        preset = CT_PRESETS.get(self.intensity.value)
        if preset is not None:
            self.level.value, self.width.value = int(preset[0]), int(preset[1])
        self.level.enabled = self.width.enabled = self.intensity.value == CUSTOM
        self.level.visible = self.width.visible = self.intensity.value != ZSCORE

    def window(self) -> tuple[float, float] | None:
        """``(level, width)`` in HU, or ``None`` for the per-slice z-score."""
        if self.intensity.value == ZSCORE:
            return None
        return float(self.level.value), float(self.width.value)


def intensity_text(preprocess: PreprocessConfig) -> str:
    """A model's intensity mapping as the Segment and Batch docks show it."""
    window = preprocess.ct_window
    names = [name for name, preset in CT_PRESETS.items() if window and preset == tuple(window)]
    return preprocess.intensity_text + (f" ({names[0]})" if names else "")


def model_file_preprocess(path: object) -> PreprocessConfig | None:
    """The preprocessing a model file was trained with, from its metadata alone (no weights
    are read, so choosing a file stays quick); ``None`` when no readable model is chosen (the
    run says why)."""
    if str(path) in ("", "."):
        return None
    try:
        return _preprocess_from_dict(read_metadata(str(path)).get("preprocess") or {})
    except (OSError, ValueError, TypeError, IndexError):
        return None


def shown_intensity(preprocess: PreprocessConfig | None) -> str:
    """What the Segment and Batch docks' *intensity* row says for a model's preprocessing."""
    return "" if preprocess is None else f"{intensity_text(preprocess)}, as trained"


INTENSITY_TIP = (
    "a model runs with the intensity mapping it was trained with; for another CT window, "
    "train a model with it (Train dock: intensity)"
)


def middle_slice(layer: Image) -> np.ndarray:
    """One slice of an image layer (its coarsest level), to check quickly what it holds."""
    data = layer.data[-1] if layer.multiscale else layer.data
    return np.asarray(data[data.shape[0] // 2] if data.ndim == 3 else data)


def not_hu_warning(values: np.ndarray, name: str) -> str | None:
    """Why ``values`` (an image, or a slice of it) do not look like CT in Hounsfield units,
    or ``None`` when they may be (a warning, not a refusal: a crop inside the body has no
    air either)."""
    if values.size == 0 or float(np.min(values)) < AIR_HU:
        return None
    return (
        f"{name} has no value below {AIR_HU:g}, so it does not look like a CT image in "
        f"Hounsfield units (air is -1000 HU)"
    )


CONTROLS = {
    "act_bits": "activation bits",
    "act_format": "paper formats",
    "batch_size": "",
    "classes": "",
    "ct_window": "intensity",
    "device": "device",
    "edge_bits": "",
    "elastic": "",
    "engine": "engine",
    "foreground_value": "foreground value",
    "init": "fine-tune from this session's FP model",
    "input_size": "",
    "intensity": "",
    "integer": "integer arithmetic (CPU)",
    "labels_dir": "labels",
    "network": "network",
    "out": "",
    "out_dir": "output folder",
    "processes": "",
    "resume": "",
    "size_budget": "size budget",
    "spacing": "",
    "weight_bits": "weight bits",
    "weight_format": "paper formats",
}
"""The dock control behind each setting a core error may name (empty: no dock has one)."""


def one_line(error: BaseException) -> str:
    """An error's message on one line, naming the control of any setting it concerns."""
    return settings_hint(error, CONTROLS, " (see: {})")


def notify_error(error: BaseException) -> None:
    """Show a worker's or a check's error as a napari notification, never a traceback; where
    the core names a setting, the notification names its control."""
    show_error(one_line(error))


def start_worker(
    work: Callable[[], Generator[Any, None, Any]],
    progress: dict[str, Any],
    buttons: tuple[PushButton, PushButton | None],
    on_yield: Callable[[Any], None] | None = None,
    on_return: Callable[[Any], None] | None = None,
    on_finish: Callable[[], None] | None = None,
    on_orphaned: Callable[[], None] | None = None,
) -> GeneratorWorker:
    """Run the generator ``work()`` in a napari worker thread (stoppable between the items
    it yields), with napari's activity-panel ``progress``; errors become notifications. The
    ``buttons`` (start, stop) are disabled while it runs, and enabled again after.

    When the dock goes away (its start button is destroyed: the dock or the viewer closed), the
    worker is asked to stop after its current item, and none of the dock's callbacks run any
    more (they would touch deleted widgets); ``on_orphaned`` runs instead, once it finished.
    """

    def loop() -> Generator[Any, None, Any]:
        return (yield from work())

    worker: GeneratorWorker = thread_worker(loop, progress=progress, ignore_errors=True)()
    alive = [True]

    def orphaned(*_: Any) -> None:
        alive[0] = False
        worker.quit()

    def guarded(callback: Callable[..., None]) -> Callable[..., None]:
        return lambda *args: callback(*args) if alive[0] else None

    start, stop = buttons
    start.native.destroyed.connect(orphaned)
    worker.errored.connect(  # a notification, not re-raised into Qt
        lambda error: notify_error(error) if alive[0] else print(one_line(error), file=sys.stderr)
    )
    if on_yield is not None:
        worker.yielded.connect(guarded(on_yield))
    if on_return is not None:
        worker.returned.connect(guarded(on_return))

    def finished() -> None:
        if not alive[0]:
            if on_orphaned is not None:
                on_orphaned()
            return
        start.native.destroyed.disconnect(orphaned)
        start.enabled = True
        if stop is not None:
            stop.enabled = False
        if on_finish is not None:
            on_finish()

    worker.finished.connect(finished)
    start.enabled = False
    if stop is not None:
        stop.enabled = True
    worker.start()
    return worker


SETTINGS_DIR = "NAPARI_UNETQUANT_SETTINGS_DIR"


class Persistent:
    """Values of some widgets kept between napari sessions (QSettings; the folder named by
    ``$NAPARI_UNETQUANT_SETTINGS_DIR`` instead of the user's, when set)."""

    def __init__(self, group: str, widgets: dict[str, ValueWidget[Any]]) -> None:
        folder = os.environ.get(SETTINGS_DIR)
        if folder:
            path = os.path.join(folder, f"{group}.ini")
            self._settings = QSettings(path, QSettings.Format.IniFormat)
        else:
            self._settings = QSettings("napari-unetquant", group)
        for key, widget in widgets.items():
            stored = self._settings.value(key)
            if stored is not None:
                try:
                    if isinstance(widget.value, bool):
                        widget.value = str(stored).lower() == "true"
                    else:
                        widget.value = type(widget.value)(stored)
                except (TypeError, ValueError):
                    pass  # an old or foreign value: keep the default
            widget.changed.connect(lambda value, key=key: self._settings.setValue(key, value))


STACKED = 2
"""Of this plugin's docks in one side of the window, this many stack one above the other;
the next ones open as tabs of the last (five stacked docks would be two rows high each)."""


_DOCKS_MADE = itertools.count()


class _FitWidth(QObject):
    """Keeps a scroll area as wide as its controls need beside the vertical scroll bar (it
    never scrolls sideways): magicgui sets that width as controls are added, before napari's
    style makes them wider, so the right edge would hide under the scroll bar."""

    def __init__(self, scroll: QScrollArea) -> None:
        super().__init__(scroll)
        self._scroll = scroll

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if event.type() in (QEvent.Type.LayoutRequest, QEvent.Type.Show):
            scroll = self._scroll
            needed = (
                scroll.widget().minimumSizeHint().width()
                + scroll.verticalScrollBar().sizeHint().width()
                + 2 * scroll.frameWidth()
            )
            if scroll.minimumWidth() != needed:
                scroll.setMinimumWidth(needed)
        return False


class Dock(Container):
    """A dock's controls in a scroll area of their own, so that several docks open at once
    share the window's height (each scrolling) instead of growing the window past the screen;
    past :data:`STACKED` docks, a new one opens as a tab of the last.

    magicgui's ``scrollable`` container keeps the scroll area apart from ``.native``, the
    widget napari docks; here ``.native`` is the scroll area itself, so napari docks it
    (``native.parent()`` is then the dock, as napari documents). The controls stack from the
    top; :meth:`add_native` appends a Qt widget (a plot) below them.
    """

    def __init__(self) -> None:
        super().__init__(labels=True, scrollable=True)
        scroll = self.root_native_widget
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        self._form = scroll.widget()
        self._form.layout().addStretch()  # controls keep their height when the dock is tall
        self._fit_width = _FitWidth(scroll)
        self._form.installEventFilter(self._fit_width)
        self._made = next(_DOCKS_MADE)  # the order docks opened in (Qt's order of children
        # changes as docks become tabs)
        # napari docks the widget once it is made; arrange it on the next turn of the event
        # loop (a timer owned by the scroll area never fires after the dock is gone)
        arrange = QTimer(scroll)
        arrange.setSingleShot(True)
        arrange.timeout.connect(self._arrange)
        arrange.start(0)

    def _arrange(self) -> None:
        """Open as a tab of this plugin's last dock on the same side when :data:`STACKED` of
        them are stacked there already (docks opened before this one: several opened at once
        arrange in their order), and share the height evenly between the stacks."""
        dock = self.native.parentWidget()
        window = dock.parentWidget() if isinstance(dock, QDockWidget) else None
        if not isinstance(window, QMainWindow) or dock.isFloating():
            return
        area = window.dockWidgetArea(dock)
        earlier = {
            widget._made: other
            for other in window.findChildren(QDockWidget)
            if isinstance(widget := getattr(other.widget(), "_magic_widget", None), Dock)
            and widget._made < self._made
            and window.dockWidgetArea(other) == area
            and other.isVisibleTo(window)
            and not other.isFloating()
        }
        ours = [earlier[made] for made in sorted(earlier)]
        stacks: list[QDockWidget] = []  # one dock of each stack (a group of tabs or a dock)
        for other in ours:
            if not any(tab in stacks for tab in window.tabifiedDockWidgets(other)):
                stacks.append(other)
        if len(stacks) >= STACKED:
            window.tabifyDockWidget(ours[-1], dock)
            dock.show()
            dock.raise_()
        else:
            stacks.append(dock)
        if len(stacks) > 1:
            window.resizeDocks(stacks, [1] * len(stacks), Qt.Orientation.Vertical)

    @property
    def native(self) -> QScrollArea:  # type: ignore[override]
        """The scroll area: what napari docks."""
        scroll: QScrollArea = self.root_native_widget
        return scroll

    def add_native(self, widget: QWidget) -> None:
        """A Qt widget below the controls (above the stretch that keeps them at the top)."""
        layout = self._form.layout()
        layout.insertWidget(layout.count() - 1, widget)


TABLE_ROWS = 8


def show_rows(table: Table, rows: int = TABLE_ROWS) -> None:
    """Make ``table`` at least ``rows`` rows tall (with its header and a horizontal scroll
    bar): the dock scrolls instead, so a result table is never a two-row slit."""
    native = table.native
    height = (
        native.horizontalHeader().sizeHint().height()
        + rows * native.verticalHeader().defaultSectionSize()
        + native.horizontalScrollBar().sizeHint().height()
        + 2 * native.frameWidth()
    )
    native.setMinimumHeight(height)


class TrainingInputs(Dock):
    """The inputs every training widget starts with: image, ground truth, the label value of
    the object, and the network width."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self._viewer = napari_viewer
        self.image = create_widget(annotation=napari.layers.Image, label="image")
        self.ground_truth = create_widget(annotation=napari.layers.Labels, label="ground truth")
        self.foreground_value = LineEdit(value="", label="foreground value")
        self.foreground_value.tooltip = (
            "label value of the object; empty: every non-zero label; several values "
            "separated by commas (1, 2): one model of several classes"
        )
        self.values_held = values_label(self.ground_truth)
        self.network_width = SpinBox(
            value=UNetConfig.base_width, min=4, max=128, step=4, label="network width"
        )
        self.extend(
            [
                self.image,
                self.ground_truth,
                self.foreground_value,
                self.values_held,
                self.network_width,
            ]
        )

    def training_data(self) -> tuple[Volume, np.ndarray]:
        """The chosen image as a volume and the object mask ``(S, H, W)``."""
        if self.image.value is None or self.ground_truth.value is None:
            raise ValueError("choose an image layer and a ground-truth Labels layer first")
        labels = layer_volume(self.ground_truth.value).array
        return layer_volume(self.image.value), foreground(labels, self.foreground_value.value)
