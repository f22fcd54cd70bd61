"""The plugin in a real napari viewer: manifest discovery and the generated sample."""

from __future__ import annotations

from collections.abc import Callable

import napari
import numpy as np


def test_sample_opens_as_image_and_labels(make_napari_viewer: Callable[..., object]) -> None:
    viewer = make_napari_viewer()
    viewer.open_sample("napari-unetquant", "em_phantom")  # type: ignore[attr-defined]
    layers = {layer.name: layer for layer in viewer.layers}  # type: ignore[attr-defined]
    image, labels = layers["EM phantom"], layers["EM phantom membranes"]
    assert isinstance(image, napari.layers.Image) and isinstance(labels, napari.layers.Labels)
    assert image.data.shape == labels.data.shape == (4, 256, 256)
    assert image.data.dtype == np.uint8
    assert set(np.unique(labels.data)) == {0, 1}


def test_manifest_is_discovered_with_its_display_name() -> None:
    from npe2 import PluginManager

    manager = PluginManager.instance()
    manager.discover()
    manifest = manager.get_manifest("napari-unetquant")
    assert manifest.display_name == "U-Net Quant"
    assert [s.key for s in manifest.contributions.sample_data or []] == ["em_phantom"]
