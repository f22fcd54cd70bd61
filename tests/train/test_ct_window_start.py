"""Training a layer's image with a CT window (the Train dock's path): the window reaches the
run's preprocessing, and a fine-tune keeps the intensity mapping of its model."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unetquant.config import PreprocessConfig, QuantConfig, TrainConfig, UNetConfig
from napari_unetquant.data.io import Volume
from napari_unetquant.errors import SettingError
from napari_unetquant.jobs import start_training
from napari_unetquant.jobs.training import check_fine_tune_window
from napari_unetquant.model import build_unet
from napari_unetquant.modelio import SegmentationModel

UNET = UNetConfig(base_width=4, depth=2)
TRAIN = TrainConfig(steps=1, batch_size=1, crop=32, device="cpu")


def _data() -> tuple[Volume, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.uniform(-1024, 1000, (4, 32, 32)).astype(np.float32)
    return Volume(image, source="ct"), (image > 0).astype(np.uint8)


def _fp(ct_window: tuple[float, float] | None) -> SegmentationModel:
    quant = QuantConfig.from_label("FP")
    model = build_unet(UNET, quant).eval()
    return SegmentationModel(model, UNET, quant, PreprocessConfig(ct_window=ct_window))


def test_a_fresh_run_normalises_with_the_window_it_is_given() -> None:
    image, labels = _data()
    fp = QuantConfig.from_label("FP")
    assert start_training(image, labels, fp, TRAIN, UNET).preprocess.ct_window is None
    run = start_training(image, labels, fp, TRAIN, UNET, None, (40.0, 400.0))
    assert run.preprocess.ct_window == (40.0, 400.0)
    assert run.best().preprocess.ct_window == (40.0, 400.0)  # and the model keeps it


def test_a_fine_tune_keeps_its_models_window_and_refuses_another() -> None:
    image, labels = _data()
    w4a6, init = QuantConfig.from_bits(4, 6), _fp((-600.0, 1500.0))
    kept = start_training(image, labels, w4a6, TRAIN, None, init)  # None: the model's
    assert kept.preprocess.ct_window == (-600.0, 1500.0)
    same = start_training(image, labels, w4a6, TRAIN, None, init, (-600.0, 1500.0))
    assert same.preprocess.ct_window == (-600.0, 1500.0)
    with pytest.raises(SettingError, match="CT window -600/1500 HU, not CT window 40/400") as e:
        start_training(image, labels, w4a6, TRAIN, None, init, (40.0, 400.0))
    assert e.value.settings == ("ct_window", "init")


def test_the_docks_check_refuses_the_z_score_for_a_ct_model_and_the_reverse() -> None:
    check_fine_tune_window(None, (40.0, 400.0))  # nothing to fine-tune: any choice
    check_fine_tune_window(_fp((40.0, 400.0)), (40.0, 400.0))
    with pytest.raises(SettingError, match="not z-score per slice"):
        check_fine_tune_window(_fp((40.0, 400.0)), None)
    with pytest.raises(SettingError, match="z-score per slice, not CT window"):
        check_fine_tune_window(_fp(None), (40.0, 400.0))
