"""Inference: sliding windows with Gaussian blending, and whole volumes on their own grid."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from ..config import InferConfig
from ..data.io import SliceSource, Volume, volume_source
from ..data.preprocess import network_spacing, normalize, resize_slices, target_shape
from ..errors import SettingError
from ..modelio import SegmentationModel, model_classes
from .engine import LOG, LazyEngine, evaluation_mode, integer_note
from .integer import IntegerUNet

Window = tuple[int, int, int]  # slice index, top row, left column


def window_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of windows of ``tile`` covering ``size`` with at least ``overlap`` overlap."""
    if size <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


GAUSSIAN_FLOOR = 1e-3


def gaussian_weights(tile: int) -> np.ndarray:
    """``(tile,)`` blending profile, highest in the centre, never zero at the border."""
    positions = np.arange(tile) - (tile - 1) / 2
    profile = np.exp(-(positions**2) / (2 * (tile / 8) ** 2))
    floored: np.ndarray = np.maximum(profile / profile.max(), GAUSSIAN_FLOOR).astype(np.float32)
    return floored


def _profile(size: int, tile: int) -> np.ndarray:
    """Blending along one axis: Gaussian where the axis is tiled, flat where one window spans it."""
    return gaussian_weights(tile) if size > tile else np.ones(min(size, tile), np.float32)


def spatial_dims(model: nn.Module | Callable[[Tensor], Tensor]) -> int:
    """2 for networks that take ``(N, C, H, W)`` slices, 3 for ``(N, C, D, H, W)`` volumes."""
    config = getattr(model, "config", None)
    return int(getattr(config, "spatial_dims", 2))


@torch.no_grad()
def predict_chunks(
    model: nn.Module | Callable[[Tensor], Tensor],
    read: Callable[[int, int], np.ndarray],
    shape: tuple[int, int, int],
    config: InferConfig,
    device: torch.device | str = "cpu",
) -> Iterator[np.ndarray]:
    """Probabilities of ``shape`` ``(S, H, W)`` normalised slices, streamed.

    ``read(start, stop)`` returns slices ``[start, stop)`` (float32); each is asked for once,
    in order, when the first window needing it runs. Yields runs of finished slices in order:
    ``(k, H, W)`` float32 foreground probabilities (sigmoid) for a network with one output
    channel, ``(k, C, H, W)`` float32 class probabilities (softmax over its ``C`` channels,
    channel 0 the background) for one with several. A slice is yielded and forgotten as soon as
    no later window covers it, so memory holds a few windows' worth of slices whatever ``S`` is.

    2D networks see ``config.tile`` squares of single slices; 3D networks see
    ``config.tile_3d`` boxes of consecutive slices. Overlapping windows are blended with
    Gaussian weights (no seams); windows are batched ``config.batch_size`` at a time
    (automatic: 1 on the CPU, 4 on GPUs).
    """
    if isinstance(model, nn.Module):
        evaluation_mode(model)
    count, height, width = shape
    dims = spatial_dims(model)
    depth, tile_h, tile_w = config.window(dims)
    depth, tile_h, tile_w = min(depth, count), min(tile_h, height), min(tile_w, width)
    weights = np.einsum(
        "d,h,w->dhw",
        _profile(count, depth) if dims == 3 else np.ones(1, np.float32),
        _profile(height, tile_h),
        _profile(width, tile_w),
    )
    starts = window_starts(count, depth, config.overlap) if dims == 3 else range(count)
    windows = [
        (d, r, c)
        for d in starts
        for r in window_starts(height, tile_h, config.overlap)
        for c in window_starts(width, tile_w, config.overlap)
    ]
    batch_size = config.batch_size or (1 if torch.device(device).type == "cpu" else 4)
    inputs = _SliceWindow(read, count, (height, width))
    sums: _SliceWindow | None = None  # (H, W) or (C, H, W) per slice: known from the first logits
    norms = _SliceWindow(None, count, (height, width))
    for first in range(0, len(windows), batch_size):
        batch = windows[first : first + batch_size]
        tiles = np.stack(
            [inputs.get(d, d + depth)[:, r : r + tile_h, c : c + tile_w] for d, r, c in batch]
        )  # (B, depth, h, w): for 2D networks depth is 1 and serves as the channel axis
        logits = model(torch.from_numpy(tiles if dims == 2 else tiles[:, None]).to(device))
        probabilities = _window_probabilities(logits, dims)
        if sums is None:
            sums = _SliceWindow(None, count, (*probabilities.shape[2:-2], height, width))
        weighting = weights if probabilities.ndim == 4 else weights[:, None]
        for (d, r, c), probability in zip(batch, probabilities, strict=True):
            sums.get(d, d + depth)[..., r : r + tile_h, c : c + tile_w] += probability * weighting
            norms.get(d, d + depth)[:, r : r + tile_h, c : c + tile_w] += weights
        done = windows[first + batch_size][0] if first + batch_size < len(windows) else count
        inputs.drop_before(done)
        finished = sums.drop_before(done)
        if len(finished):
            norm = norms.drop_before(done)
            yield finished / (norm if finished.ndim == 3 else norm[:, None])


def _window_probabilities(logits: Tensor, dims: int) -> np.ndarray:
    """Windows' logits ``(B, C, [D,] h, w)`` as probabilities per slice: ``(B, depth, h, w)``
    sigmoid for one channel, ``(B, depth, C, h, w)`` softmax over channels for several."""
    if logits.shape[1] == 1:
        binary = torch.sigmoid(logits[:, 0]).float().cpu().numpy()
        return binary if dims == 3 else binary[:, None]
    classes = torch.softmax(logits.float(), dim=1).cpu().numpy()
    return classes.transpose(0, 2, 1, 3, 4) if dims == 3 else classes[:, None]


def predicted_classes(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """Class indices (uint8) of a run of probabilities from :func:`segment_source`: ``(k, H,
    W)`` foreground probabilities give ``p >= threshold`` (0 or 1); ``(k, C, H, W)`` class
    probabilities give the most probable channel (0 the background; ``threshold`` unused)."""
    if probabilities.ndim == 4:
        return np.asarray(probabilities.argmax(axis=1), np.uint8)
    return (probabilities >= threshold).astype(np.uint8)


class _SliceWindow:
    """Slices ``[first, first + len)`` of an ``(S, *plane)`` float32 stack (``plane`` ``(H, W)``
    or ``(C, H, W)``), kept in memory while windows need them: :meth:`get` reads (or, with no
    reader, zero-fills) up to a slice, :meth:`drop_before` hands back and forgets what no
    window needs any more."""

    READ_AHEAD = 8  # slices read per call of the reader, at least

    def __init__(
        self, read: Callable[[int, int], np.ndarray] | None, count: int, plane: tuple[int, ...]
    ) -> None:
        self._read, self._count, self._plane = read, count, plane
        self._first = 0
        self._data = np.zeros((0, *plane), np.float32)

    def get(self, start: int, stop: int) -> np.ndarray:
        """Slices ``[start, stop)`` (a view: writes land in the kept slices)."""
        end = self._first + len(self._data)
        if stop > end:
            more = min(self._count, max(stop, end + self.READ_AHEAD)) - end
            if self._read is None:
                run = np.zeros((more, *self._plane), np.float32)
            else:
                run = np.asarray(self._read(end, end + more), dtype=np.float32)
            self._data = np.concatenate([self._data, run]) if len(self._data) else run
        return self._data[start - self._first : stop - self._first]

    def drop_before(self, index: int) -> np.ndarray:
        """Forget slices before ``index`` and return them."""
        cut = max(0, index - self._first)
        dropped, self._data = self._data[:cut], self._data[cut:]
        self._first += len(dropped)
        return dropped


@torch.no_grad()
def predict_probabilities(
    model: nn.Module | Callable[[Tensor], Tensor],
    slices: np.ndarray,
    config: InferConfig,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Probabilities of normalised slices ``(S, H, W)``: ``(S, H, W)`` float32 foreground
    probabilities, or ``(S, C, H, W)`` class probabilities for a network with ``C`` output
    channels (:func:`predict_chunks` over an array held in memory)."""
    shape = (slices.shape[0], slices.shape[1], slices.shape[2])
    chunks = predict_chunks(model, lambda a, b: slices[a:b], shape, config, device)
    return np.concatenate(list(chunks))


_INTEGER_NETWORKS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], IntegerUNet]]
_INTEGER_NETWORKS = weakref.WeakKeyDictionary()


def cached_integer_unet(model: nn.Module) -> IntegerUNet:
    """``IntegerUNet(model)``, built once per model and rebuilt when its parameters change
    (optimizer steps and other in-place updates bump a tensor's version counter; quantizer
    buffers are left out: evaluation rewrites them with the same values)."""
    versions = _parameter_versions(model)
    cached = _INTEGER_NETWORKS.get(model)
    if cached is None or cached[0] != versions:
        cached = (versions, IntegerUNet(model))
        _INTEGER_NETWORKS[model] = cached
    return cached[1]


def _parameter_versions(model: nn.Module) -> tuple[int, ...]:
    return tuple(parameter._version for parameter in model.parameters())


_NOTED: set[str] = set()


def _note_integer_speed() -> None:
    """Say once per process when the exact integer path is slow on this CPU."""
    if "integer" not in _NOTED:
        _NOTED.add("integer")
        note = integer_note()
        if note is not None:
            LOG.warning(note)


@torch.no_grad()
def segment_source(
    bundle: SegmentationModel,
    source: SliceSource,
    config: InferConfig,
    device: torch.device | str = "cpu",
) -> Iterator[np.ndarray]:
    """Probabilities on ``source``'s own grid, as runs of slices in order, reading the image as
    the windows need it: ``(k, H, W)`` float32 foreground probabilities for a binary model,
    ``(k, C, H, W)`` float32 class probabilities for a multi-class one (channel 0 the
    background, channel ``i`` the label value ``model_classes(bundle)[i - 1]``).
    :func:`predicted_classes` turns either into class indices.

    Each slice is resampled and normalised as in training (the model file's preprocessing: both
    are in-plane, so slice by slice), predicted, and its probabilities resampled back (class by
    class) before any thresholding. Memory stays a few windows' worth of slices, whatever the
    image's depth.
    """
    check_outputs(bundle)
    plane = target_shape(source.shape[1:], source.spacing, bundle.preprocess)
    network: Callable[[Tensor], Tensor] = bundle.model
    if config.integer:
        if torch.device(device).type != "cpu":
            raise SettingError(
                f"integer inference runs on the CPU, not {device}; use the CPU or run the float "
                f"simulation",
                "device",
                "integer",
            )
        network = cached_integer_unet(bundle.model)
        _note_integer_speed()
    else:
        _, rows, columns = config.window(spatial_dims(bundle.model))
        window = (min(rows, plane[0]), min(columns, plane[1]))
        evaluation_mode(bundle.model)
        network = LazyEngine(bundle.model, config.engine, window, device, config.threshold)
    pixel_mm = network_spacing(source.spacing, bundle.preprocess)

    def read(start: int, stop: int) -> np.ndarray:
        raw = source.slices(start, stop).astype(np.float32)
        resized = resize_slices(raw, plane, order=1)
        return normalize(resized, bundle.preprocess, source.source, pixel_mm)

    original = (source.shape[1], source.shape[2])
    for chunk in predict_chunks(network, read, (source.shape[0], *plane), config, device):
        if chunk.ndim == 4:  # (k, C, H, W): each class's plane resized like a binary one
            planes = resize_slices(chunk.reshape(-1, *chunk.shape[2:]), original, order=1)
            resized = planes.reshape(*chunk.shape[:2], *original)
        else:
            resized = resize_slices(chunk, original, order=1)
        yield np.clip(resized, 0.0, 1.0)


def check_outputs(bundle: SegmentationModel) -> None:
    """Refuse a model whose network's output channels do not match its classes (one for a
    binary model, one more than its label values for a multi-class one)."""
    classes = model_classes(bundle)
    expected = 1 if classes is None else len(classes) + 1
    if bundle.unet.out_classes != expected:
        learnt = "no class list (a binary model)" if classes is None else f"classes {list(classes)}"
        raise ValueError(
            f"the model's network has {bundle.unet.out_classes} output channels but its file "
            f"records {learnt}, which needs {expected}; use a model file written by training"
        )


def segment_volume(
    bundle: SegmentationModel,
    volume: Volume,
    config: InferConfig,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Probabilities on ``volume``'s own grid (:func:`segment_source` over a volume held in
    memory): ``(S, H, W)`` float32 for a binary model, ``(S, C, H, W)`` for a multi-class one."""
    return np.concatenate(list(segment_source(bundle, volume_source(volume), config, device)))
