"""Dock widget: train a quantized U-Net on an image layer and its ground-truth labels."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Generator
from dataclasses import replace
from pathlib import Path
from typing import Any

import napari
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.qt.threading import GeneratorWorker
from napari.utils.notifications import show_info, show_warning

from ..config import QuantConfig, TrainConfig, UNetConfig
from ..devices import resolve_device
from ..errors import SettingError
from ..events import Event, StepEvent
from ..jobs import TrainingRun, check_training_data, start_training
from ..jobs.training import (
    check_fine_tune_classes,
    check_fine_tune_foreground,
    check_fine_tune_window,
)
from ..modelio import SegmentationModel, save_model
from ..packed import has_quantized_weights
from ..recipes import ACT_BITS, DOCK_STEPS, WEIGHT_BITS, meaning, train_config
from . import _session
from ._common import (
    BIT_METHODS,
    DEVICES,
    QUANTIZERS,
    SETTINGS_DIR,
    IntensityChoice,
    Persistent,
    TrainingInputs,
    foreground_number,
    label_classes,
    not_hu_warning,
    notify_error,
    quant_choice,
    start_worker,
)
from ._plot import PlotWidget

NETWORKS = [("2D U-Net (slices)", 2), ("3D U-Net (volumes)", 3)]


class TrainWidget(TrainingInputs):
    """Train (or fine-tune) a U-Net at the chosen bit widths; Start, Stop, progress, live plot.

    ``network`` chooses the paper's 2D U-Net (the default) or a 3D U-Net trained on
    ``(16, 128, 128)`` patches of the whole stack (fine-tuning then starts from a 3D
    full-precision model).

    ``intensity`` maps the image's values for the network: the per-slice z-score (MRI, EM) or
    a CT window (a preset, or a level and width in HU). The model keeps it (Segment and Batch
    run it so); a fine-tune must choose the one its FP model was trained with.

    Training runs in a napari worker thread; Stop ends it after the current step and keeps the
    best model, which joins this session's models (for the Segment widget) and can be saved.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(napari_viewer)
        self.network = ComboBox(choices=NETWORKS, value=2, label="network")
        self.ct = IntensityChoice()
        self.quantizer = ComboBox(choices=QUANTIZERS, value="fixed", label="quantizer")
        self.weight_bits = SpinBox(value=WEIGHT_BITS, min=1, max=8, label="weight bits")
        self.act_bits = SpinBox(value=ACT_BITS, min=1, max=8, label="activation bits")
        self.paper = CheckBox(value=False, text="paper formats (Q0.4 / Q6.0)")
        self.format = Label(label="format")
        self.format.native.setWordWrap(True)  # long descriptions must not widen the dock
        self.fine_tune = CheckBox(value=True, text="fine-tune from this session's FP model")
        self.size_budget = FloatSpinBox(
            value=0.0, min=0.0, max=1_000_000.0, step=1.0, label="size budget (KiB)"
        )
        self.size_budget.tooltip = (
            "0: none. Otherwise the largest packed model file: each quantized layer's weight "
            "bits (2-8) are chosen by Hessian sensitivity to fit it, then this session's FP "
            "model is fine-tuned"
        )
        self.steps = SpinBox(value=DOCK_STEPS, min=1, max=100_000, label="steps")
        self.device = ComboBox(choices=DEVICES, value="auto", label="device")
        self.start = PushButton(text="Start")
        self.stop = PushButton(text="Stop", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, label="progress")
        self.status = Label(value="", label="status")
        self.save_path = FileEdit(mode="w", filter="*.safetensors", label="save model to")
        self.packed = CheckBox(value=True, text="packed (small file; quantized weights only)")
        self.packed.tooltip = "weight codes at their bit width, BatchNorm folded; untick for float"
        self.save = PushButton(text="Save model", enabled=False)
        self.extend(
            [
                self.network,
                *self.ct.widgets,
                self.quantizer,
                self.weight_bits,
                self.act_bits,
                self.paper,
                self.format,
                self.fine_tune,
                self.size_budget,
                self.steps,
                self.device,
                self.start,
                self.stop,
                self.progress,
                self.status,
                self.save_path,
                self.packed,
                self.save,
            ]
        )
        self.plot = PlotWidget("training", "step", "loss / validation Dice")
        self.add_native(self.plot)
        self.persist = Persistent(
            "train",
            {
                "width": self.network_width,
                "spatial_dims": self.network,
                "quantizer": self.quantizer,
                "weight_bits": self.weight_bits,
                "act_bits": self.act_bits,
                "size_budget": self.size_budget,
                "steps": self.steps,
                "device": self.device,
                "intensity": self.ct.intensity,
                "ct_level": self.ct.level,
                "ct_width": self.ct.width,
            },
        )
        for widget in (
            self.quantizer,
            self.weight_bits,
            self.act_bits,
            self.paper,
            self.size_budget,
        ):
            widget.changed.connect(self._show_format)
        self.start.clicked.connect(self.run)
        self.stop.clicked.connect(self.request_stop)
        self.save.clicked.connect(self.save_model)
        self.worker: GeneratorWorker | None = None
        self.training: TrainingRun | None = None
        self.last_model: SegmentationModel | None = None
        self._show_format()
        self.ct.refresh()

    def _show_format(self, *_: Any) -> None:
        fixed_or_lsq = self.quantizer.value in BIT_METHODS and not self.paper.value
        self.weight_bits.enabled = self.act_bits.enabled = fixed_or_lsq
        if self.budget() is not None:  # the budget chooses the weight bits
            self.weight_bits.enabled = False
            self.format.value = (
                f"weights: {self.quantizer.value}, each layer's bits (2-8) chosen to fit "
                f"{self.size_budget.value:g} KiB; activations {self.act_bits.value} bits"
            )
            return
        try:
            self.format.value = meaning(self.quant_config())
        except ValueError as error:
            self.format.value = str(error)

    def budget(self) -> int | None:
        """The size budget in bytes (``None``: none)."""
        kib = float(self.size_budget.value)
        return round(kib * 1024) if kib > 0 else None

    def quant_config(self) -> QuantConfig:
        """The quantization the controls ask for."""
        choice = quant_choice(
            self.quantizer.value, self.weight_bits.value, self.act_bits.value, self.paper.value
        )
        return choice.config()

    def train_config(self, fine_tune: bool) -> TrainConfig:
        """The recipe's training settings for the chosen network, steps and device."""
        recipe = train_config(
            fine_tune=fine_tune, spatial_dims=self.network.value, steps=self.steps.value
        )
        return replace(recipe, device=self.device.value)

    def _fp_model(self) -> SegmentationModel | None:
        dims = self.network.value  # fine-tuning keeps the network: 2D from 2D, 3D from 3D
        models = [
            m
            for m in _session.models().values()
            if m.quant.is_float and m.unet.spatial_dims == dims
        ]
        return models[-1] if models else None

    def _prepare(self) -> Callable[[], TrainingRun]:
        """Check the choices here, on the GUI thread (quick); returns what builds the run
        (slow: normalisation, resampling, the network), for the worker to call."""
        image, labels = self.training_data()
        quant = self.quant_config()
        budget = self.budget()
        init = self._fp_model() if self.fine_tune.value and not quant.is_float else None
        if budget is not None and (quant.is_float or init is None):
            raise SettingError(
                "a size budget fine-tunes this session's full-precision model: train FP first "
                "(size budget 0), then quantize with fine-tuning ticked",
                "size_budget",
                "init",
            )
        if self.fine_tune.value and not quant.is_float and init is None:
            dims = self.network.value
            show_info(
                f"no {dims}D full-precision model in this session to fine-tune from: "
                f"{quant.label} trains from scratch (train FP first for the paper's recipe)"
            )
        config = self.train_config(fine_tune=init is not None)
        resolve_device(config.device)  # a missing CUDA/MPS is an error now, not in the thread
        unet = UNetConfig(base_width=self.network_width.value, spatial_dims=self.network.value)
        check_training_data(image, labels, init)
        classes = label_classes(self.foreground_value.value)
        value = None if classes else foreground_number(self.foreground_value.value)
        check_fine_tune_foreground(init, value)  # a fine-tune segments its model's object
        check_fine_tune_classes(init, classes)
        ct_window = self.ct.window()
        check_fine_tune_window(init, ct_window)  # the z-score too: a fine-tune keeps its own
        name = f"image {self.image.value.name!r}" if self.image.value is not None else "the image"
        if ct_window is not None and (why := not_hu_warning(image.array, name)):
            show_warning(
                f"{why}; a CT window suits CT images: for others, choose intensity 'z-score'"
            )
        return lambda: start_training(
            image,
            labels,
            quant,
            config,
            unet,
            init,
            ct_window,
            foreground_value=value,
            classes=classes,
            size_budget=budget,
        )

    def run(self) -> None:
        """Start training in a worker thread (the Start button): the data are prepared there
        too, so the viewer stays responsive."""
        try:
            build = self._prepare()
        except ValueError as error:
            notify_error(error)
            return
        self.training = None
        self.progress.max, self.progress.value = 0, 0  # busy until the first step
        self.plot.clear()
        self.status.value = "preparing the data and the network..."
        image_name = self.image.value.name if self.image.value is not None else "image"
        started: list[TrainingRun] = []

        def work() -> Generator[Event | TrainingRun, None, None]:  # stops between steps
            training = build()
            started.append(training)
            yield training  # the GUI thread takes it
            yield from training.events()

        self.worker = start_worker(
            work,
            {"total": 0, "desc": "Training U-Net"},
            (self.start, self.stop),
            on_yield=self._on_event,
            on_finish=self._finished,
            on_orphaned=lambda: started and recover(started[0], image_name),
        )

    def request_stop(self) -> None:
        """Stop after the current step (the Stop button); the best model is kept."""
        if self.worker is not None:
            self.worker.quit()
            self.status.value = "stopping after this step..."

    def _on_event(self, event: Event | TrainingRun) -> None:
        if isinstance(event, TrainingRun):
            self.training = event
            self.progress.max = event.trainer.config.steps
            device = event.trainer.device
            self.status.value = f"training {event.info.get('label', event.quant.label)} on {device}"
        elif isinstance(event, StepEvent):
            self.progress.value = event.step
            minutes, seconds = divmod(int(event.eta_seconds), 60)
            self.status.value = (
                f"step {event.step}/{event.steps}, loss {event.loss:.3f}, "
                f"ETA {minutes}m{seconds:02d}s"
            )
            self.plot.add_point("loss", event.step, event.loss)
        else:
            self.plot.add_point("validation Dice", event.step, event.dice)

    def _finished(self) -> None:
        if self.training is None or self.training.trainer.step == 0:
            return
        self.last_model = self.training.best()
        image_name = self.image.value.name if self.image.value is not None else "image"
        model = self.last_model
        label = model.info.get("label", model.quant.label)
        name = _session.add_model(f"{label} ({image_name})", model)
        dice = self.last_model.info["validation_dice"]
        scored = f"validation Dice {dice:.3f}" if dice >= 0 else "stopped before the first "
        scored += "" if dice >= 0 else "validation: no validation Dice yet"
        self.status.value = f"done: {name}, {scored}"
        self.save.enabled = True
        self._offer_packed(self.last_model)

    def _offer_packed(self, model: SegmentationModel) -> None:
        """The *packed* box for the model Save writes: ticked by default for quantized weights
        (kept as the user set it from one quantized model to the next), unavailable for
        full-precision ones (packing would save nothing)."""
        quantized = has_quantized_weights(model.model)
        if quantized and not self.packed.enabled:
            self.packed.value = True
        elif not quantized:
            self.packed.value = False
        self.packed.enabled = quantized

    def save_model(self) -> None:
        """Write the last trained model to the chosen file (the Save button)."""
        if self.last_model is None:
            notify_error(ValueError("train a model first"))
            return
        model = self.last_model
        packed = self.packed.value and has_quantized_weights(model.model)
        try:
            path = self._save_path()
            save_model(path, model, packed=packed)
        except (OSError, ValueError) as error:
            notify_error(error)
            return
        size = Path(path).stat().st_size / 1024
        label = model.info.get("label", model.quant.label)
        what = (
            f"packed {label} model: weight codes at their bit width"
            if packed
            else f"float {label} model: float32 weights and BatchNorm statistics"
        )
        show_info(f"saved {path} ({what}; {size:.1f} KiB)")

    def _save_path(self) -> str:
        """The chosen file, ending in ``.safetensors``; no file or a missing folder is refused."""
        chosen = Path(str(self.save_path.value))
        if str(self.save_path.value) in ("", ".") or chosen.is_dir() or not chosen.name:
            raise ValueError("choose a file to save the model to ('save model to')")
        if not chosen.parent.is_dir():
            raise ValueError(
                f"the folder {chosen.parent} does not exist; choose a file in an existing folder"
            )
        name = str(chosen)
        return name if name.endswith(".safetensors") else name + ".safetensors"


RECOVERED = "recovered"


def recovery_folder() -> Path:
    """Where models of training cut short by a closed dock or viewer are kept: ``recovered``
    in ``$NAPARI_UNETQUANT_SETTINGS_DIR`` when set, else in ``~/.napari-unetquant``."""
    base = os.environ.get(SETTINGS_DIR) or str(Path.home() / ".napari-unetquant")
    return Path(base) / RECOVERED


def recover(training: TrainingRun, image_name: str) -> Path | None:
    """Keep the best model of a run whose dock closed: in this session's models and in a file
    of :func:`recovery_folder`, whose path is printed (the dock that would show it is gone)."""
    if training.trainer.step == 0:
        return None
    bundle = training.best()
    kind = bundle.info.get("label", bundle.quant.label)
    label = f"{kind} ({image_name}, recovered)"
    _session.add_model(label, bundle)
    stamp = str(bundle.info["created"]).replace(":", "").replace("+0000", "")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{kind}-{image_name}-{stamp}")
    path = recovery_folder() / f"{name}.safetensors"
    save_model(path, bundle)
    print(
        f"napari-unetquant: training stopped at step {training.trainer.step} because its dock "
        f"closed; the best model so far is in {path}",
        file=sys.stderr,
    )
    return path
