"""Multi-class models: blended softmax, label maps in the learnt values, per-class scores, the
engines and the exports; binary models are covered, unchanged, by the other tests."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from napari_unetquant.cli import main
from napari_unetquant.config import InferConfig, PreprocessConfig, QuantConfig, UNetConfig
from napari_unetquant.data import Volume
from napari_unetquant.infer import engine, predict_probabilities, segment_volume
from napari_unetquant.infer.integer import IntegerUNet
from napari_unetquant.infer.onnx_graph import onnx_metadata
from napari_unetquant.infer.predict import predicted_classes
from napari_unetquant.jobs.exporting import export_model
from napari_unetquant.metrics import class_scores, pooled_scores, segmentation_scores
from napari_unetquant.model import build_unet
from napari_unetquant.modelio import SegmentationModel, load_model, model_classes, save_model

CLASSES = (3, 7)
GREY = {"photometric": "minisblack"}


def calibrated_multiclass() -> nn.Module:
    """A W4A6 U-Net with three outputs (background and two classes) whose activation formats
    and BatchNorm statistics were set by a few training passes, its (float) head scaled and
    centred so that every class wins somewhere."""
    torch.manual_seed(0)
    model = build_unet(
        UNetConfig(base_width=4, depth=2, out_classes=3), QuantConfig.from_label("W4A6")
    ).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 1, 32, 32))
        model.eval()
        head = model.get_submodule("head")
        head.weight *= 30
        head.bias *= 30
        head.bias -= model(torch.randn(4, 1, 32, 32)).mean(dim=(0, 2, 3))
    return model


def multiclass_bundle(classes: tuple[int, ...] = CLASSES) -> SegmentationModel:
    model = calibrated_multiclass()
    return SegmentationModel(
        model,
        model.config,
        QuantConfig.from_label("W4A6"),
        PreprocessConfig(),
        {"classes": classes},
    )


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "multiclass.safetensors"
    save_model(path, multiclass_bundle())
    return path


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "image.tif"
    image = np.random.default_rng(5).normal(100, 20, size=(2, 40, 48)).astype(np.float32)
    tifffile.imwrite(path, image, **GREY)
    return path


class PointwiseClasses(nn.Module):
    """Logits ``(3x, -x, 1)`` per pixel: any tiling must reproduce their softmax exactly."""

    config = UNetConfig(out_classes=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([3 * x, -x, torch.ones_like(x)], dim=1)


def test_tiles_blend_class_probabilities_without_seams() -> None:
    slices = np.random.default_rng(0).normal(size=(3, 70, 90)).astype(np.float32)
    config = InferConfig(tile=32, overlap=0.5, batch_size=5)
    tiled = predict_probabilities(PointwiseClasses(), slices, config)
    logits = torch.from_numpy(np.stack([3 * slices, -slices, np.ones_like(slices)], axis=1))
    assert tiled.shape == (3, 3, 70, 90) and tiled.dtype == np.float32
    assert np.allclose(tiled, torch.softmax(logits, dim=1).numpy(), atol=1e-6)


def test_one_window_argmax_is_the_networks() -> None:
    model = calibrated_multiclass()
    image = np.random.default_rng(1).normal(size=(2, 40, 48)).astype(np.float32)
    bundle = SegmentationModel(model, model.config, QuantConfig(), info={"classes": [1, 2]})
    probabilities = segment_volume(bundle, Volume(image), InferConfig(engine="pytorch"))
    assert probabilities.shape == (2, 3, 40, 48) and probabilities.dtype == np.float32
    with torch.no_grad():
        direct = model(torch.from_numpy(_zscored(image))[:, None]).argmax(dim=1).numpy()
    assert np.array_equal(predicted_classes(probabilities, 0.5), direct)
    assert len(np.unique(direct)) == 3  # every class wins somewhere


def _zscored(image: np.ndarray) -> np.ndarray:
    """Per-slice z-score, as the default preprocessing does."""
    mean = image.mean(axis=(1, 2), keepdims=True, dtype=np.float64).astype(np.float32)
    std = image.std(axis=(1, 2), keepdims=True, dtype=np.float64).astype(np.float32)
    normalised: np.ndarray = (image - mean) / std
    return normalised


def test_probabilities_are_resampled_back_class_by_class() -> None:
    bundle = SegmentationModel(
        PointwiseClasses(),
        UNetConfig(out_classes=3),
        QuantConfig(),
        PreprocessConfig(spacing=(0.25, 0.5)),
        {"classes": [1, 2]},
    )
    volume = Volume(np.random.default_rng(2).normal(size=(2, 30, 40)), spacing=(0.5, 0.5))
    probabilities = segment_volume(bundle, volume, InferConfig())
    assert probabilities.shape == (2, 3, 30, 40)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_predicted_classes_of_both_kinds() -> None:
    binary = np.array([[[0.2, 0.5, 0.9]]], np.float32)
    assert predicted_classes(binary, 0.5).tolist() == [[[0, 1, 1]]]
    several = np.array([[[[0.6, 0.1]], [[0.3, 0.2]], [[0.1, 0.7]]]], np.float32)  # (1, 3, 1, 2)
    indices = predicted_classes(several, 0.5)
    assert indices.tolist() == [[[0, 2]]] and indices.dtype == np.uint8


@pytest.mark.parametrize(
    ("out_classes", "info", "needs"),
    [(3, {}, "needs 1"), (1, {"classes": [1, 2]}, "needs 3"), (3, {"classes": [1, 2, 4]}, "4")],
)
def test_outputs_that_do_not_match_the_classes_are_refused(
    out_classes: int, info: dict[str, object], needs: str
) -> None:
    bundle = SegmentationModel(
        PointwiseClasses(), UNetConfig(out_classes=out_classes), QuantConfig(), info=info
    )
    with pytest.raises(ValueError, match=f"{out_classes} output channels.*{needs}"):
        segment_volume(bundle, Volume(np.zeros((1, 16, 16))), InferConfig())


def test_class_scores_per_value_and_pooled() -> None:
    truth = np.array([[[0, 1, 1, 2]], [[0, 0, 2, 2]]], np.uint8)
    prediction = np.array([[[0, 1, 2, 2]], [[0, 0, 2, 2]]], np.uint8)
    scores = class_scores(prediction, truth, CLASSES)
    assert list(scores.per_class) == [3, 7]
    assert scores.per_class[3].dice_volume == pytest.approx(2 / 3)
    assert scores.per_class[7].dice_volume == pytest.approx(6 / 7)
    assert scores.dice_volume == 1.0  # the foreground is right, the classes are not
    assert scores.per_class[3].dice_per_slice == (2 / 3, 1.0)  # slice 2: both empty
    assert scores.dice_mean_over_classes == pytest.approx(
        (scores.per_class[3].dice_mean + scores.per_class[7].dice_mean) / 2
    )
    halves = [class_scores(prediction[i : i + 1], truth[i : i + 1], CLASSES) for i in (0, 1)]
    assert pooled_scores(halves) == scores
    keys = scores.as_dict()
    assert keys["dice_per_class"] == {"3": pytest.approx(5 / 6), "7": pytest.approx(5 / 6)}
    with pytest.raises(ValueError, match="binary model's scores with a multi-class"):
        pooled_scores([scores, segmentation_scores(prediction, truth)])


def test_segment_writes_the_label_values(
    model_file: Path, image_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "labels.tif"
    assert (
        main(["segment", "--model", str(model_file), "--image", str(image_file), "--out", str(out)])
        == 0
    )
    written = tifffile.imread(out)
    bundle = load_model(model_file)
    image = tifffile.imread(image_file)
    indices = predicted_classes(segment_volume(bundle, Volume(image), InferConfig()), 0.5)
    expected = np.array([0, *CLASSES])[indices]
    assert written.dtype == np.uint8 and np.array_equal(written, expected)
    assert set(np.unique(written)) == {0, 3, 7}


def _segment(model_file: Path, image_file: Path, out: Path) -> np.ndarray:
    assert (
        main(["segment", "--model", str(model_file), "--image", str(image_file), "--out", str(out)])
        == 0
    )
    labels: np.ndarray = tifffile.imread(out)
    return labels


def test_evaluate_scores_each_class_perfect_on_its_own_prediction(
    model_file: Path, image_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels.tif"
    _segment(model_file, image_file, labels)
    capsys.readouterr()
    argv = ["evaluate", "--model", str(model_file), "--images", str(image_file)]
    assert main([*argv, "--labels", str(labels), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    binary_keys = {"dice_mean", "dice_volume", "iou_mean", "n_slices", "dice_per_slice"}
    assert binary_keys <= result.keys() and binary_keys <= result["per_image"][0].keys()
    for scores in (result, result["per_image"][0]):
        assert scores["dice_per_class"] == {"3": 1.0, "7": 1.0}
        assert scores["iou_per_class"] == {"3": 1.0, "7": 1.0}
        assert scores["dice_volume_per_class"] == {"3": 1.0, "7": 1.0}
        assert scores["dice_mean_over_classes"] == scores["iou_mean_over_classes"] == 1.0
    assert main([*argv, "--labels", str(labels)]) == 0
    assert "mean Dice per class: 3 1.0000, 7 1.0000" in capsys.readouterr().out
    assert main([*argv, "--labels", str(labels), "--foreground-value", "3"]) != 0
    assert "label values [3, 7]" in capsys.readouterr().err


def test_label_files_joined_by_plus_are_painted_in_order(
    image_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model of values (1, 2) scored against ``cord+gm``: the cord file marks classes 1 and
    2, the grey matter file class 2, painted over it."""
    model_file = tmp_path / "cord-gm.safetensors"
    save_model(model_file, multiclass_bundle((1, 2)))
    predicted = _segment(model_file, image_file, tmp_path / "predicted.tif")
    cord, gm = tmp_path / "cord.tif", tmp_path / "gm.tif"
    tifffile.imwrite(cord, (predicted != 0).astype(np.uint8), **GREY)
    tifffile.imwrite(gm, (predicted == 2).astype(np.uint8), **GREY)
    capsys.readouterr()
    argv = ["evaluate", "--model", str(model_file), "--images", str(image_file), "--json"]
    assert main([*argv, "--labels", f"{cord}+{gm}"]) == 0
    assert json.loads(capsys.readouterr().out)["dice_per_class"] == {"1": 1.0, "2": 1.0}


def test_batch_csv_has_a_dice_column_per_class(
    model_file: Path, image_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels.tif"
    _segment(model_file, image_file, labels)
    out = tmp_path / "batch"
    argv = ["segment", "--model", str(model_file), "--images", str(image_file)]
    assert main([*argv, "--labels", str(labels), "--out-dir", str(out)]) == 0
    with (out / "segment.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    columns = list(rows[0])
    at = columns.index("iou_mean")
    assert columns[at + 1 : at + 3] == ["dice_3", "dice_7"] and columns[-2:] == ["seconds", "error"]
    assert rows[0]["dice_3"] == rows[0]["dice_7"] == rows[0]["dice_volume"] == "1.0000"
    assert np.array_equal(tifffile.imread(out / "image.tif"), tifffile.imread(labels))
    capsys.readouterr()
    refused = ["--labels", str(labels), "--out-dir", str(tmp_path / "b"), "--foreground-value", "1"]
    assert main([*argv, *refused]) != 0
    assert "leave the foreground value out" in capsys.readouterr().err
    assert not (tmp_path / "b" / "image.tif").exists()


@pytest.mark.parametrize("name", ["onnx-float", "onnx-int8", "integer"])
def test_engines_agree_with_pytorch_on_the_class(name: str) -> None:
    model = calibrated_multiclass()
    x = torch.randn(2, 1, 48, 40, generator=torch.Generator().manual_seed(3))
    network = IntegerUNet(model) if name == "integer" else engine.build_engine(model, name)
    with torch.no_grad():
        expected, got = model(x), network(x)
    assert got.shape == expected.shape == (2, 3, 48, 40)
    agreement = (engine.window_classes(got, 0.5) == engine.window_classes(expected, 0.5)).float()
    assert float(agreement.mean()) >= 0.99


def test_auto_engine_checks_the_classes_of_a_multiclass_model() -> None:
    model = calibrated_multiclass()
    network, choice = engine.select_engine(model, "auto", (32, 32))
    assert choice.engine in ("pytorch", "onnx-float", "onnx-int8")
    assert network(torch.zeros(1, 1, 32, 32)).shape == (1, 3, 32, 32)


def test_exports_carry_the_classes_or_refuse(model_file: Path, tmp_path: Path) -> None:
    onnx_path = tmp_path / "model.onnx"
    export_model(str(model_file), str(onnx_path), format="onnx")
    metadata = onnx_metadata(onnx_path)
    assert json.loads(metadata["classes"]) == [3, 7] and "threshold" not in metadata
    assert "softmax" in metadata["output"] and "1: 3, 2: 7" in metadata["classes_text"]
    qonnx_path = tmp_path / "model.qonnx"
    export_model(str(model_file), str(qonnx_path), format="qonnx", input_size=(32, 32))
    assert json.loads(onnx_metadata(qonnx_path)["classes"]) == [3, 7]
    integer_path = tmp_path / "model.integer.safetensors"
    export_model(str(model_file), str(integer_path), format="integer")
    from safetensors import safe_open

    with safe_open(str(integer_path), framework="pt") as handle:
        assert json.loads(handle.metadata()["classes"]) == [3, 7]
    packed_path = tmp_path / "packed.safetensors"
    export_model(str(model_file), str(packed_path))
    assert model_classes(load_model(packed_path)) == CLASSES


def test_the_c_program_writes_the_label_values(model_file: Path, tmp_path: Path) -> None:
    """The C export of a multi-class model file, compiled and run, writes the label value of
    the integer network's most probable class at every pixel."""
    compiler = shutil.which("cc")
    if compiler is None:
        pytest.fail("no C compiler: the C export's tests need `cc` on PATH (install gcc)")
    directory = tmp_path / "c"
    export_model(str(model_file), str(directory), format="c")
    assert "unet_label_values[UNET_OUT_CHANNELS] = {0, 3, 7}" in (directory / "unet.c").read_text()
    build = [compiler, "-O2", "-std=c99", "-Werror", "-Wall", "unet.c", "weights.c", "-lm"]
    result = subprocess.run([*build, "-o", "unet"], cwd=directory, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    image = np.random.default_rng(5).normal(size=(40, 36)).astype("<f4")
    image.tofile(directory / "in.f32")
    run = ["./unet", "in.f32", "out.u8", "40", "36"]
    result = subprocess.run(run, cwd=directory, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    labels = np.fromfile(directory / "out.u8", np.uint8).reshape(40, 36)
    with torch.no_grad():
        logits = IntegerUNet(load_model(model_file).model)(torch.from_numpy(image)[None, None])
    expected = np.array([0, *CLASSES], np.uint8)[logits[0].argmax(dim=0).numpy()]
    assert np.array_equal(labels, expected)
    assert set(np.unique(labels).tolist()) == {0, *CLASSES}


def test_volumes_blend_class_probabilities_along_every_axis() -> None:
    model = build_unet(UNetConfig(base_width=2, depth=2, out_classes=3, spatial_dims=3)).eval()
    slices = np.random.default_rng(4).normal(size=(6, 16, 20)).astype(np.float32)
    config = InferConfig(tile_3d=(4, 16, 16), overlap=0.5)
    probabilities = predict_probabilities(model, slices, config)
    assert probabilities.shape == (6, 3, 16, 20)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
