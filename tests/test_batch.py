"""Batch segmentation: many volumes streamed file to file, a CSV of Dice, and the same on a
local dask cluster."""

from __future__ import annotations

import csv
from pathlib import Path

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import tifffile

from napari_unetquant.cli import main
from napari_unetquant.config import InferConfig
from napari_unetquant.data import em_phantom_stack, read_volume
from napari_unetquant.infer import segment_volume
from napari_unetquant.metrics import segmentation_scores
from napari_unetquant.modelio import load_model


@pytest.fixture
def volumes(tmp_path: Path) -> tuple[Path, Path]:
    """A folder of three volumes in three formats, and a folder of their labels by name."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    stacks = [em_phantom_stack(n, 48, 40, seed=n) for n in (2, 3, 4)]
    grey = {"photometric": "minisblack"}
    tifffile.imwrite(images / "a.tif", (stacks[0][0] * 255).astype(np.uint8), **grey)
    tifffile.imwrite(labels / "a.tif", stacks[0][1], **grey)
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.moveaxis(stacks[1][0], 0, 2), affine), images / "b.nii.gz")
    nib.save(nib.Nifti1Image(np.moveaxis(stacks[1][1], 0, 2), affine), labels / "b.nii.gz")
    (images / "c").mkdir()  # a folder of PNG slices is one volume
    for index, one in enumerate(stacks[2][0]):
        iio.imwrite(images / "c" / f"{index}.png", (one * 255).astype(np.uint8))
    tifffile.imwrite(labels / "c.tif", stacks[2][1], **grey)
    return images, labels


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _mask(path: Path) -> np.ndarray:
    return read_volume(path).array


def test_a_folder_is_segmented_into_masks_with_a_dice_csv(
    w4a6_model_file: Path, volumes: tuple[Path, Path], tmp_path: Path
) -> None:
    images, labels = volumes
    out = tmp_path / "masks"
    code = main(
        [
            "segment",
            "--model",
            str(w4a6_model_file),
            "--input-dir",
            str(images),
            "--out-dir",
            str(out),
            "--labels-dir",
            str(labels),
        ]
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.tif", "b.nii.gz", "c.tif", "segment.csv"]
    rows = _rows(out / "segment.csv")
    assert [Path(r["image"]).name for r in rows] == ["a.tif", "b.nii.gz", "c"]
    bundle = load_model(w4a6_model_file)
    for row in rows:
        image, mask = read_volume(row["image"]), _mask(Path(row["mask"]))
        expected = segment_volume(bundle, image, InferConfig(), "cpu") >= 0.5
        assert np.array_equal(mask, expected)  # streamed file == the in-memory segmentation
        truth = read_volume(row["labels"]).array != 0
        scores = segmentation_scores(mask, truth)
        assert float(row["dice_volume"]) == pytest.approx(scores.dice_volume, abs=5e-5)
        assert float(row["dice_mean"]) == pytest.approx(scores.dice_mean, abs=5e-5)
        assert int(row["foreground_voxels"]) == int(mask.sum()) and row["error"] == ""
    b = nib.load(out / "b.nii.gz")
    assert np.array_equal(b.affine, nib.load(images / "b.nii.gz").affine)  # overlays its image


def test_a_bad_volume_is_reported_and_the_others_still_written(
    w4a6_model_file: Path,
    volumes: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    images, _ = volumes
    (images / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    out = tmp_path / "masks"
    code = main(
        [
            "segment",
            "--model",
            str(w4a6_model_file),
            "--input-dir",
            str(images),
            "--out-dir",
            str(out),
            "--out-format",
            ".nii",
        ]
    )
    assert code == 1
    rows = {Path(r["image"]).name: r for r in _rows(out / "segment.csv")}
    assert "broken.nii.gz" in rows["broken.nii.gz"]["error"] and rows["broken.nii.gz"]["mask"] == ""
    assert rows["a.tif"]["error"] == "" and rows["a.tif"]["dice_volume"] == ""  # no labels
    assert sorted(p.name for p in out.iterdir()) == [
        "a.nii",
        "b.nii",
        "c.nii",
        "segment.csv",
    ]  # no file, not even a partial one, for the broken volume
    assert "1 of 4 volume(s) failed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--labels", "x.tif"], "3 image(s) but 1 label file(s)"),
        (["--image", "x.tif"], "either --image and --out, or batch options"),
        (["--out-format", ".png"], "invalid choice"),
    ],
)
def test_batch_mistakes_are_one_line_errors(
    w4a6_model_file: Path,
    volumes: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    images, _ = volumes
    argv = ["segment", "--model", str(w4a6_model_file), "--input-dir", str(images)]
    with pytest.raises(SystemExit) if "--out-format" in extra else _no_exit():
        code = main([*argv, "--out-dir", str(tmp_path / "masks"), *extra])
        assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "masks").exists()


class _no_exit:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


@pytest.mark.slow
def test_a_local_dask_cluster_of_two_workers_writes_the_same_masks(
    w4a6_model_file: Path, volumes: tuple[Path, Path], tmp_path: Path
) -> None:
    distributed = pytest.importorskip("distributed")
    images, labels = volumes
    local, remote = tmp_path / "local", tmp_path / "cluster"
    common = [
        "segment",
        "--model",
        str(w4a6_model_file),
        "--input-dir",
        str(images),
        "--labels-dir",
        str(labels),
    ]
    assert main([*common, "--out-dir", str(local)]) == 0
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        assert (
            main([*common, "--out-dir", str(remote), "--dask-scheduler", cluster.scheduler_address])
            == 0
        )
        with distributed.Client(cluster) as client:
            assert len(client.scheduler_info()["workers"]) == 2
    for name in ("a.tif", "b.nii.gz", "c.tif"):
        assert np.array_equal(_mask(local / name), _mask(remote / name))
    local_rows, remote_rows = _rows(local / "segment.csv"), _rows(remote / "segment.csv")
    for a, b in zip(local_rows, remote_rows, strict=True):
        assert (a["image"], a["dice_volume"]) == (b["image"], b["dice_volume"])


def test_masks_written_inside_the_input_folder_are_not_segmented_again(
    w4a6_model_file: Path, volumes: tuple[Path, Path]
) -> None:
    images, _ = volumes
    argv = ["segment", "--model", str(w4a6_model_file), "--input-dir", str(images)]
    for _ in range(2):  # the second run lists the folder with masks/ inside it
        assert main([*argv, "--out-dir", str(images / "masks")]) == 0
        rows = _rows(images / "masks" / "segment.csv")
        assert [Path(r["image"]).name for r in rows] == ["a.tif", "b.nii.gz", "c"]


def test_slice_folders_and_zarr_arrays_get_tiff_masks(tmp_path: Path) -> None:
    """``same`` writes .tif for inputs that are neither TIFF nor NIfTI (nor a DICOM series),
    whatever hidden files a slice folder holds."""
    import zarr

    from napari_unetquant.batch import plan_batch

    slices = tmp_path / "slices"
    slices.mkdir()
    iio.imwrite(slices / "0.png", np.zeros((8, 8), np.uint8))
    (slices / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    zarr.save_array(str(tmp_path / "v.zarr"), np.zeros((2, 8, 8), np.uint8))
    items = plan_batch([str(slices), str(tmp_path / "v.zarr")], tmp_path / "masks")
    assert [Path(item.out).name for item in items] == ["slices.tif", "v.tif"]
