"""Model files: one safetensors file, configuration in its metadata, never a pickle.

Two layouts share the format. ``state_dict`` (version 1, what training writes): the tensors are
the model's ``state_dict`` (float weights, BatchNorm statistics, learned steps and quantizer
state). ``packed`` (version 2, ``save_model(..., packed=True)`` or ``unetquant export``):
quantized weights as integer codes packed at their bit width, BatchNorm folded (see
:mod:`napari_unetquant.packed`). The metadata holds ``format``, ``version``, ``layout`` and a JSON
``config`` with the U-Net, quantization and preprocessing settings plus a training summary
(packed files add ``layers``). Loading reads and checks the metadata before it builds anything,
and safetensors parses no code. :func:`unpacked` turns a packed model back into a trainable
``state_dict`` one (the start of a fine-tune from a packed file).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import (
    LayerOverride,
    PreprocessConfig,
    QuantConfig,
    QuantizerConfig,
    UNetConfig,
)
from .data.io import check_readable
from .data.write import write_safetensors
from .model import FoldedBatchNorm, build_unet
from .packed import (
    LAYOUT_PACKED,
    LAYOUT_STATE_DICT,
    load_exactly,
    pack_model,
    packed_network,
    unpacked_network,
)

FORMAT = "napari-unetquant-model"
VERSION = 1  # the state_dict layout
PACKED_VERSION = 2  # the packed layout
VERSIONS = {"1": LAYOUT_STATE_DICT, "2": LAYOUT_PACKED}
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")


@dataclass
class SegmentationModel:
    """A network with everything needed to use it on new images."""

    model: nn.Module
    unet: UNetConfig
    quant: QuantConfig
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    info: dict[str, Any] = field(default_factory=dict)
    layout: str = LAYOUT_STATE_DICT


def model_classes(bundle: SegmentationModel) -> tuple[int, ...] | None:
    """The label values a multi-class model learnt (``info["classes"]``, two or more: its
    network has one output channel more, channel 0 the background, channel ``i`` the value
    ``classes[i - 1]``, softmax over channels); ``None`` for a binary model (one sigmoid
    channel; ``info["foreground_value"]`` its label value, ``None`` any non-zero)."""
    classes = bundle.info.get("classes")
    if not classes or len(classes) < 2:
        return None
    return tuple(int(value) for value in classes)


def quant_to_dict(quant: QuantConfig) -> dict[str, Any]:
    """``dataclasses.asdict(quant)``, each override's settings without the fields left at
    their defaults (a size budget's model has an override per block: its file stays small).
    :func:`quant_from_dict` reads it back."""
    data = asdict(quant)
    defaults = {f.name: f.default for f in fields(QuantizerConfig)}
    for override in data["overrides"]:
        for key in ("weight", "act"):
            if override[key] is not None:
                override[key] = {
                    k: v
                    for k, v in override[key].items()
                    if k in ("method", "bits") or v != defaults[k]
                }
    return data


def quant_from_dict(data: dict[str, Any]) -> QuantConfig:
    """Rebuild a :class:`QuantConfig` from ``dataclasses.asdict`` output."""

    def one(value: dict[str, Any] | None) -> QuantizerConfig | None:
        return None if value is None else QuantizerConfig(**value)

    return QuantConfig(
        weight=QuantizerConfig(**data["weight"]),
        act=QuantizerConfig(**data["act"]),
        edge_layers=tuple(data["edge_layers"]),
        edge_precision=QuantizerConfig(**data["edge_precision"]),
        overrides=tuple(
            LayerOverride(o["pattern"], weight=one(o["weight"]), act=one(o["act"]))
            for o in data["overrides"]
        ),
    )


def _preprocess_from_dict(data: dict[str, Any]) -> PreprocessConfig:
    spacing, window = data.get("spacing"), data.get("ct_window")
    return PreprocessConfig(
        spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        ct_window=None if window is None else (float(window[0]), float(window[1])),
        intensity=str(data.get("intensity", "slice")),  # files from before the choice: slice
        local_mm=float(data.get("local_mm", PreprocessConfig.local_mm)),
    )


def save_model(path: str | Path, bundle: SegmentationModel, *, packed: bool = False) -> None:
    """Write ``bundle`` to ``path`` (atomically: a crash leaves the previous file intact).

    ``packed=True`` writes the packed layout: integer weight codes at their bit width and
    folded BatchNorm, loading to a network with exactly the same outputs.
    """
    write_safetensors(Path(path), *_file_contents(bundle, packed))


def packed_file_bytes(bundle: SegmentationModel) -> int:
    """The exact size of ``bundle``'s packed file (what ``save_model(..., packed=True)``
    writes: codes, scales, float layers and metadata), made in memory."""
    from safetensors.torch import save

    return len(save(*_file_contents(bundle, packed=True)))


def _file_contents(
    bundle: SegmentationModel, packed: bool
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    config: dict[str, Any] = {
        "unet": asdict(bundle.unet),
        "quant": quant_to_dict(bundle.quant),
        "preprocess": asdict(bundle.preprocess),
        "info": bundle.info,
    }
    if packed:
        tensors, config["layers"] = pack_model(bundle.model)
        version = PACKED_VERSION
    else:
        if any(isinstance(m, FoldedBatchNorm) for m in bundle.model.modules()):
            raise ValueError(
                "this model was loaded from a packed file (BatchNorm folded); save it packed"
            )
        tensors = {k: v.detach().cpu().contiguous() for k, v in bundle.model.state_dict().items()}
        version = VERSION
    metadata = {"format": FORMAT, "version": str(version), "config": json.dumps(config)}
    return tensors, metadata


def _check_not_pickle(path: Path) -> None:
    with path.open("rb") as handle:
        head = handle.read(9)
    # A safetensors file starts with its header length (8 bytes, little endian) and then "{";
    # that length can begin with a pickle's magic byte, so recognise safetensors first.
    looks_like_safetensors = len(head) == 9 and head[8:9] == b"{"
    if head.startswith(_PICKLE_MAGIC) and not looks_like_safetensors:
        raise ValueError(
            f"{path} is a pickle (a PyTorch .pt/.pth checkpoint), which can run arbitrary code "
            f"when loaded, so it was not opened; use a model file written by unetquant "
            f"(safetensors)"
        )


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The checked ``config`` metadata of a model file (reads no tensors)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such model file; check the path")
    check_readable(path)
    _check_not_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:
        raise ValueError(
            f"{path} is not a readable model file ({error}); it may be truncated or of "
            f"another format: train one with napari-unetquant (the Train dock or the train command)"
        ) from error
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} is a safetensors file but not a napari-unetquant model (format "
            f"{metadata.get('format')!r}); train one with napari-unetquant (the Train dock or "
            f"the train command)"
        )
    version = metadata.get("version")
    if version not in VERSIONS:
        raise ValueError(
            f"{path} has model format version {version}, this napari-unetquant reads versions "
            f"{', '.join(VERSIONS)}; upgrade napari-unetquant or re-export the model"
        )
    try:
        config = json.loads(metadata["config"])
    except (KeyError, ValueError) as error:  # no config, or not JSON
        raise ValueError(
            f"{path}: the model's metadata is damaged (no readable configuration: {error!r}); "
            f"use the file that training or export wrote"
        ) from error
    if not isinstance(config, dict) or not isinstance(config.get("info", {}), dict):
        raise ValueError(
            f"{path}: the model's metadata is damaged (its configuration is not a JSON object "
            f"of settings); use the file that training or export wrote"
        )
    config["layout"] = VERSIONS[version]
    return config


def check_grey_input(bundle: SegmentationModel, name: str | Path) -> None:
    """Refuse a network that does not take one input channel: every image here is read as one
    grey channel. ``name`` (the model file) starts the message."""
    channels = bundle.unet.in_channels
    if channels != 1:
        raise ValueError(
            f"{name}: the model takes {channels} input channels, but images are read as one "
            f"grey channel; use a model trained on single-channel images (in_channels=1)"
        )


def _check_size(path: Path, unet: UNetConfig, quant: QuantConfig) -> None:
    """Refuse a configuration describing more weights than the file can hold (at least one
    bit each), before building it: edited metadata must not allocate a huge network."""
    try:
        with torch.device("meta"):  # shapes only, no memory
            weights = str(sum(p.numel() for p in build_unet(unet, quant).parameters()))
    except RuntimeError:  # sizes whose product overflows
        weights = "over 2**63"
    size = path.stat().st_size
    if not weights.isdigit() or int(weights) > 8 * size:
        raise ValueError(
            f"the tensors do not match the configured network: it has {weights} "
            f"weights, more than a {size}-byte file holds; the file is damaged or was edited"
        )


def load_model(path: str | Path, device: str | torch.device = "cpu") -> SegmentationModel:
    """Load a model file written by :func:`save_model`, in evaluation mode."""
    from safetensors.torch import load_file

    config = read_metadata(path)
    try:
        unet = UNetConfig(**config["unet"])
        quant = quant_from_dict(config["quant"])
        preprocess = _preprocess_from_dict(config["preprocess"])
    except (LookupError, TypeError, ValueError, AttributeError) as error:  # JSON of any shape
        raise ValueError(f"{path}: the model's configuration is invalid ({error})") from error
    tensors = load_file(str(path))
    try:
        _check_size(Path(path), unet, quant)
        if config["layout"] == LAYOUT_PACKED:
            model = packed_network(unet, quant, tensors, dict(config.get("layers", {})))
        else:
            model = build_unet(unet, quant)
            load_exactly(model, tensors)
    except (KeyError, TypeError) as error:  # metadata of the wrong shape
        raise ValueError(f"{path}: the model's metadata is damaged ({error!r})") from error
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    model.to(device).eval()
    info = dict(config.get("info", {}))
    return SegmentationModel(model, unet, quant, preprocess, info, config["layout"])


def unpacked(bundle: SegmentationModel) -> SegmentationModel:
    """``bundle`` as a trainable model in the ``state_dict`` layout: a packed one unpacked
    (float weights exactly its dequantized codes, BatchNorm unfolded with the same inference
    arithmetic, so the same outputs; see :func:`~napari_unetquant.packed.unpacked_network`), a
    ``state_dict`` one as it is."""
    if bundle.layout != LAYOUT_PACKED:
        return bundle
    model = unpacked_network(bundle.model, bundle.unet, bundle.quant)
    device = next(bundle.model.parameters()).device
    return SegmentationModel(
        model.to(device), bundle.unet, bundle.quant, bundle.preprocess, dict(bundle.info)
    )
