"""The ``unetquant`` command line (also ``python -m napari_unetquant``).

A thin shell: parse arguments into configs, call the jobs, print. User mistakes end with one
line on stderr and a non-zero exit code (2), never a traceback. The commands and options of the
trainer issue are a contract other tools rely on: extend, never rename or drop.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn, TextIO, TypeVar

from .config import (
    FLOAT_BITS,
    LOSSES,
    MASK_FORMATS,
    METHODS,
    SPATIAL_DIMS,
    InferConfig,
    QuantConfig,
    QuantizerConfig,
    TrainConfig,
    UNetConfig,
)

Number = TypeVar("Number", int, float)
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
NATURAL_BITS = {"ternary": 2, "binary": 1}
# Fine-tuning a quantized model from a trained one needs fewer steps and a gentler rate.
FINE_TUNE_STEPS = 800
FINE_TUNE_LR = 5e-4


def _add_quant_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weight-bits", type=int, help="stored weight bits, sign included (32 = full precision)"
    )
    parser.add_argument(
        "--act-bits", type=int, help="stored activation bits, sign included (32 = full precision)"
    )
    parser.add_argument(
        "--quantizer",
        choices=[m for m in METHODS if m != "float"],
        default="fixed",
        help="fixed (dynamic fixed point; default), lsq (learned step), ternary or binary",
    )
    parser.add_argument("--weight-format", help="paper-style fixed-point weight format, e.g. Q0.4")
    parser.add_argument("--act-format", help="paper-style fixed-point activation format, e.g. Q6.0")
    parser.add_argument(
        "--quantize-edges",
        action="store_true",
        help="also quantize the first block and the last convolution (full precision by default)",
    )


def quant_config_from_args(args: argparse.Namespace, default_bits: int = FLOAT_BITS) -> QuantConfig:
    """The :class:`QuantConfig` that the quantization options ask for.

    Bits left out mean ``default_bits`` for fixed point and LSQ, and the natural width of
    ternary (2) and binary (1); 32 always means full precision.
    """

    def one(bits: int | None, name: str | None, activations: bool) -> QuantizerConfig:
        try:
            if name:
                return QuantizerConfig.from_format(name)
            chosen = NATURAL_BITS.get(args.quantizer, default_bits) if bits is None else bits
            return QuantizerConfig.from_bits(args.quantizer, chosen, activations=activations)
        except ValueError as error:  # say which option was wrong
            kind = "act" if activations else "weight"
            option = f"--{kind}-format {name}" if name else f"--{kind}-bits {bits}"
            raise ValueError(f"{option}: {error}") from None

    edges = () if args.quantize_edges else QuantConfig().edge_layers
    return QuantConfig(
        weight=one(args.weight_bits, args.weight_format, activations=False),
        act=one(args.act_bits, args.act_format, activations=True),
        edge_layers=edges,
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


def _progress(event: object, out: TextIO | None = None) -> None:
    """A progress line on a terminal; a line per validation everywhere."""
    from .train import StepEvent, ValidationEvent

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


def _unet_from_args(args: argparse.Namespace) -> UNetConfig | None:
    """The network the options ask for; ``None`` when none is asked for (default or --init's)."""
    if args.base_width is None and args.depth is None and args.spatial_dims is None:
        return None
    return UNetConfig(
        base_width=_default(args.base_width, UNetConfig.base_width),
        depth=_default(args.depth, UNetConfig.depth),
        spatial_dims=_default(args.spatial_dims, UNetConfig.spatial_dims),
    )


def _default(value: Number | None, default: Number) -> Number:
    return default if value is None else value


def _cmd_train(args: argparse.Namespace) -> int:
    """Train; under torchrun, data-parallel over its processes (the first one reports)."""
    from .train.distributed import Torchrun, check_batch_size, process_group

    launch = Torchrun.from_environment()
    if launch is not None:  # fail before joining the others
        check_batch_size(args.batch_size, launch.world_size)
    with process_group(args.device):
        return _train(args, launch is None or launch.writes_files)


def _train(args: argparse.Namespace, reports: bool) -> int:
    from .jobs import TrainJob, train_model

    if args.crop_depth is not None and args.spatial_dims != 3 and not args.init:
        raise ValueError(
            "--crop-depth sets the slices of 3D training patches; add --spatial-dims 3 for a "
            "3D U-Net, or drop it (2D U-Nets train on single slices)"
        )

    job = TrainJob(
        images=tuple(args.images),
        labels=tuple(args.labels),
        out=args.out,
        quant=quant_config_from_args(args),
        unet=_unet_from_args(args),
        train=TrainConfig(
            steps=_default(args.steps, FINE_TUNE_STEPS if args.init else TrainConfig.steps),
            batch_size=args.batch_size,
            crop=args.crop,
            crop_depth=_default(args.crop_depth, TrainConfig.crop_depth),
            learning_rate=_default(
                args.lr, FINE_TUNE_LR if args.init else TrainConfig.learning_rate
            ),
            loss=args.loss,
            validate_every=args.validate_every,
            augment=not args.no_augment,
            elastic=args.elastic,
            seed=args.seed,
            device=args.device,
        ),
        foreground_value=args.foreground_value,
        val_images=tuple(args.val_images or ()),
        val_labels=tuple(args.val_labels or ()),
        spacing=args.spacing,
        ct_window=tuple(args.ct_window) if args.ct_window else None,
        init=args.init,
        resume=args.resume,
        checkpoint_seconds=args.checkpoint_seconds,
    )
    if len(job.val_images) != len(job.val_labels):
        raise ValueError("give as many --val-labels as --val-images")
    best, step = None, None
    events = train_model(job)
    try:
        with _stop_between_steps(reports and "WORLD_SIZE" not in os.environ) as stop:
            for event in events:
                if reports and args.resume and step is None and event.step > 1:
                    print(f"resuming after step {event.step - 1}", file=sys.stderr)
                step = event.step
                if reports:
                    _progress(event)
                best = getattr(event, "best_dice", best)
                if stop.requested:
                    events.close()  # saves the checkpoint at this step
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        if not reports:
            return EXIT_INTERRUPTED
        where = f" at step {step}" if step is not None else ""
        print(
            f"unetquant train: interrupted{where}; the best model so far is in {args.out} "
            f"(continue with the same command and --resume)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    finally:
        events.close()
    if not reports:
        return 0
    if best is None:
        print(f"{args.out} is already complete: nothing left to train")
        return 0
    print(f"saved {args.out} ({job.quant.label}, best validation Dice {best:.4f})")
    return 0


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


def _infer_config(args: argparse.Namespace) -> InferConfig:
    return InferConfig(
        tile=args.tile,
        tile_3d=tuple(args.tile_3d),
        threshold=args.threshold,
        integer=args.integer,
    )


def _cmd_segment(args: argparse.Namespace) -> int:
    from .jobs import segment_to_file

    batch = args.images or args.input_dir
    if batch:
        if args.image or args.out:
            raise ValueError("give either --image and --out, or batch options with --out-dir")
        return _segment_batch(args)
    batch_only = ("out_dir", "labels", "labels_dir", "csv", "dask_scheduler", "foreground_value")
    used = [f"--{name.replace('_', '-')}" for name in batch_only if getattr(args, name)]
    if used:
        raise ValueError(f"{', '.join(used)} need --images or --input-dir (batch mode)")
    if not (args.image and args.out):
        raise ValueError("give --image and --out (or --images/--input-dir with --out-dir)")
    result = segment_to_file(args.model, args.image, args.out, _infer_config(args), args.device)
    print(f"wrote {args.out}: {result.shape} mask, {result.foreground} foreground pixels")
    return 0


def _segment_batch(args: argparse.Namespace) -> int:
    """``segment`` over many volumes: masks into ``--out-dir``, one CSV row per volume."""
    from pathlib import Path

    from .batch import list_volumes, plan_batch, segment_batch, write_scores_csv

    if not args.out_dir:
        raise ValueError("batch mode writes into a folder: give --out-dir")
    if args.images and args.input_dir:
        raise ValueError("give --images or --input-dir, not both")
    if args.labels and args.labels_dir:
        raise ValueError("give --labels or --labels-dir, not both")
    out_dir = Path(args.out_dir).resolve()
    listed = list_volumes(args.input_dir) if args.input_dir else []
    images = args.images or [i for i in listed if Path(i).resolve() != out_dir]  # not the masks
    items = plan_batch(images, args.out_dir, args.labels, args.labels_dir, args.out_format)
    client = _dask_client(args.dask_scheduler) if args.dask_scheduler else None
    order = {item.image: index for index, item in enumerate(items)}
    results = []
    try:
        config = _infer_config(args)
        runs = segment_batch(args.model, items, config, args.device, args.foreground_value, client)
        for done, result in enumerate(runs, start=1):
            results.append(result)
            if result.error:
                print(f"[{done}/{len(items)}] {result.image}: error: {result.error}")
                continue
            dice = f", Dice {result.scores.dice_volume:.4f}" if result.scores else ""
            print(
                f"[{done}/{len(items)}] {result.image} -> {result.out}: {result.shape} mask, "
                f"{result.foreground} foreground voxels{dice} ({result.seconds:.1f} s)"
            )
    finally:
        if client is not None:
            client.close()
        if results:  # what finished is reported even when the rest was interrupted
            results.sort(key=lambda r: order[r.image])
            csv_path = args.csv or str(Path(args.out_dir) / "segment.csv")
            write_scores_csv(csv_path, results)
            print(f"wrote {csv_path}")
    failed = [r for r in results if r.error]
    scored = [r.scores for r in results if r.scores is not None]
    if scored:
        from .metrics import SegmentationScores

        print(f"volume Dice {SegmentationScores.pooled(scored).dice_volume:.4f} over all voxels")
    if failed:
        print(f"{len(failed)} of {len(items)} volume(s) failed (see the CSV)", file=sys.stderr)
        return 1
    return 0


def _dask_client(address: str) -> Any:
    try:
        from distributed import Client
    except ImportError as error:
        raise ValueError(
            "--dask-scheduler needs dask.distributed: pip install 'napari-unetquant[cluster]'"
        ) from error
    try:
        return Client(address, timeout=30)  # type: ignore[no-untyped-call]
    except OSError as error:
        raise ValueError(
            f"no dask scheduler answered at {address} ({error}); start one "
            f"(dask scheduler) or check the address"
        ) from error


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .jobs import evaluate_files
    from .metrics import SegmentationScores
    from .modelio import check_grey_input, load_model

    bundle = load_model(args.model)
    check_grey_input(bundle, args.model)
    scores = evaluate_files(
        bundle, args.images, args.labels, args.foreground_value, _infer_config(args), args.device
    )
    pooled = SegmentationScores.pooled(scores)
    if args.json:
        result: dict[str, object] = dict(pooled.as_dict())
        result["per_image"] = [
            {"image": image, **s.as_dict()} for image, s in zip(args.images, scores, strict=True)
        ]
        print(json.dumps(result))
        return 0
    for image, s in zip(args.images, scores, strict=True):
        print(f"{image}: Dice {s.dice_mean:.4f} (volume {s.dice_volume:.4f}), {s.n_slices} slices")
    print(
        f"mean Dice {pooled.dice_mean:.4f}  volume Dice {pooled.dice_volume:.4f}  "
        f"mean IoU {pooled.iou_mean:.4f}  over {pooled.n_slices} slices"
    )
    return 0


def model_summary(path: str) -> dict[str, object]:
    """What ``unetquant info --json`` reports about a model file."""
    return _summary_and_table(path)[0]


def _summary_and_table(path: str) -> tuple[dict[str, object], str]:
    """The JSON summary of a model file and its per-layer table."""
    from dataclasses import asdict

    from .modelio import load_model
    from .packed import LAYOUT_PACKED, file_report
    from .quant import bit_report

    bundle = load_model(path)
    report = bit_report(bundle.model)
    quant = bundle.quant
    on_disk = file_report(path, bundle.model, bundle.unet)
    summary: dict[str, object] = {
        "label": quant.label,
        "weight_bits": quant.weight.bits,
        "act_bits": quant.act.bits,
        "quantizer": quant.weight.method if not quant.weight.is_float else quant.act.method,
        "weight_format": quant.weight.format_name,
        "act_format": quant.act.format_name,
        "parameters": sum(p.numel() for p in bundle.model.parameters()),
        "layout": bundle.layout,
        "file_bytes": on_disk.file_bytes,
        "fp32_file_bytes": on_disk.fp32_file_bytes,
        "file_ratio": on_disk.ratio,
        "stored_bytes": report.stored_bytes,
        "fp32_bytes": report.fp32_bytes,
        "mean_weight_bits": report.mean_weight_bits,
        "network": _network_text(bundle.unet),
        "spatial_dims": bundle.unet.spatial_dims,
        "unet": asdict(bundle.unet),
        "preprocess": asdict(bundle.preprocess),
        "training": bundle.info,
        "layers": [asdict(layer) for layer in report.layers],
        "layer_bytes": [asdict(layer) for layer in on_disk.layers],
    }
    if bundle.layout == LAYOUT_PACKED:
        return summary, on_disk.table()
    return summary, (
        f"{report.table()}\nthis file holds float32 weights ({on_disk.file_bytes} bytes); the "
        f"table shows the stored bits 'unetquant export' packs them to"
    )


def _network_text(unet: UNetConfig) -> str:
    """``2D U-Net, base width 16, depth 3``."""
    return f"{unet.spatial_dims}D U-Net, base width {unet.base_width}, depth {unet.depth}"


def _cmd_info(args: argparse.Namespace) -> int:
    summary, table = _summary_and_table(args.model)
    if args.json:
        print(json.dumps(summary))
        return 0
    keys = ("label", "network", "weight_bits", "act_bits", "quantizer", "parameters", "layout")
    for key in keys:
        print(f"{key:<12}{summary[key]}")
    print(
        f"{'file':<12}{summary['file_bytes']} bytes; the FP32 state_dict file of this network: "
        f"{summary['fp32_file_bytes']} bytes ({summary['file_ratio']:.2f}x smaller)"
    )
    training = summary["training"]
    assert isinstance(training, dict)
    print(
        f"{'validation':<12}Dice {training.get('validation_dice')} at step "
        f"{training.get('best_step')} of {training.get('steps')}"
    )
    print(table)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .jobs import export_model

    written = export_model(args.model, args.out, integer=args.integer)
    print(
        f"wrote {written.path} ({written.layout}): {written.file_bytes} bytes, "
        f"{written.ratio:.2f}x smaller than the FP32 state_dict file "
        f"({written.fp32_file_bytes} bytes)"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, format_rows, run_demo

    config = DemoConfig(
        fp_steps=args.fp_steps,
        quant_steps=args.quant_steps,
        weight_bits=args.weight_bits,
        act_bits=args.act_bits,
        seed=args.seed,
        out_dir=args.out_dir,
    )
    print(format_rows(run_demo(config)))
    return 0


def _cmd_bits(args: argparse.Namespace) -> int:
    from .model import build_unet
    from .quant import bit_report

    quant = quant_config_from_args(args, default_bits=4)
    unet = UNetConfig(base_width=args.base_width, depth=args.depth, spatial_dims=args.spatial_dims)
    model = build_unet(unet, quant)
    print(f"{quant.label}: {_network_text(unet)}")
    print(bit_report(model).table())
    return 0


def _add_infer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threshold", type=float, default=0.5, help="probability threshold")
    parser.add_argument(
        "--tile", type=int, default=InferConfig.tile, help="sliding-window tile size (px)"
    )
    parser.add_argument(
        "--tile-3d",
        type=int,
        nargs=3,
        default=InferConfig.tile_3d,
        metavar=("SLICES", "ROWS", "COLS"),
        help="sliding-window box of 3D U-Nets",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument(
        "--integer",
        action="store_true",
        help="run quantized layers on integer codes (int8 kernels, int32 accumulators; CPU)",
    )


def _add_train_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    train = commands.add_parser("train", help="train a (quantized) U-Net on images and labels")
    train.add_argument("--images", nargs="+", required=True, metavar="PATH")
    train.add_argument("--labels", nargs="+", required=True, metavar="PATH")
    train.add_argument("--out", required=True, metavar="MODEL", help="model file to write")
    train.add_argument(
        "--foreground-value",
        type=int,
        metavar="V",
        help="label value of the object (default: every non-zero value)",
    )
    _add_quant_arguments(train)
    train.add_argument(
        "--steps",
        type=int,
        help=f"optimisation steps (default {TrainConfig.steps}; {FINE_TUNE_STEPS} with --init)",
    )
    train.add_argument("--init", metavar="MODEL", help="fine-tune from this model's weights")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run")
    train.add_argument(
        "--checkpoint-seconds",
        type=float,
        default=60.0,
        metavar="S",
        help="write the resume checkpoint at least this often (default 60)",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    train.add_argument("--val-images", nargs="+", metavar="PATH")
    train.add_argument("--val-labels", nargs="+", metavar="PATH")
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
    train.add_argument("--crop", type=int, default=TrainConfig.crop)
    train.add_argument(
        "--crop-depth",
        type=int,
        help=f"slices per 3D training patch (default {TrainConfig.crop_depth}; 3D U-Nets only)",
    )
    train.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    train.add_argument(
        "--lr",
        type=float,
        help=f"learning rate (default {TrainConfig.learning_rate}; {FINE_TUNE_LR} with --init)",
    )
    train.add_argument("--loss", choices=LOSSES, default=TrainConfig.loss)
    train.add_argument("--validate-every", type=int, default=TrainConfig.validate_every)
    train.add_argument("--no-augment", action="store_true")
    train.add_argument("--elastic", action="store_true", help="add elastic deformations")
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
    train.set_defaults(handler=_cmd_train)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), like every other user error here."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="unetquant",
        description="Quantization-aware training of low-bit fixed-point U-Nets for medical image "
        "segmentation.",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    _add_train_parser(commands)

    segment = commands.add_parser(
        "segment",
        help="segment an image (--image, --out) or many (--images/--input-dir, --out-dir)",
    )
    segment.add_argument("--model", required=True)
    segment.add_argument("--image", metavar="PATH", help="one image to segment")
    segment.add_argument("--out", metavar="PATH", help="its mask: .tif/.tiff or .nii/.nii.gz")
    batch = segment.add_argument_group("batch mode: many volumes, masks into --out-dir")
    batch.add_argument("--images", nargs="+", metavar="PATH", help="volumes to segment")
    batch.add_argument("--input-dir", metavar="DIR", help="segment every volume in this folder")
    batch.add_argument("--out-dir", metavar="DIR", help="where the masks and the CSV go")
    batch.add_argument(
        "--labels", nargs="+", metavar="PATH", help="labels per image (same order): Dice in the CSV"
    )
    batch.add_argument(
        "--labels-dir", metavar="DIR", help="labels named like the images: Dice in the CSV"
    )
    batch.add_argument("--foreground-value", type=int, metavar="V", help="label value scored")
    batch.add_argument("--csv", metavar="PATH", help="the CSV's path (default OUT_DIR/segment.csv)")
    batch.add_argument(
        "--out-format",
        choices=MASK_FORMATS,
        default="same",
        help="mask files: same (as the image when TIFF/NIfTI, else .tif) or this suffix",
    )
    batch.add_argument(
        "--dask-scheduler",
        metavar="ADDRESS",
        help="run the volumes on a dask.distributed cluster (e.g. tcp://host:8786)",
    )
    _add_infer_arguments(segment)
    segment.set_defaults(handler=_cmd_segment)

    evaluate = commands.add_parser("evaluate", help="Dice and IoU of a model against labels")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--images", nargs="+", required=True, metavar="PATH")
    evaluate.add_argument("--labels", nargs="+", required=True, metavar="PATH")
    evaluate.add_argument("--foreground-value", type=int, metavar="V")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    _add_infer_arguments(evaluate)
    evaluate.set_defaults(handler=_cmd_evaluate)

    info = commands.add_parser("info", help="bits, size and training summary of a model file")
    info.add_argument("--model", required=True)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=_cmd_info)

    export = commands.add_parser(
        "export", help="write a packed model file (codes at their bit width), or --integer"
    )
    export.add_argument("--model", required=True)
    export.add_argument("--out", required=True, metavar="PATH", help="file to write")
    export.add_argument(
        "--integer",
        action="store_true",
        help="write the integer network for hardware (docs/integer-format.md)",
    )
    export.set_defaults(handler=_cmd_export)

    demo = commands.add_parser(
        "demo", help="train FP and W4A6 on a generated EM-like phantom and compare them"
    )
    demo.add_argument("--fp-steps", type=int, default=400)
    demo.add_argument("--quant-steps", type=int, default=200)
    demo.add_argument("--weight-bits", type=int, default=4)
    demo.add_argument("--act-bits", type=int, default=6)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out-dir", default="demo-output", help="where models and the PNG go")
    demo.set_defaults(handler=_cmd_demo)

    bits = commands.add_parser(
        "bits", help="per-layer stored bits and memory of a U-Net at given bit widths"
    )
    _add_quant_arguments(bits)
    bits.add_argument("--base-width", type=int, default=16)
    bits.add_argument("--depth", type=int, default=3)
    bits.add_argument(
        "--spatial-dims", type=int, choices=SPATIAL_DIMS, default=2, help="2D or 3D U-Net"
    )
    bits.set_defaults(handler=_cmd_bits)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = build_parser().parse_args(argv)
    command = f"unetquant {args.command}{_rank_tag()}"
    try:
        return int(args.handler(args))
    except (ValueError, OSError) as error:  # user mistakes, bad files: one line, no traceback
        message = " ".join(str(error).split())
        print(f"{command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _rank_tag() -> str:
    """`` (rank R of N)`` in a process torchrun started, so messages say which one failed."""
    world_size, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "?")
    return f" (rank {rank} of {world_size})" if world_size not in ("", "0", "1") else ""
