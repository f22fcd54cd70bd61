"""The demo job: train full precision and W4A6 on a generated EM-like phantom and compare.

The recipe is the recommended one for low bits: train full precision, then fine-tune the
quantized network from it. Everything runs on the CPU in a few minutes.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import QuantConfig, UNetConfig
from .data import em_phantom_stack, random_crop_batch, zscore
from .metrics import dice_score
from .model import build_unet
from .quant import bit_report, prepare
from .train import Batch, bce_dice_loss, fit


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo run (defaults: about two minutes on two CPU cores)."""

    fp_steps: int = 300
    quant_steps: int = 150
    weight_bits: int = 4
    act_bits: int = 6
    base_width: int = 16
    crop: int = 96
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("fp_steps", "quant_steps", "base_width", "crop", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class DemoRow:
    """Result of one model of the demo."""

    label: str
    dice_membrane: float
    mean_weight_bits: float
    stored_bytes: int
    fp32_bytes: int
    train_seconds: float


def _batches(images: np.ndarray, labels: np.ndarray, config: DemoConfig) -> Callable[[], Batch]:
    rng = np.random.default_rng(config.seed)

    def next_batch() -> Batch:
        x, y = random_crop_batch(images, labels, config.crop, config.batch_size, rng)
        return torch.from_numpy(x), torch.from_numpy(y)

    return next_batch


@torch.no_grad()
def _dice(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    logits = model(torch.from_numpy(images[:, None]))
    return dice_score(logits[:, 0].numpy() > 0, labels)


def _train(
    model: nn.Module,
    steps: int,
    next_batch: Callable[[], Batch],
    log: Callable[[str], None],
    learning_rate: float,
) -> float:
    start = time.perf_counter()
    for event in fit(model, next_batch, bce_dice_loss, steps, learning_rate):
        if event.step % 50 == 0 or event.step == event.steps:
            log(f"  step {event.step}/{event.steps}  loss {event.loss:.4f}")
    return time.perf_counter() - start


def _row(
    label: str, model: nn.Module, seconds: float, test: tuple[np.ndarray, np.ndarray]
) -> DemoRow:
    report = bit_report(model)
    return DemoRow(
        label=label,
        dice_membrane=_dice(model, *test),
        mean_weight_bits=report.mean_weight_bits,
        stored_bytes=report.stored_bytes,
        fp32_bytes=report.fp32_bytes,
        train_seconds=seconds,
    )


def run_demo(config: DemoConfig, log: Callable[[str], None] = print) -> list[DemoRow]:
    """Train FP, fine-tune the quantized model from it, and score both on unseen phantoms."""
    torch.manual_seed(config.seed)
    train_images, train_labels = em_phantom_stack(8, 192, 192, seed=config.seed)
    test_images, test_labels = em_phantom_stack(2, 256, 256, seed=config.seed + 1)
    train_images = np.stack([zscore(s) for s in train_images])
    test = (np.stack([zscore(s) for s in test_images]), test_labels)
    next_batch = _batches(train_images, train_labels, config)

    model_config = UNetConfig(base_width=config.base_width)
    log(f"training full precision, {config.fp_steps} steps")
    fp_model = build_unet(model_config)
    rows = [_row("FP", fp_model, _train(fp_model, config.fp_steps, next_batch, log, 1e-3), test)]

    quant = QuantConfig.from_bits(config.weight_bits, config.act_bits)
    log(f"fine-tuning {quant.label} from it, {config.quant_steps} steps")
    quant_model = prepare(copy.deepcopy(fp_model), quant)
    seconds = _train(quant_model, config.quant_steps, next_batch, log, 5e-4)
    rows.append(_row(quant.label, quant_model, seconds, test))
    return rows


def format_rows(rows: list[DemoRow]) -> str:
    """The demo's result table."""
    lines = [
        f"{'model':<8}{'Dice (membranes)':>18}{'weight bits':>13}{'stored bytes':>14}"
        f"{'vs FP32':>9}{'train s':>9}"
    ]
    for row in rows:
        lines.append(
            f"{row.label:<8}{row.dice_membrane:>18.4f}{row.mean_weight_bits:>13.2f}"
            f"{row.stored_bytes:>14}{row.fp32_bytes / row.stored_bytes:>8.2f}x"
            f"{row.train_seconds:>9.1f}"
        )
    return "\n".join(lines)
