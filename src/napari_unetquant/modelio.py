"""Model files: one safetensors file, configuration in its metadata, never a pickle.

Layout: the tensors are the model's ``state_dict`` (weights, BatchNorm statistics, learned steps
and quantizer state); the metadata holds ``format``, ``version`` and a JSON ``config`` with the
U-Net, quantization and preprocessing settings plus a training summary. Loading reads and checks
the metadata before it builds anything, and safetensors parses no code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
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
from .data.io import atomic_path
from .model import build_unet

FORMAT = "napari-unetquant-model"
VERSION = 1
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")


@dataclass
class SegmentationModel:
    """A network with everything needed to use it on new images."""

    model: nn.Module
    unet: UNetConfig
    quant: QuantConfig
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    info: dict[str, Any] = field(default_factory=dict)


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
    )


def save_model(path: str | Path, bundle: SegmentationModel) -> None:
    """Write ``bundle`` to ``path`` (atomically: a crash leaves the previous file intact)."""
    from safetensors.torch import save_file

    config = {
        "unet": asdict(bundle.unet),
        "quant": asdict(bundle.quant),
        "preprocess": asdict(bundle.preprocess),
        "info": bundle.info,
    }
    metadata = {"format": FORMAT, "version": str(VERSION), "config": json.dumps(config)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in bundle.model.state_dict().items()}
    with atomic_path(Path(path)) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def _check_not_pickle(path: Path) -> None:
    with path.open("rb") as handle:
        head = handle.read(4)
    if head.startswith(_PICKLE_MAGIC):
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
    _check_not_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:
        raise ValueError(
            f"{path} is not a readable model file ({error}); it may be truncated or of "
            f"another format: train one with 'unetquant train'"
        ) from error
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} is a safetensors file but not a napari-unetquant model (format "
            f"{metadata.get('format')!r}); train one with 'unetquant train'"
        )
    if metadata.get("version") != str(VERSION):
        raise ValueError(
            f"{path} has model format version {metadata.get('version')}, this napari-unetquant "
            f"reads version {VERSION}; upgrade napari-unetquant or re-export the model"
        )
    config: dict[str, Any] = json.loads(metadata["config"])
    return config


def load_model(path: str | Path, device: str | torch.device = "cpu") -> SegmentationModel:
    """Load a model file written by :func:`save_model`, in evaluation mode."""
    from safetensors.torch import load_file

    config = read_metadata(path)
    try:
        unet = UNetConfig(**config["unet"])
        quant = quant_from_dict(config["quant"])
        preprocess = _preprocess_from_dict(config["preprocess"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: the model's configuration is invalid ({error})") from error
    model = build_unet(unet, quant)
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"{path}: tensors do not match the configured network ({error}); the file is "
            f"damaged or was edited"
        ) from error
    model.to(device).eval()
    return SegmentationModel(model, unet, quant, preprocess, dict(config.get("info", {})))
