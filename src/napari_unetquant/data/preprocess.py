"""From files to network inputs and back: masks, intensity normalisation, in-plane resampling."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..config import LOCAL_PIXELS_PER_MM, PreprocessConfig
from .volume import Volume


def zscore(image: np.ndarray) -> np.ndarray:
    """``(image - mean) / std`` as float32 (a constant image becomes zeros).

    The mean and the population SD are accumulated in float64 and rounded to float32, then
    ``(v - mean) / std`` is one float32 subtraction and one float32 division per pixel: a
    definition another program reproduces to the bit (a float32 running sum depends on the
    summation order; ``docs/integer-format.md`` states this rule for hardware ports)."""
    values = np.asarray(image, dtype=np.float32)
    mean = np.float32(values.mean(dtype=np.float64))
    std = np.float32(values.std(dtype=np.float64))
    normalised: np.ndarray = (values - mean) / (std if std > 0 else np.float32(1.0))
    return normalised


def local_zscore(image: np.ndarray, sigma: float | tuple[float, float]) -> np.ndarray:
    """Each pixel's z-score against a Gaussian neighbourhood of SD ``sigma`` pixels (one, or
    one per axis), as float32.

    The local variance gets a tiny floor (:data:`LOCAL_SD_FLOOR` of the image's SD, squared), so
    constant regions (zero padding) give zeros rather than a division by zero."""
    values = np.asarray(image, dtype=np.float32)
    mean = ndimage.gaussian_filter(values, sigma, mode="reflect")
    variance = ndimage.gaussian_filter(values * values, sigma, mode="reflect") - mean * mean
    floor = (LOCAL_SD_FLOOR * float(values.std())) ** 2 or 1.0
    normalised: np.ndarray = (values - mean) / np.sqrt(np.maximum(variance, 0.0) + floor)
    return normalised.astype(np.float32)


LOCAL_SD_FLOOR = 1e-3


def label_values(labels: np.ndarray, most: int = 8) -> str:
    """The values a label image holds with their pixel counts, most frequent first:
    ``"0 (262,144 px), 255 (70,000 px)"`` (``most`` at the most, then how many more)."""
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    order = np.argsort(-counts, kind="stable")
    shown = [f"{values[i]:g} ({counts[i]:,} px)" for i in order[:most]]
    more = len(values) - most
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def foreground_mask(
    labels: np.ndarray, foreground_value: int | None = None, source: str = ""
) -> np.ndarray:
    """``labels == foreground_value`` (or ``labels != 0`` when ``None``) as uint8 {0, 1}.

    ISBI 2012's membranes are value 0: pass ``foreground_value=0`` to segment them.
    ``source`` names the labels in errors.
    """
    values = np.asarray(labels)
    where = f"{source}: " if source else ""
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)):
            raise ValueError(
                f"{where}labels must be an integer mask, but they hold fractional or NaN "
                f"values; give the label image, not a probability map"
            )
    elif values.dtype.kind not in "iub":
        raise ValueError(
            f"{where}labels of type {values.dtype} are not an integer mask; give a label image"
        )
    mask: np.ndarray = values != 0 if foreground_value is None else values == foreground_value
    return mask.astype(np.uint8)


def class_indices(
    labels: np.ndarray, classes: tuple[int, ...] | None, source: str = ""
) -> np.ndarray:
    """Training targets of a label image as uint8: binary ``{0, 1}`` for ``classes`` ``None``
    (every non-zero value) or one value, else class indices ``i + 1`` where ``labels ==
    classes[i]`` and 0 (background) everywhere else. ``source`` names the labels in errors."""
    if classes is None or len(classes) == 1:
        return foreground_mask(labels, None if classes is None else classes[0], source)
    check_classes(classes)
    foreground_mask(labels, None, source)  # the same checks of an integer label image
    values = np.asarray(labels)
    indices = np.zeros(values.shape, np.uint8)
    for index, value in enumerate(classes, start=1):
        indices[values == value] = index
    return indices


MAX_CLASSES = 254
"""Most label values one model learns (class indices are uint8, 0 the background)."""


def check_classes(classes: tuple[int, ...]) -> None:
    """Refuse an empty, repeated or too long list of label values, saying the fix."""
    if not classes:
        raise ValueError("give at least one label value to learn, e.g. 1 and 2")
    if len(set(classes)) != len(classes):
        raise ValueError(f"label values {list(classes)} repeat a value; name each class once")
    if len(classes) > MAX_CLASSES:
        raise ValueError(f"{len(classes)} classes: at most {MAX_CLASSES} label values per model")


def class_values(indices: np.ndarray, classes: tuple[int, ...] | None) -> np.ndarray:
    """A label map in the original label values from class indices (0 stays 0, ``i`` becomes
    ``classes[i - 1]``), in the smallest unsigned type that holds them; binary masks (one
    class or ``None``) stay ``{0, 1}`` uint8, as binary models have always written them."""
    if classes is None or len(classes) == 1:
        return np.asarray(indices, np.uint8)
    low, high = min(classes), max(classes)
    dtype = (
        np.uint8
        if low >= 0 and high <= 255
        else np.uint16
        if low >= 0 and high <= 65535
        else np.int32
    )
    values: np.ndarray = np.array([0, *classes], dtype)[np.asarray(indices)]
    return values


def paint_label_layers(layers: list[np.ndarray], sources: list[str]) -> np.ndarray:
    """One label image from several of the same shape, painted in order: the non-zero pixels
    of layer ``k`` (1-based) take the value ``k``, later layers over earlier ones (``cord``
    then ``gm``: white matter 1, grey matter 2)."""
    if not layers:
        raise ValueError("no label layers to paint")
    shape = np.shape(layers[0])
    painted = np.zeros(shape, np.uint8)
    for value, (layer, source) in enumerate(zip(layers, sources, strict=True), start=1):
        if np.shape(layer) != shape:
            raise ValueError(
                f"{source} has shape {np.shape(layer)} but {sources[0]} has {shape}; the label "
                f"files painted into one must share the image's grid"
            )
        painted[foreground_mask(layer, None, source) != 0] = value
    return painted


def normalize(
    slices: np.ndarray,
    config: PreprocessConfig,
    source: str = "",
    spacing: tuple[float, float] | None = None,
) -> np.ndarray:
    """``(S, H, W)`` -> float32: per-slice or local z-score, or a CT window mapped to [-1, 1].

    ``spacing`` (mm) is the slices' pixel size, which sizes the ``"local"`` neighbourhood;
    ``source`` names the image in the error about NaN or Inf pixels.
    """
    values = np.asarray(slices, dtype=np.float32)
    if not np.all(np.isfinite(values)):
        where = f"{source}: " if source else ""
        raise ValueError(
            f"{where}the image holds NaN or Inf pixels; replace them (e.g. with 0) before "
            f"training or segmenting"
        )
    if config.ct_window is not None:
        level, width = config.ct_window
        low = level - width / 2
        return (np.clip(values, low, low + width) - low) * np.float32(2 / width) - 1
    if config.intensity == "local":
        per_mm = (1 / spacing[0], 1 / spacing[1]) if spacing else (LOCAL_PIXELS_PER_MM,) * 2
        sigma = (config.local_mm * per_mm[0], config.local_mm * per_mm[1])
        return np.stack([local_zscore(s, sigma) for s in values])
    return np.stack([zscore(s) for s in values])


def network_spacing(
    spacing: tuple[float, float] | None, config: PreprocessConfig
) -> tuple[float, float] | None:
    """The pixel size (mm) of the slices the network sees: ``config.spacing`` when images
    are resampled to it, the image's own otherwise (``None``: unknown)."""
    if spacing is None:
        return None
    return config.spacing or spacing


def target_shape(
    shape: tuple[int, int], spacing: tuple[float, float] | None, config: PreprocessConfig
) -> tuple[int, int]:
    """In-plane size after resampling from ``spacing`` to ``config.spacing``."""
    if spacing is None or config.spacing is None:
        return shape
    return (
        max(1, round(shape[0] * spacing[0] / config.spacing[0])),
        max(1, round(shape[1] * spacing[1] / config.spacing[1])),
    )


def resize_slices(slices: np.ndarray, shape: tuple[int, int], order: int) -> np.ndarray:
    """Resample ``(S, H, W)`` in-plane to ``(S, *shape)``; pixels are areas (``grid_mode``).

    ``order`` 1 (linear) for images and probabilities, 0 (nearest) for label masks.
    """
    if tuple(slices.shape[1:]) == tuple(shape):
        return slices
    factors = (1.0, shape[0] / slices.shape[1], shape[1] / slices.shape[2])
    resized: np.ndarray = ndimage.zoom(
        slices, factors, order=order, mode="nearest", grid_mode=True, prefilter=False
    )
    return resized


def network_input(volume: Volume, config: PreprocessConfig) -> np.ndarray:
    """The normalised, resampled ``(S, H', W')`` float32 slices the network sees."""
    shape = target_shape(volume.array.shape[1:], volume.spacing, config)
    resized = resize_slices(volume.array.astype(np.float32), shape, order=1)
    return normalize(resized, config, volume.source, network_spacing(volume.spacing, config))


def network_mask(mask: np.ndarray, volume: Volume, config: PreprocessConfig) -> np.ndarray:
    """A ``(S, H, W)`` uint8 mask on ``volume``'s grid resampled like :func:`network_input`."""
    shape = target_shape(volume.array.shape[1:], volume.spacing, config)
    return resize_slices(mask, shape, order=0)
