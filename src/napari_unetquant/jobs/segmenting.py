"""Segmentation jobs: an image in memory or on disk into a mask (a label map in the label values
a multi-class model learnt), and scores against labels (per class for multi-class models).

Every image is read a few slices at a time (:func:`~napari_unetquant.infer.predict.segment_source`),
so memory does not grow with the image's depth.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import numpy as np

from ..batch import (
    SegmentedFile,
    check_foreground_value,
    label_mask,
    scores_of,
    segment_to_path,
)
from ..config import InferConfig
from ..data.io import MASK_SUFFIXES, SliceSource, Volume, open_volume, suffix_of, volume_source
from ..data.preprocess import class_values
from ..devices import inference_device
from ..infer.predict import predicted_classes, segment_source
from ..metrics import Scores, pooled_scores
from ..modelio import SegmentationModel, check_grey_input, load_model, model_classes


def segment_array(
    bundle: SegmentationModel,
    image: Volume | SliceSource,
    config: InferConfig,
    device: str = "auto",
) -> Generator[int, None, np.ndarray]:
    """Segment an image held or opened in memory (a layer's NumPy or dask data) into a mask on
    its own grid, slice run by slice run: yields the number of slices done as they finish and
    returns the ``(S, H, W)`` mask (``mask = yield from segment_array(...)``): uint8 ``{0, 1}``
    for a binary model, a label map in the label values a multi-class model learnt
    (:func:`~napari_unetquant.data.preprocess.class_values`)."""
    source = image if isinstance(image, SliceSource) else volume_source(image)
    target = inference_device(device, config.integer)
    bundle.model.to(target)
    classes = model_classes(bundle)
    mask = np.empty(source.shape, class_values(np.zeros(0, np.uint8), classes).dtype)
    done = 0
    for probabilities in segment_source(bundle, source, config, target):
        indices = predicted_classes(probabilities, config.threshold)
        mask[done : done + len(indices)] = class_values(indices, classes)
        for _ in probabilities:  # one step per slice, for progress bars
            done += 1
            yield done
    return mask


def segment_to_file(
    model_path: str, image_path: str, out_path: str, config: InferConfig, device: str = "auto"
) -> SegmentedFile:
    """``unetquant segment``: read the image a few slices at a time, segment them and write
    the mask as it is made (TIFF or NIfTI by extension; the file appears once complete)."""
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
) -> list[Scores]:
    """Scores of each image's segmentation against its labels (a label file or several joined
    by ``+``), on the original grid (each image streamed a few slices at a time; its labels are
    held as uint8): :class:`~napari_unetquant.metrics.SegmentationScores` for a binary model,
    :class:`~napari_unetquant.metrics.ClassScores` for a multi-class one (which takes no
    ``foreground_value``)."""
    if len(images) != len(labels):
        raise ValueError(
            f"{len(images)} image path(s) but {len(labels)} label path(s); give one label file "
            f"per image, in the same order"
        )
    classes = model_classes(bundle)
    check_foreground_value(classes, foreground_value)
    target = inference_device(device, config.integer)
    bundle.model.to(target)
    scores = []
    for image, label in zip(images, labels, strict=True):
        with open_volume(image) as source:
            truth = label_mask(label, source, foreground_value, classes)
            parts: list[Scores] = []
            done = 0
            for probabilities in segment_source(bundle, source, config, target):
                indices = predicted_classes(probabilities, config.threshold)
                parts.append(scores_of(indices, truth[done : done + len(indices)], classes))
                done += len(indices)
        scores.append(pooled_scores(parts))
    return scores
