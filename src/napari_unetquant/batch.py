"""Segmenting many or large volumes: streamed from file to file, one after another or on a
dask cluster, with a CSV of what was done (and Dice per volume when labels are given: per
class too for multi-class models, whose masks are label maps in the label values they learnt).

Every volume is read a few slices at a time and its mask written as it is made
(:func:`~napari_unetquant.infer.predict.segment_source`,
:func:`~napari_unetquant.data.write.write_mask_stream`), so memory does not grow with the
volume's depth, and no output file exists until it is complete.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import MASK_FORMATS, InferConfig
from .data.io import (
    MASK_SUFFIXES,
    PICTURE_SUFFIXES,
    TIFF_SUFFIXES,
    VOLUME_SUFFIXES,
    InputError,
    SliceSource,
    check_readable,
    label_files,
    labels_on_image_grid,
    open_volume,
    read_labels,
    suffix_of,
    write_csv,
    write_mask_stream,
)
from .data.preprocess import class_indices, class_values, foreground_mask
from .devices import inference_device
from .errors import SettingError
from .infer.predict import predicted_classes, segment_source
from .metrics import ClassScores, Scores, class_scores, pooled_scores, segmentation_scores
from .modelio import SegmentationModel, check_grey_input, load_model, model_classes


@dataclass(frozen=True)
class SegmentedFile:
    """One volume of a batch: where its mask went, and its scores when labels were given
    (:class:`~napari_unetquant.metrics.ClassScores` for a multi-class model; ``error``
    instead when it failed: the other volumes go on)."""

    image: str
    out: str
    labels: str | None = None
    shape: tuple[int, int, int] | None = None
    foreground: int = 0
    seconds: float = 0.0
    scores: Scores | None = None
    error: str | None = None

    def row(self) -> dict[str, Any]:
        """The CSV row (with ``dice_<value>``, each class's volume Dice, for a multi-class
        model's scores)."""
        scores = self.scores
        per_class = scores.per_class if isinstance(scores, ClassScores) else {}
        return {
            "image": self.image,
            "labels": self.labels or "",
            "mask": "" if self.error else self.out,
            "slices": self.shape[0] if self.shape else "",
            "foreground_voxels": "" if self.error else self.foreground,
            "dice_volume": f"{scores.dice_volume:.4f}" if scores else "",
            "dice_mean": f"{scores.dice_mean:.4f}" if scores else "",
            "iou_mean": f"{scores.iou_mean:.4f}" if scores else "",
            **{f"dice_{value}": f"{s.dice_volume:.4f}" for value, s in per_class.items()},
            "seconds": f"{self.seconds:.2f}",
            "error": self.error or "",
        }


def segment_to_path(
    bundle: SegmentationModel,
    source: SliceSource,
    out: str | Path,
    config: InferConfig,
    device: torch.device | str = "cpu",
    labels: np.ndarray | None = None,
) -> SegmentedFile:
    """Segment ``source`` into the mask file ``out`` (TIFF or NIfTI by suffix, atomically),
    scoring it against ``labels`` (same shape: :func:`label_mask`'s mask or class indices) on
    the way when given. A binary model writes a uint8 ``{0, 1}`` mask, a multi-class one a
    label map in the label values it learnt (0 the background)."""
    if labels is not None and labels.shape != source.shape:
        raise InputError(
            f"labels of shape {labels.shape} do not match the image {source.source} of shape "
            f"{source.shape}; give the labels drawn on this image"
        )
    start = time.perf_counter()
    classes = model_classes(bundle)
    counts = {"foreground": 0, "done": 0}
    parts: list[Scores] = []

    def masks() -> Iterator[np.ndarray]:
        for probabilities in segment_source(bundle, source, config, device):
            indices = predicted_classes(probabilities, config.threshold)
            done = counts["done"]
            if labels is not None:
                parts.append(scores_of(indices, labels[done : done + len(indices)], classes))
            counts["foreground"] += int(np.count_nonzero(indices))
            counts["done"] = done + len(indices)
            yield class_values(indices, classes)

    dtype = class_values(np.zeros(0, np.uint8), classes).dtype
    write_mask_stream(out, masks(), source.shape, dtype, like=source)
    return SegmentedFile(
        source.source,
        str(out),
        shape=source.shape,
        foreground=counts["foreground"],
        seconds=time.perf_counter() - start,
        scores=pooled_scores(parts) if labels is not None else None,
    )


def scores_of(indices: np.ndarray, truth: np.ndarray, classes: tuple[int, ...] | None) -> Scores:
    """Scores of a run of predicted class indices against the truth's: binary masks' for
    ``classes`` ``None``, per class otherwise."""
    if classes is None:
        return segmentation_scores(indices, truth)
    return class_scores(indices, truth, classes)


def label_mask(
    path: str | Path,
    image: SliceSource,
    foreground_value: int | None,
    classes: tuple[int, ...] | None = None,
) -> np.ndarray:
    """The truth (uint8) of a label file, or of several joined by ``+``
    (:func:`~napari_unetquant.data.io.read_labels`), on ``image``'s grid: the object mask
    (``foreground_value``, or any non-zero value) for a binary model, the class indices of a
    multi-class model's label values ``classes``
    (:func:`~napari_unetquant.data.preprocess.class_indices`)."""
    labels = read_labels(path)
    array = labels_on_image_grid(labels, image)
    if array.shape != image.shape:
        raise InputError(
            f"{path} has shape {array.shape} but {image.source} has {image.shape}; labels must "
            f"be on the image's grid"
        )
    if classes is None:
        return foreground_mask(array, foreground_value, str(path))
    check_foreground_value(classes, foreground_value)
    return class_indices(array, classes, str(path))


def check_foreground_value(classes: tuple[int, ...] | None, foreground_value: int | None) -> None:
    """Refuse a foreground value for a multi-class model (``classes`` not ``None``): each of
    its label values is scored against the same value in the labels."""
    if classes is not None and foreground_value is not None:
        raise SettingError(
            f"a foreground value ({foreground_value}) picks the one label value a binary model "
            f"is scored against, but this model segments the label values {list(classes)} and "
            f"scores each against the same value in the labels; leave the foreground value out",
            "foreground_value",
        )


@dataclass(frozen=True)
class BatchItem:
    """One volume to segment: image, mask file to write, labels to score against (or none)."""

    image: str
    out: str
    labels: str | None = None


def list_volumes(folder: str | Path) -> list[str]:
    """The volumes in ``folder``, in name order: image files (TIFF, PNG/JPEG, NIfTI, ``.npy``,
    ``.zarr``) and sub-folders (a DICOM series or a folder of slices each)."""
    path = Path(folder)
    if not path.is_dir():
        raise InputError(f"{folder}: not a folder; give a folder of volumes, or list them")
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    volumes = [str(p) for p in entries if p.is_dir() or suffix_of(p) in VOLUME_SUFFIXES]
    if not volumes:
        raise InputError(
            f"{folder}: no volumes found; it should hold image files "
            f"({', '.join(VOLUME_SUFFIXES)}) or one folder per DICOM series"
        )
    return volumes


def _stem(path: str) -> str:
    name = Path(path).name
    suffix = suffix_of(Path(path))
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else name


def _mask_suffix(image: str, out_format: str) -> str:
    if out_format != "same":
        return out_format
    suffix = suffix_of(Path(image))
    if suffix in MASK_SUFFIXES:
        return suffix
    folder = Path(image)
    if (
        suffix != ".zarr"
        and folder.is_dir()
        and not all(
            suffix_of(f) in PICTURE_SUFFIXES + TIFF_SUFFIXES
            for f in folder.iterdir()
            if f.is_file() and not f.name.startswith(".")  # e.g. macOS .DS_Store
        )
    ):
        return ".nii.gz"  # a DICOM series: NIfTI keeps its affine
    return ".tif"


def plan_batch(
    images: Sequence[str],
    out_dir: str | Path,
    labels: Sequence[str] | None = None,
    labels_dir: str | Path | None = None,
    out_format: str = "same",
) -> list[BatchItem]:
    """One :class:`BatchItem` per image: masks named after the images in ``out_dir``
    (``out_format`` ``same`` keeps TIFF/NIfTI and writes ``.tif`` for other inputs,
    ``.nii.gz`` for DICOM folders), labels given in the same order or found in ``labels_dir``
    under the image's name (any supported suffix)."""
    if out_format not in MASK_FORMATS:
        raise ValueError(f"output format {out_format!r}: use one of {', '.join(MASK_FORMATS)}")
    if not images:
        raise InputError("no images to segment; list them or give a folder of volumes")
    if labels is not None and len(labels) != len(images):
        raise InputError(
            f"{len(images)} image(s) but {len(labels)} label file(s); give one label file per "
            f"image, in the same order (or a labels folder)"
        )
    joined = [part for given in labels or [] for part in label_files(given)]
    for given in [*images, *joined]:  # a typo fails now, not after the other volumes
        check_readable(Path(given))
    outs = [str(Path(out_dir) / (_stem(i) + _mask_suffix(i, out_format))) for i in images]
    seen: set[str] = set()
    for out in outs:
        if out in seen:
            raise InputError(f"several images would write {out}; give images with different names")
        seen.add(out)
    written = {Path(out).resolve() for out in outs}
    for image in images:
        if Path(image).resolve() in written:
            raise SettingError(
                f"{image} would be overwritten by a mask; choose another output folder", "out_dir"
            )
    matched: list[str | None] = list(labels) if labels is not None else [None] * len(images)
    if labels_dir is not None:
        if not Path(labels_dir).is_dir():
            raise SettingError(
                f"{labels_dir}: no such folder of labels; check the labels folder", "labels_dir"
            )
        by_stem: dict[str, list[Path]] = {}
        for path in Path(labels_dir).iterdir():
            by_stem.setdefault(_stem(str(path)), []).append(path)
        matched = [
            _only_labels(image, by_stem.get(_stem(image), []), labels_dir) for image in images
        ]
    return [BatchItem(i, o, lab) for i, o, lab in zip(images, outs, matched, strict=True)]


def _only_labels(image: str, found: list[Path], folder: str | Path) -> str:
    if len(found) != 1:
        what = "no file" if not found else f"{len(found)} files"
        raise InputError(
            f"{folder}: {what} named {_stem(image)} (any suffix) to score {image} against; give "
            f"one label file per image with the image's name"
        )
    return str(found[0])


@functools.lru_cache(maxsize=2)
def _cached_model(path: str, stamp: tuple[int, int]) -> SegmentationModel:
    """A model file loaded once per process (and again when the file changes)."""
    return load_model(path)


def _model(path: str) -> SegmentationModel:
    status = os.stat(path)
    return _cached_model(os.path.abspath(path), (status.st_mtime_ns, status.st_size))


def segment_item(
    model_path: str,
    item: BatchItem,
    config: InferConfig,
    device: str = "auto",
    foreground_value: int | None = None,
) -> SegmentedFile:
    """Segment one batch item; a failure becomes the result's ``error`` (the batch goes on).

    A plain function of picklable arguments: dask workers run it as it is.
    """
    start = time.perf_counter()
    try:
        bundle = _model(model_path)
        target = inference_device(device, config.integer)
        bundle.model.to(target)
        classes = model_classes(bundle)
        with open_volume(item.image) as source:
            labels = (
                label_mask(item.labels, source, foreground_value, classes) if item.labels else None
            )
            result = segment_to_path(bundle, source, item.out, config, target, labels)
    except Exception as error:  # reported in the CSV and the exit status; the batch goes on
        message = " ".join(str(error).split()) or type(error).__name__
        return SegmentedFile(
            item.image, item.out, item.labels, seconds=time.perf_counter() - start, error=message
        )
    return SegmentedFile(
        item.image,
        item.out,
        item.labels,
        result.shape,
        result.foreground,
        result.seconds,
        result.scores,
    )


def segment_batch(
    model_path: str,
    items: Sequence[BatchItem],
    config: InferConfig,
    device: str = "auto",
    foreground_value: int | None = None,
    client: Any = None,
) -> Iterator[SegmentedFile]:
    """Segment every item, yielding each result as it finishes: here, one after another, or
    on a ``dask.distributed`` ``client``'s workers (one task per volume; every worker reads
    the model, images and labels from paths it must see, and writes the masks itself)."""
    if not Path(model_path).is_file():
        raise InputError(f"{model_path}: no such model file; check the path")
    # a wrong or damaged model fails the batch up front (and stays cached)
    bundle = _model(model_path)
    check_grey_input(bundle, model_path)
    check_foreground_value(model_classes(bundle), foreground_value)
    for item in items:
        Path(item.out).parent.mkdir(parents=True, exist_ok=True)
    if client is None:
        for item in items:
            yield segment_item(model_path, item, config, device, foreground_value)
        return
    from distributed import as_completed

    futures = client.map(
        segment_item,
        [model_path] * len(items),
        list(items),
        config=config,
        device=device,
        foreground_value=foreground_value,
        pure=False,
    )
    for future in as_completed(futures):  # type: ignore[no-untyped-call]
        yield future.result()


CSV_FIELDS = (
    "image",
    "labels",
    "mask",
    "slices",
    "foreground_voxels",
    "dice_volume",
    "dice_mean",
    "iou_mean",
    "seconds",
    "error",
)


def write_scores_csv(path: str | Path, results: Sequence[SegmentedFile]) -> None:
    """The batch's CSV, one row per volume, written atomically: :data:`CSV_FIELDS`, and for a
    multi-class model's scores a ``dice_<value>`` column per class (each class's volume Dice)
    after ``iou_mean``."""
    rows = [result.row() for result in results]
    per_class = dict.fromkeys(key for row in rows for key in row if key not in CSV_FIELDS)
    at = CSV_FIELDS.index("iou_mean") + 1
    write_csv(path, rows, [*CSV_FIELDS[:at], *per_class, *CSV_FIELDS[at:]])
