"""States a dock must not get into silently: saving with no file or into a missing folder,
a Stop before the first validation, a fine-tune with nothing to fine-tune from, fixed point
at one bit, and the Dice readout holding the scores of layers that were removed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from napari_unetquant._widgets import _train

PLUGIN = "napari-unetquant"
TIMEOUT = 60_000


def _dock(viewer: Any, name: str) -> Any:
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def _data(viewer: Any) -> tuple[Any, Any]:
    rng = np.random.default_rng(0)
    labels = np.zeros((4, 32, 32), np.int32)
    labels[:, 8:16, 8:16] = 1
    image = viewer.add_image(rng.random((4, 32, 32)).astype(np.float32), name="image")
    return image, viewer.add_labels(labels, name="truth")


@pytest.fixture
def infos(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    shown: list[str] = []
    monkeypatch.setattr(_train, "show_info", shown.append)
    return shown


def _trained(viewer: Any, qtbot: Any, steps: int = 2, quantizer: str = "float") -> Any:
    train = _dock(viewer, "Train quantized U-Net")
    train.image.value, train.ground_truth.value = _data(viewer)
    train.network_width.value, train.steps.value, train.quantizer.value = 4, steps, quantizer
    train.start.clicked()
    qtbot.waitUntil(lambda: train.start.enabled and train.last_model is not None, timeout=TIMEOUT)
    return train


def test_saving_needs_a_file_in_an_existing_folder(
    make_napari_viewer: Callable[..., Any],
    qtbot: Any,
    errors: list[str],
    infos: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    train = _trained(make_napari_viewer(), qtbot)
    train.save.clicked()  # no file chosen
    assert errors == ["choose a file to save the model to ('save model to')"]
    assert list(work.iterdir()) == []  # no hidden '..safetensors'
    train.save_path.value = work / "missing" / "model"
    train.save.clicked()
    assert "missing does not exist; choose a file in an existing folder" in errors[-1]
    assert not (work / "missing").exists()
    train.save_path.value = work / "model"
    train.save.clicked()
    assert (work / "model.safetensors").is_file() and infos[-1].startswith("saved ")


def test_a_stop_before_the_first_validation_says_so(
    make_napari_viewer: Callable[..., Any], qtbot: Any
) -> None:
    viewer = make_napari_viewer()
    train = _dock(viewer, "Train quantized U-Net")
    train.image.value, train.ground_truth.value = _data(viewer)
    train.network_width.value, train.steps.value, train.quantizer.value = 4, 5000, "float"
    train.start.clicked()
    qtbot.waitUntil(lambda: train.progress.value >= 1, timeout=TIMEOUT)
    train.stop.clicked()
    qtbot.waitUntil(lambda: train.start.enabled, timeout=TIMEOUT)
    assert "stopped before the first validation: no validation Dice yet" in train.status.value
    assert "-1.000" not in train.status.value


def test_a_fine_tune_with_no_fp_model_says_it_trains_from_scratch(
    make_napari_viewer: Callable[..., Any], qtbot: Any, infos: list[str]
) -> None:
    train = _trained(make_napari_viewer(), qtbot, quantizer="fixed")
    assert any("no 2D full-precision model in this session" in i for i in infos), infos
    assert train.last_model.info["init"] is None


def test_fixed_point_at_one_bit_is_shown_as_binary(make_napari_viewer: Callable[..., Any]) -> None:
    train = _dock(make_napari_viewer(), "Train quantized U-Net")
    train.quantizer.value, train.weight_bits.value = "fixed", 1
    assert "weights: binary {-a, a}, 1 stored bit" in train.format.value
    assert "sign + 0 bits" not in train.format.value


def test_removed_layers_leave_the_dice_readout(make_napari_viewer: Callable[..., Any]) -> None:
    viewer = make_napari_viewer()
    _, truth = _data(viewer)
    first = viewer.add_labels(truth.data.copy(), name="first")
    viewer.add_labels(np.zeros_like(truth.data), name="second")
    dice = _dock(viewer, "Dice readout")
    dice.truth.value = truth
    dice.predictions.reset_choices()
    assert truth not in dice.predictions.choices  # the ground truth is not a prediction
    dice.predictions.value = [first, viewer.layers["second"]]
    dice.compute.clicked()
    assert list(dice.scores) == ["first", "second"]
    viewer.layers.remove("second")
    assert list(dice.scores) == ["first"] and "second" not in dice.summary.value
    viewer.layers.remove("truth")
    assert dice.scores == {} and dice.summary.value == ""


def test_the_docks_show_the_values_the_labels_hold(
    make_napari_viewer: Callable[..., Any], errors: list[str]
) -> None:
    viewer = make_napari_viewer()
    labels = np.full((2, 16, 16), 255, np.uint8)
    labels[:, :, :4] = 0  # ISBI-like: membranes 0, interior 255
    truth = viewer.add_labels(labels, name="isbi")
    image = viewer.add_image(np.ones((2, 16, 16), np.float32), name="image")
    train, dice = _dock(viewer, "Train quantized U-Net"), _dock(viewer, "Dice readout")
    train.ground_truth.value = dice.truth.value = truth
    assert train.values_held.value == "255 (384 px), 0 (128 px)"
    assert dice.values_held.value == train.values_held.value
    train.image.value, train.foreground_value.value = image, "7"
    train.start.clicked()
    assert errors == [
        "no pixel of the labels has the value 7; they hold 255 (384 px), 0 (128 px); choose one "
        "of those"
    ]


def test_the_dice_readout_scores_the_value_the_model_was_trained_on(
    make_napari_viewer: Callable[..., Any],
) -> None:
    viewer = make_napari_viewer()
    truth = np.full((2, 16, 16), 255, np.uint8)
    truth[:, :, :4] = 0  # membranes 0, as in ISBI
    viewer.add_labels(truth, name="isbi")
    made_by = {"napari_unetquant_prediction": {"model": "W4A6", "foreground_value": 0}}
    membranes = viewer.add_labels((truth == 0).astype(np.uint8), name="pred", metadata=made_by)
    dice = _dock(viewer, "Dice readout")
    dice.truth.value = viewer.layers["isbi"]
    dice.predictions.reset_choices()
    dice.predictions.value = [membranes]
    dice.compute.clicked()
    assert dice.scores["pred"].dice_mean == 1.0  # value 0 scored, not the non-zero interior
    assert dice.summary.value.startswith(
        "scoring ground-truth value 0 (the value the model was trained on)"
    )
    dice.foreground_value.value = "255"  # a typed value wins
    dice.compute.clicked()
    assert dice.scores["pred"].dice_mean == 0.0 and "value 255" in dice.summary.value


def test_start_prepares_the_data_in_the_worker_not_the_viewer(
    make_napari_viewer: Callable[..., Any], qtbot: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    threads: list[str] = []
    real = _train.start_training

    def recording(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(_train, "start_training", recording)
    viewer = make_napari_viewer()
    train = _dock(viewer, "Train quantized U-Net")
    train.image.value, train.ground_truth.value = _data(viewer)
    train.network_width.value, train.steps.value, train.quantizer.value = 4, 2, "float"
    train.start.clicked()
    assert train.status.value == "preparing the data and the network..."
    qtbot.waitUntil(lambda: train.start.enabled and train.last_model is not None, timeout=TIMEOUT)
    assert threads and threads != [threading.main_thread().name]
    assert train.progress.max == 2 and train.training is not None


def test_plots_have_axes_a_pareto_front_and_export(qtbot: Any, tmp_path: Path) -> None:
    from napari_unetquant._widgets._plot import PlotWidget

    plot = PlotWidget("Dice vs size", "stored weights (KiB)", "validation Dice", False, True)
    qtbot.addWidget(plot)
    for kib, dice, label in ((1200, 0.80, "FP"), (170, 0.79, "W4A6"), (300, 0.78, "W8A8")):
        plot.add_point("Dice", kib, dice, label)
    plot.log_x = True
    plot.add_point("Dice", 60, 0.5, "binary")
    assert [p[2] for p in plot.pareto_front()] == ["binary", "W4A6", "FP"]  # W8A8 is beaten
    assert plot.axes.get_xscale() == "log" and plot.axes.get_xlabel() == "stored weights (KiB)"
    assert [t.get_text() for t in plot.axes.get_legend().get_texts()] == ["Dice", "Pareto front"]
    png, svg = plot.save(tmp_path / "sweep"), plot.save(tmp_path / "sweep.svg")
    assert png.name == "sweep.png" and png.read_bytes()[:4] == b"\x89PNG"
    assert svg.read_text().lstrip().startswith("<?xml")


def test_a_model_trained_in_the_dock_records_its_foreground_value_end_to_end(
    make_napari_viewer: Callable[..., Any], qtbot: Any, errors: list[str]
) -> None:
    """Train on membranes = 0 (ISBI's convention) in the Train dock, segment with that model,
    and the Dice readout scores value 0 without being told; the sweep records it too, and a
    fine-tune on another value is refused."""
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    truth = np.full((4, 32, 32), 255, np.uint8)
    truth[:, :, 12:20] = 0  # membranes 0, interior 255
    image = viewer.add_image(
        (truth == 0) + 0.1 * rng.random((4, 32, 32)).astype(np.float32), name="em"
    )
    labels = viewer.add_labels(truth, name="isbi")
    train = _dock(viewer, "Train quantized U-Net")
    train.image.value, train.ground_truth.value = image, labels
    train.foreground_value.value = "0"
    train.network_width.value, train.steps.value, train.quantizer.value = 4, 2, "float"
    train.start.clicked()
    qtbot.waitUntil(lambda: train.start.enabled and train.last_model is not None, timeout=TIMEOUT)
    assert train.last_model.info["foreground_value"] == 0

    segment = _dock(viewer, "Segment")
    segment.image.value = image
    segment.model.reset_choices()
    segment.model.value = segment.model.choices[0]  # the session model just trained
    segment.run_button.clicked()
    qtbot.waitUntil(lambda: len(viewer.layers) == 3, timeout=TIMEOUT)
    dice = _dock(viewer, "Dice readout")
    dice.truth.value = labels
    dice.predictions.reset_choices()
    dice.predictions.value = [viewer.layers[-1]]
    dice.compute.clicked()
    assert dice.summary.value.startswith(
        "scoring ground-truth value 0 (the value the model was trained on)"
    )

    train.foreground_value.value = "255"  # fine-tuning the membrane model on the interior
    train.quantizer.value = "fixed"
    train.start.clicked()
    assert errors and "was trained on foreground value 0, not 255" in errors[-1]
