"""``unetquant train``: options into a training job on files, progress on the terminal,
Ctrl-C between steps."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from ..config import (
    INTENSITY_NORMALISATIONS,
    LOSSES,
    SPATIAL_DIMS,
    UPSAMPLE_MODES,
    TrainConfig,
    UNetConfig,
)
from ..events import StepEvent, ValidationEvent
from ..jobs import ALL_CLASSES, TrainJob, train_model
from ..modelio import read_metadata
from ..packed import LAYOUT_PACKED
from ..quant.allocation import parse_size
from ..recipes import FINE_TUNE_LEARNING_RATE, FINE_TUNE_STEPS, train_config
from ._options import add_device_argument, add_quant_arguments, quant_config_from_args

EXIT_INTERRUPTED = 130


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    train = commands.add_parser("train", help="train a (quantized) U-Net on images and labels")
    train.add_argument("--images", nargs="+", required=True, metavar="PATH")
    train.add_argument("--labels", nargs="+", required=True, metavar="PATH")
    train.add_argument(
        "--out",
        required=True,
        metavar="MODEL",
        help="model file to write: packed (codes at their bit width, small) when the weights "
        "are quantized, else float",
    )
    train.add_argument(
        "--save-float",
        action="store_true",
        help="write the float model file (float weights, BatchNorm statistics, quantizer state; "
        "larger) even when the weights are quantized",
    )
    train.add_argument(
        "--foreground-value",
        type=int,
        metavar="V",
        help="label value of the object (default: every non-zero value)",
    )
    train.add_argument(
        "--classes",
        type=_classes,
        metavar="V,V,...",
        help="label values to learn as classes of one multi-class model (softmax; e.g. 1,2), "
        "or 'all' (every non-zero value in the training labels); a label path may join files "
        "painted in order, later over earlier, file k as value k: cord.nii.gz+gm.nii.gz",
    )
    add_quant_arguments(train)
    train.add_argument(
        "--steps",
        type=int,
        help=f"optimisation steps (default {TrainConfig.steps}; {FINE_TUNE_STEPS} with --init)",
    )
    train.add_argument(
        "--init",
        metavar="MODEL",
        help="fine-tune from this model's weights (a float or a packed model file)",
    )
    train.add_argument(
        "--size-budget",
        type=_size,
        metavar="SIZE",
        help="largest packed model file, e.g. 100KiB (KiB, MiB, kB, MB or bytes): each "
        "quantized layer's weight bits are chosen from 2, 3, 4, 5, 6, 8 by Hessian sensitivity "
        "and an exact allocation, then --init is fine-tuned; activations take --act-bits",
    )
    train.add_argument("--resume", action="store_true", help="continue an interrupted run")
    train.add_argument(
        "--checkpoint-seconds",
        type=float,
        default=TrainJob.checkpoint_seconds,
        metavar="S",
        help=f"write the resume checkpoint at least this often "
        f"(default {TrainJob.checkpoint_seconds:g})",
    )
    train.add_argument("--seed", type=int, default=TrainConfig.seed)
    add_device_argument(train)
    train.add_argument("--val-images", nargs="+", metavar="PATH")
    train.add_argument("--val-labels", nargs="+", metavar="PATH")
    _add_network_arguments(train)
    _add_schedule_arguments(train)
    train.set_defaults(handler=run)


def _add_network_arguments(train: argparse.ArgumentParser) -> None:
    train.add_argument(
        "--base-width",
        type=int,
        help=f"channels of the first level (default {UNetConfig.base_width})",
    )
    train.add_argument("--depth", type=int, help=f"pooling levels (default {UNetConfig.depth})")
    train.add_argument(
        "--spatial-dims",
        type=int,
        choices=SPATIAL_DIMS,
        help="2: the paper's U-Net on slices (default); 3: a 3D U-Net on (--crop-depth, --crop, "
        "--crop) patches of whole volumes",
    )
    train.add_argument(
        "--upsample",
        choices=UPSAMPLE_MODES,
        help="decoder upsampling: bilinear (the paper's, default) or nearest (a 2 x 2 repeat: "
        "what hls4ml and other FPGA flows implement; docs/deploying.md)",
    )
    train.add_argument(
        "--spacing",
        type=_spacing,
        default="auto",
        help="in-plane spacing to resample to: auto, none or ROWS,COLS mm",
    )
    train.add_argument(
        "--ct-window",
        type=float,
        nargs=2,
        metavar=("LEVEL", "WIDTH"),
        help="CT window in HU instead of z-score normalisation",
    )
    train.add_argument(
        "--intensity",
        choices=INTENSITY_NORMALISATIONS,
        help="intensity normalisation of new models: 'slice' z-score (default) or 'local' "
        "z-score in a 10 mm neighbourhood (independent of the field of view); a fine-tune "
        "keeps its model's",
    )


def _add_schedule_arguments(train: argparse.ArgumentParser) -> None:
    train.add_argument("--crop", type=int, default=TrainConfig.crop)
    train.add_argument(
        "--crop-depth",
        type=int,
        help=f"slices per 3D training patch (default {TrainConfig.crop_depth}; 3D U-Nets only)",
    )
    train.add_argument(
        "--batch-size", type=int, help="crops per step (default: 8, or 2 for 3D U-Nets)"
    )
    train.add_argument(
        "--lr",
        type=float,
        help=f"learning rate (default {TrainConfig.learning_rate}; "
        f"{FINE_TUNE_LEARNING_RATE} with --init)",
    )
    train.add_argument("--loss", choices=LOSSES, default=TrainConfig.loss)
    train.add_argument(
        "--validate-every", type=int, help="steps between validations (default: ~10 a run)"
    )
    train.add_argument("--no-augment", action="store_true")
    train.add_argument("--elastic", action="store_true", help="add elastic deformations")
    train.add_argument(
        "--scanner-augment",
        type=float,
        default=TrainConfig.scanner_augment,
        metavar="S",
        help="0 to 1: also vary gamma, bias field, blur and noise as other scanners do",
    )


def _spacing(text: str) -> tuple[float, float] | str | None:
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        rows, cols = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"spacing {text!r}: use auto, none or ROWS,COLS in mm (e.g. 0.5,0.5)"
        ) from None
    return rows, cols


def unet_from_args(args: argparse.Namespace) -> UNetConfig | None:
    """The network the options ask for; ``None`` when none is asked for (default or --init's)."""
    chosen = {
        "base_width": args.base_width,
        "depth": args.depth,
        "spatial_dims": args.spatial_dims,
        "upsample": args.upsample,
    }
    if all(value is None for value in chosen.values()):
        return None
    base = UNetConfig()
    if args.init:  # a fine-tune: what is not set is its model's (a conflict is then a real one)
        unet = read_metadata(args.init).get("unet")
        if isinstance(unet, dict):  # a network this version cannot build: the job reports it
            with contextlib.suppress(TypeError, ValueError):
                base = UNetConfig(**unet)
    return replace(base, **{k: v for k, v in chosen.items() if v is not None})


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The recipe's settings for this run, with what the options set explicitly."""
    dims = args.spatial_dims or (_init_dims(args.init) if args.init else 2)
    recipe = train_config(fine_tune=args.init is not None, spatial_dims=dims, steps=args.steps)
    chosen = {
        "batch_size": args.batch_size,
        "crop_depth": args.crop_depth,
        "learning_rate": args.lr,
        "validate_every": args.validate_every,
    }
    return replace(
        recipe,
        crop=args.crop,
        loss=args.loss,
        augment=not args.no_augment,
        elastic=args.elastic,
        scanner_augment=args.scanner_augment,
        seed=args.seed,
        device=args.device,
        **{key: value for key, value in chosen.items() if value is not None},
    )


def _init_dims(path: str) -> int:
    """The spatial dims of the model a fine-tune starts from (a 3D model fine-tunes in 3D)."""
    unet = read_metadata(path).get("unet")
    dims = unet.get("spatial_dims", 2) if isinstance(unet, dict) else 2
    return dims if dims in SPATIAL_DIMS else 2


def job_from_args(args: argparse.Namespace) -> TrainJob:
    if args.crop_depth is not None and args.spatial_dims != 3 and not args.init:
        raise ValueError(
            "--crop-depth sets the slices of 3D training patches; add --spatial-dims 3 for a "
            "3D U-Net, or drop it (2D U-Nets train on single slices)"
        )
    if args.size_budget is not None and (args.weight_bits or args.weight_format):
        raise ValueError(
            "--size-budget chooses each layer's weight bits; drop --weight-bits and "
            "--weight-format (--quantizer still chooses fixed or lsq weights)"
        )
    if args.size_budget is not None and args.save_float:
        raise ValueError(
            "--size-budget is the size of the packed model file; drop --save-float (unetquant "
            "export --format packed writes the packed file of a float one, but a budgeted "
            "training writes it directly)"
        )
    quant = quant_config_from_args(args)
    if args.size_budget is not None and args.quantizer in ("fixed", "lsq"):
        # the quantizer's weights, their widths chosen per layer by the budget
        quant = quant_config_from_args(argparse.Namespace(**{**vars(args), "weight_bits": 8}))
    return TrainJob(
        images=tuple(args.images),
        labels=tuple(args.labels),
        out=args.out,
        quant=quant,
        unet=unet_from_args(args),
        train=train_config_from_args(args),
        foreground_value=args.foreground_value,
        val_images=tuple(args.val_images or ()),
        val_labels=tuple(args.val_labels or ()),
        spacing=args.spacing,
        ct_window=tuple(args.ct_window) if args.ct_window else None,
        intensity=args.intensity,
        init=args.init,
        resume=args.resume,
        checkpoint_seconds=args.checkpoint_seconds,
        save_float=args.save_float,
        classes=args.classes,
        size_budget=args.size_budget,
    )


def _size(text: str) -> int:
    """``--size-budget``: bytes from 100KiB, 0.5MiB, 40kB or 40000."""
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _classes(text: str) -> tuple[int, ...] | str:
    """``--classes``: ``all`` or comma-separated integer label values."""
    if text.strip().lower() == ALL_CLASSES:
        return ALL_CLASSES
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give integer label values separated by commas (1,2) or 'all'"
        ) from None
    return values


def run(args: argparse.Namespace) -> int:
    """Train; under torchrun, data-parallel over its processes (the first one reports)."""
    from ..train.distributed import Torchrun, check_batch_size, process_group

    launch = Torchrun.from_environment()
    job = job_from_args(args)
    if launch is not None:  # fail before joining the others
        check_batch_size(job.train.batch_size, launch.world_size)
    with process_group(args.device):
        return _train(job, args.resume, launch is None or launch.writes_files)


def _train(job: TrainJob, resume: bool, reports: bool) -> int:
    best, step = None, None
    events = train_model(job)
    try:
        with _stop_between_steps(reports and "WORLD_SIZE" not in os.environ) as stop:
            for event in events:
                if reports and resume and step is None and event.step > 1:
                    print(f"resuming after step {event.step - 1}", file=sys.stderr)
                step = event.step
                if reports:
                    progress(event)
                best = getattr(event, "best_dice", best)
                if stop.requested:
                    events.close()  # saves the checkpoint at this step
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        if reports:
            where = f" at step {step}" if step is not None else ""
            print(
                f"unetquant train: interrupted{where}; the best model so far is in {job.out} "
                f"(continue with the same command and --resume)",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED
    finally:
        events.close()
    if reports:
        if best is None:
            print(f"{job.out} is already complete: nothing left to train")
        else:
            print(f"saved {job.out} ({_written(job)}, best validation Dice {best:.4f})")
    return 0


def _written(job: TrainJob) -> str:
    """``W4A6, packed, 37.2 KiB``: what the model file holds and its size (and the budget it
    was allocated for)."""
    metadata = read_metadata(job.out)
    layout = "packed" if metadata["layout"] == LAYOUT_PACKED else "float"
    label = metadata.get("info", {}).get("label", job.quant.label)
    text = f"{label}, {layout}, {Path(job.out).stat().st_size / 1024:.1f} KiB"
    if job.size_budget is not None:
        text += f" (budget {job.size_budget / 1024:.1f} KiB for the packed file)"
    return text


def progress(event: object, out: TextIO | None = None) -> None:
    """A progress line on a terminal; a line per validation everywhere."""
    out = out or sys.stderr
    if isinstance(event, StepEvent) and out.isatty():
        minutes, seconds = divmod(int(event.eta_seconds), 60)
        out.write(
            f"\rstep {event.step}/{event.steps}  loss {event.loss:.4f}  "
            f"ETA {minutes}m{seconds:02d}s "
        )
    elif isinstance(event, ValidationEvent):
        mark = " (best, saved)" if event.improved else ""
        out.write(
            f"\rstep {event.step}/{event.steps}  validation Dice {event.dice:.4f}{mark}"
            f"  best {event.best_dice:.4f} at step {event.best_step}\n"
        )


class _StopRequest:
    requested = False


@contextlib.contextmanager
def _stop_between_steps(enabled: bool) -> Iterator[_StopRequest]:
    """The first Ctrl-C asks training to stop after the current step (the resume checkpoint
    then holds that step); a second one stops at once. Off under torchrun, which signals every
    process itself."""
    stop = _StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request(signum: int, frame: object) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        print(
            "unetquant train: stopping after this step (Ctrl-C again to stop now)", file=sys.stderr
        )

    previous = signal.signal(signal.SIGINT, request)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
