"""Export of the integer network for fixed-point hardware or a C implementation.

One safetensors file (8-byte little-endian header length, a JSON header naming every tensor's
dtype, shape and byte range, then the raw little-endian data), with the network described in
the metadata entry ``network`` (JSON). The layout and the arithmetic are documented in
``docs/integer-format.md``; ``tests/infer/test_export.py`` holds a reference reader written with
the standard library and NumPy only, which runs the exported network and matches
:class:`~napari_unetquant.infer.integer.IntegerUNet` code for code.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data.write import write_safetensors
from ..quant.codes import weight_codes
from .integer import IntegerUNet
from .integer_ops import ActFormat

INTEGER_FORMAT = "napari-unetquant-integer"
INTEGER_VERSION = 2  # 2: upsampling mode, deployment rules, all_integer


def _format_json(fmt: ActFormat | None) -> dict[str, Any] | None:
    if fmt is None:
        return None
    return {"lo": fmt.lo, "hi": fmt.hi, "step": fmt.step, "frac_bits": fmt.frac_bits}


def integer_file_contents(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """What :func:`export_integer` writes: the tensors of ``model``'s integer network
    (``{name: tensor}``, on the CPU, contiguous) and its description (a JSON-able dict with
    ``"unet"``, ``"upsample"``, ``"upsample_extra_bits"``, ``"all_integer"``, ``"float_layers"``
    and ``"layers"``; see ``docs/integer-format.md``)."""
    net = IntegerUNet(model)
    tensors: dict[str, Tensor] = {}
    layers = []
    for name, conv in net.convs.items():
        layer = conv.layer
        entry: dict[str, Any] = {
            "name": name,
            "integer": conv.integer,
            "in_channels": layer.in_channels,
            "out_channels": layer.out_channels,
            "relu_batchnorm": conv.bn is not None,
            "input": _format_json(conv.input_format),
            "outputs": [],
        }
        if conv.bn is not None:
            tensors[f"{name}.alpha"], tensors[f"{name}.beta"] = conv.alpha, conv.beta
        tensors[f"{name}.bias"] = conv.bias
        if conv.integer:
            quantizer = layer.weight_quantizer
            codes = weight_codes(quantizer, layer.weight)
            tensors[f"{name}.weight"] = codes.codes.permute(0, 2, 3, 1).to(torch.int8)
            tensors[f"{name}.accumulator_scale"] = conv.scale
            entry["weight_bits"] = codes.bits
            entry["accumulator_bound"] = conv.accumulator_bound
        else:  # the weights the layer computes with (dequantized when they are quantized)
            tensors[f"{name}.weight"] = layer.quantized_weight().detach().float()
        for consumer, fmt, extra in net.outputs[name]:
            output: dict[str, Any] = {"consumer": consumer, "kind": "float"}
            if fmt is not None:
                output.update(kind="codes", format=_format_json(fmt), extra_bits=extra)
                if conv.integer:
                    requant = conv.requant(consumer, fmt, extra)
                    prefix = f"{name}.to.{consumer}"
                    tensors[f"{prefix}.multiplier"] = requant.multiplier
                    tensors[f"{prefix}.offset"] = requant.offset
                    tensors[f"{prefix}.low"] = requant.low
                    tensors[f"{prefix}.high"] = requant.high
                    output["shift"] = requant.shift
            entry["outputs"].append(output)
        layers.append(entry)
    description = {
        "unet": asdict(net.config),
        "upsample": net.config.upsample,
        "upsample_extra_bits": net.upsample_extra_bits,
        "all_integer": all(conv.integer for conv in net.convs.values()),
        "float_layers": [name for name, conv in net.convs.items() if not conv.integer],
        "layers": layers,
    }
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, description


def export_integer(
    model: nn.Module,
    path: str | Path,
    info: dict[str, Any] | None = None,
    deployment: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``model``'s integer network to ``path`` (atomically) and return its description.

    ``deployment`` holds what a runtime needs beside the network (the input's preprocessing,
    the threshold, the tiling; see ``docs/integer-format.md``): each entry becomes a metadata
    entry of the file, JSON text unless it is a string."""

    tensors, description = integer_file_contents(model)
    entries = {"network": description, "info": info or {}, **(deployment or {})}
    metadata = {"format": INTEGER_FORMAT, "version": str(INTEGER_VERSION)}
    for key, value in entries.items():
        if key in metadata:
            raise ValueError(f"metadata entry {key!r} is the file's own")
        metadata[key] = value if isinstance(value, str) else json.dumps(value)
    write_safetensors(Path(path), tensors, metadata)
    return description
