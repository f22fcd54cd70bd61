"""Packed model files: exact outputs after loading, real sizes on disk, damage detected."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from napari_unetquant.config import QuantConfig, UNetConfig
from napari_unetquant.model import (
    BatchNorm2d,
    BatchNorm3d,
    FoldedBatchNorm,
    build_unet,
)
from napari_unetquant.modelio import SegmentationModel, load_model, read_metadata, save_model
from napari_unetquant.packed import file_report, fp32_state_dict_bytes, safetensors_layout
from napari_unetquant.quant import bit_report
from napari_unetquant.quant.packing import packed_size

UNET = UNetConfig(base_width=4, depth=2)
SETTINGS = [
    "W4A6",
    "W2A4",
    "W3A5",
    "W8A8",
    "Q0.4/Q6.0",
    "W4A4-lsq",
    "W3A6-lsq",
    "ternary",
    "binary",
    "FP",
]


def _trained(quant: QuantConfig, unet: UNetConfig = UNET) -> SegmentationModel:
    """A model after a few real optimisation steps (BatchNorm statistics, learned steps)."""
    model = build_unet(unet, quant).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(4):
        loss = model(torch.randn(4, 1, 32, 32)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return SegmentationModel(model.eval(), unet, quant, info={"note": "test"})


@pytest.mark.parametrize("label", SETTINGS)
def test_packed_file_runs_exactly_like_the_model_it_came_from(label: str, tmp_path: Path) -> None:
    bundle = _trained(QuantConfig.from_label(label))
    path = tmp_path / "packed.safetensors"
    save_model(path, bundle, packed=True)
    loaded = load_model(path)
    assert loaded.layout == "packed" and loaded.quant == bundle.quant
    _assert_runs_exactly_like(loaded, bundle, torch.randn(2, 1, 44, 52), tmp_path)


def _assert_runs_exactly_like(
    loaded: SegmentationModel, bundle: SegmentationModel, x: torch.Tensor, tmp_path: Path
) -> None:
    """``loaded`` (from ``bundle``'s packed file) gives bit-identical outputs, twice, leaves
    the input alone, reports the same stored bits, and re-packs to the same codes."""
    original = x.clone()
    with torch.no_grad():
        expected = bundle.model(x)
        assert torch.equal(loaded.model(x), expected)
        assert torch.equal(loaded.model(x), expected)  # in-place paths leave no trace
    assert torch.equal(x, original)  # the caller's input is never overwritten
    # the same stored bits per convolution (BatchNorm is smaller once folded)
    assert bit_report(loaded.model).layers == bit_report(bundle.model).layers
    # re-packing a loaded packed model writes the same codes
    again = tmp_path / "again.safetensors"
    save_model(again, loaded, packed=True)
    first, second = load_file(str(tmp_path / "packed.safetensors")), load_file(str(again))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_codes_take_exactly_their_bits_and_batchnorm_is_folded(tmp_path: Path) -> None:
    quant = dataclasses.replace(QuantConfig.from_label("W3A5"), edge_layers=())
    bundle = _trained(quant)
    path = tmp_path / "w3.safetensors"
    save_model(path, bundle, packed=True)
    _, sizes = safetensors_layout(path)
    for name, module in bundle.model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            assert sizes[f"{name}.weight.codes"] == packed_size(module.weight.numel(), 3)
            assert f"{name}.weight" not in sizes
        if isinstance(module, BatchNorm2d):
            assert sizes[f"{name}.alpha"] == sizes[f"{name}.beta"] == 4 * module.num_features
            assert f"{name}.running_mean" not in sizes
    loaded = load_model(path)
    assert any(isinstance(m, FoldedBatchNorm) for m in loaded.model.modules())


def test_batchnorm_inference_is_the_folded_arithmetic() -> None:
    bn = BatchNorm2d(6).train()
    bn(torch.randn(8, 6, 5, 5) * 3 + 1)
    bn.eval()
    x = torch.randn(2, 6, 7, 7)
    reference = torch.nn.functional.batch_norm(
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
    )
    torch.testing.assert_close(bn(x), reference, rtol=1e-6, atol=1e-6)
    assert torch.equal(FoldedBatchNorm.from_batch_norm(bn)(x), bn(x))


@pytest.mark.parametrize(("label", "goal"), [("W4A6", 7.9), ("W2A4", 15.5)])
def test_file_report_measures_the_file_on_disk(label: str, goal: float, tmp_path: Path) -> None:
    """At the paper's width, with every layer quantized, the files reach the issue's goals."""
    unet = UNetConfig.paper()
    quant = dataclasses.replace(QuantConfig.from_label(label), edge_layers=())
    model = build_unet(unet, quant).eval()
    with torch.no_grad():
        model(torch.randn(1, 1, 16, 16))
    path = tmp_path / "paper.safetensors"
    save_model(path, SegmentationModel(model, unet, quant), packed=True)
    report = file_report(path, load_model(path).model, unet)
    assert report.file_bytes == path.stat().st_size
    assert report.header_bytes + sum(layer.bytes for layer in report.layers) <= report.file_bytes
    assert report.fp32_file_bytes == fp32_state_dict_bytes(unet)
    assert report.ratio >= goal
    assert "file on disk" in report.table()


def test_fp32_reference_is_the_float_state_dict_file(tmp_path: Path) -> None:
    model = build_unet(UNET)
    path = tmp_path / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert fp32_state_dict_bytes(UNET) == path.stat().st_size


def _packed_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A packed W4A6 file at ``path``: its tensors and its metadata, for editing."""
    from safetensors import safe_open

    save_model(path, _trained(QuantConfig.from_label("W4A6")), packed=True)
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    return load_file(str(path)), metadata


def test_damaged_packed_files_are_refused_with_the_reason(tmp_path: Path) -> None:
    tensors, metadata = _packed_file(tmp_path / "p.safetensors")
    truncated = dict(tensors)
    truncated["enc2.conv1.weight.codes"] = truncated["enc2.conv1.weight.codes"][:-1]
    save_file(truncated, str(tmp_path / "short.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="damaged"):
        load_model(tmp_path / "short.safetensors")
    config = json.loads(metadata["config"])
    config["layers"].pop("enc2.conv1")
    edited = dict(metadata, config=json.dumps(config))
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=edited)
    with pytest.raises(ValueError, match="do not match"):
        load_model(tmp_path / "edited.safetensors")
    assert read_metadata(tmp_path / "p.safetensors")["layout"] == "packed"


def test_a_packed_model_cannot_be_saved_unpacked(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    save_model(path, _trained(QuantConfig.from_label("W4A6")), packed=True)
    with pytest.raises(ValueError, match="save it packed"):
        save_model(tmp_path / "state.safetensors", load_model(path))


def test_submodules_of_a_packed_model_keep_their_plain_meaning(tmp_path: Path) -> None:
    """The in-place inference path belongs to whole blocks: a BatchNorm or convolution called
    on its own computes what it says and leaves its input alone."""
    bundle = _trained(QuantConfig.from_label("W4A6"))
    path = tmp_path / "p.safetensors"
    save_model(path, bundle, packed=True)
    loaded = load_model(path).model
    x = torch.randn(1, 8, 16, 16)
    original = x.clone()
    with torch.no_grad():
        assert torch.equal(loaded.enc2.bn1(x), bundle.model.enc2.bn1(x))
        assert torch.equal(loaded.enc2.conv2(x), bundle.model.enc2.conv2(x))
        block = torch.randn(1, 4, 16, 16)
        assert torch.equal(loaded.enc2(block), bundle.model.enc2(block))
    assert torch.equal(x, original)


def test_damaged_packing_metadata_is_a_clear_error(tmp_path: Path) -> None:
    tensors, metadata = _packed_file(tmp_path / "p.safetensors")
    edits = {
        "no offset": lambda layers: layers["enc2.conv1"].pop("offset"),
        "null layer": lambda layers: layers.update({"enc2.conv1": None}),
        "text bits": lambda layers: layers["enc2.conv1"].update(bits="4"),
        "wrong offset": lambda layers: layers["enc2.conv1"].update(offset=3),
        "layers a list": None,
    }
    for name, edit in edits.items():
        config = json.loads(metadata["config"])
        if edit is None:
            config["layers"] = [1, 2]
        else:
            edit(config["layers"])
        damaged = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(damaged), metadata=dict(metadata, config=json.dumps(config)))
        with pytest.raises(ValueError, match=r"damaged|edited|does not fit"):
            load_model(damaged)


def test_batchnorm_with_frozen_statistics_still_trains_its_affine() -> None:
    bn = BatchNorm2d(3).eval()
    bn(torch.randn(2, 3, 4, 4)).sum().backward()
    assert bn.weight.grad is not None and bn.bias.grad is not None
    assert float(bn.bias.grad.abs().sum()) > 0


UNET_3D = UNetConfig(base_width=2, depth=2, spatial_dims=3)


def _trained_3d(quant: QuantConfig) -> SegmentationModel:
    """A 3D model after a few real optimisation steps (BatchNorm statistics, learned steps)."""
    model = build_unet(UNET_3D, quant).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = model(torch.randn(2, 1, 8, 16, 16)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return SegmentationModel(model.eval(), UNET_3D, quant)


@pytest.mark.parametrize("label", ["W4A6", "Q0.4/Q6.0", "W3A6-lsq", "W4A4-lsq", "ternary", "FP"])
def test_packed_3d_file_runs_exactly_like_the_model_it_came_from(
    label: str, tmp_path: Path
) -> None:
    bundle = _trained_3d(QuantConfig.from_label(label))
    path = tmp_path / "packed.safetensors"
    save_model(path, bundle, packed=True)
    loaded = load_model(path)
    assert loaded.layout == "packed" and loaded.unet == UNET_3D
    assert loaded.model.fast_inference  # the in-place block path runs below
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in loaded.model.modules())
    assert any(isinstance(m, FoldedBatchNorm) for m in loaded.model.modules())
    _assert_runs_exactly_like(loaded, bundle, torch.randn(2, 1, 7, 19, 13), tmp_path)


def test_3d_codes_take_exactly_their_bits_and_the_report_counts_them(tmp_path: Path) -> None:
    quant = dataclasses.replace(QuantConfig.from_label("W3A5"), edge_layers=())
    bundle = _trained_3d(quant)
    path = tmp_path / "w3.safetensors"
    save_model(path, bundle, packed=True)
    _, sizes = safetensors_layout(path)
    report = bit_report(bundle.model)
    rows = {layer.name: layer for layer in report.layers}
    for name, module in bundle.model.named_modules():
        if isinstance(module, torch.nn.Conv3d):
            assert module.weight.shape[2:] == (3, 3, 3)
            assert sizes[f"{name}.weight.codes"] == packed_size(module.weight.numel(), 3)
            assert rows[name].weights == module.weight.numel()
            assert rows[name].weight_bits == 3
        if isinstance(module, BatchNorm3d):
            assert sizes[f"{name}.alpha"] == 4 * module.num_features
    on_disk = file_report(path, load_model(path).model, UNET_3D)
    assert on_disk.file_bytes == path.stat().st_size
    assert sum(row.bytes for row in on_disk.layers) * 3 < sum(r.fp32_bytes for r in on_disk.layers)
    assert on_disk.fp32_file_bytes == fp32_state_dict_bytes(UNET_3D)


def test_3d_batchnorm_inference_is_the_folded_arithmetic() -> None:
    bn = BatchNorm3d(4).train()
    bn(torch.randn(3, 4, 5, 6, 6) * 2 - 1)
    bn.eval()
    x = torch.randn(2, 4, 3, 7, 5)
    reference = torch.nn.functional.batch_norm(
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
    )
    torch.testing.assert_close(bn(x), reference, rtol=1e-6, atol=1e-6)
    assert torch.equal(FoldedBatchNorm.from_batch_norm(bn)(x), bn(x))
    bn(x).sum().backward()  # frozen statistics, trainable affine
    assert bn.weight.grad is not None and float(bn.bias.grad.abs().sum()) > 0
