"""The CT window in the docks: Train chooses it (a preset or a typed level and width) and the
run carries it; Segment and Batch show the window their model was trained with and keep it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from napari_unetquant._widgets import _segment, _session, _train
from napari_unetquant._widgets._common import CUSTOM, ZSCORE
from napari_unetquant.config import PreprocessConfig, QuantConfig, UNetConfig
from napari_unetquant.model import build_unet
from napari_unetquant.modelio import SegmentationModel, save_model

PLUGIN = "napari-unetquant"
TIMEOUT = 120_000


def _dock(viewer: Any, name: str) -> Any:
    return viewer.window.add_plugin_dock_widget(PLUGIN, name)[1]


def _model(label: str, ct_window: tuple[float, float] | None) -> SegmentationModel:
    """A tiny untrained 2D model (masks arbitrary) with the given CT window."""
    unet, quant = UNetConfig(base_width=4, depth=2), QuantConfig.from_label(label)
    preprocess = PreprocessConfig(ct_window=ct_window)
    return SegmentationModel(build_unet(unet, quant).eval(), unet, quant, preprocess)


@pytest.fixture
def warnings_shown(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Messages the Train and Segment docks showed as warnings."""
    shown: list[str] = []
    monkeypatch.setattr(_train, "show_warning", shown.append)
    monkeypatch.setattr(_segment, "show_warning", shown.append)
    return shown


def test_a_train_preset_shows_its_window_and_custom_takes_the_typed_one(
    make_napari_viewer: Callable[..., Any],
) -> None:
    train = _dock(make_napari_viewer(), "Train quantized U-Net")
    ct = train.ct
    assert ct.intensity.value == ZSCORE and ct.window() is None  # MRI and EM: the default
    assert not ct.level.visible and not ct.width.visible
    ct.intensity.value = "lung"
    assert (ct.level.value, ct.width.value) == (-600, 1500)
    assert not ct.level.enabled and ct.window() == (-600.0, 1500.0)
    ct.intensity.value = CUSTOM
    assert ct.level.enabled and ct.width.enabled
    ct.level.value, ct.width.value = 60, 360
    assert ct.window() == (60.0, 360.0)


def test_the_intensity_choice_persists(make_napari_viewer: Callable[..., Any]) -> None:
    first = _dock(make_napari_viewer(), "Train quantized U-Net")
    first.ct.intensity.value = CUSTOM
    first.ct.level.value, first.ct.width.value = -100, 900
    second = _dock(make_napari_viewer(), "Train quantized U-Net")
    assert second.ct.window() == (-100.0, 900.0) and second.ct.level.enabled


def test_training_with_a_preset_carries_its_window_into_the_run_and_the_model(
    make_napari_viewer: Callable[..., Any],
    qtbot: Any,
    errors: list[str],
    warnings_shown: list[str],
) -> None:
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "em_phantom")
    train = _dock(viewer, "Train quantized U-Net")
    train.image.value = viewer.layers["EM phantom"]
    train.ground_truth.value = viewer.layers["EM phantom membranes"]
    train.network_width.value, train.steps.value, train.quantizer.value = 4, 1, "float"
    train.ct.intensity.value = "soft tissue"
    train.start.clicked()
    qtbot.waitUntil(lambda: train.start.enabled and train.last_model is not None, timeout=TIMEOUT)
    assert errors == []
    assert train.training.preprocess.ct_window == (40.0, 400.0)
    assert train.last_model.preprocess.ct_window == (40.0, 400.0)
    # an EM image (0 to 255) holds no air: trained anyway, with a warning that says so
    assert len(warnings_shown) == 1 and "Hounsfield" in warnings_shown[0]
    assert "'z-score'" in warnings_shown[0] and "--" not in warnings_shown[0]


def test_fine_tuning_refuses_another_intensity_than_its_model_had(
    make_napari_viewer: Callable[..., Any], errors: list[str]
) -> None:
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "em_phantom")
    _session.add_model("FP (z-score)", _model("FP", None))
    train = _dock(viewer, "Train quantized U-Net")
    train.image.value = viewer.layers["EM phantom"]
    train.ground_truth.value = viewer.layers["EM phantom membranes"]
    train.quantizer.value, train.fine_tune.value = "fixed", True
    train.ct.intensity.value = "abdomen"
    train.start.clicked()
    assert train.start.enabled and train.worker is None  # refused before any thread started
    assert len(errors) == 1
    assert "z-score per slice, not CT window 50/350 HU" in errors[0]
    assert errors[0].endswith("(see: intensity, fine-tune from this session's FP model)")


def test_segment_shows_the_window_of_the_chosen_model(
    make_napari_viewer: Callable[..., Any], tmp_path: Path
) -> None:
    _session.add_model("FP (CT)", _model("FP", (40.0, 400.0)))
    _session.add_model("FP (EM)", _model("FP", None))
    segment = _dock(make_napari_viewer(), "Segment")
    segment.model.value = "FP (CT)"
    assert segment.intensity.value == "CT window 40/400 HU (soft tissue), as trained"
    segment.model.value = "FP (EM)"
    assert segment.intensity.value == "z-score per slice, as trained"
    path = tmp_path / "lung.safetensors"
    save_model(path, _model("W4A6", (-600.0, 1500.0)))
    segment.model.value = _segment.FROM_FILE
    segment.model_file.value = path
    assert segment.intensity.value == "CT window -600/1500 HU (lung), as trained"
    assert not hasattr(segment, "ct")  # shown, never chosen: the model decides


def test_segment_warns_when_a_ct_model_meets_an_image_without_air(
    make_napari_viewer: Callable[..., Any],
    qtbot: Any,
    errors: list[str],
    warnings_shown: list[str],
) -> None:
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    ct_image = viewer.add_image(rng.uniform(-1024, 1000, (2, 32, 32)).astype(np.float32))
    em_image = viewer.add_image(rng.uniform(0, 255, (2, 32, 32)).astype(np.float32))
    _session.add_model("FP (CT)", _model("FP", (40.0, 400.0)))
    segment = _dock(viewer, "Segment")
    segment.model.value = "FP (CT)"
    for layer in (ct_image, em_image):
        before = len(viewer.layers)
        segment.image.value = layer
        segment.run_button.clicked()
        qtbot.waitUntil(lambda before=before: len(viewer.layers) > before, timeout=TIMEOUT)
    assert errors == []
    assert len(warnings_shown) == 1 and repr(em_image.name) in warnings_shown[0]


def test_batch_shows_the_window_of_the_model_file(
    make_napari_viewer: Callable[..., Any], tmp_path: Path
) -> None:
    batch = _dock(make_napari_viewer(), "Batch segment")
    assert batch.intensity.value == ""
    path = tmp_path / "brain.safetensors"
    save_model(path, _model("FP", (40.0, 80.0)))
    batch.model_file.value = path
    assert batch.intensity.value == "CT window 40/80 HU (brain), as trained"
    batch.model_file.value = tmp_path / "missing.safetensors"
    assert batch.intensity.value == ""
