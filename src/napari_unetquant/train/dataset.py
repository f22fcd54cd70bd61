"""From image and label files to training and validation slices (or volumes, for 3D U-Nets)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import PreprocessConfig
from ..data.io import Volume, labels_on_image_grid, read_labels, read_volume
from ..data.preprocess import (
    check_classes,
    class_indices,
    label_values,
    network_input,
    network_mask,
)
from ..errors import SettingError
from .sets import SliceSet, VolumeSet

VALIDATION_FRACTION = 0.15


@dataclass(frozen=True)
class LabelledVolume:
    """An image volume and its training target (uint8, same shape): a foreground mask
    ``{0, 1}``, or class indices for several classes (:func:`~..data.preprocess.class_indices`)."""

    image: Volume
    mask: np.ndarray


def read_pairs(
    images: Sequence[str | Path],
    labels: Sequence[str | Path],
    foreground_value: int | None = None,
    require_foreground: bool = True,
    classes: tuple[int, ...] | None = None,
) -> list[LabelledVolume]:
    """Read image/label files pairwise (in order) and check that they fit together.

    A label path may join several files with ``+`` (:func:`~..data.io.read_labels`). The
    target is the mask of ``foreground_value`` (``None``: every non-zero value) or, with two or
    more ``classes``, the class indices of those label values. Training needs some foreground
    (``require_foreground``); evaluation does not.
    """
    if classes is not None and len(classes) < 2:
        foreground_value, classes = classes[0], None
    wanted = (
        classes
        if classes is not None
        else None
        if foreground_value is None
        else (foreground_value,)
    )
    if len(images) != len(labels):
        raise ValueError(
            f"{len(images)} image path(s) but {len(labels)} label path(s); give one label file "
            f"per image, in the same order"
        )
    pairs = []
    for image_path, label_path in zip(images, labels, strict=True):
        image, label = read_volume(image_path), read_labels(label_path)
        label_array = labels_on_image_grid(label, image)
        if image.array.shape != label_array.shape:
            raise ValueError(
                f"{image_path} has shape {image.array.shape} but {label_path} has "
                f"{label_array.shape}; labels must be on the image's grid"
            )
        mask = class_indices(label_array, wanted, str(label_path))
        pairs.append(LabelledVolume(image, mask))
    if require_foreground and not any(pair.mask.any() for pair in pairs):
        hint = "" if wanted is None else f" (value{'s' if len(wanted) > 1 else ''} "
        hint += "" if wanted is None else f"{', '.join(map(str, wanted))})"
        files = ", ".join(str(path) for path in labels)
        held = label_values(read_labels(labels[0]).array)
        raise SettingError(
            f"{files}: the labels contain no foreground{hint}; they hold {held}; check the "
            f"foreground value and the files",
            "foreground_value",
        )
    return pairs


def present_classes(labels: Sequence[str | Path]) -> tuple[int, ...]:
    """Every non-zero value the label files hold, in increasing order (``--classes all``)."""
    values: set[int] = set()
    for path in labels:
        array = read_labels(path).array
        class_indices(array, None, str(path))  # the checks of an integer label image
        values.update(int(v) for v in np.unique(array) if v != 0)
    if not values:
        files = ", ".join(str(path) for path in labels)
        raise SettingError(
            f"{files}: the labels hold no non-zero value; paint the classes, or check the files",
            "classes",
        )
    found = tuple(sorted(values))
    check_classes(found)
    return found


def median_spacing(pairs: list[LabelledVolume]) -> tuple[float, float] | None:
    """The median in-plane spacing when every image has one (else ``None``: no resampling)."""
    spacings = [pair.image.spacing for pair in pairs]
    if not spacings or any(s is None for s in spacings):
        return None
    rows, cols = zip(*[s for s in spacings if s is not None], strict=True)
    return float(np.median(rows)), float(np.median(cols))


def slice_set(pairs: list[LabelledVolume], config: PreprocessConfig) -> SliceSet:
    """Every slice of ``pairs``, resampled and normalised as the network will see it."""
    parts = [
        SliceSet.from_stacks(
            network_input(pair.image, config), network_mask(pair.mask, pair.image, config)
        )
        for pair in pairs
    ]
    return SliceSet.concat(parts)


def volume_set(pairs: list[LabelledVolume], config: PreprocessConfig) -> VolumeSet:
    """Every volume of ``pairs`` whole, resampled and normalised as the network will see it."""
    return VolumeSet.from_volumes(
        [network_input(pair.image, config) for pair in pairs],
        [network_mask(pair.mask, pair.image, config) for pair in pairs],
    )


def training_set(
    pairs: list[LabelledVolume], config: PreprocessConfig, spatial_dims: int = 2
) -> SliceSet | VolumeSet:
    """What a U-Net of ``spatial_dims`` trains and is validated on: the slices of ``pairs``
    (2D) or the whole volumes (3D)."""
    return volume_set(pairs, config) if spatial_dims == 3 else slice_set(pairs, config)


def split_validation(
    pairs: list[LabelledVolume],
) -> tuple[list[LabelledVolume], list[LabelledVolume]]:
    """Hold out validation data when none is given.

    With three or more volumes the last one is held out (a split by subject); otherwise the
    last 15% of each volume's slices (at least one slice, when a volume has two or more).
    """
    if len(pairs) >= 3:
        return pairs[:-1], pairs[-1:]
    train, validation = [], []
    for pair in pairs:
        slices = pair.mask.shape[0]
        held = max(1, round(slices * VALIDATION_FRACTION)) if slices >= 2 else 0
        cut = slices - held
        train.append(_subset(pair, slice(0, cut)))
        if held:
            validation.append(_subset(pair, slice(cut, slices)))
    return train, validation


def _subset(pair: LabelledVolume, slices: slice) -> LabelledVolume:
    image = pair.image
    return LabelledVolume(
        Volume(image.array[slices], image.spacing, image.affine, image.source),
        pair.mask[slices],
    )
