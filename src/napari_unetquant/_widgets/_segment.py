"""Dock widget: segment an image layer with a model of this session or from a file."""

from __future__ import annotations

import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import napari
import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FileEdit,
    FloatSlider,
    Label,
    PushButton,
    create_widget,
)
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_warning

from ..config import ENGINES, InferConfig
from ..devices import resolve_device
from ..infer.engine import integer_note, last_choice
from ..jobs import segment_array
from ..modelio import SegmentationModel, check_grey_input, load_model, model_classes
from ..quant import bit_report
from . import _session
from ._common import (
    DEVICES,
    INTENSITY_TIP,
    PREDICTION_KEY,
    Dock,
    Persistent,
    layer_source,
    middle_slice,
    model_file_preprocess,
    not_hu_warning,
    notify_error,
    shown_intensity,
    start_worker,
)

FROM_FILE = "model file..."
PREDICTION_COLOUR = "magenta"
"""Predictions (1 = the object) in one colour unlike any ground truth's random label colours."""


class SegmentWidget(Dock):
    """Run a (quantized) model on an image layer; adds an aligned Labels layer and shows the
    model's bits, its size and the time taken.

    The model decides the intensity mapping (its CT window or the z-score), shown read-only: a
    model only works on the values it was trained on. A CT-window model on an image whose
    middle slice has no air (nothing below -500) runs with a warning: not HU, most likely."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self._viewer = napari_viewer
        self.image = create_widget(annotation=napari.layers.Image, label="image")
        self.model = ComboBox(choices=self._model_choices, label="model")
        self.model_file = FileEdit(mode="r", filter="*.safetensors", label="model file")
        self.intensity = Label(value="", label="intensity")
        self.intensity.native.setWordWrap(True)
        self.intensity.tooltip = INTENSITY_TIP
        self.threshold = FloatSlider(
            value=InferConfig.threshold, min=0.05, max=0.95, step=0.05, label="threshold"
        )
        self.device = ComboBox(choices=DEVICES, value="auto", label="device")
        self.integer = CheckBox(value=False, text="integer arithmetic (CPU)")
        self.integer.tooltip = (
            "int8 codes and int32 accumulators, as integer hardware computes: the bit-exact "
            "reference, slow on CPUs without a fast int8 dot product (the result line says)"
        )
        self.engine = ComboBox(choices=ENGINES, value=InferConfig.engine, label="engine")
        self.engine.tooltip = (
            "what runs the network: auto times the engines once per model and keeps the "
            "fastest on this computer; pytorch, or ONNX Runtime in float or int8"
        )
        self.run_button = PushButton(text="Segment")
        self.info = Label(value="", label="model")
        self.status = Label(value="", label="result")
        self.status.native.setWordWrap(True)
        self.extend(
            [
                self.image,
                self.model,
                self.model_file,
                self.intensity,
                self.threshold,
                self.device,
                self.integer,
                self.engine,
                self.run_button,
                self.info,
                self.status,
            ]
        )
        self.persist = Persistent(
            "segment",
            {
                "threshold": self.threshold,
                "device": self.device,
                "integer": self.integer,
                "engine": self.engine,
            },
        )
        self.run_button.clicked.connect(self.run)
        self.model.changed.connect(self._show_intensity)
        self.model_file.changed.connect(self._show_intensity)
        self._show_intensity()
        self._refresh = self.model.reset_choices
        _session.on_change(self._refresh)
        self.native.destroyed.connect(lambda *_: _session.forget(self._refresh))
        self.worker: Any = None

    def _model_choices(self, *_: Any) -> list[str]:
        return [*reversed(list(_session.models())), FROM_FILE]

    def _show_intensity(self, *_: Any) -> None:
        """The chosen model's intensity mapping (its CT window or z-score), which it runs with."""
        if self.model.value == FROM_FILE:
            preprocess = model_file_preprocess(self.model_file.value)
        else:
            bundle = _session.models().get(self.model.value)
            preprocess = None if bundle is None else bundle.preprocess
        self.intensity.value = shown_intensity(preprocess)

    def _bundle(self) -> tuple[SegmentationModel, str]:
        if self.model.value == FROM_FILE:
            path = Path(str(self.model_file.value))
            bundle = load_model(path)
            check_grey_input(bundle, path)
            size = f"{path.stat().st_size / 1024:.0f} KiB on disk"
        else:
            bundle = _session.models()[self.model.value]
            size = f"{bit_report(bundle.model).stored_bytes / 1024:.0f} KiB stored"
        quant = bundle.quant
        return (
            bundle,
            f"{quant.label}: {quant.weight.bits}-bit weights, "
            f"{quant.act.bits}-bit activations, {size}",
        )

    def run(self) -> None:
        """Segment in a worker thread (the Segment button)."""
        try:
            if self.image.value is None:
                raise ValueError("choose an image layer first")
            layer = self.image.value
            source = layer_source(layer)
            bundle, description = self._bundle()
            config = InferConfig(
                threshold=self.threshold.value,
                integer=self.integer.value,
                engine=self.engine.value,
            )
            device = "cpu" if config.integer else str(resolve_device(self.device.value))
        except ValueError as error:
            notify_error(error)
            return
        self.info.value = description
        self.intensity.value = shown_intensity(bundle.preprocess)
        self._check_hu(layer, bundle)

        def work() -> Generator[int, None, tuple[np.ndarray, float, str]]:
            start = time.perf_counter()
            mask = yield from segment_array(bundle, source, config, device)
            seconds = time.perf_counter() - start
            if config.integer:
                how = integer_note() or "exact integer path"
            else:
                choice = last_choice(bundle.model)
                how = choice.text if choice is not None else ""
            return mask, seconds, how

        self.worker = start_worker(
            work,
            {"total": source.shape[0], "desc": "Segmenting slices"},
            (self.run_button, None),
            on_return=lambda result: self._add_layer(layer, bundle, *result),
        )

    @staticmethod
    def _check_hu(layer: napari.layers.Image, bundle: SegmentationModel) -> None:
        """Warn (not refuse) when a model trained with a CT window meets an image whose middle
        slice has no air, so is most likely not CT in HU: its masks would be nonsense."""
        if bundle.preprocess.ct_window is None:
            return
        why = not_hu_warning(middle_slice(layer), f"image {layer.name!r}")
        if why is not None:
            show_warning(
                f"{why}; the model was trained on CT in HU with a CT window, so its masks "
                f"of this image may be wrong: choose a CT image, or a model trained with "
                f"z-score"
            )

    def _add_layer(
        self,
        layer: napari.layers.Image,
        bundle: SegmentationModel,
        mask: np.ndarray,
        seconds: float,
        how: str = "",
    ) -> None:
        mask = mask if layer.ndim == 3 else mask[0]
        suffix = " integer" if self.integer.value else ""
        classes = model_classes(bundle)
        made_by: dict[str, Any] = {
            "model": bundle.quant.label,
            "foreground_value": bundle.info.get("foreground_value"),
        }
        if classes is not None:
            made_by["classes"] = list(classes)
        # one colour for a binary mask; napari's own colour per value for several classes
        colours = DirectLabelColormap(
            color_dict={None: PREDICTION_COLOUR, 0: "transparent", 1: PREDICTION_COLOUR}
        )
        self._viewer.add_labels(
            mask,
            name=f"{layer.name} {bundle.quant.label}{suffix}",
            scale=layer.scale,
            translate=layer.translate,
            affine=layer.affine,  # the image's display orientation (radiological for NIfTI)
            metadata={**layer.metadata, PREDICTION_KEY: made_by},
            **({"colormap": colours} if classes is None else {}),
        )
        if classes is None:
            status = f"{int(mask.sum())} foreground pixels in {seconds:.1f} s"
        else:
            counts = ", ".join(f"{int((mask == v).sum())} of value {v}" for v in classes)
            status = f"pixels per class: {counts}, in {seconds:.1f} s"
        self.status.value = f"{status}; {how}" if how else status
        self.status.tooltip = how
