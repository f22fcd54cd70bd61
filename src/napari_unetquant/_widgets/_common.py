"""What the widgets share: layers to volumes, settings that persist, error notifications."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Generator
from typing import Any

import napari
import numpy as np
from magicgui.widgets import Container, Label, LineEdit, PushButton, SpinBox, create_widget
from magicgui.widgets.bases import ValueWidget
from napari.layers import Image, Labels
from napari.qt.threading import GeneratorWorker, thread_worker
from napari.utils.notifications import show_error
from qtpy.QtCore import QSettings

from ..config import UNetConfig
from ..data.io import SliceSource, Volume, array_source
from ..data.preprocess import foreground_mask, label_values
from ..errors import settings_hint
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


def foreground(labels: np.ndarray, value: str) -> np.ndarray:
    """The object mask of a labels array: ``value`` empty means every non-zero label."""
    text = value.strip()
    if not text:
        return foreground_mask(labels)
    try:
        number = int(text)
    except ValueError:
        raise ValueError(
            f"foreground value {value!r} is not a whole number; leave it empty for non-zero"
        ) from None
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


CONTROLS = {
    "act_bits": "activation bits",
    "act_format": "paper formats",
    "batch_size": "",
    "ct_window": "",
    "device": "device",
    "elastic": "",
    "foreground_value": "foreground value",
    "init": "fine-tune from this session's FP model",
    "integer": "integer",
    "labels_dir": "labels",
    "network": "network",
    "out": "",
    "out_dir": "output folder",
    "processes": "",
    "resume": "",
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


class TrainingInputs(Container):
    """The inputs every training widget starts with: image, ground truth, the label value of
    the object, and the network width."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self.image = create_widget(annotation=napari.layers.Image, label="image")
        self.ground_truth = create_widget(annotation=napari.layers.Labels, label="ground truth")
        self.foreground_value = LineEdit(value="", label="foreground value")
        self.foreground_value.tooltip = "label value of the object; empty: every non-zero label"
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
