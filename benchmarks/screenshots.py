"""Render the viewer with the plugin's docks to PNG, for the README (1600 x 1000 each).

Runs the real docks, as a person would click them, and writes to ``docs/images``:

* ``napari-unetquant.png``: the generated phantom; Train runs FP then fine-tunes W4A6, Segment
  runs W4A6 (float simulation, then integer arithmetic), the Dice readout scores both.
* ``all-docks.png``: all five docks open at once on an image: two stacked, the later ones as
  tabs, each scrolling, all inside the window.
* ``isbi-flow.png``: ISBI 2012 EM slices with membranes chosen by value (foreground 0, as the
  Train dock's *values held* line shows): FP, then W4A6 fine-tuned from it, segmented and
  scored (the Dice readout scores the value the model was trained on).
* ``sweep.png``: the Bit-width sweep dock after a small sweep: table, progress, and the plots
  of Dice against bits and against stored size with the Pareto front.

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/screenshots.py [--only NAME]
    (or: make screenshots)

Widget settings go to a new temporary folder for each picture
(``$NAPARI_UNETQUANT_SETTINGS_DIR``), never the user's. ISBI 2012 is read from ``--isbi``
(``train-volume.tif``, ``train-labels.tif``); without it, the ISBI pictures use the generated
phantom instead. PyTorch runs on ``--threads`` threads (1 by default: on two cores shared with
other jobs, two threads are several times slower).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images"
ISBI = ROOT.parent / "shared" / "data" / "isbi2012"  # as benchmarks/paper_table.py finds it
SIZE = (1600, 1000)
PLUGIN = "napari-unetquant"
TRAIN, SEGMENT, BATCH, DICE, SWEEP = (
    "Train quantized U-Net",
    "Segment",
    "Batch segment",
    "Dice readout",
    "Bit-width sweep",
)
PICTURES = ("overview", "docks", "isbi", "sweep")


def _wait(app: Any, done: Callable[[], bool], timeout: float = 1800) -> None:
    start = time.monotonic()
    while not done():
        app.processEvents()
        time.sleep(0.02)
        if time.monotonic() - start > timeout:
            raise TimeoutError("the widget did not finish in time")


def _settle(app: Any, seconds: float = 0.5) -> None:
    """Let Qt lay out, draw and run its zero-time timers (docks arrange on one)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.02)


def _viewer() -> Any:
    import napari

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(*SIZE)
    return viewer


def _dock(viewer: Any, name: str) -> Any:
    from qtpy.QtWidgets import QApplication

    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    _settle(QApplication.instance(), 0.3)
    return widget


def _shot(viewer: Any, name: str) -> Path:
    from qtpy.QtWidgets import QApplication

    _settle(QApplication.instance(), 1.0)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    viewer.screenshot(str(path), canvas_only=False)
    print(f"wrote {path}", flush=True)
    return path


def _train(app: Any, train: Any, quantizer: str, steps: int) -> None:
    """One run of the Train dock (fine-tuning from this session's FP model when quantized)."""
    train.quantizer.value, train.steps.value = quantizer, steps
    started = time.monotonic()
    train.start.clicked()
    _wait(app, lambda: train.start.enabled)
    if not str(train.status.value).startswith("done"):
        raise RuntimeError(f"training {quantizer} did not finish: {train.status.value!r}")
    print(f"  {train.status.value} ({time.monotonic() - started:.0f} s)", flush=True)


def _segment(app: Any, viewer: Any, segment: Any, image: str, model: str, integer: bool) -> Any:
    """Segment ``image`` with this session's latest model whose name starts with ``model``."""
    segment.image.value = viewer.layers[image]
    segment.model.reset_choices()
    segment.model.value = next(c for c in segment.model.choices if c.startswith(model))
    segment.integer.value = integer
    before = len(viewer.layers)
    segment.run_button.clicked()
    _wait(app, lambda: len(viewer.layers) > before)
    print(f"  {segment.info.value}; {segment.status.value}", flush=True)
    return viewer.layers[-1]


def _score(app: Any, dice: Any, truth: Any, predictions: list[Any], value: str = "") -> None:
    """Compute Dice as the dock does by default: it scores the foreground value the model
    recorded (``value``: what that must be; the picture is refused if it is not)."""
    from napari_unetquant._widgets._common import PREDICTION_KEY

    dice.truth.value = truth
    dice.predictions.reset_choices()
    dice.predictions.value = predictions
    trained = {p.metadata.get(PREDICTION_KEY, {}).get("foreground_value") for p in predictions}
    if value and trained != {int(value)}:
        raise SystemExit(
            f"the predictions record foreground value {trained}, not {value}: the Dice readout "
            f"would score the wrong object"
        )
    dice.compute.clicked()
    _settle(app, 0.3)
    print(f"  {dice.summary.value}", flush=True)
    dice.table.native.resizeColumnsToContents()  # as a person would widen the columns
    _settle(app, 0.3)
    _scroll_to(dice, dice.compute)  # the summary and the table, below the list of layers


def _isbi(viewer: Any, slices: int, folder: Path) -> tuple[str, str, str]:
    """The first ``slices`` ISBI 2012 slices and labels as layers (membranes are 0); without
    the files, the generated phantom (membranes are 1). Returns the layer names and the
    foreground value of the membranes."""
    volume, labels = folder / "train-volume.tif", folder / "train-labels.tif"
    if not (volume.is_file() and labels.is_file()):
        print(f"  {folder} has no ISBI 2012 files: using the generated phantom", flush=True)
        viewer.open_sample(PLUGIN, "em_phantom")
        return "EM phantom", "EM phantom membranes", "1"
    import tifffile

    keys = range(slices)
    viewer.add_image(tifffile.imread(volume, key=keys), name="ISBI 2012 EM")
    viewer.add_labels(tifffile.imread(labels, key=keys), name="ISBI 2012 labels", visible=False)
    viewer.layers.selection.active = viewer.layers["ISBI 2012 EM"]
    return "ISBI 2012 EM", "ISBI 2012 labels", "0"


def _scroll_to(dock: Any, widget: Any) -> None:
    """Scroll a dock so that ``widget`` (a magicgui widget in it) is at the top."""
    from qtpy.QtCore import QPoint

    scroll = dock.native
    top = widget.native.mapTo(scroll.widget(), QPoint(0, 0)).y()
    scroll.verticalScrollBar().setValue(max(0, top - 6))


def overview(app: Any, args: argparse.Namespace) -> None:
    """The phantom: train FP and W4A6, segment (float and integer), score both."""
    viewer = _viewer()
    viewer.open_sample(PLUGIN, "em_phantom")
    train = _dock(viewer, TRAIN)
    train.image.value = viewer.layers["EM phantom"]
    train.ground_truth.value = viewer.layers["EM phantom membranes"]
    train.foreground_value.value = ""
    train.network_width.value = args.width
    _train(app, train, "float", args.steps)
    _train(app, train, "fixed", args.steps // 2)
    segment = _dock(viewer, SEGMENT)
    simulated = _segment(app, viewer, segment, "EM phantom", "W4A6 (EM phantom", False)
    integer = _segment(app, viewer, segment, "EM phantom", "W4A6 (EM phantom", True)
    dice = _dock(viewer, DICE)
    _score(app, dice, viewer.layers["EM phantom membranes"], [simulated, integer])
    viewer.layers["EM phantom membranes"].visible = False
    simulated.visible = False
    integer.opacity = 0.5
    viewer.layers.selection.active = integer
    _shot(viewer, "napari-unetquant.png")
    viewer.close()


def all_docks(app: Any, args: argparse.Namespace) -> None:
    """All five docks at once on an image: two stacked, the others tabs; all in the window."""
    viewer = _viewer()
    image, labels, value = _isbi(viewer, args.isbi_slices, args.isbi)
    docks = {name: _dock(viewer, name) for name in (TRAIN, SEGMENT, BATCH, DICE, SWEEP)}
    train = docks[TRAIN]
    train.image.value, train.ground_truth.value = viewer.layers[image], viewer.layers[labels]
    train.foreground_value.value = value
    train.network_width.value = args.width
    docks[SWEEP].image.value = viewer.layers[image]
    docks[SWEEP].ground_truth.value = viewer.layers[labels]
    docks[SWEEP].foreground_value.value = value
    docks[DICE].truth.value = viewer.layers[labels]
    _shot(viewer, "all-docks.png")
    viewer.close()


def isbi_flow(app: Any, args: argparse.Namespace) -> None:
    """ISBI 2012 membranes (value 0): FP, then W4A6 fine-tuned from it; segment; Dice."""
    viewer = _viewer()
    image, labels, value = _isbi(viewer, args.isbi_slices, args.isbi)
    train = _dock(viewer, TRAIN)
    train.image.value, train.ground_truth.value = viewer.layers[image], viewer.layers[labels]
    train.foreground_value.value = value
    train.network_width.value = args.isbi_width
    train.fine_tune.value = True
    _train(app, train, "float", args.isbi_steps)
    _train(app, train, "fixed", args.isbi_steps // 2)
    segment = _dock(viewer, SEGMENT)
    prediction = _segment(app, viewer, segment, image, f"W4A6 ({image}", False)
    dice = _dock(viewer, DICE)
    _score(app, dice, viewer.layers[labels], [prediction], value)
    prediction.opacity = 0.55
    viewer.layers.selection.active = prediction
    viewer.dims.set_current_step(0, viewer.layers[image].data.shape[0] - 1)  # validation
    _shot(viewer, "isbi-flow.png")
    viewer.close()


def sweep(app: Any, args: argparse.Namespace) -> None:
    """The Bit-width sweep dock after a small sweep, scrolled to its results and plots."""
    from napari_unetquant._widgets._common import show_rows

    viewer = _viewer()
    image, labels, value = _isbi(viewer, args.isbi_slices, args.isbi)
    dock = _dock(viewer, SWEEP)
    dock.image.value, dock.ground_truth.value = viewer.layers[image], viewer.layers[labels]
    dock.foreground_value.value = value
    dock.network_width.value = args.sweep_width
    dock.settings.value = args.sweep
    dock.fp_steps.value, dock.quant_steps.value = args.sweep_steps, args.sweep_steps // 2
    started = time.monotonic()
    dock.start.clicked()
    _wait(app, lambda: dock.start.enabled)
    if not dock.results:
        raise RuntimeError(f"the sweep did not finish: {dock.status.value!r}")
    print(f"  sweep: {dock.status.value} ({time.monotonic() - started:.0f} s)", flush=True)
    for result in dock.results:
        print(f"    {result.row()}", flush=True)
    # the table as tall as its rows (not the dock's 8), so that progress, table and both plots
    # fit in the 1000-pixel window together
    show_rows(dock.table, len(dock.results))
    dock.table.native.resizeColumnsToContents()
    dock.native.parentWidget().raise_()
    _settle(app, 0.5)
    _scroll_to(dock, dock.progress)
    _shot(viewer, "sweep.png")
    viewer.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", choices=("all", *PICTURES), default="all", help="render one picture"
    )
    parser.add_argument("--steps", type=int, default=150, help="phantom FP steps (W4A6: half)")
    parser.add_argument("--width", type=int, default=16, help="phantom network width")
    parser.add_argument("--isbi", type=Path, default=ISBI, help="folder of ISBI 2012 TIFFs")
    parser.add_argument("--isbi-slices", type=int, default=8, help="ISBI slices to open")
    parser.add_argument("--isbi-steps", type=int, default=150, help="ISBI FP steps (W4A6: half)")
    parser.add_argument("--isbi-width", type=int, default=8, help="ISBI network width")
    parser.add_argument("--sweep", default="FP, W8A8, W4A6, W2A4", help="sweep settings")
    parser.add_argument(
        "--sweep-steps", type=int, default=80, help="sweep FP steps (fine-tunes: half)"
    )
    parser.add_argument("--sweep-width", type=int, default=8, help="sweep network width")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for PyTorch (1: several times faster than 2 when other jobs share "
        "two cores; more on an idle machine)",
    )
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
    import torch
    from napari.qt import get_qapp

    from napari_unetquant._widgets import _session

    app = get_qapp()
    torch.set_num_threads(args.threads)
    steps = {"overview": overview, "docks": all_docks, "isbi": isbi_flow, "sweep": sweep}
    begun = time.monotonic()
    for name, render in steps.items():
        if args.only in ("all", name):
            print(f"{name}:", flush=True)
            started = time.monotonic()
            # the docks' settings in a fresh folder: never the user's, and each picture starts
            # from the docks' defaults
            with tempfile.TemporaryDirectory(prefix=f"{name}-", ignore_cleanup_errors=True) as tmp:
                os.environ["NAPARI_UNETQUANT_SETTINGS_DIR"] = tmp
                render(app, args)
            _session._models.clear()  # each picture's Segment dock lists its own models only
            print(f"  ({time.monotonic() - started:.0f} s)", flush=True)
    print(f"done in {time.monotonic() - begun:.0f} s", flush=True)


if __name__ == "__main__":
    main()
