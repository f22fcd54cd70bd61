"""A size budget in the docks: the Train dock fine-tunes the session's FP model into a file of
at most so many KiB; the sweep runs budgets beside uniform settings on the same Dice-against-KiB
plot, with the Pareto front over all of them."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from napari_unetquant.modelio import packed_file_bytes

PLUGIN = "napari-unetquant"
TIMEOUT = 120_000
BUDGET_KIB = 19.0  # base width 4: between the uniform W3A6 (17.3 KiB) and W8A6 (28.8) files


def _dock(viewer: Any, name: str) -> Any:
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def _inputs(widget: Any, viewer: Any) -> None:
    widget.image.value = viewer.layers["EM phantom"]
    widget.ground_truth.value = viewer.layers["EM phantom membranes"]
    widget.network_width.value = 4


def test_the_train_dock_fits_a_budget(
    make_napari_viewer: Callable[..., Any], qtbot: Any, errors: list[str]
) -> None:
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "em_phantom")
    train = _dock(viewer, "Train quantized U-Net")
    _inputs(train, viewer)
    train.steps.value = 2
    train.size_budget.value = BUDGET_KIB
    assert not train.weight_bits.enabled and "fit 19 KiB" in train.format.value
    train.start.clicked()  # no FP model in the session yet: refused, with the controls named
    assert "fine-tunes this session's full-precision model" in errors[-1]
    assert "(see: size budget, fine-tune from this session's FP model)" in errors[-1]

    train.size_budget.value = 0
    assert train.weight_bits.enabled
    train.quantizer.value = "float"
    train.start.clicked()
    qtbot.waitUntil(lambda: train.start.enabled and train.last_model is not None, timeout=TIMEOUT)
    fp = train.last_model
    train.quantizer.value, train.act_bits.value = "fixed", 6
    train.size_budget.value = BUDGET_KIB
    train.start.clicked()
    qtbot.waitUntil(lambda: train.start.enabled and train.last_model is not fp, timeout=TIMEOUT)
    model = train.last_model
    assert model.info["size_budget"] == round(BUDGET_KIB * 1024)
    assert model.info["label"].endswith("A6-mixed") and model.info["weight_bits_per_layer"]
    assert packed_file_bytes(model) <= BUDGET_KIB * 1024


@pytest.mark.slow
def test_the_sweep_plots_budgets_with_the_uniform_settings(
    make_napari_viewer: Callable[..., Any], qtbot: Any, tmp_path: Path, errors: list[str]
) -> None:
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "em_phantom")
    sweep = _dock(viewer, "Bit-width sweep")
    _inputs(sweep, viewer)
    sweep.settings.value, sweep.budgets.value = "FP, W3A6", "0, 19"
    sweep.start.clicked()
    assert "give positive sizes in KiB" in errors[-1] and not sweep.results

    sweep.budgets.value = f"{BUDGET_KIB:g}"
    sweep.fp_steps.value, sweep.quant_steps.value = 3, 2
    sweep.start.clicked()
    qtbot.waitUntil(lambda: sweep.start.enabled and len(sweep.results) == 3, timeout=TIMEOUT)
    fp, uniform, budgeted = sweep.results
    assert budgeted.label.endswith(f"A6-mixed in {BUDGET_KIB:.1f} KiB")
    assert budgeted.size_budget == round(BUDGET_KIB * 1024) >= budgeted.packed_bytes
    assert uniform.packed_bytes < budgeted.packed_bytes < fp.packed_bytes
    assert sweep.progress.max == sweep.progress.value == 3 + 2 + 2
    assert len(sweep.by_size.series["Dice"]) == 2 and len(sweep.by_size.series["size budget"]) == 1
    points = [p for values in sweep.by_size.series.values() for p in values]
    undominated = [
        p for p in points if not any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in points)
    ]
    assert sorted(sweep.by_size.pareto_front()) == sorted(undominated)  # over both series
    headers = [sweep.table.native.horizontalHeaderItem(i).text() for i in range(9)]
    assert headers[6:8] == ["packed file KiB", "budget KiB"]
    sweep.csv_path.value = tmp_path / "sweep.csv"
    sweep.export.clicked()
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert [r["size_budget_bytes"] for r in rows] == ["", "", str(round(BUDGET_KIB * 1024))]
    assert int(rows[2]["packed_file_bytes"]) <= round(BUDGET_KIB * 1024)
