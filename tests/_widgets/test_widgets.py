"""The plugin as users meet it: real viewers, docked widgets, clicks, real files."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import napari
import nibabel as nib
import numpy as np
import pytest

from napari_unetquant._widgets import _session
from napari_unetquant.jobs import model_name
from napari_unetquant.metrics import segmentation_scores
from napari_unetquant.modelio import load_model

PLUGIN = "napari-unetquant"
WIDGETS = ["Train quantized U-Net", "Segment", "Batch segment", "Dice readout", "Bit-width sweep"]
TIMEOUT = 120_000


def _viewer_with_sample(make_napari_viewer: Callable[..., Any]) -> Any:
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "em_phantom")
    return viewer


def _dock(viewer: Any, name: str) -> Any:
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def _train(widget: Any, qtbot: Any, viewer: Any, quantizer: str, steps: int) -> None:
    widget.image.value = viewer.layers["EM phantom"]
    widget.ground_truth.value = viewer.layers["EM phantom membranes"]
    widget.network_width.value, widget.steps.value = 4, steps
    widget.quantizer.value = quantizer
    widget.start.clicked()
    qtbot.waitUntil(lambda: widget.start.enabled, timeout=TIMEOUT)


DOCKED = {
    "Train quantized U-Net": "TrainWidget",
    "Segment": "SegmentWidget",
    "Batch segment": "BatchWidget",
    "Dice readout": "DiceWidget",
    "Bit-width sweep": "SweepWidget",
}


@pytest.mark.parametrize("name", WIDGETS)
def test_each_widget_docks(make_napari_viewer: Callable[..., Any], qtbot: Any, name: str) -> None:
    viewer = make_napari_viewer(show=True)
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    assert type(widget).__name__ == DOCKED[name]
    assert dock.widget().isAncestorOf(widget.native) or dock.widget() is widget.native
    qtbot.waitUntil(lambda: dock.isVisible() and widget.native.isVisible(), timeout=10_000)
    assert viewer.window._qt_window.dockWidgetArea(dock) != 0  # docked, not floating loose


@pytest.mark.slow
def test_sample_train_segment_and_dice_end_to_end(
    make_napari_viewer: Callable[..., Any], qtbot: Any, errors: list[str], tmp_path: Path
) -> None:
    viewer = _viewer_with_sample(make_napari_viewer)
    train = _dock(viewer, "Train quantized U-Net")
    _train(train, qtbot, viewer, "float", steps=6)
    _train(train, qtbot, viewer, "fixed", steps=4)  # W4A6, fine-tuned from the FP model
    assert errors == []
    names = list(_session.models())
    assert [n.split(" ")[0] for n in names] == ["FP", "W4A6"]
    assert train.last_model.info["steps"] == 4 and "W4A6" in train.status.value
    for packed in (False, True):
        train.packed.value = packed
        train.save_path.value = tmp_path / f"w4a6-{packed}"
        train.save.clicked()
    plain, small = tmp_path / "w4a6-False.safetensors", tmp_path / "w4a6-True.safetensors"
    assert (load_model(plain).layout, load_model(small).layout) == ("state_dict", "packed")
    assert small.stat().st_size < plain.stat().st_size

    segment = _dock(viewer, "Segment")
    segment.model.reset_choices()
    segment.image.value = viewer.layers["EM phantom"]
    segment.model.value = names[1]
    segment.run_button.clicked()
    qtbot.waitUntil(lambda: "EM phantom W4A6" in viewer.layers, timeout=TIMEOUT)
    prediction = viewer.layers["EM phantom W4A6"]
    assert isinstance(prediction, napari.layers.Labels)
    assert prediction.data.shape == (4, 256, 256)
    assert tuple(prediction.scale) == tuple(viewer.layers["EM phantom"].scale)
    assert "4-bit weights" in segment.info.value
    assert "engine: " in segment.status.value  # which engine ran (auto: measured), and why
    made_by = prediction.metadata["napari_unetquant_prediction"]
    assert made_by == {"model": "W4A6", "foreground_value": None}
    truth_colour = viewer.layers["EM phantom membranes"].colormap.map([1])
    assert not np.allclose(prediction.colormap.map([1]), truth_colour)  # told apart

    segment.integer.value = True  # the same model on integer arithmetic
    segment.run_button.clicked()
    qtbot.waitUntil(lambda: "EM phantom W4A6 integer" in viewer.layers, timeout=TIMEOUT)
    integer = viewer.layers["EM phantom W4A6 integer"].data
    assert np.mean(integer == prediction.data) >= 0.9999
    segment.model.value = names[0]  # FP: nothing to run on integers, a notification says so
    segment.run_button.clicked()
    qtbot.waitUntil(lambda: bool(errors) and segment.run_button.enabled, timeout=TIMEOUT)
    assert "no quantized layer" in errors.pop()
    segment.integer.value = False

    dice = _dock(viewer, "Dice readout")
    dice.truth.value = viewer.layers["EM phantom membranes"]
    dice.predictions.reset_choices()
    dice.predictions.value = [prediction]
    dice.compute.clicked()
    expected = segmentation_scores(prediction.data != 0, viewer.layers["EM phantom membranes"].data)
    assert f"mean Dice {expected.dice_mean:.4f}" in dice.summary.value
    assert dice.summary.value.startswith("scoring non-zero ground truth")
    assert dice.table.shape == (4, 2)
    dice.go_to_slice(2)
    assert viewer.dims.current_step[0] == 2
    dice.foreground_value.value = "0"  # the other class, as ISBI's membranes (label 0)
    dice.compute.clicked()
    inverted = segmentation_scores(
        prediction.data != 0, viewer.layers["EM phantom membranes"].data == 0
    )
    assert f"mean Dice {inverted.dice_mean:.4f}" in dice.summary.value
    dice.foreground_value.value = "membrane"
    dice.compute.clicked()
    assert errors == [
        "foreground value 'membrane' is not a whole number; leave it empty for non-zero, or "
        "give several values separated by commas (1, 2) for several classes"
    ]


@pytest.mark.slow
def test_stop_ends_training_and_keeps_the_best_model(
    make_napari_viewer: Callable[..., Any], qtbot: Any
) -> None:
    viewer = _viewer_with_sample(make_napari_viewer)
    train = _dock(viewer, "Train quantized U-Net")
    train.image.value = viewer.layers["EM phantom"]
    train.ground_truth.value = viewer.layers["EM phantom membranes"]
    train.network_width.value, train.steps.value, train.quantizer.value = 4, 2000, "float"
    train.start.clicked()
    qtbot.waitUntil(lambda: train.progress.value >= 3, timeout=TIMEOUT)
    train.stop.clicked()
    qtbot.waitUntil(lambda: train.start.enabled, timeout=TIMEOUT)
    assert train.training.trainer.step < 2000
    assert train.last_model is not None and len(_session.models()) == 1


def test_settings_persist_between_sessions(
    make_napari_viewer: Callable[..., Any], settings_dir: Path
) -> None:
    first = _dock(make_napari_viewer(), "Train quantized U-Net")
    first.quantizer.value, first.weight_bits.value, first.steps.value = "lsq", 3, 77
    first.native.close()
    second = _dock(make_napari_viewer(), "Train quantized U-Net")
    assert (second.quantizer.value, second.weight_bits.value, second.steps.value) == ("lsq", 3, 77)
    assert (settings_dir / "train.ini").exists()


def test_errors_are_notifications(
    make_napari_viewer: Callable[..., Any], errors: list[str], tmp_path: Path
) -> None:
    viewer = make_napari_viewer()
    train = _dock(viewer, "Train quantized U-Net")
    train.start.clicked()
    assert errors == ["choose an image layer and a ground-truth Labels layer first"]
    viewer.add_image(np.zeros((4, 32, 32), np.float32), name="blank")
    viewer.add_labels(np.zeros((4, 32, 32), np.int32), name="empty")
    train.image.value, train.ground_truth.value = viewer.layers["blank"], viewer.layers["empty"]
    train.start.clicked()
    assert "no foreground" in errors[-1]
    segment = _dock(viewer, "Segment")
    segment.image.value = viewer.layers["blank"]
    segment.model_file.value = tmp_path / "model.pt"
    (tmp_path / "model.pt").write_bytes(b"\x80\x04N.")
    segment.run_button.clicked()
    assert "is a pickle" in errors[-1]
    assert len(viewer.layers) == 2


@pytest.mark.slow
def test_sweep_plots_and_exports_csv(
    make_napari_viewer: Callable[..., Any], qtbot: Any, tmp_path: Path
) -> None:
    viewer = _viewer_with_sample(make_napari_viewer)
    sweep = _dock(viewer, "Bit-width sweep")
    sweep.image.value = viewer.layers["EM phantom"]
    sweep.ground_truth.value = viewer.layers["EM phantom membranes"]
    sweep.settings.value, sweep.network_width.value = "FP, W4A6, ternary", 4
    sweep.fp_steps.value, sweep.quant_steps.value = 4, 2
    sweep.start.clicked()
    qtbot.waitUntil(lambda: sweep.start.enabled and bool(sweep.results), timeout=TIMEOUT)
    assert [r.label for r in sweep.results] == ["FP", "W4A6", "ternary"]
    assert sweep.progress.max == sweep.progress.value == 4 + 2 + 2  # one bar over the sweep
    fp = sweep.results[0].model
    assert fp.info["init"] is None and fp.info["steps"] == 4
    for result in sweep.results[1:]:  # fine-tuned from this sweep's FP model, for 2 steps
        assert result.model.info["init"] == model_name(fp)
        assert result.model.info["steps"] == 2
    assert sweep.results[1].stored_bytes < sweep.results[0].stored_bytes
    assert len(sweep.by_size.series["Dice"]) == 3
    headers = [sweep.table.native.horizontalHeaderItem(i).text() for i in range(7)]
    assert headers[:4] == ["setting", "validation Dice", "bits per weight", "stored KiB"]
    kib = sweep.table.data[1][3]  # W4A6's stored size, in KiB in the table (bytes in the CSV)
    assert kib == round(sweep.results[1].stored_bytes / 1024, 1)
    sweep.csv_path.value = tmp_path / "sweep.csv"
    sweep.export.clicked()
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert [r["setting"] for r in rows] == ["FP", "W4A6", "ternary"]
    assert [r["fine_tuned_from"] for r in rows] == ["", model_name(fp), model_name(fp)]
    assert float(rows[1]["compression"]) > 5


def test_reader_keeps_spacing_and_writer_keeps_the_affine(
    make_napari_viewer: Callable[..., Any], shared_data: Path, tmp_path: Path
) -> None:
    viewer = make_napari_viewer()
    folder = shared_data / "spinal-gm-tiny"
    [image] = viewer.open(folder / "t2s.nii.gz", plugin=PLUGIN)
    [labels] = viewer.open(folder / "t2s_gmseg_manual.nii.gz", plugin=PLUGIN)
    assert isinstance(image, napari.layers.Image) and isinstance(labels, napari.layers.Labels)
    assert image.data.shape == (9, 49, 54)
    assert np.allclose(image.scale, (7.5, 0.5, 0.5), atol=1e-3)
    source = nib.load(folder / "t2s_gmseg_manual.nii.gz")
    out = tmp_path / "saved.nii.gz"
    labels.save(str(out), plugin=PLUGIN)
    written = nib.load(out)
    assert np.allclose(written.affine, source.affine)
    assert np.array_equal(np.asanyarray(written.dataobj), np.asanyarray(source.dataobj))
    [tif] = viewer.open(shared_data / "isbi2012" / "train-labels.tif", plugin=PLUGIN)
    assert isinstance(tif, napari.layers.Labels) and tif.data.shape == (24, 512, 512)


@pytest.mark.slow
def test_batch_segments_files_and_scores_them(
    make_napari_viewer: Callable[..., Any],
    qtbot: Any,
    errors: list[str],
    tmp_path: Path,
    w4a6_model_file: Path,
) -> None:
    import tifffile

    from napari_unetquant.data import em_phantom_stack, read_volume

    model = w4a6_model_file
    images, labels = [], []
    for n in (2, 3):
        stack, truth = em_phantom_stack(n, 40, 48, seed=n)
        images.append(tmp_path / f"vol{n}.tif")
        labels.append(tmp_path / f"vol{n}-labels.tif")
        tifffile.imwrite(images[-1], (stack * 255).astype(np.uint8), photometric="minisblack")
        tifffile.imwrite(labels[-1], truth, photometric="minisblack")

    viewer = make_napari_viewer()
    batch = _dock(viewer, "Batch segment")
    batch.start.clicked()  # nothing chosen yet: a notification, no crash
    assert errors and "output folder" in errors.pop()
    batch.images.value, batch.labels_files.value = images, labels
    batch.model_file.value, batch.out_dir.value = model, tmp_path / "masks"
    batch.open_masks.value = True
    batch.start.clicked()
    qtbot.waitUntil(lambda: batch.start.enabled and len(batch.results) == 2, timeout=TIMEOUT)
    assert errors == []
    with open(tmp_path / "masks" / "segment.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    for image, truth, row in zip(images, labels, rows, strict=True):
        mask = read_volume(tmp_path / "masks" / image.name).array
        expected = segmentation_scores(mask, read_volume(truth).array)
        assert float(row["dice_volume"]) == pytest.approx(expected.dice_volume, abs=5e-5)
        assert np.array_equal(viewer.layers[image.name.split(".")[0]].data, mask)
    assert batch.table.shape == (2, 3) and "2 of 2 volumes done, 0 failed" in batch.status.value


@pytest.mark.slow
def test_segment_streams_a_dask_layer_without_computing_it_whole(
    make_napari_viewer: Callable[..., Any], qtbot: Any, errors: list[str], w4a6_model_file: Path
) -> None:
    import dask.array as da

    from napari_unetquant.data import em_phantom_stack

    model = w4a6_model_file
    stack = em_phantom_stack(20, 48, 40, seed=1)[0]
    lazy = Recorded(da.from_array(stack, chunks=(1, 48, 40)))
    viewer = make_napari_viewer()
    viewer.add_image(stack, name="in memory")
    viewer.add_image(lazy, name="lazy")
    segment = _dock(viewer, "Segment")
    segment.model.value, segment.model_file.value = "model file...", model
    for name in ("in memory", "lazy"):
        lazy.requests.clear()
        segment.image.value = viewer.layers[name]
        segment.run_button.clicked()
        qtbot.waitUntil(lambda n=name: f"{n} W4A6" in viewer.layers, timeout=TIMEOUT)
    assert errors == []
    assert np.array_equal(viewer.layers["lazy W4A6"].data, viewer.layers["in memory W4A6"].data)
    runs = [key for key in lazy.requests if isinstance(key, slice)]  # the segmentation's reads
    assert runs and "whole" not in lazy.requests
    assert max(key.stop - key.start for key in runs) <= 8  # a few slices at a time


class Recorded:
    """An array-like (as napari layers take) that records what is asked of it."""

    def __init__(self, array: Any) -> None:
        self.array, self.requests = array, []
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, key: Any) -> Any:
        self.requests.append(key)
        return self.array[key]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        self.requests.append("whole")
        return np.asarray(self.array, dtype=dtype)
