"""What the widgets share: layers to volumes, settings that persist, error notifications."""

from __future__ import annotations

import os
from typing import Any

import napari
import numpy as np
from magicgui.widgets import Container, LineEdit, SpinBox, create_widget
from magicgui.widgets.bases import ValueWidget
from napari.layers import Image, Labels
from napari.utils.notifications import show_error
from qtpy.QtCore import QSettings

from ..config import QuantConfig
from ..data.io import Volume
from ..data.preprocess import foreground_mask
from ..data.stream import SliceSource, array_source
from ._io import VOLUME_KEY

QUANTIZERS = [
    ("fixed point", "fixed"),
    ("learned step (LSQ)", "lsq"),
    ("ternary", "ternary"),
    ("binary", "binary"),
    ("full precision", "float"),
]


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
    return foreground_mask(labels, number)


def quant_config(method: str, weight_bits: int, act_bits: int, paper: bool) -> QuantConfig:
    """The widget's quantization choice as a config (full precision, bit budgets, or the
    paper's exact formats)."""
    if paper:
        return QuantConfig.paper()
    if method == "float":
        return QuantConfig()
    if method in ("ternary", "binary"):
        bits = 2 if method == "ternary" else 1
        return QuantConfig.from_bits(bits, bits, method)
    return QuantConfig.from_bits(weight_bits, act_bits, method)


def format_text(method: str, weight_bits: int, act_bits: int, paper: bool) -> str:
    """What the chosen bits mean, e.g. the Q(i.f) formats of fixed point."""
    if paper:
        return "weights Q0.4 (5 stored bits), activations Q6.0 (7), as in the paper"
    if method == "fixed":
        return (
            f"sign + {weight_bits - 1} bits (weights), sign + {act_bits - 1} bits "
            f"(activations); each layer picks its Q(i.f) split"
        )
    if method == "lsq":
        return f"{2**weight_bits} weight levels, {2**act_bits} activation levels, learned steps"
    return {"ternary": "{-a, 0, a}: 2 stored bits", "binary": "{-a, a}: 1 stored bit"}.get(
        method, "32-bit floats"
    )


def notify_error(error: BaseException) -> None:
    """Show a worker's or a check's error as a napari notification, never a traceback."""
    show_error(" ".join(str(error).split()) or type(error).__name__)


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
        self.network_width = SpinBox(value=16, min=4, max=128, step=4, label="network width")
        self.extend([self.image, self.ground_truth, self.foreground_value, self.network_width])

    def training_data(self) -> tuple[Volume, np.ndarray]:
        """The chosen image as a volume and the object mask ``(S, H, W)``."""
        if self.image.value is None or self.ground_truth.value is None:
            raise ValueError("choose an image layer and a ground-truth Labels layer first")
        labels = layer_volume(self.ground_truth.value).array
        return layer_volume(self.image.value), foreground(labels, self.foreground_value.value)
