"""The trainer: events, best model, stopping, divergence, checkpoints, data preparation."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_unetquant.config import PreprocessConfig, QuantConfig, TrainConfig, UNetConfig
from napari_unetquant.data import Volume, em_phantom_stack, zscore
from napari_unetquant.infer.accumulator_grid import int8_layout, integer_layers, off_grid
from napari_unetquant.infer.integer_ops import ActFormat
from napari_unetquant.model import build_unet
from napari_unetquant.train import (
    LabelledVolume,
    SliceSet,
    StepEvent,
    Trainer,
    TrainingDiverged,
    ValidationEvent,
    load_checkpoint,
    median_spacing,
    read_pairs,
    save_checkpoint,
    slice_set,
    split_validation,
)

SMALL = UNetConfig(base_width=4, depth=2)


def _slices(count: int, seed: int) -> SliceSet:
    images, masks = em_phantom_stack(count, 48, 48, seed=seed)
    return SliceSet.from_stacks(np.stack([zscore(s) for s in images]), masks)


def _trainer(steps: int = 6, **kwargs: object) -> Trainer:
    config = TrainConfig(steps=steps, batch_size=2, crop=32, validate_every=3, **kwargs)  # type: ignore[arg-type]
    return Trainer(
        build_unet(SMALL, QuantConfig.from_bits(4, 6)), _slices(2, 1), _slices(1, 2), config
    )


def test_events_in_order_with_validation_and_best_model() -> None:
    trainer = _trainer()
    events = list(trainer.run())
    steps = [e.step for e in events if isinstance(e, StepEvent)]
    validations = [e for e in events if isinstance(e, ValidationEvent)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [v.step for v in validations] == [3, 6]
    assert validations[0].improved and validations[0].best_dice == validations[0].dice
    best = max(validations, key=lambda v: v.dice)
    assert trainer.best_step == best.step and trainer.best_dice == best.dice
    assert all(isinstance(e.eta_seconds, float) for e in events if isinstance(e, StepEvent))


def test_best_model_holds_the_best_weights_not_the_last() -> None:
    trainer = _trainer()
    list(trainer.run())
    trainer.best_state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    marker = next(iter(trainer.best_state))
    if trainer.best_state[marker].is_floating_point():
        trainer.best_state[marker].fill_(0.123)
    best = trainer.best_model()
    assert not best.training
    assert torch.equal(best.state_dict()[marker], trainer.best_state[marker])


def test_best_model_puts_integer_biases_on_the_int8_accumulator_grid() -> None:
    trainer = _trainer()
    list(trainer.run())
    trained = copy.deepcopy(trainer.model).eval()
    trained.load_state_dict(trainer.best_state or trainer.model.state_dict())
    assert off_grid(trained) > 0.01  # training leaves biases anywhere
    best = trainer.best_model()
    assert off_grid(best) < 1e-3
    layers, before = integer_layers(best), integer_layers(trained)
    moved = 0
    for name, (layer, _) in layers.items():
        fmt = ActFormat.of(layer.input_quantizer, name)
        new, old = (int8_layout(name, *pair[name], fmt) for pair in (layers, before))
        if new is None or old is None:
            assert torch.equal(layer.bias, before[name][0].bias)  # float layers stay as trained
            continue
        # by at most half an accumulator unit, a hundredth of an activation step or less
        shift = np.abs(new.folded_bias - old.folded_bias) / new.accumulator_step
        assert shift.max() <= 0.5 + 1e-3
        moved += 1
    assert moved >= 4


def test_stopping_between_steps_keeps_the_best_so_far() -> None:
    trainer = _trainer(steps=50)
    for event in trainer.run():
        if isinstance(event, ValidationEvent):
            break  # the widget's Stop, Ctrl-C in the CLI
    assert trainer.step == 3 and trainer.best_state is not None


def test_divergence_stops_with_a_clear_message() -> None:
    trainer = _trainer()
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        list(trainer.run())


def test_checkpoint_restores_the_whole_training_state(tmp_path: Path) -> None:
    trainer = _trainer(steps=10)
    for event in trainer.run():
        if isinstance(event, ValidationEvent) and event.step == 6:
            break
    save_checkpoint(tmp_path / "ckpt", trainer, {"run": 1})
    resumed = _trainer(steps=10)
    load_checkpoint(tmp_path / "ckpt", resumed, {"run": 1})
    assert (resumed.step, resumed.best_step, resumed.best_dice) == (
        trainer.step,
        trainer.best_step,
        trainer.best_dice,
    )
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value)
    original, restored = trainer.optimizer.state_dict(), resumed.optimizer.state_dict()
    for index, state in original["state"].items():
        assert torch.equal(restored["state"][index]["exp_avg"], state["exp_avg"])
    assert resumed.schedule.last_epoch == trainer.schedule.last_epoch == 6
    assert [e.step for e in resumed.run() if isinstance(e, StepEvent)] == [7, 8, 9, 10]
    with pytest.raises(ValueError, match="other settings"):
        load_checkpoint(tmp_path / "ckpt", _trainer(steps=10), {"run": 2})


def test_read_pairs_checks_what_users_get_wrong(phantom_files: tuple[Path, Path]) -> None:
    image, labels = phantom_files
    pairs = read_pairs([image], [labels])
    assert pairs[0].mask.shape == (3, 64, 64) and set(np.unique(pairs[0].mask)) == {0, 1}
    with pytest.raises(ValueError, match="1 image path\\(s\\) but 2 label path\\(s\\)"):
        read_pairs([image], [labels, labels])
    with pytest.raises(ValueError, match="labels contain no foreground \\(value 9\\)"):
        read_pairs([image], [labels], foreground_value=9)


def test_shape_mismatch_between_image_and_labels(
    shared_data: Path, phantom_files: tuple[Path, Path]
) -> None:
    with pytest.raises(ValueError, match="labels must be on the image's grid"):
        read_pairs([phantom_files[0]], [shared_data / "isbi2012" / "train-labels.tif"])


def _pair(slices: int, spacing: tuple[float, float] | None = None) -> LabelledVolume:
    return LabelledVolume(
        Volume(np.zeros((slices, 8, 8)), spacing), np.ones((slices, 8, 8), np.uint8)
    )


def test_validation_split_rules() -> None:
    train, validation = split_validation([_pair(20)])
    assert [p.mask.shape[0] for p in train] == [17] and [p.mask.shape[0] for p in validation] == [3]
    train, validation = split_validation([_pair(5), _pair(6), _pair(7)])
    assert len(train) == 2 and validation[0].mask.shape[0] == 7
    train, validation = split_validation([_pair(1)])
    assert train[0].mask.shape[0] == 1 and validation == []


def test_median_spacing_and_slice_sets() -> None:
    pairs = [_pair(2, (0.5, 0.5)), _pair(2, (1.0, 1.0)), _pair(2, (0.6, 0.7))]
    assert median_spacing(pairs) == (0.6, 0.7)
    assert median_spacing([_pair(2), _pair(2, (1.0, 1.0))]) is None
    slices = slice_set(pairs[:2], PreprocessConfig(spacing=(0.5, 0.5)))
    assert [s.shape for s in slices.images] == [(8, 8), (8, 8), (16, 16), (16, 16)]


def test_slice_set_errors() -> None:
    with pytest.raises(ValueError, match="no slices to train on"):
        SliceSet((), ())
    with pytest.raises(ValueError, match="must be 2D and of the same shape"):
        SliceSet((np.zeros((4, 4)),), (np.zeros((4, 5)),))
