"""``unetquant segment`` (one image, or a batch into a folder) and ``unetquant evaluate``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..batch import list_volumes, plan_batch, segment_batch, write_scores_csv
from ..config import MASK_FORMATS
from ..jobs import evaluate_files, segment_to_file
from ..metrics import ClassScores, Scores, pooled_scores
from ..modelio import check_grey_input, load_model
from ._options import add_infer_arguments, infer_config


def add_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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
        "--labels",
        nargs="+",
        metavar="PATH",
        help="labels per image (same order; a+b paints files a, b as values 1, 2): Dice in the CSV",
    )
    batch.add_argument(
        "--labels-dir", metavar="DIR", help="labels named like the images: Dice in the CSV"
    )
    batch.add_argument(
        "--foreground-value",
        type=int,
        metavar="V",
        help="label value scored (binary models; a multi-class model scores each of its values)",
    )
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
    add_infer_arguments(segment)
    segment.set_defaults(handler=run_segment)

    evaluate = commands.add_parser("evaluate", help="Dice and IoU of a model against labels")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--images", nargs="+", required=True, metavar="PATH")
    evaluate.add_argument("--labels", nargs="+", required=True, metavar="PATH")
    evaluate.add_argument(
        "--foreground-value",
        type=int,
        metavar="V",
        help="label value scored (binary models; a multi-class model scores each of its values)",
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    add_infer_arguments(evaluate)
    evaluate.set_defaults(handler=run_evaluate)


def run_segment(args: argparse.Namespace) -> int:
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
    result = segment_to_file(args.model, args.image, args.out, infer_config(args), args.device)
    print(f"wrote {args.out}: {result.shape} mask, {result.foreground} foreground pixels")
    return 0


def _segment_batch(args: argparse.Namespace) -> int:
    """``segment`` over many volumes: masks into ``--out-dir``, one CSV row per volume."""
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
        config = infer_config(args)
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
        pooled = pooled_scores(scored)
        print(f"volume Dice {pooled.dice_volume:.4f} over all voxels{_per_class_text(pooled)}")
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


def run_evaluate(args: argparse.Namespace) -> int:
    bundle = load_model(args.model)
    check_grey_input(bundle, args.model)
    scores = evaluate_files(
        bundle, args.images, args.labels, args.foreground_value, infer_config(args), args.device
    )
    pooled = pooled_scores(scores)
    if args.json:
        result: dict[str, object] = dict(pooled.as_dict())
        result["per_image"] = [
            {"image": image, **s.as_dict()} for image, s in zip(args.images, scores, strict=True)
        ]
        print(json.dumps(result))
        return 0
    for image, s in zip(args.images, scores, strict=True):
        print(
            f"{image}: Dice {s.dice_mean:.4f} (volume {s.dice_volume:.4f}), {s.n_slices} slices"
            f"{_per_class_text(s)}"
        )
    print(
        f"mean Dice {pooled.dice_mean:.4f}  volume Dice {pooled.dice_volume:.4f}  "
        f"mean IoU {pooled.iou_mean:.4f}  over {pooled.n_slices} slices{_per_class_text(pooled)}"
    )
    return 0


def _per_class_text(scores: Scores) -> str:
    """A multi-class model's mean Dice per label value, after its foreground scores (nothing
    for a binary model's)."""
    if not isinstance(scores, ClassScores):
        return ""
    each = ", ".join(f"{value} {s.dice_mean:.4f}" for value, s in scores.per_class.items())
    return f"; mean Dice per class: {each} (mean over classes {scores.dice_mean_over_classes:.4f})"
