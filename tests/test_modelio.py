"""Model files: exact round trips, and no pickle ever runs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from napari_unetquant.config import PreprocessConfig, QuantConfig, UNetConfig
from napari_unetquant.model import build_unet
from napari_unetquant.modelio import SegmentationModel, load_model, read_metadata, save_model


def _bundle(quant: QuantConfig) -> SegmentationModel:
    model = build_unet(UNetConfig(base_width=4, depth=2), quant)
    model.train()
    for _ in range(2):
        model(torch.randn(2, 1, 32, 32))
    return SegmentationModel(
        model.eval(),
        UNetConfig(base_width=4, depth=2),
        quant,
        PreprocessConfig(spacing=(0.5, 0.5)),
        {"validation_dice": 0.5},
    )


@pytest.mark.parametrize(
    "quant",
    [
        QuantConfig(),
        QuantConfig.paper(),
        QuantConfig.from_bits(4, 6),
        QuantConfig.from_bits(3, 4, "lsq"),
        QuantConfig.from_bits(2, 2, "ternary"),
        QuantConfig.from_bits(1, 1, "binary"),
    ],
    ids=lambda q: q.label,
)
def test_round_trip_gives_identical_outputs(quant: QuantConfig, tmp_path: Path) -> None:
    bundle = _bundle(quant)
    save_model(tmp_path / "m.safetensors", bundle)
    loaded = load_model(tmp_path / "m.safetensors")
    assert (loaded.unet, loaded.quant, loaded.preprocess) == (bundle.unet, quant, bundle.preprocess)
    assert loaded.info == {"validation_dice": 0.5}
    x = torch.randn(1, 1, 40, 36)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), bundle.model(x))


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "renamed.safetensors"])
def test_pickles_are_refused_and_never_run(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / name).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="is a pickle"):
        load_model(tmp_path / name)
    assert not marker.exists()


def test_torch_zip_checkpoints_are_refused(tmp_path: Path) -> None:
    torch.save({"weight": torch.zeros(2)}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="is a pickle"):
        load_model(tmp_path / "model.pt")
    marker = tmp_path / "pwned"  # torch.save's zip holding a pickle that would run code
    torch.save({"weight": torch.zeros(2), "payload": _Payload(marker)}, tmp_path / "evil.pth")
    (tmp_path / "evil.safetensors").write_bytes((tmp_path / "evil.pth").read_bytes())
    for name in ("evil.pth", "evil.safetensors"):
        with pytest.raises(ValueError, match="is a pickle"):
            load_model(tmp_path / name)
    assert not marker.exists()


def test_foreign_damaged_and_future_files(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a napari-unetquant model"):
        load_model(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{nonsense")
    with pytest.raises(ValueError, match="not a readable model file"):
        load_model(tmp_path / "junk.safetensors")
    good = tmp_path / "good.safetensors"
    save_model(good, _bundle(QuantConfig()))
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a readable model file"):
        load_model(tmp_path / "cut.safetensors")
    future = {"format": "napari-unetquant-model", "version": "99", "config": "{}"}
    save_file({"w": torch.zeros(2)}, str(tmp_path / "future.safetensors"), metadata=future)
    with pytest.raises(ValueError, match="version 99"):
        load_model(tmp_path / "future.safetensors")
    with pytest.raises(ValueError, match="no such model file"):
        load_model(tmp_path / "absent.safetensors")


def test_tensors_that_do_not_fit_the_configuration(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_model(path, _bundle(QuantConfig()))
    config = read_metadata(path)
    config["unet"]["base_width"] = 8
    metadata = {"format": "napari-unetquant-model", "version": "1", "config": json.dumps(config)}
    save_file({"head.weight": torch.zeros(1)}, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="do not match the configured network"):
        load_model(path)


def test_3d_model_files_round_trip_and_older_files_load_as_2d(tmp_path: Path) -> None:
    unet = UNetConfig(base_width=2, depth=2, spatial_dims=3)
    model = build_unet(unet, QuantConfig.from_bits(4, 6)).train()
    model(torch.randn(2, 1, 6, 16, 16))
    save_model(
        tmp_path / "3d.safetensors",
        SegmentationModel(model.eval(), unet, QuantConfig.from_bits(4, 6)),
    )
    loaded = load_model(tmp_path / "3d.safetensors")
    assert loaded.unet.spatial_dims == 3
    x = torch.randn(1, 1, 5, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    # files written before 3D U-Nets existed have no spatial_dims: they are 2D
    save_model(tmp_path / "2d.safetensors", _bundle(QuantConfig()))
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(tmp_path / "2d.safetensors"), framework="pt") as handle:
        metadata = dict(handle.metadata())
    config = json.loads(metadata["config"])
    del config["unet"]["spatial_dims"]
    old = tmp_path / "old.safetensors"
    save_file(
        load_file(str(tmp_path / "2d.safetensors")),
        str(old),
        metadata=dict(metadata, config=json.dumps(config)),
    )
    assert load_model(old).unet == UNetConfig(base_width=4, depth=2)


@pytest.mark.parametrize("packed", [False, True])
def test_intensity_normalisation_travels_with_the_model(tmp_path: Path, packed: bool) -> None:
    """A model trained on locally normalised images is run on locally normalised images: the
    choice is in the file (float and packed); files from before the choice load as "slice"."""
    from dataclasses import replace

    bundle = _bundle(QuantConfig.from_bits(4, 6))
    local = PreprocessConfig(spacing=(0.5, 0.5), intensity="local", local_mm=7.5)
    save_model(tmp_path / "local.safetensors", replace(bundle, preprocess=local), packed=packed)
    assert load_model(tmp_path / "local.safetensors").preprocess == local

    save_model(tmp_path / "new.safetensors", bundle)
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as handle:
        metadata = dict(handle.metadata())
    config = json.loads(metadata["config"])
    del config["preprocess"]["intensity"], config["preprocess"]["local_mm"]
    old = tmp_path / "old.safetensors"
    save_file(
        load_file(str(tmp_path / "new.safetensors")),
        str(old),
        metadata=dict(metadata, config=json.dumps(config)),
    )
    assert load_model(old).preprocess == PreprocessConfig(spacing=(0.5, 0.5))
