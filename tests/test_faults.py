"""Faults: a killed or interrupted training run leaves whole files and resumes where it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from napari_unetquant.config import TrainConfig, UNetConfig
from napari_unetquant.jobs import TrainJob, train_model
from napari_unetquant.modelio import load_model
from napari_unetquant.train import StepEvent, checkpoint_path

SMALL = UNetConfig(base_width=4, depth=2)
FAST = ["--crop", "32", "--batch-size", "2", "--base-width", "4", "--depth", "2"]


def _job(files: tuple[Path, Path], out: Path, **changes: object) -> TrainJob:
    image, labels = files
    train = TrainConfig(steps=6, batch_size=2, crop=32, validate_every=6, device="cpu")
    fields: dict[str, object] = {"unet": SMALL, "train": train, **changes}
    return TrainJob((str(image),), (str(labels),), str(out), **fields)  # type: ignore[arg-type]


def _checkpoint_step(path: Path) -> int:
    with safe_open(str(path), framework="pt") as handle:
        return int(json.loads((handle.metadata() or {})["state"])["step"])


def test_the_checkpoint_follows_the_clock_between_validations(
    phantom_files: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "m.safetensors"
    for event in train_model(_job(phantom_files, out, checkpoint_seconds=0)):
        if isinstance(event, StepEvent) and event.step < event.steps:  # no validation yet
            assert _checkpoint_step(checkpoint_path(out)) == event.step
    assert not checkpoint_path(out).exists() and load_model(out).info["steps"] == 6


def test_stopping_between_steps_then_resuming_equals_training_through(
    phantom_files: tuple[Path, Path], tmp_path: Path
) -> None:
    through, stopped = tmp_path / "through.safetensors", tmp_path / "stopped.safetensors"
    for _ in train_model(_job(phantom_files, through, train=_validating_every(2))):
        pass
    events = train_model(_job(phantom_files, stopped, train=_validating_every(2)))
    for event in events:
        if event.step == 3:
            break  # as the CLI's Ctrl-C and any caller that stops iterating do
    events.close()
    assert _checkpoint_step(checkpoint_path(stopped)) == 3
    for _ in train_model(_job(phantom_files, stopped, train=_validating_every(2), resume=True)):
        pass
    a, b = load_model(through).model.state_dict(), load_model(stopped).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _validating_every(steps: int) -> TrainConfig:
    return TrainConfig(steps=6, batch_size=2, crop=32, validate_every=steps, device="cpu")


def _start(files: tuple[Path, Path], out: Path, *extra: str) -> subprocess.Popen[str]:
    image, labels = files
    command = [sys.executable, "-m", "napari_unetquant", "train", "--images", str(image)]
    command += ["--labels", str(labels), "--out", str(out), "--device", "cpu", *FAST, *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, process: subprocess.Popen[str], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


RUN = ["--steps", "120", "--validate-every", "20", "--checkpoint-seconds", "0"]


@pytest.mark.slow
def test_kill_9_leaves_whole_files_and_resume_finishes(
    phantom_files: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "m.safetensors"
    process = _start(phantom_files, out, *RUN)
    _wait_for(out, process)  # the first validation saved a model; checkpoints every step
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert load_model(out).info["steps"] >= 20  # whole, whatever the moment of the kill
    step = _checkpoint_step(checkpoint_path(out))
    assert 20 <= step < 120
    resumed = _start(phantom_files, out, *RUN, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert f"resuming after step {step}" in err  # from the checkpoint, not from scratch
    assert "step 120/120  validation" in err and load_model(out).info["steps"] <= 120
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [out.name, *(p.name for p in phantom_files)]
    )  # no checkpoint and no temporary file left behind


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="signals as on Linux and macOS")
def test_ctrl_c_stops_after_the_step_and_resume_finishes(
    phantom_files: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "m.safetensors"
    process = _start(phantom_files, out, *RUN[:-2], "--checkpoint-seconds", "3600")
    _wait_for(out, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "stopping after this step" in err and "interrupted" in err and "Traceback" not in err
    step = _checkpoint_step(checkpoint_path(out))  # written at the step it stopped at
    assert f"interrupted at step {step};" in err
    resumed = _start(phantom_files, out, *RUN[:-2], "--checkpoint-seconds", "3600", "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and f"resuming after step {step}" in err
    assert "step 120/120  validation" in err and not checkpoint_path(out).exists()


def test_a_diverging_run_stops_with_a_message_and_keeps_the_best_model(
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from napari_unetquant.cli import main
    from napari_unetquant.train import trainer

    calls = {"n": 0}
    real_loss = trainer.bce_dice_loss

    def blows_up_at_step_5(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = real_loss(logits, target)
        return loss * float("nan") if calls["n"] >= 5 else loss

    monkeypatch.setattr(trainer, "bce_dice_loss", blows_up_at_step_5)
    image, labels = phantom_files
    out = tmp_path / "m.safetensors"
    argv = ["train", "--images", str(image), "--labels", str(labels), "--out", str(out)]
    code = main([*argv, *FAST, "--steps", "20", "--validate-every", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "training diverged at step 5" in err and "lower the learning rate" in err
    assert "the best model (step" in err and "Traceback" not in err
    assert load_model(out).info["best_step"] in (2, 4)  # kept, whole, from before the NaN
