"""Data-parallel training under torchrun: two CPU processes (gloo) train as one process does.

Each torchrun launch costs a few seconds (torch is imported by the launcher and each process),
so the launches are few and each checks much.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from napari_unetquant.cli import main
from napari_unetquant.config import TrainConfig, UNetConfig
from napari_unetquant.jobs import TrainJob, train_model
from napari_unetquant.modelio import load_model
from napari_unetquant.train import ValidationEvent
from napari_unetquant.train.distributed import Torchrun, check_batch_size, training_device

WORKER = Path(__file__).with_name("_data_parallel_worker.py")
SMALL = ["--crop", "32", "--base-width", "4", "--depth", "2", "--device", "cpu"]
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` with this venv's torch."""
    environment = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return subprocess.run(
        [*command, "--nproc_per_node", "2", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_data_parallel_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every setting of the worker trained by two processes (one launch for all of them)."""
    out = tmp_path_factory.mktemp("data-parallel")
    result = _torchrun(str(WORKER), str(out), cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _two_process(out: Path, setting: str) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    path = out / f"{setting}.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        summary = json.loads((handle.metadata() or {})["summary"])
    return load_file(str(path)), summary


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["fp", "w4a6-fixed", "w4a6-fixed-mse", "w4a4-lsq"])
def test_two_processes_train_as_one_does(two_process_runs: Path, setting: str) -> None:
    """Same seed, same global batch: one process and two agree.

    Tolerances: (1) the first step's gradients (what the update is made of) within 1e-4 of
    each tensor's largest gradient: float32 sums over the batch and the per-channel statistics
    are added in another order (two shares, then all-reduced), which moves them by ~1e-6 of
    that (LSQ steps, which sum rounding residuals of every value, by ~3e-5); a real mistake
    (statistics of half the batch, a share missing) moves them by percents. (2) BatchNorm and
    quantizer state after the first step: integers exactly, floats to 1e-5 relative. (3)
    after three steps, the weights differ by under 2% of how far training moved them (RMS) and
    no weight by more than one learning rate: Adam divides each gradient element by its own
    size, so an element whose gradient is ~1e-8 (Adam's eps) takes a different fraction of a
    learning-rate step for a rounding-level difference. (4) the loss at every step to 1e-4,
    and the same validation Dice (to 1e-9) and best step.
    """
    worker = _worker()
    one, one_summary = worker.train(setting)
    two, two_summary = _two_process(two_process_runs, setting)
    parameters = [k.removeprefix("grad.") for k in one if k.startswith("grad.")]
    for name in parameters:
        gradient = one[f"grad.{name}"]
        scale = float(gradient.abs().max())
        torch.testing.assert_close(two[f"grad.{name}"], gradient, rtol=0, atol=1e-4 * scale)
    for key in (k for k in one if k.startswith("first.") and k[6:] not in parameters):
        if one[key].is_floating_point():
            torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(two[key], one[key]), key
    moved = torch.cat([(one[f"last.{n}"] - one[f"init.{n}"]).flatten() for n in parameters])
    apart = torch.cat([(two[f"last.{n}"] - one[f"last.{n}"]).flatten() for n in parameters])
    assert float(apart.norm()) < 0.02 * float(moved.norm())
    assert float(apart.abs().max()) < worker.CONFIG.learning_rate
    assert one_summary["losses"] == pytest.approx(two_summary["losses"], abs=1e-4)
    assert one_summary["best_step"] == two_summary["best_step"]
    assert one_summary["dice"] == pytest.approx(two_summary["dice"], abs=1e-9)


@pytest.mark.slow
def test_ternary_statistics_of_the_whole_batch(two_process_runs: Path) -> None:
    """Ternary activations: the running threshold and scale and BatchNorm's statistics after
    the first step, and its loss, are the single process's. (Their gradients are not compared:
    on ternary values max pooling meets exact ties, and which pixel of a tie gets the gradient
    turns on the last bit, in float64 too.)"""
    one, one_summary = _worker().train("ternary")
    two, two_summary = _two_process(two_process_runs, "ternary")
    statistics = [k for k in one if k.startswith("first.") and ("running" in k or ".value" in k)]
    assert any("threshold" in k for k in statistics)
    for key in statistics:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-7)
    assert two_summary["losses"][0] == pytest.approx(one_summary["losses"][0], abs=1e-6)


@pytest.mark.slow
def test_a_nan_on_one_process_stops_every_process(two_process_runs: Path) -> None:
    for rank in (0, 1):
        message = (two_process_runs / f"diverged-rank{rank}.txt").read_text()
        assert "training diverged at step 1" in message


@pytest.mark.slow
def test_torchrun_cli_trains_once_and_only_the_first_process_writes(
    shared_data: Path, tmp_path: Path
) -> None:
    """The README's torchrun command, as written, on the real ISBI files it names (linked into
    an empty folder), made short by options appended to it."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    match = re.search(r"^torchrun --standalone .*?(?<!\\)$", readme, flags=re.M | re.S)
    assert match, "the README shows a single-machine torchrun command"
    words = shlex.split(match.group(0).replace("\\\n", " "))
    assert words[:4] == ["torchrun", "--standalone", "--nproc_per_node", "2"]
    for name in ("train-volume.tif", "train-labels.tif"):
        (tmp_path / name).symlink_to(shared_data / "isbi2012" / name)
    fast = ["--steps", "4", "--batch-size", "4", "--validate-every", "2", *SMALL]
    result = _torchrun(*words[4:], *fast, cwd=tmp_path)
    out = tmp_path / "fp.safetensors"
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved ") == 1
    assert result.stderr.count("step 2/4  validation Dice") == 1
    assert result.stderr.count("step 4/4  validation Dice") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fp.safetensors",
        "train-labels.tif",
        "train-volume.tif",
    ]
    bundle = load_model(out)
    assert bundle.info["best_step"] in (2, 4) and bundle.unet.base_width == 4


@pytest.mark.slow
def test_torchrun_resumes_a_single_process_run(
    phantom_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """A run stopped in one process continues in two (the batches are the same): the first
    process reads the checkpoint and hands it to the other."""
    image, labels = phantom_files
    out = tmp_path / "m.safetensors"
    job = TrainJob(
        images=(str(image),),
        labels=(str(labels),),
        out=str(out),
        unet=UNetConfig(base_width=4, depth=2),
        train=TrainConfig(steps=6, batch_size=2, crop=32, validate_every=2, device="cpu"),
    )
    for event in train_model(job):  # "crash" after the validation at step 2
        if isinstance(event, ValidationEvent) and event.step == 2:
            break
    reference = tmp_path / "reference"
    reference.mkdir()
    for path in (out, Path(f"{out}.resume")):
        (reference / path.name).write_bytes(path.read_bytes())
    options = ["--steps", "6", "--batch-size", "2", "--validate-every", "2", *SMALL]
    files = ["--images", str(image), "--labels", str(labels)]
    result = _torchrun("-m", "napari_unetquant", "train", *files, "--out", str(out), *options,
                       "--resume", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2/6" not in result.stderr and result.stderr.count("step 6/6") == 1
    assert not Path(f"{out}.resume").exists()
    one_process = TrainJob(**{**job.__dict__, "out": str(reference / out.name), "resume": True})
    list(train_model(one_process))
    two, one = load_model(out), load_model(reference / out.name)
    assert two.info["best_step"] == one.info["best_step"]
    assert two.info["validation_dice"] == pytest.approx(one.info["validation_dice"], abs=1e-3)


def test_batch_size_must_split_over_the_processes(
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Checked before joining the other processes, so it needs none."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    image, labels = phantom_files
    argv = ["train", "--images", str(image), "--labels", str(labels)]
    code = main([*argv, "--out", str(tmp_path / "m.safetensors"), "--batch-size", "3"])
    error = capsys.readouterr().err
    assert code == 2
    assert "unetquant train (rank 0 of 2): error: batch size 3 does not split evenly" in error
    assert "use a multiple of 2 (e.g. batch size 4) or 3 processes (option --batch-size)" in error
    assert not (tmp_path / "m.safetensors").exists()


def test_torchrun_environment_and_devices() -> None:
    assert Torchrun.from_environment({}) is None
    assert Torchrun.from_environment({"WORLD_SIZE": "1", "RANK": "0"}) is None
    launch = Torchrun.from_environment(
        {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    )
    assert launch == Torchrun(rank=3, world_size=4, local_rank=1, local_world_size=2)
    assert not launch.writes_files
    with pytest.raises(ValueError, match="RANK, LOCAL_RANK is not set; start"):
        Torchrun.from_environment({"WORLD_SIZE": "2"})
    assert training_device("cpu", launch) == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA GPUs or the CPU; use the CPU"):
        training_device("mps", launch)
    with pytest.raises(ValueError, match="all 2 processes of this node on one GPU"):
        training_device("cuda:0", launch)
    check_batch_size(8, 4)
    with pytest.raises(ValueError, match=r"e\.g\. batch size 8"):
        check_batch_size(7, 4)
