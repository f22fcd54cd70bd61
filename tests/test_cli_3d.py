"""The command line with 3D U-Nets: train, info, export, bits, and the refusals that say the fix."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_unetquant.cli import main
from napari_unetquant.config import InferConfig
from napari_unetquant.data import read_volume
from napari_unetquant.infer import segment_volume
from napari_unetquant.modelio import load_model

FAST_3D = [
    "--spatial-dims",
    "3",
    "--crop-depth",
    "4",
    "--steps",
    "4",
    "--crop",
    "24",
    "--batch-size",
    "2",
    "--validate-every",
    "2",
    "--base-width",
    "2",
    "--depth",
    "2",
]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _train(shared_data: Path, out: Path, *extra: str) -> list[str]:
    folder = shared_data / "spinal-gm-tiny"
    return [
        "train",
        "--images",
        str(folder / "t2s.nii.gz"),
        "--labels",
        str(folder / "t2s_seg.nii.gz"),
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture
def model_3d(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    out = tmp_path / "w4a6-3d.safetensors"
    extra = ["--weight-bits", "4", "--act-bits", "6", *FAST_3D]
    code, stdout, err = _run(_train(shared_data, out, *extra), capsys)
    assert code == 0, err
    assert "saved" in stdout and "validation Dice" in err
    return out


def test_train_3d_writes_a_3d_model_that_info_reports(
    model_3d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = load_model(model_3d)
    assert bundle.unet.spatial_dims == 3 and bundle.unet.base_width == 2
    assert bundle.quant.label == "W4A6"
    code, stdout, _ = _run(["info", "--model", str(model_3d)], capsys)
    assert code == 0
    assert "network     3D U-Net, base width 2, depth 2" in stdout.splitlines()
    info = json.loads(_run(["info", "--model", str(model_3d), "--json"], capsys)[1])
    assert info["spatial_dims"] == 3 and info["unet"]["spatial_dims"] == 3
    assert {row["name"] for row in info["layers"]} >= {"enc1.conv1", "bottleneck.conv2", "head"}
    packed = tmp_path / "packed.safetensors"
    assert _run(["export", "--model", str(model_3d), "--out", str(packed)], capsys)[0] == 0
    info = json.loads(_run(["info", "--model", str(packed), "--json"], capsys)[1])
    assert (info["layout"], info["spatial_dims"]) == ("packed", 3)


def test_integer_export_of_a_3d_model_is_refused_up_front(
    model_3d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "int.safetensors"
    code, _, err = _run(
        ["export", "--model", str(model_3d), "--out", str(out), "--integer"], capsys
    )
    assert code == 2 and err.count("\n") == 1
    assert "integer inference runs 2D U-Nets only; this model is 3D" in err
    assert err.endswith("(option --integer)\n")
    assert not out.exists()


def test_fine_tuning_a_3d_model_keeps_it_3d(
    model_3d: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flat = ["--spatial-dims", "2", "--init", str(model_3d)]
    code, _, err = _run(_train(shared_data, tmp_path / "x.safetensors", *flat), capsys)
    assert code == 2 and "(option --base-width/--depth/--spatial-dims/--upsample)" in err


def test_bits_of_a_3d_unet(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = _run(["bits", "--spatial-dims", "3", "--base-width", "4"], capsys)
    assert code == 0
    assert stdout.splitlines()[0] == "W4A4: 3D U-Net, base width 4, depth 3"
    flat = _run(["bits", "--base-width", "4"], capsys)[1]
    rows_3d = {line.split()[0]: line.split() for line in stdout.splitlines()[2:]}
    rows_2d = {line.split()[0]: line.split() for line in flat.splitlines()[2:]}
    assert rows_3d.keys() == rows_2d.keys()  # the same layers, with 3x the weights each
    assert int(rows_3d["enc2.conv1"][1]) == 3 * int(rows_2d["enc2.conv1"][1])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--spatial-dims", "3", "--elastic"], "turn it off to train a 3D U-Net (option --elas"),
        (["--spatial-dims", "3", "--crop-depth", "0"], "crop_depth must be a positive integer"),
    ],
)
def test_3d_training_errors_are_one_line(
    extra: list[str],
    message: str,
    shared_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = _run(_train(shared_data, tmp_path / "m.safetensors", *extra), capsys)
    assert code == 2 and message in err and err.count("\n") == 1


def test_spatial_dims_other_than_2_or_3_are_refused_by_the_parser(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bits", "--spatial-dims", "4"])
    assert exit_info.value.code == 2 and "invalid choice: 4" in capsys.readouterr().err


def test_segment_with_a_3d_model_and_refuse_integer(
    model_3d: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = shared_data / "spinal-gm-tiny" / "t2s.nii.gz"
    out = tmp_path / "mask.nii.gz"
    argv = ["segment", "--model", str(model_3d), "--image", str(image), "--out", str(out)]
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    assert nib.load(out).shape == nib.load(image).shape
    code, _, err = _run([*argv, "--integer"], capsys)
    assert code == 2 and "this model is 3D: run it without integer inference" in err

    # small boxes: the volume streams through several overlapping windows along every axis
    boxed = tmp_path / "boxed.nii.gz"
    code, _, err = _run([*argv[:-1], str(boxed), "--tile-3d", "4", "16", "16"], capsys)
    assert code == 0, err
    config = InferConfig(tile_3d=(4, 16, 16))
    expected = segment_volume(load_model(model_3d), read_volume(image), config, "cpu") >= 0.5
    assert np.array_equal(read_volume(boxed).array, expected)


def test_crop_depth_without_a_3d_network_is_refused(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.safetensors"
    code, _, err = _run(_train(shared_data, out, "--crop-depth", "8", "--steps", "2"), capsys)
    assert code == 2 and "add --spatial-dims 3" in err and not out.exists()
