"""Every file the project writes appears whole or not at all: a failure at the last moment
(here ``fsync`` reporting a full disk, after the writer wrote everything) leaves the previous
file byte for byte and no temporary file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_unetquant.batch import SegmentedFile, write_scores_csv
from napari_unetquant.data import write_mask
from napari_unetquant.infer.export import export_integer
from napari_unetquant.modelio import load_model, save_model


def _writers(model: Path) -> dict[str, tuple[str, Callable[[Path], None]]]:
    bundle = load_model(model)
    with torch.no_grad():  # a forward pass in training mode picks the activation formats
        bundle.model.train()(torch.randn(2, 1, 32, 32))
    bundle.model.eval()
    mask = np.ones((2, 8, 8), np.uint8)
    return {
        "model": ("m.safetensors", lambda p: save_model(p, bundle)),
        "packed model": ("p.safetensors", lambda p: save_model(p, bundle, packed=True)),
        "integer export": ("i.safetensors", lambda p: export_integer(bundle.model, p, {})),
        "TIFF mask": ("mask.tif", lambda p: write_mask(p, mask)),
        "NIfTI mask": ("mask.nii.gz", lambda p: write_mask(p, mask)),
        "batch CSV": ("scores.csv", lambda p: write_scores_csv(p, [SegmentedFile("a", "b")])),
    }


@pytest.mark.parametrize(
    "kind", ["model", "packed model", "integer export", "TIFF mask", "NIfTI mask", "batch CSV"]
)
def test_a_write_that_fails_at_the_end_keeps_the_old_file(
    kind: str, w4a6_model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, write = _writers(w4a6_model_file)[kind]
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / name
    write(target)  # a first, complete version
    before = target.read_bytes()

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write(target)
    assert target.read_bytes() == before
    assert [p.name for p in folder.iterdir()] == [name]
