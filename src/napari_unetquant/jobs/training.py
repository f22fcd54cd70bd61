"""Training jobs: a model file from image and label files, or a model in memory from a layer.

Both start the same way (:func:`start_network`: a fresh network, or a trained one re-quantized for a
fine-tune) and run as a :class:`TrainingRun`, a generator of the trainer's progress events, so
the caller shows progress and may stop it between steps. A fine-tune may start from a packed
model too: it is unpacked (the float weights are exactly its quantized ones) and its BatchNorm,
stored folded, is re-split on the training data before the first step.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..config import PreprocessConfig, QuantConfig, TrainConfig, UNetConfig
from ..data.io import Volume
from ..errors import SettingError
from ..events import Event
from ..model import build_unet
from ..modelio import SegmentationModel, check_grey_input, model_classes, unpacked
from ..packed import LAYOUT_PACKED, calibrate_batch_norm
from ..recipes import intensity_for
from ..train import (
    LabelledVolume,
    SliceSet,
    Trainer,
    VolumeSet,
    median_spacing,
    split_validation,
    training_set,
)


@dataclass(frozen=True)
class Start:
    """The network to train and what it keeps from the model it was fine-tuned from.

    ``unfolded``: the network comes from a packed model, whose BatchNorm was stored folded;
    :func:`begin` re-splits it on the training data (see
    :func:`~napari_unetquant.packed.calibrate_batch_norm`)."""

    model: torch.nn.Module
    unet: UNetConfig
    preprocess: PreprocessConfig | None
    foreground_value: int | None
    unfolded: bool = False
    classes: tuple[int, ...] | None = None


def start_network(
    quant: QuantConfig, seed: int, unet: UNetConfig | None, init: SegmentationModel | None
) -> Start:
    """A fresh network of ``unet``, or ``init``'s trained weights re-quantized for ``quant``
    (its network, preprocessing and object kept; a packed ``init`` is unpacked first)."""
    torch.manual_seed(seed)  # the seed decides the initial weights too
    if init is None:
        unet = unet or UNetConfig()
        return Start(build_unet(unet, quant), unet, None, None)
    foreground = init.info.get("foreground_value")
    unfolded = init.layout == LAYOUT_PACKED
    model = requantized(init, quant)
    classes = model_classes(init)
    return Start(model, init.unet, init.preprocess, foreground, unfolded, classes)


def check_fine_tune_source(source: SegmentationModel, name: str) -> None:
    """Refuse a model that cannot be fine-tuned: models of colour inputs. (Packed models
    can be: :func:`requantized` unpacks them.)"""
    check_grey_input(source, name)


def requantized(source: SegmentationModel, quant: QuantConfig) -> torch.nn.Module:
    """``source``'s network with its trained weights, quantized as ``quant`` says (the start
    of a fine-tune); the old quantizer state is dropped, everything else must fit. A packed
    ``source`` is unpacked first (:func:`~napari_unetquant.modelio.unpacked`): its float
    weights are exactly its quantized ones, its BatchNorm the folded scale and shift."""
    try:
        source = unpacked(source)
    except ValueError as error:
        raise SettingError(
            f"{model_name(source)} cannot be fine-tuned ({error}); fine-tune from the model "
            f"file that training or export wrote",
            "init",
        ) from error
    model = build_unet(source.unet, quant)
    weights = {
        key: value
        for key, value in source.model.state_dict().items()
        if "_quantizer." not in key  # quantizer state belongs to the old precision
    }
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any("_quantizer." not in key for key in missing):
        raise ValueError("the model's weights do not fit the network it describes")
    return model


def model_name(bundle: SegmentationModel) -> str:
    """How a model in memory is named in the metadata of the models fine-tuned from it:
    ``FP (EM phantom, 2026-12-01T10:00:00+00:00)``."""
    info = bundle.info
    where = ", ".join(str(info[key]) for key in ("source", "created") if info.get(key))
    label = info.get("label", bundle.quant.label)
    return f"{label} ({where})" if where else str(label)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class TrainingRun:
    """A run of the trainer: iterate :meth:`events`, stop by no longer iterating, then take
    :meth:`best`."""

    trainer: Trainer
    unet: UNetConfig
    quant: QuantConfig
    preprocess: PreprocessConfig
    info: dict[str, Any]

    def events(self) -> Iterator[Event]:
        return self.trainer.run()

    def best(self) -> SegmentationModel:
        """The best model so far (the last one when no validation has run yet)."""
        info = {
            **self.info,
            "best_step": self.trainer.best_step,
            "steps": self.trainer.step,
            "validation_dice": self.trainer.best_dice,
            "created": now(),
        }
        return SegmentationModel(
            self.trainer.best_model(), self.unet, self.quant, self.preprocess, info
        )


def begin(
    start: Start,
    quant: QuantConfig,
    config: TrainConfig,
    pairs: tuple[list[LabelledVolume], list[LabelledVolume]],
    preprocess: PreprocessConfig,
    training: SliceSet | VolumeSet | None = None,
) -> TrainingRun:
    """The one way a run begins: the trainer on ``pairs`` (training, validation) as the
    network of ``start`` sees them (``training``: the training pairs' set, when the caller
    made it already)."""
    train_pairs, val_pairs = pairs
    dims = start.unet.spatial_dims  # 3D U-Nets train on whole volumes
    validation = training_set(val_pairs, preprocess, dims) if val_pairs else None
    if training is None:
        training = training_set(train_pairs, preprocess, dims)
    if start.unfolded:  # BatchNorm from a packed file: statistics measured on these data
        calibrate_batch_norm(start.model, calibration_batch(training, config))
    trainer = Trainer(start.model, training, validation, config)
    info = run_info(start, quant, pairs)
    return TrainingRun(trainer, start.unet, quant, preprocess, info)


def budgeted_begin(
    start: Start,
    init: SegmentationModel,
    quant: QuantConfig,
    config: TrainConfig,
    pairs: tuple[list[LabelledVolume], list[LabelledVolume]],
    preprocess: PreprocessConfig,
    budget: int,
    extra: dict[str, Any],
) -> TrainingRun:
    """:func:`begin` for a size budget: each layer's weight bits planned on ``init`` and the
    training data (:func:`~.budget.plan_budget`) so that the packed file of the trained model,
    whose information is the run's, ``extra`` and the plan's, fits ``budget`` bytes."""
    from .budget import BudgetPlan, plan_budget

    training = training_set(pairs[0], preprocess, start.unet.spatial_dims)

    def info(plan: BudgetPlan) -> dict[str, Any]:
        return {
            **run_info(start, plan.quant, pairs),
            **extra,
            **plan.info(),
            **result_info_at_most(config.steps),
        }

    plan = plan_budget(init, quant, training, config, budget, info)
    start = replace(start, model=requantized(init, plan.quant))
    run = begin(start, plan.quant, config, pairs, preprocess, training)
    run.info.update({**extra, **plan.info()})
    return run


def run_info(
    start: Start, quant: QuantConfig, pairs: tuple[list[LabelledVolume], list[LabelledVolume]]
) -> dict[str, Any]:
    """The model information a run starts with (:meth:`TrainingRun.best` adds the results)."""
    return {
        "label": quant.label,
        "foreground_value": start.foreground_value,
        **({"classes": list(start.classes)} if start.classes else {}),
        "train_volumes": len(pairs[0]),
        "validation_volumes": len(pairs[1]),
        "napari_unetquant": __version__,
    }


def result_info_at_most(steps: int) -> dict[str, Any]:
    """What :meth:`TrainingRun.best` adds, each value as long as it can be in a run of
    ``steps`` steps (a size budget counts the file's final metadata before training)."""
    return {
        "best_step": steps,
        "steps": steps,
        "validation_dice": 2.2250738585072014e-308,  # the longest text a float can have
        "created": now(),
    }


def calibration_batch(data: SliceSet | VolumeSet, config: TrainConfig) -> torch.Tensor:
    """Up to ``config.batch_size`` training items, evenly spread, cropped about their centres
    to one training crop (or what the smallest item allows): ``(N, 1, *crop)`` float32, the
    same every time (no randomness, so a resumed run starts alike)."""
    count = min(config.batch_size, len(data))
    chosen = [data.images[int(i)] for i in np.linspace(0, len(data) - 1, count).round()]
    crop = (config.crop_depth, config.crop, config.crop)[-chosen[0].ndim :]
    size = [min(c, *(item.shape[axis] for item in chosen)) for axis, c in enumerate(crop)]
    crops = []
    for item in chosen:
        corner = [(extent - want) // 2 for extent, want in zip(item.shape, size, strict=True)]
        box = tuple(slice(c, c + want) for c, want in zip(corner, size, strict=True))
        crops.append(item[box])
    return torch.from_numpy(np.stack(crops)[:, None].astype(np.float32))


def check_fine_tune_window(
    init: SegmentationModel | None, ct_window: tuple[float, float] | None
) -> None:
    """Refuse to fine-tune ``init`` with another intensity mapping than it was trained with
    (``None``: the per-slice z-score): its weights expect those input values, so the fine-tune
    would start from a network that sees nonsense."""
    if init is None or init.preprocess.ct_window == ct_window:
        return
    raise SettingError(
        f"{model_name(init)} was trained with {init.preprocess.intensity_text}, not "
        f"{PreprocessConfig(ct_window=ct_window).intensity_text}; fine-tune it with the same, "
        f"or train from scratch instead of fine-tuning it",
        "ct_window",
        "init",
    )


def _value_text(value: int | None) -> str:
    return "non-zero" if value is None else str(value)


def check_fine_tune_foreground(init: SegmentationModel | None, value: int | None) -> None:
    """Refuse to fine-tune ``init`` on another object than it was trained on (its recorded
    foreground value; ``None``: every non-zero label)."""
    if init is None or "foreground_value" not in init.info:
        return
    trained = init.info["foreground_value"]
    if trained != value:
        raise SettingError(
            f"{model_name(init)} was trained on foreground value {_value_text(trained)}, not "
            f"{_value_text(value)}; choose the same value to fine-tune it, or train from "
            f"scratch",
            "foreground_value",
            "init",
        )


def check_fine_tune_classes(
    init: SegmentationModel | None, classes: tuple[int, ...] | None
) -> None:
    """Refuse to fine-tune ``init`` on other classes than it learnt (``None``: binary)."""
    if init is None or model_classes(init) == classes:
        return

    def text(value: tuple[int, ...] | None) -> str:
        return "one object" if value is None else f"classes {', '.join(map(str, value))}"

    raise SettingError(
        f"{model_name(init)} learnt {text(model_classes(init))}, not {text(classes)}; give the "
        f"same label values to fine-tune it, or train from scratch",
        "classes",
        "init",
    )


def check_training_data(
    image: Volume, labels: np.ndarray, init: SegmentationModel | None = None
) -> None:
    """The quick checks of :func:`start_training` (shapes, foreground, finite pixels, the
    model to fine-tune), for a shell to run before it hands the slow part to a thread."""
    if labels.shape != image.array.shape:
        raise ValueError(
            f"labels of shape {labels.shape} do not match the image {image.array.shape}; "
            f"choose the labels drawn on this image"
        )
    if not labels.any():
        raise ValueError("the labels contain no foreground; paint or load some first")
    if not np.isfinite(image.array).all():
        raise ValueError(
            f"{image.source}: the image holds NaN or Inf pixels; replace them (e.g. with 0) "
            f"before training or segmenting"
        )
    if init is not None:
        check_fine_tune_source(init, model_name(init))


def start_training(
    image: Volume,
    labels: np.ndarray,
    quant: QuantConfig,
    train: TrainConfig,
    unet: UNetConfig | None = None,
    init: SegmentationModel | None = None,
    ct_window: tuple[float, float] | None = None,
    *,
    foreground_value: int | None = None,
    classes: tuple[int, ...] | None = None,
    size_budget: int | None = None,
) -> TrainingRun:
    """Prepare training on one image and its foreground mask ``(S, H, W)`` (validation held
    out as :func:`~napari_unetquant.train.split_validation` says); ``init`` fine-tunes, and the
    model's metadata names it (:func:`model_name`).

    ``ct_window``: ``(level, width)`` in HU mapped to [-1, 1] instead of the per-slice z-score.
    A fine-tune keeps ``init``'s preprocessing, as a fine-tune from a file does: ``None`` takes
    it, and another window is refused (:func:`check_fine_tune_window`).

    ``foreground_value``: the label value ``labels`` marks (``None``: every non-zero label),
    recorded in the model so that Segment and the Dice readout score the same object; a
    fine-tune must use its model's (:func:`check_fine_tune_foreground`). ``classes``: two or
    more label values make a multi-class model, ``labels`` then holding class indices
    (:func:`~napari_unetquant.data.preprocess.class_indices`); a fine-tune keeps its model's.
    ``size_budget``: bytes the packed model file must fit, each quantized layer's weight bits
    chosen for it before fine-tuning ``init`` (:func:`budgeted_begin`)."""
    check_training_data(image, labels, init)
    check_fine_tune_foreground(init, foreground_value)
    classes = classes if classes is not None and len(classes) > 1 else None
    check_fine_tune_classes(init, classes)
    if ct_window is not None:
        check_fine_tune_window(init, ct_window)
    mask = labels.astype(np.uint8)
    if classes is not None and init is None:
        unet = replace(unet or UNetConfig(), out_classes=len(classes) + 1)
    start = start_network(quant, train.seed, unet, init)
    if classes is not None:
        start = replace(start, classes=classes)
    pairs = split_validation([LabelledVolume(image, mask)])
    spacing = median_spacing(pairs[0])
    preprocess = start.preprocess or PreprocessConfig(
        spacing=spacing, ct_window=ct_window, intensity=intensity_for(spacing, ct_window)
    )
    extra = {
        "source": image.source,
        "init": None if init is None else model_name(init),
        "foreground_value": foreground_value,
    }
    if size_budget is not None:
        if init is None:
            raise SettingError(
                "a size budget chooses each layer's bits from a trained model's sensitivity "
                "and fine-tunes it; fine-tune a full-precision model",
                "size_budget",
                "init",
            )
        return budgeted_begin(start, init, quant, train, pairs, preprocess, size_budget, extra)
    run = begin(start, quant, train, pairs, preprocess)
    run.info.update(extra)
    return run
