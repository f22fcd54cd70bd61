"""Render the viewer with the plugin's widgets and a segmentation overlay to PNG, for the README.

Runs the real widgets: opens the generated sample, trains FP then fine-tunes W4A6 with the
Train widget, segments with the Segment widget (float simulation, then integer arithmetic) and
scores both with the Dice readout.

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/screenshots.py [--steps N]
    (or: make screenshots)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images"


def _wait(app: object, done: object, timeout: float = 1800) -> None:
    start = time.monotonic()
    while not done():  # type: ignore[operator]
        app.processEvents()  # type: ignore[attr-defined]
        time.sleep(0.02)
        if time.monotonic() - start > timeout:
            raise TimeoutError("the widget did not finish in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300, help="FP steps (W4A6: half)")
    args = parser.parse_args()
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    os.environ.setdefault("NAPARI_UNETQUANT_SETTINGS_DIR", tempfile.mkdtemp())
    viewer.open_sample("napari-unetquant", "em_phantom")
    app = QApplication.instance()
    _, train = viewer.window.add_plugin_dock_widget("napari-unetquant", "Train quantized U-Net")
    train.image.value = viewer.layers["EM phantom"]
    train.ground_truth.value = viewer.layers["EM phantom membranes"]
    train.network_width.value = 16
    for quantizer, steps in (("float", args.steps), ("fixed", args.steps // 2)):
        train.quantizer.value, train.steps.value = quantizer, steps
        train.start.clicked()
        _wait(app, lambda: train.start.enabled)
    _, segment = viewer.window.add_plugin_dock_widget("napari-unetquant", "Segment")
    segment.image.value = viewer.layers["EM phantom"]
    segment.model.reset_choices()
    segment.model.value = segment.model.choices[0]
    segment.run_button.clicked()
    _wait(app, lambda: "EM phantom W4A6" in viewer.layers)
    segment.integer.value = True
    segment.run_button.clicked()
    _wait(app, lambda: "EM phantom W4A6 integer" in viewer.layers)
    _, dice = viewer.window.add_plugin_dock_widget("napari-unetquant", "Dice readout")
    dice.truth.value = viewer.layers["EM phantom membranes"]
    dice.predictions.reset_choices()
    predictions = [viewer.layers["EM phantom W4A6"], viewer.layers["EM phantom W4A6 integer"]]
    dice.predictions.value = predictions
    dice.compute.clicked()
    viewer.layers["EM phantom membranes"].visible = False
    viewer.layers["EM phantom W4A6"].visible = False
    viewer.layers["EM phantom W4A6 integer"].opacity = 0.5
    OUT.mkdir(parents=True, exist_ok=True)
    for _ in range(20):
        app.processEvents()
    path = OUT / "napari-unetquant.png"
    viewer.screenshot(str(path), canvas_only=False)
    print(f"wrote {path}")
    viewer.close()


if __name__ == "__main__":
    main()
