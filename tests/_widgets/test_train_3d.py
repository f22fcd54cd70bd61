"""The Train widget's choice of a 2D or 3D U-Net, on a real viewer with the generated sample."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from napari_unetquant._widgets import _session

PLUGIN = "napari-unetquant"
TIMEOUT = 120_000


def _train(widget: Any, qtbot: Any, network: int, quantizer: str) -> Any:
    widget.network.value, widget.quantizer.value = network, quantizer
    widget.start.clicked()
    qtbot.waitUntil(lambda: widget.start.enabled, timeout=TIMEOUT)
    return widget.last_model


@pytest.mark.slow
def test_train_widget_trains_3d_unets_and_fine_tunes_them_from_3d_models(
    make_napari_viewer: Callable[..., Any], qtbot: Any, errors: list[str]
) -> None:
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "em_phantom")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Train quantized U-Net")
    assert widget.network.choices == (2, 3)
    assert widget.network.current_choice == "2D U-Net (slices)"  # the paper's, by default
    widget.image.value = viewer.layers["EM phantom"]
    widget.ground_truth.value = viewer.layers["EM phantom membranes"]
    widget.network_width.value, widget.steps.value = 4, 1

    flat_fp = _train(widget, qtbot, 2, "float")
    assert flat_fp.unet.spatial_dims == 2
    # no 3D full-precision model yet: the 2D one is not a starting point for a 3D network
    volume_w4a6 = _train(widget, qtbot, 3, "fixed")
    assert (volume_w4a6.unet.spatial_dims, volume_w4a6.quant.label) == (3, "W4A6")
    assert widget.training.trainer.config.batch_size == 2
    volume_fp = _train(widget, qtbot, 3, "float")
    assert volume_fp.unet.spatial_dims == 3
    assert widget._fp_model() is volume_fp  # what the next 3D fine-tune starts from
    widget.network.value = 2
    assert widget._fp_model() is flat_fp
    assert errors == []
    assert [m.unet.spatial_dims for m in _session.models().values()] == [2, 3, 3]
    assert "validation Dice" in widget.status.value


def test_network_choice_persists(make_napari_viewer: Callable[..., Any]) -> None:
    _, first = make_napari_viewer().window.add_plugin_dock_widget(PLUGIN, "Train quantized U-Net")
    first.network.value = 3
    first.native.close()
    _, second = make_napari_viewer().window.add_plugin_dock_widget(PLUGIN, "Train quantized U-Net")
    assert second.network.value == 3
