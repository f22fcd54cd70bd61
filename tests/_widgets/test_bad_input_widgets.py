"""Bad input in the napari widgets: a notification naming the problem and the fix, nothing
escaping into Qt, the buttons enabled again, no layer, model or file added, and an earlier
output file left as it was. The cases mirror ``tests/test_bad_input.py``; ``bad_file``
(``tests/conftest.py``) makes the files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from napari_unetquant._widgets import _session

PLUGIN = "napari-unetquant"
TIMEOUT = 60_000
rng = np.random.default_rng(0)


def _dock(viewer: Any, name: str) -> Any:
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def _image(shape: tuple[int, ...] = (4, 32, 32)) -> np.ndarray:
    return rng.random(shape).astype(np.float32)


def _labels(shape: tuple[int, ...] = (4, 32, 32)) -> np.ndarray:
    labels = np.zeros(shape, np.int32)
    labels[..., 8:16, 8:16] = 1
    return labels


def _nan_image() -> np.ndarray:
    image = _image()
    image[1, 3, 3] = np.nan
    return image


# (case, image layer, labels layer, what the notification says)
LAYERS = [
    ("shapes differ", _image(), _labels((4, 16, 16)), "do not match the image"),
    ("no foreground", _image(), np.zeros((4, 32, 32), np.int32), "no foreground"),
    ("rgb", (_image((32, 32, 3)) * 255).astype(np.uint8), _labels((32, 32)), "colour (RGB)"),
    ("4d", _image((2, 4, 32, 32)), _labels(), "has 4 dimensions; choose a 2D image or a 3D"),
    ("nan pixels", _nan_image(), _labels(), "the image holds NaN or Inf pixels; replace them"),
]


def _add(viewer: Any, image: np.ndarray, labels: np.ndarray) -> tuple[Any, Any]:
    rgb = image.ndim == 3 and image.shape[-1] == 3
    return viewer.add_image(image, name="image", rgb=rgb), viewer.add_labels(labels, name="truth")


def _notified(errors: list[str], message: str) -> None:
    assert len(errors) == 1 and message in errors[0], errors
    assert "\n" not in errors[0] and "Traceback" not in errors[0]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "image", "labels", "message"), LAYERS, ids=[c[0] for c in LAYERS])
def test_train_refuses_bad_layers(
    make_napari_viewer: Callable[..., Any],
    errors: list[str],
    case: str,
    image: np.ndarray,
    labels: np.ndarray,
    message: str,
) -> None:
    viewer = make_napari_viewer()
    train = _dock(viewer, "Train quantized U-Net")
    train.image.value, train.ground_truth.value = _add(viewer, image, labels)
    train.network_width.value, train.steps.value = 4, 2
    train.start.clicked()
    _notified(errors, message)
    assert train.worker is None and train.start.enabled and not train.stop.enabled
    assert len(viewer.layers) == 2 and _session.models() == {}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "image", "labels", "settings", "message"),
    [
        ("W9A6", _image(), _labels(), "FP, W9A6", "setting 'W9A6': fixed quantizer needs 2 to 8"),
        ("W4A0", _image(), _labels(), "W4A0", "setting 'W4A0': fixed quantizer needs 2 to 8"),
        *[(c, i, lab, "FP", m) for c, i, lab, m in LAYERS],
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 16 else "",
)
def test_sweep_refuses_bad_settings_and_layers(
    make_napari_viewer: Callable[..., Any],
    qtbot: Any,
    errors: list[str],
    case: str,
    image: np.ndarray,
    labels: np.ndarray,
    settings: str,
    message: str,
) -> None:
    viewer = make_napari_viewer()
    sweep = _dock(viewer, "Bit-width sweep")
    sweep.image.value, sweep.ground_truth.value = _add(viewer, image, labels)
    sweep.settings.value, sweep.network_width.value, sweep.fp_steps.value = settings, 4, 2
    sweep.start.clicked()  # some errors come from the worker thread, as notifications
    qtbot.waitUntil(lambda: bool(errors) and sweep.start.enabled, timeout=TIMEOUT)
    _notified(errors, message)
    assert sweep.results == [] and not sweep.export.enabled and len(viewer.layers) == 2


def test_bit_spin_boxes_refuse_widths_outside_1_to_8(
    make_napari_viewer: Callable[..., Any], settings_dir: Path
) -> None:
    settings_dir.mkdir(parents=True, exist_ok=True)
    (settings_dir / "train.ini").write_text("[General]\nweight_bits=12\nact_bits=0\n")
    train = _dock(make_napari_viewer(), "Train quantized U-Net")
    assert (train.weight_bits.value, train.act_bits.value) == (4, 6)  # stored values ignored
    for spin_box in (train.weight_bits, train.act_bits):
        for bits in (0, 9, 32):
            with pytest.raises(ValueError, match="outside of the allowed range"):
                spin_box.value = bits
        spin_box.native.setValue(9)  # typed into the box: Qt clamps it
        assert spin_box.value == 8
        spin_box.native.setValue(0)
        assert spin_box.value == 1


MODELS = [
    ("model-missing.safetensors", "no such model file; check the path"),
    ("model-unreadable.safetensors", "permission denied; make it readable"),
    ("model-text.safetensors", "not a readable model file"),
    ("model-png.safetensors", "not a readable model file"),
    ("model-foreign.safetensors", "a safetensors file but not a napari-unetquant model"),
    ("model-future.safetensors", "upgrade napari-unetquant"),
    ("model-truncated.safetensors", "not a readable model file"),
    ("model-no-config.safetensors", "the model's metadata is damaged"),
    ("model-bits.safetensors", "needs 2 to 8 stored bits, got 12"),
    ("model-depth.safetensors", "tensors do not match the configured network"),
    ("model-2-channels.safetensors", "the model takes 2 input channels"),
]
IMAGE_LAYERS = [
    ("rgb", (_image((32, 32, 3)) * 255).astype(np.uint8), "colour (RGB)"),
    ("4d", _image((2, 4, 32, 32)), "has 4 dimensions"),
    ("nan pixels", _nan_image(), "the image holds NaN or Inf pixels; replace them"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "image", "message"),
    [*[(c, _image(), m) for c, m in MODELS], *IMAGE_LAYERS],
    ids=[*[c for c, _ in MODELS], *[c for c, _, _ in IMAGE_LAYERS]],
)
def test_segment_refuses_bad_models_and_layers(
    make_napari_viewer: Callable[..., Any],
    qtbot: Any,
    errors: list[str],
    bad_file: Callable[[str], Path],
    w4a6_model_file: Path,
    case: str,
    image: np.ndarray,
    message: str,
) -> None:
    model = bad_file(case) if case.startswith("model-") else w4a6_model_file
    viewer = make_napari_viewer()
    layer = viewer.add_image(image, name="image", rgb=image.shape[-1] == 3)
    segment = _dock(viewer, "Segment")
    segment.image.value, segment.model.value, segment.model_file.value = (
        layer,
        "model file...",
        model,
    )
    segment.run_button.clicked()
    qtbot.waitUntil(lambda: bool(errors) and segment.run_button.enabled, timeout=TIMEOUT)
    _notified(errors, message)
    if case.startswith("model-"):
        assert str(model) in errors[0]
    assert list(viewer.layers) == [layer]


# (case, image file, labels file, model file, what the notification says); None: a good one
BATCH = [
    *[(c, c, None, None, m) for c, m in [
        ("missing.tif", "no such file or folder; check the path"),
        ("unreadable.tif", "permission denied; make it readable"),
        ("truncated.nii.gz", "check that the file is complete"),
        ("truncated.png", "check that the file is complete"),
        ("corrupt.tif", "check that the file is complete and of that format"),
        ("truncated-dicom", "DICOM pixel data could not be decoded"),
        ("rgb.tif", "colour (RGB)"),
        ("4d.nii.gz", "give one 3D volume"),
        ("empty.nii.gz", "the image is empty"),
        ("nan.tif", "the image holds NaN or Inf pixels"),
    ]],
    *[(c, None, c, None, m) for c, m in [
        ("labels-shape.tif", "labels must be on the image's grid"),
        ("labels-fraction.tif", "labels must be an integer mask"),
        ("labels-nan.tif", "labels must be an integer mask"),
    ]],
    *[(c, None, None, c, m) for c, m in [
        ("model-missing.safetensors", "choose a model file (.safetensors)"),
        ("model-text.safetensors", "not a readable model file"),
        ("model-future.safetensors", "upgrade napari-unetquant"),
        ("model-no-config.safetensors", "the model's metadata is damaged"),
        ("model-2-channels.safetensors", "the model takes 2 input channels"),
    ]],
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "image", "labels", "model", "message"), BATCH, ids=[b[0] for b in BATCH]
)
def test_batch_refuses_bad_files_and_keeps_earlier_masks(
    make_napari_viewer: Callable[..., Any],
    qtbot: Any,
    errors: list[str],
    bad_file: Callable[[str], Path],
    phantom_files: tuple[Path, Path],
    w4a6_model_file: Path,
    tmp_path: Path,
    case: str,
    image: str | None,
    labels: str | None,
    model: str | None,
    message: str,
) -> None:
    image_path = bad_file(image) if image else phantom_files[0]
    labels_path = bad_file(labels) if labels else phantom_files[1]
    model_path = bad_file(model) if model else w4a6_model_file
    out = tmp_path / "masks"
    out.mkdir()
    earlier = out / f"{image_path.name.split('.')[0]}.tif"  # the mask this image would get
    earlier.write_bytes(b"an earlier result")
    viewer = make_napari_viewer()
    batch = _dock(viewer, "Batch segment")
    batch.images.value, batch.labels_files.value = [image_path], [labels_path]
    batch.model_file.value, batch.out_dir.value = model_path, out
    batch.start.clicked()
    qtbot.waitUntil(lambda: bool(errors) and batch.start.enabled, timeout=TIMEOUT)
    _notified(errors, message)
    assert earlier.read_bytes() == b"an earlier result"
    assert {p.name for p in out.iterdir()} <= {earlier.name, "segment.csv"}  # no partial mask
    assert all(r.error for r in batch.results) and len(viewer.layers) == 0


@pytest.mark.parametrize(
    ("case", "truth", "prediction", "message"),
    [
        ("shapes differ", _labels(), _labels((4, 16, 16)), "compare layers of the same image"),
        ("4d", _labels((2, 4, 32, 32)), _labels(), "has 4 dimensions"),
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 16 else "",
)
def test_dice_refuses_bad_layers(
    make_napari_viewer: Callable[..., Any],
    errors: list[str],
    case: str,
    truth: np.ndarray,
    prediction: np.ndarray,
    message: str,
) -> None:
    viewer = make_napari_viewer()
    truth_layer = viewer.add_labels(truth, name="truth")
    prediction_layer = viewer.add_labels(prediction, name="prediction")
    dice = _dock(viewer, "Dice readout")
    dice.truth.value = truth_layer
    dice.predictions.reset_choices()
    dice.predictions.value = [prediction_layer]
    dice.compute.clicked()
    _notified(errors, message)
    assert dice.summary.value == "" and dice.scores == {}
