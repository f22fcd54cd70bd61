"""The exported integer network, read back by a reference reader that uses only the standard
library and NumPy and follows docs/integer-format.md line by line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from napari_unetquant.config import LayerOverride, QuantConfig, QuantizerConfig, UNetConfig
from napari_unetquant.infer.export import export_integer
from napari_unetquant.infer.integer import IntegerUNet
from napari_unetquant.model import build_unet

DTYPES = {"I8": np.int8, "I64": np.int64, "F32": np.float32, "F64": np.float64}


# --- the reference reader --------------------------------------------------------------------


def read_integer_network(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    metadata = header.pop("__metadata__")
    assert metadata["format"] == "napari-unetquant-integer" and metadata["version"] == "2"
    base = 8 + length
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        array = np.frombuffer(raw[base + begin : base + end], dtype=DTYPES[entry["dtype"]])
        tensors[name] = array.reshape(entry["shape"])
    return json.loads(metadata["network"]), tensors


def rhe(v: np.ndarray, shift: int) -> np.ndarray:
    if shift <= 0:
        return v << -shift
    return (v + (1 << (shift - 1)) - 1 + ((v >> shift) & 1)) >> shift


def quantize(y: np.ndarray, fmt: dict[str, Any]) -> np.ndarray:
    if fmt["frac_bits"] is not None:
        scaled = y.astype(np.float32) * np.float32(2.0 ** fmt["frac_bits"])
    else:
        scaled = y.astype(np.float32) / np.float32(fmt["step"])
    return np.round(np.clip(scaled, fmt["lo"], fmt["hi"])).astype(np.int64)


def convolve(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``x (H, W, C)``, ``weight (O, 3, 3, C)``, zero padding 1 -> ``(H, W, O)``."""
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    windows = sliding_window_view(padded, (3, 3), axis=(0, 1))  # (H, W, C, 3, 3)
    return np.einsum("hwcyx,oyxc->hwo", windows, weight)


def run_layer(layer: dict[str, Any], t: dict[str, np.ndarray], x: np.ndarray) -> dict[str, Any]:
    name = layer["name"]
    results: dict[str, Any] = {}
    if layer["integer"]:
        if x.dtype.kind == "f":
            x = quantize(x, layer["input"])
        acc = convolve(x, t[f"{name}.weight"].astype(np.int64))
        assert np.abs(acc).max() <= layer["accumulator_bound"] < 2**31
        z = acc * t[f"{name}.accumulator_scale"] + t[f"{name}.bias"]
    else:
        if x.dtype.kind != "f":  # a float layer whose input arrives as codes
            x = x * layer["input"]["step"]
        weight = t[f"{name}.weight"].transpose(0, 2, 3, 1).astype(np.float64)
        z = convolve(x.astype(np.float64), weight) + t[f"{name}.bias"]
    y = np.maximum(z, 0) * t[f"{name}.alpha"] + t[f"{name}.beta"] if layer["relu_batchnorm"] else z
    for output in layer["outputs"]:
        consumer = output["consumer"]
        if output["kind"] == "float":
            results[consumer] = y
        elif layer["integer"]:
            prefix = f"{name}.to.{consumer}"
            v = t[f"{prefix}.multiplier"] * acc + t[f"{prefix}.offset"]
            codes = rhe(v, output["shift"] - output["extra_bits"])
            results[consumer] = np.clip(codes, t[f"{prefix}.low"], t[f"{prefix}.high"])
        elif output["extra_bits"]:
            results[consumer] = y  # float layers hand float values to the upsampling
        else:
            results[consumer] = quantize(y, output["format"])
    return results


def upsample(source: np.ndarray, extra_bits: int, fmt: dict[str, Any] | None) -> np.ndarray:
    def along(v: np.ndarray, axis: int) -> np.ndarray:
        n = v.shape[axis]
        before = np.take(v, np.maximum(np.arange(n) - 1, 0), axis=axis)
        after = np.take(v, np.minimum(np.arange(n) + 1, n - 1), axis=axis)
        out = np.stack([3 * v + before, 3 * v + after], axis=axis + 1)
        return out.reshape((*v.shape[:axis], 2 * n, *v.shape[axis + 1 :]))

    numerator = along(along(source, 0), 1)
    if fmt is None or source.dtype.kind == "f":
        return numerator / 16
    return np.clip(rhe(numerator, extra_bits + 4), fmt["lo"], fmt["hi"])


def reference_logits(network: dict[str, Any], t: dict[str, np.ndarray], image: np.ndarray):
    layers = {layer["name"]: layer for layer in network["layers"]}
    depth = network["unet"]["depth"]
    multiple = 2**depth
    height, width = image.shape
    x: np.ndarray = np.pad(image, ((0, -height % multiple), (0, -width % multiple)), "edge")
    x = x[:, :, None]

    def block(name: str, x: np.ndarray) -> dict[str, Any]:
        middle = run_layer(layers[f"{name}.conv1"], t, x)[f"{name}.conv2"]
        return run_layer(layers[f"{name}.conv2"], t, middle)

    skips = []
    for level in range(1, depth + 1):
        out = block(f"enc{level}", x)
        after = f"enc{level + 1}.conv1" if level < depth else "bottleneck.conv1"
        skips.append(out[f"dec{level}.conv1"])
        a = out[after]
        x = a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2, -1).max(axis=(1, 3))
    below = block("bottleneck", x)[f"dec{depth}.conv1"]
    for level in range(depth, 0, -1):
        consumer = f"dec{level}.conv1"
        fmt = layers[consumer]["input"]
        if network["upsample"] == "nearest":  # a 2 x 2 repeat of codes (or of float values)
            up = below.repeat(2, axis=0).repeat(2, axis=1)
        else:
            up = upsample(below, network["upsample_extra_bits"], fmt)
        if up.dtype.kind == "f" and fmt is not None:
            up = quantize(up, fmt)
        x = np.concatenate([up, skips[level - 1]], axis=2)
        after = f"dec{level - 1}.conv1" if level > 1 else "head"
        below = block(f"dec{level}", x)[after]
    logits = run_layer(layers["head"], t, below)["logits"]
    return logits[:height, :width, 0]


# --- the tests -------------------------------------------------------------------------------


def tiny_trained_unet(quant: QuantConfig, upsample: str = "bilinear") -> torch.nn.Module:
    """A tiny U-Net given a few optimisation steps: formats chosen, BatchNorm not initial."""
    torch.manual_seed(0)
    model = build_unet(UNetConfig(base_width=4, depth=2, upsample=upsample), quant).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        loss = (model(torch.randn(4, 1, 32, 32)) - 1).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize(
    ("label", "upsample"),
    [
        ("W4A6", "bilinear"),
        ("Q0.4/Q6.0", "bilinear"),
        ("W3A4-lsq", "bilinear"),
        ("W4A6", "nearest"),
    ],
)
def test_reference_reader_computes_the_same_integer_network(
    label: str, upsample: str, tmp_path: Path
) -> None:
    quant = dataclasses.replace(QuantConfig.from_label(label), edge_layers=())
    model = tiny_trained_unet(quant, upsample)
    path = tmp_path / "net.safetensors"
    export_integer(model, path, {"label": label})
    network, tensors = read_integer_network(path)
    assert all(layer["integer"] for layer in network["layers"])
    assert network["upsample"] == upsample
    assert network["upsample_extra_bits"] == (16 if upsample == "bilinear" else 0)
    image = np.random.default_rng(1).normal(size=(28, 36)).astype(np.float32)
    expected = IntegerUNet(model)(torch.from_numpy(image)[None, None])[0, 0].numpy()
    logits = reference_logits(network, tensors, image)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(logits > 0, expected > 0)


def test_default_model_exports_float_edge_layers(tmp_path: Path) -> None:
    model = tiny_trained_unet(QuantConfig.from_label("W4A6"))
    path = tmp_path / "net.safetensors"
    export_integer(model, path)
    network, tensors = read_integer_network(path)
    kinds = {layer["name"]: layer["integer"] for layer in network["layers"]}
    assert not kinds["enc1.conv1"] and not kinds["enc1.conv2"] and not kinds["head"]
    assert sum(kinds.values()) == len(kinds) - 3
    assert tensors["enc1.conv1.weight"].dtype == np.float32
    assert tensors["enc2.conv1.weight"].dtype == np.int8
    assert tensors["enc2.conv1.weight"].shape == (8, 3, 3, 4)
    image = np.random.default_rng(2).normal(size=(24, 20)).astype(np.float32)
    expected = IntegerUNet(model)(torch.from_numpy(image)[None, None])[0, 0].numpy()
    logits = reference_logits(network, tensors, image)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "override",
    [
        LayerOverride("*.conv2", weight=QuantizerConfig()),  # quantized inputs, float weights
        LayerOverride("dec1.conv1", act=QuantizerConfig()),  # quantized weights, float inputs
    ],
    ids=["float-weights", "float-inputs"],
)
def test_mixed_layers_export_what_they_compute(override: LayerOverride, tmp_path: Path) -> None:
    quant = dataclasses.replace(QuantConfig.from_label("W4A6"), overrides=(override,))
    model = tiny_trained_unet(quant)
    path = tmp_path / "net.safetensors"
    export_integer(model, path)
    network, tensors = read_integer_network(path)
    image = np.random.default_rng(3).normal(size=(24, 32)).astype(np.float32)
    x = torch.from_numpy(image)[None, None]
    expected = IntegerUNet(model)(x)[0, 0].numpy()
    logits = reference_logits(network, tensors, image)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        simulated = model(x)[0, 0].numpy()
    assert np.mean((simulated > 0) == (expected > 0)) >= 0.999


@pytest.mark.parametrize("edges", ["float", "quantized"])
def test_export_job_carries_deployment_rules_and_names_float_layers(
    edges: str, tmp_path: Path
) -> None:
    """The file holds what a program needs around the network (docs/integer-format.md, "From
    an image to a mask") and the job says whether it is reproducible bit for bit."""
    from safetensors import safe_open

    from napari_unetquant.config import PreprocessConfig
    from napari_unetquant.jobs import export_model
    from napari_unetquant.modelio import SegmentationModel, save_model

    quant = QuantConfig.from_label("W4A6")
    if edges == "quantized":
        quant = dataclasses.replace(quant, edge_layers=())
    preprocess = PreprocessConfig(ct_window=(40.0, 400.0))
    unet = UNetConfig(base_width=4, depth=2)
    model = tiny_trained_unet(quant)
    source = tmp_path / "model.safetensors"
    save_model(source, SegmentationModel(model, unet, quant, preprocess))
    out = tmp_path / "net.safetensors"
    written = export_model(str(source), str(out), format="integer")
    network, _ = read_integer_network(out)
    with safe_open(str(out), "np") as opened:
        metadata = opened.metadata()
    assert json.loads(metadata["preprocess"])["ct_window"] == [40.0, 400.0]
    assert "CT window" in metadata["preprocess_text"]
    assert json.loads(metadata["threshold"]) == 0.5
    tiling = json.loads(metadata["tiling"])
    assert tiling == {"tile": 512, "overlap": 0.25, "gaussian_sigma": 64.0, "weight_floor": 1e-3}
    assert json.loads(metadata["info"])["label"] == "W4A6"
    (note,) = written.notes
    if edges == "float":
        assert not network["all_integer"]
        assert network["float_layers"] == ["enc1.conv1", "enc1.conv2", "head"]
        assert "3 of 11 layers compute in float32 (enc1.conv1, enc1.conv2, head)" in note
    else:
        assert network["all_integer"] and network["float_layers"] == []
        assert note.startswith("all 11 layers are integer")
