"""Several classes in the docks, on a real viewer: the Train dock learns grey and white matter
from one Labels layer (label values typed as ``1, 2``), Segment adds one Labels layer holding
the classes' values, and the Dice readout has a column per class."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from napari_unetquant.data.io import read_labels, read_volume
from napari_unetquant.modelio import model_classes

PLUGIN = "napari-unetquant"
TIMEOUT = 120_000
TINY = Path(__file__).resolve().parents[3] / "shared" / "data" / "spinal-gm-tiny"


def _spinal(viewer: Any) -> tuple[Any, Any]:
    image = read_volume(TINY / "t2s.nii.gz").array.astype(np.float32)
    labels = read_labels(f"{TINY / 't2s_seg.nii.gz'}+{TINY / 't2s_gmseg_manual.nii.gz'}").array
    return viewer.add_image(image, name="T2*"), viewer.add_labels(labels, name="cord and GM")


def test_the_train_dock_learns_several_classes_from_typed_label_values(
    make_napari_viewer: Callable[..., Any], qtbot: Any, errors: list[str]
) -> None:
    viewer = make_napari_viewer()
    image, labels = _spinal(viewer)
    _, train = viewer.window.add_plugin_dock_widget(PLUGIN, "Train quantized U-Net")
    train.image.value, train.ground_truth.value = image, labels
    train.network_width.value, train.steps.value = 4, 1
    train.quantizer.value = "float"

    train.foreground_value.value = "1, 7"  # a value the labels do not hold: said, nothing runs
    train.start.clicked()
    assert errors and "value 7" in errors[-1] and "they hold" in errors[-1]
    assert train.start.enabled

    train.foreground_value.value = "1, 2"
    train.start.clicked()
    qtbot.waitUntil(lambda: train.start.enabled, timeout=TIMEOUT)
    model = train.last_model
    assert model_classes(model) == (1, 2) and model.unet.out_classes == 3
    assert len(errors) == 1

    segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")[1]
    segment.model.reset_choices()
    segment.image.value = image
    segment.model.value = segment.model.choices[0]  # the model trained in this session
    segment.run_button.clicked()
    name = f"T2* {model.quant.label}"
    qtbot.waitUntil(lambda: name in viewer.layers or len(errors) > 1, timeout=TIMEOUT)
    assert name in viewer.layers, (errors, segment.model.choices, segment.status.value)
    prediction = viewer.layers[name]
    assert set(np.unique(prediction.data)) <= {0, 1, 2}  # one layer, the classes' values
    assert prediction.metadata["napari_unetquant_prediction"]["classes"] == [1, 2]
    assert "of value 1" in segment.status.value and "of value 2" in segment.status.value

    dice = viewer.window.add_plugin_dock_widget(PLUGIN, "Dice readout")[1]
    dice.truth.value = labels
    dice.predictions.reset_choices()
    dice.predictions.value = [prediction]
    dice.compute.clicked()
    assert "the classes the model learnt" in dice.summary.value
    assert "mean Dice over classes" in dice.summary.value
    columns = dice.table.to_dict()
    assert {f"Dice {name} [1]", f"Dice {name} [2]"} <= set(columns)
    assert errors == [errors[0]]
