"""Training reads every format segmentation reads: ``.npy`` and ``.zarr`` images and labels
give the pairs a TIFF gives, and ``unetquant train`` runs on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_unetquant.cli import main
from napari_unetquant.data import em_phantom_stack
from napari_unetquant.train import read_pairs

FAST = ["--steps", "2", "--crop", "32", "--batch-size", "2", "--validate-every", "1"]
SMALL = ["--base-width", "4", "--depth", "2"]


def _phantom() -> tuple[np.ndarray, np.ndarray]:
    """An EM-like ``(3, 64, 64)`` uint8 image and its uint8 {0, 1} membranes."""
    images, membranes = em_phantom_stack(3, 64, 64, seed=7)
    return (images * 255).astype(np.uint8), membranes.astype(np.uint8)


def _save(path: Path, array: np.ndarray) -> Path:
    if path.suffix == ".npy":
        np.save(path, array)
    elif path.suffix == ".zarr":
        import zarr

        zarr.save_array(str(path), array)
    else:
        tifffile.imwrite(path, array, photometric="minisblack")
    return path


@pytest.mark.parametrize(
    ("image_suffix", "label_suffix"),
    [(".npy", ".npy"), (".zarr", ".zarr"), (".npy", ".tif"), (".tif", ".zarr")],
)
def test_read_pairs_reads_npy_and_zarr_as_it_reads_tiff(
    tmp_path: Path, image_suffix: str, label_suffix: str
) -> None:
    image, labels = _phantom()
    image_path = _save(tmp_path / f"image{image_suffix}", image)
    label_path = _save(tmp_path / f"labels{label_suffix}", labels * 255)
    [pair] = read_pairs([image_path], [label_path])
    assert pair.image.shape == pair.mask.shape == (3, 64, 64)
    assert pair.image.array.dtype == np.uint8 and np.array_equal(pair.image.array, image)
    assert pair.mask.dtype == np.uint8 and np.array_equal(pair.mask, labels)
    assert pair.image.source == str(image_path) and pair.image.spacing is None


def test_read_pairs_refuses_npy_labels_off_the_image_grid(tmp_path: Path) -> None:
    image, labels = _phantom()
    image_path = _save(tmp_path / "image.npy", image)
    label_path = _save(tmp_path / "labels.npy", labels[:, :32])
    with pytest.raises(ValueError, match="labels must be on the image's grid"):
        read_pairs([image_path], [label_path])


@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
def test_train_command_runs_on_npy_and_zarr_files(
    tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    image, labels = _phantom()
    image_path = _save(tmp_path / f"image{suffix}", image)
    label_path = _save(tmp_path / f"labels{suffix}", labels)
    out = tmp_path / "model.safetensors"
    argv = ["train", "--images", str(image_path), "--labels", str(label_path), "--out", str(out)]
    code = main([*argv, *FAST, *SMALL])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "saved" in captured.out and out.is_file()
