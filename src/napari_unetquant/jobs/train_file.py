"""The training job on files: train (or fine-tune, or resume) and keep a model file holding
the best model so far, with a resume checkpoint beside it.

The model file of a network with quantized weights is packed (codes at their bit width, the
small file users deploy) unless the job asks for the float file; the float training state lives
in the resume checkpoint while the run is unfinished. Fine-tuning starts from either layout."""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import PreprocessConfig, QuantConfig, TrainConfig, UNetConfig
from ..data.io import remove_partial_writes
from ..data.preprocess import check_classes
from ..errors import SettingError
from ..events import Event, ValidationEvent
from ..modelio import SegmentationModel, load_model, model_classes, save_model
from ..packed import has_quantized_weights
from ..recipes import intensity_for
from ..train import (
    LabelledVolume,
    checkpoint_path,
    load_checkpoint,
    median_spacing,
    present_classes,
    read_pairs,
    save_checkpoint,
    split_validation,
)
from ..train.distributed import first_process_file
from .training import (
    Start,
    TrainingRun,
    begin,
    budgeted_begin,
    check_fine_tune_source,
    start_network,
)

AUTO = "auto"
ALL_CLASSES = "all"


@dataclass(frozen=True)
class TrainJob:
    """Everything a training run on files needs.

    ``unet``: the network (``None``: the default U-Net, or the ``init`` model's). ``spacing``:
    ``"auto"`` (the median spacing of the training images, when they have one, or the ``init``
    model's), ``None`` (no resampling) or ``(rows, cols)`` mm. ``foreground_value``: ``None``
    means non-zero, or the ``init`` model's value. ``checkpoint_seconds``: the resume checkpoint
    is written at least this often (between validations too), so a crash loses little.
    ``save_float``: write the float ``state_dict`` model file (larger: float weights, BatchNorm
    statistics, quantizer state) even when the weights are quantized, whose file is otherwise
    packed (see :func:`writes_packed`). ``classes``: the label values to learn; two or more
    make a multi-class model (softmax over one channel per class and the background), one is
    ``foreground_value``, ``"all"`` every non-zero value the training labels hold, ``None``
    the binary model of ``foreground_value`` (or the ``init`` model's classes).
    ``size_budget``: bytes the packed model file must fit; each quantized layer's weight bits
    are then chosen (:mod:`.budget`) before fine-tuning ``init``, ``quant`` giving the
    activations, the weight quantizer and which layers are quantized.
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
    intensity: str | None = None
    init: str | None = None
    resume: bool = False
    checkpoint_seconds: float = 60.0
    save_float: bool = False
    classes: tuple[int, ...] | str | None = None
    size_budget: int | None = None

    def __post_init__(self) -> None:
        if self.size_budget is not None:
            if self.size_budget <= 0:
                raise SettingError(
                    f"a size budget of {self.size_budget} bytes: give a positive size, e.g. "
                    f"100 KiB",
                    "size_budget",
                )
            if self.init is None:
                raise SettingError(
                    "a size budget chooses each layer's bits from a trained model's "
                    "sensitivity and fine-tunes it; name the full-precision model to start "
                    "from",
                    "size_budget",
                    "init",
                )
        if not self.checkpoint_seconds >= 0:
            raise ValueError(
                f"checkpoint every {self.checkpoint_seconds} s: give 0 (every step) or more"
            )
        if isinstance(self.classes, str) and self.classes != ALL_CLASSES:
            raise ValueError(
                f"classes {self.classes!r}: give label values (e.g. 1,2) or {ALL_CLASSES!r}"
            )
        if isinstance(self.classes, tuple):
            check_classes(self.classes)
            if self.foreground_value is not None and len(self.classes) > 1:
                raise SettingError(
                    f"a foreground value ({self.foreground_value}) and classes "
                    f"{list(self.classes)}: give one, the classes for a multi-class model",
                    "foreground_value",
                    "classes",
                )
        if len(self.val_images) != len(self.val_labels):
            raise ValueError(
                f"{len(self.val_images)} validation image(s) but {len(self.val_labels)} "
                f"validation label file(s); give one label file per image, in the same order"
            )


def _classes(job: TrainJob) -> tuple[int, ...] | None:
    """The label values of a multi-class job (two or more), else ``None``."""
    classes = job.classes
    if classes == ALL_CLASSES:
        classes = present_classes(job.labels)
    if not isinstance(classes, tuple) or len(classes) < 2:
        return None
    return classes


def _start(job: TrainJob, classes: tuple[int, ...] | None) -> Start:
    """A fresh network (one output channel per class and the background for several
    ``classes``), or (``init``) the weights of a trained model file re-quantized for ``job``,
    which must not ask for another network, preprocessing or object."""
    foreground = job.foreground_value
    if isinstance(job.classes, tuple) and len(job.classes) == 1:
        foreground = job.classes[0]
    if job.init is None:
        unet = job.unet or UNetConfig()
        if classes is not None:
            if job.unet is not None and job.unet.out_classes not in (1, len(classes) + 1):
                raise SettingError(
                    f"{len(classes)} classes need {len(classes) + 1} output channels (one per "
                    f"class and the background), not {job.unet.out_classes}; leave the output "
                    f"channels unset",
                    "classes",
                )
            unet = replace(unet, out_classes=len(classes) + 1)
        start = start_network(job.quant, job.train.seed, unet, None)
        return Start(start.model, start.unet, None, foreground, classes=classes)
    source = load_model(job.init)
    check_fine_tune_source(source, job.init)
    _check_init_conflicts(job, source, classes)
    start = start_network(job.quant, job.train.seed, None, source)
    foreground = source.info.get("foreground_value", foreground)
    return replace(start, foreground_value=foreground)


def _check_init_conflicts(
    job: TrainJob, source: SegmentationModel, classes: tuple[int, ...] | None
) -> None:
    """Fine-tuning keeps the network, preprocessing and object of the ``init`` model."""
    conflicts: list[tuple[str, str]] = []
    trained_classes = model_classes(source)
    if job.classes is not None and classes != trained_classes:
        text = "one object" if trained_classes is None else f"classes {list(trained_classes)}"
        conflicts.append((text, "classes"))
    if job.unet is not None and job.unet != source.unet:
        conflicts.append((f"network {source.unet}", "network"))
    if job.spacing != AUTO and job.spacing != source.preprocess.spacing:
        conflicts.append((f"spacing {source.preprocess.spacing}", "spacing"))
    if job.ct_window is not None and job.ct_window != source.preprocess.ct_window:
        conflicts.append((f"CT window {source.preprocess.ct_window}", "ct_window"))
    if job.intensity is not None and job.intensity != source.preprocess.intensity:
        conflicts.append((f"intensity {source.preprocess.intensity!r}", "intensity"))
    trained_on = source.info.get("foreground_value")
    if (
        job.foreground_value is not None
        and "foreground_value" in source.info
        and (job.foreground_value != trained_on)
    ):
        value = "non-zero" if trained_on is None else trained_on
        conflicts.append((f"foreground value {value}", "foreground_value"))
    if conflicts:
        raise SettingError(
            f"{job.init} was trained with "
            + "; ".join(text for text, _ in conflicts)
            + "; leave these unset: a fine-tune keeps what its model was trained with",
            *(setting for _, setting in conflicts),
        )


def _preprocess(
    job: TrainJob, pairs: list[LabelledVolume], inherited: PreprocessConfig | None
) -> PreprocessConfig:
    if inherited is not None:  # fine-tuning keeps the preprocessing the model was trained with
        return inherited
    spacing = median_spacing(pairs) if job.spacing == AUTO else job.spacing
    grid = spacing if not isinstance(spacing, str) else None
    return PreprocessConfig(
        spacing=grid,
        ct_window=job.ct_window,
        intensity=job.intensity or intensity_for(grid, job.ct_window),
    )


def _run(job: TrainJob) -> TrainingRun:
    start = _start(job, _classes(job))
    foreground, classes = start.foreground_value, start.classes
    pairs = read_pairs(list(job.images), list(job.labels), foreground, classes=classes)
    if job.val_images:
        validation = read_pairs(
            list(job.val_images), list(job.val_labels), foreground, classes=classes
        )
        split = (pairs, validation)
    else:
        split = split_validation(pairs)
    preprocess = _preprocess(job, pairs, start.preprocess)
    if job.size_budget is None:
        run = begin(start, job.quant, job.train, split, preprocess)
        run.info["init"] = job.init
        return run
    source = load_model(job.init) if job.init is not None else None
    if source is None or job.size_budget is None:  # TrainJob refuses a budget without init
        raise AssertionError("a size budget without a model to fine-tune")
    extra = {"init": job.init}
    return budgeted_begin(
        start, source, job.quant, job.train, split, preprocess, job.size_budget, extra
    )


def writes_packed(job: TrainJob, bundle: SegmentationModel) -> bool:
    """Whether ``job.out`` is written packed: when the network has quantized weights (what the
    packed layout stores in a few bits) and the job does not ask for the float file."""
    return not job.save_float and has_quantized_weights(bundle.model)


def save_best(job: TrainJob, bundle: SegmentationModel) -> None:
    """Write ``bundle`` to ``job.out``, packed as :func:`writes_packed` says."""
    save_model(job.out, bundle, packed=writes_packed(job, bundle))


def train_model(job: TrainJob) -> Generator[Event, None, None]:
    """Train, yield progress events, and keep ``job.out`` holding the best model so far
    (packed when its weights are quantized, unless ``job.save_float``; see
    :func:`writes_packed`).

    At every validation the resume checkpoint beside ``job.out`` is written first, then the
    model if it improved, both before the event is yielded (the caller may stop there); between
    validations the checkpoint is written again once ``job.checkpoint_seconds`` have passed, and
    when the caller stops iterating (a Ctrl-C handled between steps), so an interruption loses at
    most that much training. Every file goes through a temporary file and a rename; temporary
    files that a killed run left beside ``job.out`` are removed at the start. The checkpoint is
    removed once the last step is done; ``job.resume`` continues from it. Data-parallel (under
    torchrun) only the first process writes files.
    """
    run = _run(job)
    trainer = run.trainer
    identity = _identity(job, run)
    resume_file = checkpoint_path(job.out)
    writes = trainer.parallel is None or trainer.parallel.rank == 0
    if writes:
        for path in (Path(job.out), resume_file):
            remove_partial_writes(path)
    if job.resume:
        _resume(job, run, identity)
        if writes and trainer.best_state is not None:  # the model file may predate it
            save_best(job, run.best())

    saved_at = time.monotonic()
    for event in run.events():
        unfinished = event.step < event.steps
        if writes and isinstance(event, ValidationEvent):
            if unfinished:
                save_checkpoint(resume_file, trainer, identity)
                saved_at = time.monotonic()
            if event.improved:
                save_best(job, run.best())
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


def _resume(job: TrainJob, run: TrainingRun, identity: dict[str, Any]) -> None:
    """Restore the checkpoint beside ``job.out`` (data-parallel: the first process reads it
    and hands it to the others), or refuse when the run that wrote ``job.out`` finished."""
    trainer = run.trainer
    with first_process_file(checkpoint_path(job.out), trainer.parallel) as saved:
        if saved is not None:
            load_checkpoint(saved, trainer, identity)
            return
    finished = Path(job.out).exists()
    if trainer.parallel is not None:  # what the first process's disk says
        finished = trainer.parallel.from_first(finished)
    if finished:
        raise SettingError(
            f"nothing to resume: {job.out} has no checkpoint beside it, so its training "
            f"finished; train without resuming to train it again (the file will be replaced)",
            "resume",
        )


def _identity(job: TrainJob, run: TrainingRun) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one."""
    return {
        "unet": asdict(run.unet),
        "quant": asdict(job.quant),
        "train": asdict(job.train),
        "preprocess": asdict(run.preprocess),
        "data": [list(job.images), list(job.labels), list(job.val_images), list(job.val_labels)],
        "foreground_value": run.info["foreground_value"],
        "classes": run.info.get("classes"),
        "init": job.init,
        **(
            {"size_budget": job.size_budget, "bits": run.info["weight_bits_per_layer"]}
            if job.size_budget is not None
            else {}
        ),
    }
