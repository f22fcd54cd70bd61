"""Whole jobs on files: train a model file, segment an image, evaluate against labels.

The shells (CLI, napari widgets) call these; each job reads what it needs, calls the core, and
writes its results atomically. Training is a generator of the trainer's progress events, so the
caller shows progress and may stop it between steps; the best model is on disk by then.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Generator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .batch import SegmentedFile, label_mask, segment_to_path
from .config import InferConfig, PreprocessConfig, QuantConfig, TrainConfig, UNetConfig
from .data.io import Volume, remove_partial_writes
from .data.stream import SliceSource, open_volume, volume_source
from .devices import inference_device
from .infer.predict import segment_source
from .metrics import SegmentationScores, segmentation_scores
from .model import build_unet
from .modelio import SegmentationModel, check_grey_input, load_model, save_model
from .packed import LAYOUT_STATE_DICT
from .train import (
    Event,
    LabelledVolume,
    Trainer,
    ValidationEvent,
    checkpoint_path,
    load_checkpoint,
    median_spacing,
    read_pairs,
    save_checkpoint,
    split_validation,
    training_set,
)
from .train.distributed import first_process_file

AUTO = "auto"


@dataclass(frozen=True)
class TrainJob:
    """Everything ``unetquant train`` needs.

    ``unet``: the network (``None``: the default U-Net, or the ``init`` model's). ``spacing``:
    ``"auto"`` (the median spacing of the training images, when they have one, or the ``init``
    model's), ``None`` (no resampling) or ``(rows, cols)`` mm. ``foreground_value``: ``None``
    means non-zero, or the ``init`` model's value. ``checkpoint_seconds``: the resume checkpoint
    is written at least this often (between validations too), so a crash loses little.
    """

    images: tuple[str, ...]
    labels: tuple[str, ...]
    out: str
    quant: QuantConfig = field(default_factory=QuantConfig)
    unet: UNetConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    foreground_value: int | None = None
    val_images: tuple[str, ...] = ()
    val_labels: tuple[str, ...] = ()
    spacing: tuple[float, float] | str | None = AUTO
    ct_window: tuple[float, float] | None = None
    init: str | None = None
    resume: bool = False
    checkpoint_seconds: float = 60.0

    def __post_init__(self) -> None:
        if not self.checkpoint_seconds >= 0:
            raise ValueError(
                f"checkpoint every {self.checkpoint_seconds} s: give 0 (every step) or more"
            )


@dataclass(frozen=True)
class _Start:
    """The network to train and the settings it must keep."""

    model: torch.nn.Module
    unet: UNetConfig
    preprocess: PreprocessConfig | None
    foreground_value: int | None


def _initial_model(job: TrainJob) -> _Start:
    """A fresh network, or (``--init``) the weights of a trained one re-quantized for ``job``."""
    torch.manual_seed(job.train.seed)  # the seed decides the initial weights too
    if job.init is None:
        unet = job.unet or UNetConfig()
        return _Start(build_unet(unet, job.quant), unet, None, job.foreground_value)
    source = load_model(job.init)
    check_grey_input(source, job.init)
    if source.layout != LAYOUT_STATE_DICT:
        raise ValueError(
            f"{job.init} is a packed model file (for deployment: codes, folded BatchNorm); "
            f"fine-tune from the model file that training wrote"
        )
    _check_init_conflicts(job, source)
    foreground = source.info.get("foreground_value", job.foreground_value)
    return _Start(requantized(source, job.quant), source.unet, source.preprocess, foreground)


def requantized(source: SegmentationModel, quant: QuantConfig) -> torch.nn.Module:
    """``source``'s network with its trained weights, quantized as ``quant`` says (the start
    of a fine-tune); the old quantizer state is dropped, everything else must fit."""
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


def _check_init_conflicts(job: TrainJob, source: SegmentationModel) -> None:
    """Fine-tuning keeps the network, preprocessing and object of the ``init`` model."""
    conflicts = []
    if job.unet is not None and job.unet != source.unet:
        conflicts.append(f"network {source.unet} (leave out --base-width/--depth/--spatial-dims)")
    if job.spacing != AUTO and job.spacing != source.preprocess.spacing:
        conflicts.append(f"spacing {source.preprocess.spacing} (leave out --spacing)")
    if job.ct_window is not None and job.ct_window != source.preprocess.ct_window:
        conflicts.append(f"CT window {source.preprocess.ct_window} (leave out --ct-window)")
    trained_on = source.info.get("foreground_value")
    if (
        job.foreground_value is not None
        and "foreground_value" in source.info
        and (job.foreground_value != trained_on)
    ):
        value = "non-zero" if trained_on is None else trained_on
        conflicts.append(f"foreground value {value} (leave out --foreground-value)")
    if conflicts:
        raise ValueError(f"{job.init} was trained with " + "; ".join(conflicts))


def _preprocess(
    job: TrainJob, pairs: list[Any], inherited: PreprocessConfig | None
) -> PreprocessConfig:
    if inherited is not None:  # fine-tuning keeps the preprocessing the model was trained with
        return inherited
    spacing = median_spacing(pairs) if job.spacing == AUTO else job.spacing
    return PreprocessConfig(
        spacing=spacing if not isinstance(spacing, str) else None, ct_window=job.ct_window
    )


def train_model(job: TrainJob) -> Generator[Event, None, None]:
    """Train, yield progress events, and keep ``job.out`` holding the best model so far.

    At every validation the resume checkpoint beside ``job.out`` is written first, then the
    model if it improved, both before the event is yielded (the caller may stop there); between
    validations the checkpoint is written again once ``job.checkpoint_seconds`` have passed, and
    when the caller stops iterating (a Ctrl-C handled between steps), so an interruption loses at
    most that much training. Every file goes through a temporary file and a rename; temporary
    files that a killed run left beside ``job.out`` are removed at the start. The checkpoint is
    removed once the last step is done; ``job.resume`` continues from it. Data-parallel (under
    torchrun) only the first process writes files.
    """
    start = _initial_model(job)
    foreground = start.foreground_value
    pairs = read_pairs(list(job.images), list(job.labels), foreground)
    if job.val_images:
        train_pairs = pairs
        val_pairs = read_pairs(list(job.val_images), list(job.val_labels), foreground)
    else:
        train_pairs, val_pairs = split_validation(pairs)
    preprocess = _preprocess(job, pairs, start.preprocess)
    dims = start.unet.spatial_dims  # 3D U-Nets train on whole volumes
    validation = training_set(val_pairs, preprocess, dims) if val_pairs else None
    train_set = training_set(train_pairs, preprocess, dims)
    trainer = Trainer(start.model, train_set, validation, job.train)
    identity = _identity(job, start.unet, preprocess, foreground)
    resume_file = checkpoint_path(job.out)
    writes = trainer.parallel is None or trainer.parallel.rank == 0

    def bundle() -> SegmentationModel:
        info = _info(job, trainer, foreground, (len(train_pairs), len(val_pairs)))
        return SegmentationModel(trainer.best_model(), start.unet, job.quant, preprocess, info)

    if writes:
        for path in (Path(job.out), resume_file):
            remove_partial_writes(path)
    if job.resume:
        _resume(job, trainer, identity)
        if writes and trainer.best_state is not None:  # the model file may predate it
            save_model(job.out, bundle())

    saved_at = time.monotonic()
    for event in trainer.run():
        unfinished = event.step < event.steps
        if writes and isinstance(event, ValidationEvent):
            if unfinished:
                save_checkpoint(resume_file, trainer, identity)
                saved_at = time.monotonic()
            if event.improved:
                save_model(job.out, bundle())
            if not unfinished:
                resume_file.unlink(missing_ok=True)
        elif writes and unfinished and time.monotonic() - saved_at >= job.checkpoint_seconds:
            save_checkpoint(resume_file, trainer, identity)
            saved_at = time.monotonic()
        try:
            yield event
        except GeneratorExit:  # the caller stopped between steps: keep where training got to
            if writes and unfinished and trainer.step > 0:
                save_checkpoint(resume_file, trainer, identity)
            raise


def _resume(job: TrainJob, trainer: Trainer, identity: dict[str, Any]) -> None:
    """Restore the checkpoint beside ``job.out`` (data-parallel: the first process reads it
    and hands it to the others), or refuse when the run that wrote ``job.out`` finished."""
    with first_process_file(checkpoint_path(job.out), trainer.parallel) as saved:
        if saved is not None:
            load_checkpoint(saved, trainer, identity)
            return
    finished = Path(job.out).exists()
    if trainer.parallel is not None:  # what the first process's disk says
        finished = trainer.parallel.from_first(finished)
    if finished:
        raise ValueError(
            f"nothing to resume: {job.out} has no checkpoint beside it, so its training "
            f"finished; drop --resume to train it again (the file will be replaced)"
        )


def _identity(
    job: TrainJob, unet: UNetConfig, preprocess: PreprocessConfig, foreground: int | None
) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one."""
    return {
        "unet": asdict(unet),
        "quant": asdict(job.quant),
        "train": asdict(job.train),
        "preprocess": asdict(preprocess),
        "data": [list(job.images), list(job.labels), list(job.val_images), list(job.val_labels)],
        "foreground_value": foreground,
        "init": job.init,
    }


def _info(
    job: TrainJob, trainer: Trainer, foreground: int | None, volumes: tuple[int, int]
) -> dict[str, Any]:
    n_train, n_val = volumes
    return {
        "label": job.quant.label,
        "foreground_value": foreground,
        "best_step": trainer.best_step,
        "steps": trainer.step,
        "validation_dice": trainer.best_dice,
        "train_volumes": n_train,
        "validation_volumes": n_val,
        "init": job.init,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "napari_unetquant": __version__,
    }


@dataclass
class TrainingRun:
    """Training held in memory (for the napari widgets): iterate :meth:`events`, stop by no
    longer iterating, then take :meth:`best`."""

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
        }
        return SegmentationModel(
            self.trainer.best_model(), self.unet, self.quant, self.preprocess, info
        )


def start_training(
    image: Volume,
    labels: np.ndarray,
    quant: QuantConfig,
    train: TrainConfig,
    unet: UNetConfig | None = None,
    init: SegmentationModel | None = None,
) -> TrainingRun:
    """Prepare training on one image and its foreground mask ``(S, H, W)`` (validation held
    out as :func:`~napari_unetquant.train.split_validation` says); ``init`` fine-tunes."""
    torch.manual_seed(train.seed)
    if init is not None:
        unet, model = init.unet, requantized(init, quant)
    else:
        unet = unet or UNetConfig()
        model = build_unet(unet, quant)
    mask = labels.astype(np.uint8)
    if mask.shape != image.array.shape:
        raise ValueError(
            f"labels of shape {mask.shape} do not match the image {image.array.shape}; "
            f"choose the labels drawn on this image"
        )
    if not mask.any():
        raise ValueError("the labels contain no foreground; paint or load some first")
    train_pairs, val_pairs = split_validation([LabelledVolume(image, mask)])
    preprocess = (
        init.preprocess
        if init is not None
        else PreprocessConfig(spacing=median_spacing(train_pairs))
    )
    dims = unet.spatial_dims  # 3D U-Nets train on whole volumes
    validation = training_set(val_pairs, preprocess, dims) if val_pairs else None
    trainer = Trainer(model, training_set(train_pairs, preprocess, dims), validation, train)
    info = {"label": quant.label, "source": image.source, "napari_unetquant": __version__}
    return TrainingRun(trainer, unet, quant, preprocess, info)


@dataclass(frozen=True)
class SweepResult:
    """One setting of a bit-width sweep: validation Dice against what the model stores."""

    label: str
    dice: float
    mean_weight_bits: float
    stored_bytes: int
    fp32_bytes: int
    model: SegmentationModel

    def row(self) -> dict[str, Any]:
        """The CSV/table row (everything but the model)."""
        return {
            "setting": self.label,
            "validation_dice": round(self.dice, 4),
            "mean_weight_bits": round(self.mean_weight_bits, 3),
            "stored_bytes": self.stored_bytes,
            "fp32_bytes": self.fp32_bytes,
            "compression": round(self.fp32_bytes / self.stored_bytes, 2),
        }


def sweep(
    image: Volume,
    labels: np.ndarray,
    settings: list[QuantConfig],
    train: TrainConfig,
    fp_model: SegmentationModel | None = None,
    unet: UNetConfig | None = None,
) -> Iterator[Event | SweepResult]:
    """Train or fine-tune each setting and yield its :class:`SweepResult` (and the trainer's
    events in between, for progress). Quantized settings are fine-tuned from ``fp_model`` or
    from the full-precision setting trained earlier in the list; without either, from scratch.
    """
    from .quant import bit_report

    for quant in settings:
        init = None if quant.is_float else fp_model
        run = start_training(image, labels, quant, train, unet, init)
        yield from run.events()
        bundle = run.best()
        if quant.is_float:
            fp_model = bundle
        report = bit_report(bundle.model)
        yield SweepResult(
            quant.label,
            run.trainer.best_dice,
            report.mean_weight_bits,
            report.stored_bytes,
            report.fp32_bytes,
            bundle,
        )


def segment_array(
    bundle: SegmentationModel,
    image: Volume | SliceSource,
    config: InferConfig,
    device: str = "auto",
) -> Generator[int, None, np.ndarray]:
    """Segment an image held or opened in memory (a layer's NumPy or dask data) into a uint8
    mask on its own grid, slice run by slice run: yields the number of slices done as they
    finish and returns the ``(S, H, W)`` mask (``mask = yield from segment_array(...)``)."""
    source = image if isinstance(image, SliceSource) else volume_source(image)
    target = inference_device(device, config.integer)
    bundle.model.to(target)
    mask = np.empty(source.shape, np.uint8)
    done = 0
    for probabilities in segment_source(bundle, source, config, target):
        mask[done : done + len(probabilities)] = probabilities >= config.threshold
        for _ in probabilities:  # one step per slice, for progress bars
            done += 1
            yield done
    return mask


def segment_to_file(
    model_path: str, image_path: str, out_path: str, config: InferConfig, device: str = "auto"
) -> SegmentedFile:
    """``unetquant segment``: read the image a few slices at a time, segment them and write
    the mask as it is made (TIFF or NIfTI by extension; the file appears once complete)."""
    from .data.io import MASK_SUFFIXES, suffix_of

    if suffix_of(Path(out_path)) not in MASK_SUFFIXES:  # fail before the slow part
        raise ValueError(f"{out_path}: write masks as .tif, .tiff, .nii or .nii.gz")
    bundle = load_model(model_path)
    check_grey_input(bundle, model_path)
    target = inference_device(device, config.integer)
    bundle.model.to(target)
    with open_volume(image_path) as source:
        return segment_to_path(bundle, source, out_path, config, target)


def evaluate_files(
    bundle: SegmentationModel,
    images: list[str],
    labels: list[str],
    foreground_value: int | None,
    config: InferConfig,
    device: str = "auto",
) -> list[SegmentationScores]:
    """Scores of each image's segmentation against its labels, on the original grid (each
    image streamed a few slices at a time; its labels are held as a uint8 mask)."""
    if len(images) != len(labels):
        raise ValueError(
            f"{len(images)} image path(s) but {len(labels)} label path(s); give one label file "
            f"per image, in the same order"
        )
    target = inference_device(device, config.integer)
    bundle.model.to(target)
    scores = []
    for image, label in zip(images, labels, strict=True):
        with open_volume(image) as source:
            truth = label_mask(label, source, foreground_value)
            parts, done = [], 0
            for probabilities in segment_source(bundle, source, config, target):
                mask = probabilities >= config.threshold
                parts.append(segmentation_scores(mask, truth[done : done + len(mask)]))
                done += len(mask)
        scores.append(SegmentationScores.pooled(parts))
    return scores


@dataclass(frozen=True)
class Export:
    """What ``unetquant export`` wrote: the file, its size and the FP32 file's size."""

    path: str
    layout: str
    file_bytes: int
    fp32_file_bytes: int

    @property
    def ratio(self) -> float:
        return self.fp32_file_bytes / self.file_bytes


def export_model(model_path: str, out_path: str, *, integer: bool = False) -> Export:
    """Write a model file's packed form (codes at their bit width, BatchNorm folded), or with
    ``integer`` its integer network for hardware (``docs/integer-format.md``)."""
    from .infer.export import export_integer
    from .packed import fp32_state_dict_bytes

    if Path(out_path).resolve() == Path(model_path).resolve():
        raise ValueError(
            f"--out {out_path} is the model file itself; write the export to a new file "
            f"(the original keeps what fine-tuning and --resume need)"
        )
    bundle = load_model(model_path)
    if integer:
        info = {"label": bundle.quant.label, "source": Path(model_path).name, **bundle.info}
        export_integer(bundle.model, out_path, info)
        layout = "integer"
    else:
        save_model(out_path, bundle, packed=True)
        layout = "packed"
    size = Path(out_path).stat().st_size
    return Export(out_path, layout, size, fp32_state_dict_bytes(bundle.unet))
