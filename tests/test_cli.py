"""The command line, as users and other tools call it (the trainer issue's contract)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile

from napari_unetquant.cli import main
from napari_unetquant.demo import DemoConfig, format_rows, run_demo


def _train_args(files: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    image, labels = files
    return ["train", "--images", str(image), "--labels", str(labels), "--out", str(out), *extra]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_works_through_python_dash_m_and_lists_the_contract() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "napari_unetquant", "train", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    for option in (
        "--images",
        "--labels",
        "--foreground-value",
        "--weight-bits",
        "--act-bits",
        "--quantizer",
        "--weight-format",
        "--act-format",
        "--steps",
        "--init",
        "--resume",
        "--seed",
        "--device",
        "--out",
    ):
        assert option in result.stdout


@pytest.fixture
def trained(
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fast_train: list[str],
) -> Path:
    out = tmp_path / "fp.safetensors"
    code, stdout, _ = _run(_train_args(phantom_files, out, *fast_train), capsys)
    assert code == 0 and "saved" in stdout
    return out


def test_train_fine_tune_info_segment_evaluate(
    trained: Path,
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fast_train: list[str],
) -> None:
    image, labels = phantom_files
    quantized = tmp_path / "w4a6.safetensors"
    code, _, err = _run(
        _train_args(
            phantom_files,
            quantized,
            "--init",
            str(trained),
            "--weight-bits",
            "4",
            "--act-bits",
            "6",
            *fast_train,
        ),
        capsys,
    )
    assert code == 0 and "validation Dice" in err
    assert not Path(str(quantized) + ".resume").exists(), "checkpoint removed when complete"

    code, stdout, _ = _run(["info", "--model", str(quantized), "--json"], capsys)
    info = json.loads(stdout)
    assert (info["weight_bits"], info["act_bits"], info["quantizer"]) == (4, 6, "fixed")
    assert info["file_bytes"] == quantized.stat().st_size and info["parameters"] > 0
    assert info["training"]["init"] == str(trained)

    for suffix in (".tif", ".nii.gz"):
        out = tmp_path / f"mask{suffix}"
        code, _, _ = _run(
            ["segment", "--model", str(quantized), "--image", str(image), "--out", str(out)], capsys
        )
        assert code == 0
        mask = (
            tifffile.imread(out)
            if suffix == ".tif"
            else np.moveaxis(np.asanyarray(nib.load(out).dataobj), 2, 0)
        )
        assert mask.shape == (3, 64, 64) and set(np.unique(mask)) <= {0, 1}

    code, stdout, _ = _run(
        [
            "evaluate",
            "--model",
            str(quantized),
            "--images",
            str(image),
            "--labels",
            str(labels),
            "--json",
        ],
        capsys,
    )
    result = json.loads(stdout)
    assert {"dice_mean", "dice_volume", "iou_mean", "n_slices"} <= set(result)
    assert result["n_slices"] == 3 and 0 <= result["dice_mean"] <= 1


def test_resume_continues_an_interrupted_run(
    phantom_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from napari_unetquant.config import TrainConfig, UNetConfig
    from napari_unetquant.jobs import TrainJob, train_model
    from napari_unetquant.train import StepEvent, ValidationEvent

    image, labels = phantom_files
    out = tmp_path / "m.safetensors"
    job = TrainJob(
        images=(str(image),),
        labels=(str(labels),),
        out=str(out),
        unet=UNetConfig(base_width=4, depth=2),
        train=TrainConfig(steps=6, batch_size=2, crop=32, validate_every=2),
    )
    for event in train_model(job):  # "crash" after the validation at step 4
        if isinstance(event, ValidationEvent) and event.step == 4:
            break
    assert out.exists() and Path(str(out) + ".resume").exists()
    resumed = [
        e.step
        for e in train_model(TrainJob(**{**job.__dict__, "resume": True}))
        if isinstance(e, StepEvent)
    ]
    assert resumed == [5, 6]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bits", "--weight-bits", "9"], "needs 2 to 8 stored bits, got 9"),
        (["bits", "--weight-format", "Q4"], "not of the form Q<int>.<frac>"),
        (["bits", "--depth", "0"], "depth must be a positive integer"),
        (["demo", "--fp-steps", "0"], "fp_steps must be positive"),
        (["train", "--images", "a.tif", "--labels", "b.tif", "--out", "m"], "no such file"),
        (["segment", "--model", "m", "--image", "i", "--out", "x.png"], "write masks as"),
        (["info", "--model", "missing.safetensors"], "no such model file"),
        (
            ["train", "--images", "a", "--labels", "b", "--out", "m", "--steps", "0"],
            "steps must be a positive integer",
        ),
    ],
)
def test_user_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_fine_tuning_keeps_the_source_settings(
    trained: Path,
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = _train_args(
        phantom_files,
        tmp_path / "q.safetensors",
        "--init",
        str(trained),
        "--steps",
        "2",
        "--crop",
        "32",
        "--batch-size",
        "2",
        "--validate-every",
        "2",
    )
    code, _, err = _run([*base, "--base-width", "8"], capsys)
    assert code == 2 and "was trained with network" in err
    assert "(option --base-width/--depth/--spatial-dims/--upsample)" in err
    code, _, err = _run([*base, "--foreground-value", "1"], capsys)
    assert code == 2 and "foreground value non-zero; leave these unset" in err
    assert err.endswith("(option --foreground-value)\n")
    code, _, err = _run([*base, "--intensity", "local"], capsys)
    assert code == 2 and "intensity 'slice'; leave these unset" in err
    assert err.endswith("(option --intensity)\n")
    code, _, _ = _run(base, capsys)
    assert code == 0
    code, _, err = _run([*base, "--resume"], capsys)
    assert code == 2 and "nothing to resume" in err


def test_unknown_device_is_a_user_error(
    trained: Path,
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = _run(
        [
            "segment",
            "--model",
            str(trained),
            "--image",
            str(phantom_files[0]),
            "--out",
            str(tmp_path / "m.tif"),
            "--device",
            "gpu",
        ],
        capsys,
    )
    assert code == 2 and "unknown device 'gpu'" in err and not (tmp_path / "m.tif").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--images", "a"], "the following arguments are required: --labels, --out"),
        (
            ["train", "--images", "a", "--labels", "b", "--out", "m", "--spacing", "x"],
            "use auto, none or ROWS,COLS",
        ),
        (
            ["segment", "--model", "m", "--image", "i", "--out", "o.tif", "--threshold", "x"],
            "invalid float value",
        ),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_argument_errors_are_one_line_too(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1


def test_unavailable_device_and_bad_validation_pairs(
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fast_train: list[str],
) -> None:
    image = phantom_files[0]
    base = _train_args(phantom_files, tmp_path / "m.safetensors", *fast_train)
    code, _, err = _run([*base, "--device", "cuda"], capsys)
    assert code == 2 and "CUDA is not available; use the CPU (option --device)" in err
    code, _, err = _run([*base, "--val-images", str(image)], capsys)
    assert code == 2 and "1 validation image(s) but 0 validation label file(s)" in err
    assert not (tmp_path / "m.safetensors").exists()


def test_evaluate_pairs_must_match(
    trained: Path, phantom_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    image, labels = phantom_files
    code, _, err = _run(
        [
            "evaluate",
            "--model",
            str(trained),
            "--images",
            str(image),
            str(image),
            "--labels",
            str(labels),
        ],
        capsys,
    )
    assert code == 2 and "2 image path(s) but 1 label path(s)" in err


def test_pickled_model_is_refused_from_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    torch.save({"w": torch.zeros(1)}, tmp_path / "m.pt")
    code, _, err = _run(["info", "--model", str(tmp_path / "m.pt")], capsys)
    assert code == 2 and "is a pickle" in err


def test_bits_prints_per_layer_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        ["bits", "--weight-bits", "4", "--act-bits", "6", "--base-width", "8"], capsys
    )
    assert code == 0 and "enc2.conv1" in out and "head" in out and "smaller" in out


def test_paper_formats_from_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["bits", "--weight-format", "Q0.4", "--act-format", "Q6.0"], capsys)
    assert code == 0 and out.startswith("Q0.4/Q6.0")
    row = next(line for line in out.splitlines() if line.startswith("enc2.conv1"))
    assert row.split()[1:4] == ["4608", "5", "7"]


def test_demo_trains_both_models_writes_files_and_reports_real_bits(tmp_path: Path) -> None:
    config = DemoConfig(fp_steps=4, quant_steps=2, base_width=4, crop=32, out_dir=str(tmp_path))
    fp, quant = run_demo(config, log=lambda _: None)
    assert (fp.label, quant.label) == ("FP", "W4A6")
    assert fp.mean_weight_bits == 32 and 4 < quant.mean_weight_bits < 5
    assert quant.stored_bytes < fp.stored_bytes == fp.fp32_bytes
    assert all(0.0 <= row.dice_membrane <= 1.0 for row in (fp, quant))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "demo-overlay.png",
        "fp.safetensors",
        "w4a6.safetensors",
    ]
    assert "W4A6" in format_rows([fp, quant])


def test_export_packed_and_integer_then_segment_with_integers(
    trained: Path,
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fast_train: list[str],
) -> None:
    image, labels = phantom_files
    quantized = tmp_path / "w4a6.safetensors"
    argv = _train_args(phantom_files, quantized, "--init", str(trained), "--weight-bits", "4")
    assert _run([*argv, "--act-bits", "6", "--save-float", *fast_train], capsys)[0] == 0

    packed = tmp_path / "w4a6-packed.safetensors"
    code, stdout, _ = _run(["export", "--model", str(quantized), "--out", str(packed)], capsys)
    assert code == 0 and "(packed)" in stdout and "smaller than the FP32" in stdout
    assert packed.stat().st_size < quantized.stat().st_size / 2  # tiny test net: headers weigh

    code, stdout, _ = _run(["info", "--model", str(packed)], capsys)
    assert code == 0 and "layout      packed" in stdout and "file on disk" in stdout
    assert "enc2.conv1" in stdout and "fixed4/fixed6" in stdout
    info = json.loads(_run(["info", "--model", str(packed), "--json"], capsys)[1])
    assert info["layout"] == "packed" and info["file_bytes"] == packed.stat().st_size
    assert info["file_ratio"] == pytest.approx(info["fp32_file_bytes"] / info["file_bytes"])
    rows = {row["name"]: row for row in info["layer_bytes"]}
    assert rows["enc2.conv1"]["weight_bits"] == 4 and rows["enc1.conv1"]["weight_bits"] == 32

    masks = {}
    for name, model, extra in [
        ("float", quantized, ["--engine", "pytorch"]),
        ("packed", packed, ["--engine", "pytorch"]),
        ("integer", packed, ["--integer"]),
        ("auto", packed, []),
    ]:
        out = tmp_path / f"{name}.tif"
        command = ["segment", "--model", str(model), "--image", str(image), "--out", str(out)]
        assert _run([*command, *extra], capsys)[0] == 0
        masks[name] = tifffile.imread(out)
    assert np.array_equal(masks["packed"], masks["float"])
    assert np.mean(masks["integer"] == masks["float"]) >= 0.9999
    assert np.mean(masks["auto"] == masks["float"]) >= 0.9999

    scores = [
        json.loads(
            _run(
                [
                    "evaluate",
                    "--model",
                    str(packed),
                    "--images",
                    str(image),
                    "--labels",
                    str(labels),
                    "--json",
                    *extra,
                ],
                capsys,
            )[1]
        )["dice_mean"]
        for extra in ([], ["--integer"])
    ]
    assert scores[0] == pytest.approx(scores[1], abs=1e-3)

    hardware = tmp_path / "w4a6-integer.safetensors"
    command = ["export", "--model", str(packed), "--out", str(hardware), "--integer"]
    code, stdout, _ = _run(command, capsys)
    assert code == 0 and "(integer)" in stdout and hardware.is_file()


def test_export_and_integer_errors_are_one_line(
    trained: Path,
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fast_train: list[str],
) -> None:
    code, _, err = _run(["export", "--model", str(trained), "--out", str(trained)], capsys)
    assert code == 2 and "the model file itself" in err and err.count("\n") == 1
    image = phantom_files[0]
    command = ["segment", "--model", str(trained), "--image", str(image), "--integer"]
    code, _, err = _run([*command, "--out", str(tmp_path / "m.tif")], capsys)
    assert code == 2 and "no quantized layer" in err and not (tmp_path / "m.tif").exists()
    code, _, err = _run(
        ["export", "--model", str(trained), "--out", str(tmp_path / "i.st"), "--integer"], capsys
    )
    assert code == 2 and "no quantized layer" in err and not (tmp_path / "i.st").exists()
    packed = tmp_path / "fp-packed.safetensors"
    assert _run(["export", "--model", str(trained), "--out", str(packed)], capsys)[0] == 0
    argv = _train_args(
        phantom_files, tmp_path / "q.safetensors", "--init", str(packed), *fast_train
    )
    code, _, err = _run([*argv, "--weight-bits", "4"], capsys)
    assert code == 0, err  # a packed model fine-tunes too (unpacked first)


def test_the_scanner_augmentation_option_reaches_training() -> None:
    from napari_unetquant.cli import build_parser
    from napari_unetquant.cli._train import train_config_from_args

    argv = ["train", "--images", "x.tif", "--labels", "y.tif", "--out", "m.safetensors"]
    args = build_parser().parse_args([*argv, "--scanner-augment", "0.5"])
    assert train_config_from_args(args).scanner_augment == 0.5
    assert train_config_from_args(build_parser().parse_args(argv)).scanner_augment == 0.0


def test_local_intensity_normalisation_is_trained_saved_and_segmented_with(
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fast_train: list[str],
) -> None:
    from napari_unetquant.modelio import load_model

    out = tmp_path / "local.safetensors"
    code, _, _ = _run(_train_args(phantom_files, out, *fast_train, "--intensity", "local"), capsys)
    assert code == 0
    assert load_model(out).preprocess.intensity == "local"
    code, stdout, _ = _run(["info", "--model", str(out)], capsys)
    assert code == 0 and "inputs      each image's own grid; local z-score (10 mm)" in stdout
    mask = tmp_path / "mask.tif"
    code, _, _ = _run(
        ["segment", "--model", str(out), "--image", str(phantom_files[0]), "--out", str(mask)],
        capsys,
    )
    assert code == 0 and mask.exists()


def test_new_models_of_nifti_images_default_to_the_local_z_score(
    shared_data: Path,
    trained: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fast_train: list[str],
) -> None:
    """The recipe: images with a pixel size (MRI NIfTI) get the local z-score, images without
    one (the TIFF phantom) the per-slice z-score; an explicit choice wins."""
    from napari_unetquant.modelio import load_model

    assert load_model(trained).preprocess.intensity == "slice"  # TIFF: no spacing
    tiny = shared_data / "spinal-gm-tiny"
    files = (tiny / "t2s.nii.gz", tiny / "t2s_gmseg_manual.nii.gz")
    for extra, expected in (((), "local"), (("--intensity", "slice"), "slice")):
        out = tmp_path / f"gm-{expected}.safetensors"
        code, _, _ = _run(_train_args(files, out, *fast_train, *extra), capsys)
        assert code == 0 and load_model(out).preprocess.intensity == expected


def test_onnx_export_runs_in_onnx_runtime_with_the_masks_of_segment(
    trained: Path,
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fast_train: list[str],
) -> None:
    import onnxruntime

    from napari_unetquant.data.io import read_volume
    from napari_unetquant.data.preprocess import network_input
    from napari_unetquant.modelio import load_model

    image, _ = phantom_files
    quantized = tmp_path / "w4a6.safetensors"
    argv = _train_args(phantom_files, quantized, "--init", str(trained), *fast_train)
    assert _run([*argv, "--weight-bits", "4", "--act-bits", "6"], capsys)[0] == 0
    mask_path = tmp_path / "segment.tif"
    command = ["segment", "--model", str(quantized), "--image", str(image), "--out"]
    code, _, err = _run([*command, str(mask_path), "--engine", "pytorch"], capsys)
    assert code == 0 and "engine: pytorch (asked for)" in err
    expected = tifffile.imread(mask_path)

    bundle = load_model(quantized)
    slices = network_input(read_volume(image), bundle.preprocess)
    for form in ("int8", "float"):
        out = tmp_path / f"w4a6-{form}.onnx"
        export = ["export", "--model", str(quantized), "--out", str(out), "--format", "onnx"]
        code, stdout, _ = _run([*export, "--onnx-form", form], capsys)
        assert code == 0 and f"(ONNX, {form})" in stdout
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        metadata = session.get_modelmeta().custom_metadata_map
        assert metadata["form"] == form and json.loads(metadata["threshold"]) == 0.5
        assert json.loads(metadata["preprocess"]) == json.loads(
            json.dumps(dataclasses.asdict(bundle.preprocess))
        )
        (logits,) = session.run(["logits"], {"image": slices[:, None]})
        probability = 1 / (1 + np.exp(-logits[:, 0]))
        assert np.mean((probability >= 0.5) == expected) >= 0.9999, form

    code, _, err = _run([*export, "--onnx-form", "float", "--integer"], capsys)
    assert code == 2 and "disagree" in err
    code, _, err = _run(
        ["export", "--model", str(quantized), "--out", "x.st", "--onnx-form", "int8"], capsys
    )
    assert code == 2 and "--format onnx only" in err and not Path("x.st").exists()
