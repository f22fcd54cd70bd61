"""Run by ``test_close_mid_training.py`` in its own process: train in the Train dock, close
the viewer after a few steps, let the worker finish, and exit 0 if Python survived."""

from __future__ import annotations

import sys
import time

import napari
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication

viewer = napari.Viewer(show=True)
viewer.open_sample("napari-unetquant", "em_phantom")
_, train = viewer.window.add_plugin_dock_widget("napari-unetquant", "Train quantized U-Net")
train.image.value = viewer.layers["EM phantom"]
train.ground_truth.value = viewer.layers["EM phantom membranes"]
train.network_width.value, train.steps.value, train.quantizer.value = 4, 100_000, "float"
train.start.clicked()
worker = train.worker
finished = []
worker.finished.connect(lambda: finished.append(True))
worker.yielded.connect(lambda event: event.step == 3 and QTimer.singleShot(0, viewer.close))
napari.run()  # returns once the window is closed
app = QApplication.instance()
deadline = time.monotonic() + 120
while not finished and time.monotonic() < deadline:
    app.processEvents()
    time.sleep(0.05)
print("worker finished" if finished else "worker still running", file=sys.stderr)
sys.exit(0 if finished else 3)
