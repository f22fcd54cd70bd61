"""Trains a few steps of each quantization setting, in one process or in each of the processes
torchrun starts (``python -m torch.distributed.run --nproc_per_node 2 THIS_FILE OUT``); the
first process writes, per setting, the state and gradients after the first step and the state
after the last to ``OUT/<setting>.safetensors`` (losses in its metadata).

``tests/train/test_data_parallel.py`` compares them with the same training in one process, so
both must build exactly the same data, networks and settings: they come from here.
"""

from __future__ import annotations

import gc
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from napari_unetquant.config import (
    FLOAT,
    LayerOverride,
    QuantConfig,
    QuantizerConfig,
    TrainConfig,
    UNetConfig,
)
from napari_unetquant.data import em_phantom_stack, zscore
from napari_unetquant.model import build_unet
from napari_unetquant.train import SliceSet, StepEvent, Trainer, TrainingDiverged
from napari_unetquant.train.distributed import DataParallel

STEPS = 3
NETWORK = UNetConfig(base_width=4, depth=2)
CONFIG = TrainConfig(steps=STEPS, batch_size=4, crop=32, validate_every=STEPS, device="cpu")
SETTINGS = {
    "fp": QuantConfig(),
    # dynamic fixed point: weight formats by squared error, activation formats by running peak
    "w4a6-fixed": QuantConfig.from_bits(4, 6),
    # activation formats by squared error over the (sharded) batch's sample
    "w4a6-fixed-mse": QuantConfig(
        weight=QuantizerConfig.from_bits("fixed", 4), act=QuantizerConfig(method="fixed", bits=6)
    ),
    # learned steps, initialised from the first batch. The weights of enc2.conv2, whose output
    # is max-pooled, stay float: with 4-bit inputs and weights its outputs are a few integer
    # sums times one step, so a pooling window often holds two pixels with the same sum, which
    # float32 rounds 1-2 ulps apart (by convolution order) and BatchNorm of one or of two
    # processes then orders either way: max pooling sends the gradient to another pixel.
    # (Its 4-bit input patches differ, so its float-weight outputs do not tie.)
    "w4a4-lsq": replace(
        QuantConfig.from_bits(4, 4, "lsq"), overrides=(LayerOverride("enc2.conv2", weight=FLOAT),)
    ),
    # ternary activations keep running batch statistics
    "ternary": QuantConfig(
        weight=QuantizerConfig(method="ternary", bits=2),
        act=QuantizerConfig(method="ternary", bits=2),
    ),
}


def slices(count: int, seed: int) -> SliceSet:
    images, masks = em_phantom_stack(count, 48, 48, seed=seed)
    return SliceSet.from_stacks(np.stack([zscore(s) for s in images]), masks)


def train(setting: str) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """``STEPS`` steps of ``setting`` from the seeded initial network: ``first.*`` (state after
    step 1), ``grad.*`` (the gradients of step 1), ``last.*`` (state after the last step);
    and the losses, best step and Dice."""
    torch.manual_seed(CONFIG.seed)
    model = build_unet(NETWORK, SETTINGS[setting])
    trainer = Trainer(model, slices(3, 1), slices(3, 2), CONFIG)
    tensors = {f"init.{k}": v.clone() for k, v in model.state_dict().items()}
    losses = []
    for event in trainer.run():
        if isinstance(event, StepEvent):
            losses.append(event.loss)
        if isinstance(event, StepEvent) and event.step == 1:
            tensors |= {f"first.{k}": v.clone() for k, v in model.state_dict().items()}
            tensors |= {f"grad.{k}": p.grad.clone() for k, p in model.named_parameters()}
    tensors |= {f"last.{k}": v.clone() for k, v in model.state_dict().items()}
    summary = {"losses": losses, "best_step": trainer.best_step, "dice": trainer.best_dice}
    return tensors, summary


def diverge_on_one_process(out: Path, parallel: DataParallel) -> None:
    """A NaN in the last process's share only: every process must stop with the message."""
    torch.manual_seed(CONFIG.seed)
    trainer = Trainer(build_unet(NETWORK), slices(3, 1), None, CONFIG)
    images, masks = trainer._share(*trainer._batch(np.random.default_rng(0)))
    if parallel.rank == parallel.world_size - 1:
        images[0, 0, 0, 0] = float("nan")
    try:
        trainer._optimise(images, masks)
    except TrainingDiverged as error:
        (out / f"diverged-rank{parallel.rank}.txt").write_text(str(error))


def main(out: Path) -> None:
    from safetensors.torch import save_file

    torch.distributed.init_process_group("gloo")
    parallel = DataParallel.current()
    assert parallel is not None, "run under torchrun with several processes"
    for setting in SETTINGS:
        tensors, summary = train(setting)
        if parallel.rank == 0:
            path = str(out / f"{setting}.safetensors")
            save_file(tensors, path, {"summary": json.dumps(summary)})
    diverge_on_one_process(out, parallel)
    gc.collect()  # the trainers' DDP reducers go before the group they use
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
