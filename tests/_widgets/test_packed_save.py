"""The Train dock saves a quantized model small by default (packed), a full-precision one as
float weights, says what it wrote and its size, and fine-tunes from a packed FP model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from napari_unetquant._widgets import _session, _train
from napari_unetquant.jobs import model_name
from napari_unetquant.modelio import load_model, read_metadata, save_model

PLUGIN = "napari-unetquant"
TIMEOUT = 60_000


@pytest.fixture
def infos(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    shown: list[str] = []
    monkeypatch.setattr(_train, "show_info", shown.append)
    return shown


def _dock(viewer: Any) -> Any:
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Train quantized U-Net")
    rng = np.random.default_rng(0)
    labels = np.zeros((4, 32, 32), np.int32)
    labels[:, 8:16, 8:16] = 1
    widget.image.value = viewer.add_image(rng.random((4, 32, 32)).astype(np.float32), name="im")
    widget.ground_truth.value = viewer.add_labels(labels, name="truth")
    widget.network_width.value, widget.steps.value = 4, 2
    return widget


def _train_once(widget: Any, qtbot: Any, quantizer: str) -> None:
    widget.quantizer.value = quantizer
    widget.last_model = None
    widget.start.clicked()
    qtbot.waitUntil(lambda: widget.start.enabled and widget.last_model is not None, timeout=TIMEOUT)


def _save(widget: Any, path: Path, infos: list[str]) -> str:
    widget.save_path.value = path
    widget.save.clicked()
    return infos[-1]


def test_save_writes_packed_for_quantized_weights_and_float_for_full_precision(
    make_napari_viewer: Callable[..., Any],
    qtbot: Any,
    errors: list[str],
    infos: list[str],
    tmp_path: Path,
) -> None:
    train = _dock(make_napari_viewer())
    _train_once(train, qtbot, "fixed")  # W4A6 (from scratch: no FP model in the session)
    assert train.packed.enabled and train.packed.value  # packed by default
    message = _save(train, tmp_path / "w4a6", infos)
    small = tmp_path / "w4a6.safetensors"
    assert read_metadata(small)["layout"] == "packed"
    size = small.stat().st_size / 1024
    assert (
        message
        == f"saved {small} (packed W4A6 model: weight codes at their bit width; {size:.1f} KiB)"
    )

    train.packed.value = False  # the user may still ask for the float file
    _save(train, tmp_path / "w4a6-float", infos)
    large = tmp_path / "w4a6-float.safetensors"
    assert read_metadata(large)["layout"] == "state_dict"
    assert small.stat().st_size < large.stat().st_size / 2

    _train_once(train, qtbot, "float")
    assert not train.packed.enabled and not train.packed.value  # nothing to pack
    message = _save(train, tmp_path / "fp", infos)
    assert read_metadata(tmp_path / "fp.safetensors")["layout"] == "state_dict"
    assert message.startswith(f"saved {tmp_path / 'fp.safetensors'} (float FP model: ")
    assert message.endswith(" KiB)")

    _train_once(train, qtbot, "fixed")
    assert train.packed.enabled and train.packed.value  # quantized again: packed again
    assert errors == []


def test_fine_tuning_starts_from_a_packed_fp_model_of_the_session(
    make_napari_viewer: Callable[..., Any],
    qtbot: Any,
    errors: list[str],
    infos: list[str],
    tmp_path: Path,
) -> None:
    train = _dock(make_napari_viewer())
    _train_once(train, qtbot, "float")
    path = tmp_path / "fp-packed.safetensors"
    save_model(path, train.last_model, packed=True)  # e.g. exported, then opened from a file
    packed_fp = load_model(path)
    assert packed_fp.layout == "packed"
    _session.add_model("FP (from a packed file)", packed_fp)
    train.fine_tune.value = True
    _train_once(train, qtbot, "fixed")
    assert errors == []
    assert train.last_model.info["init"] == model_name(packed_fp)
    assert train.last_model.quant.label == "W4A6"
