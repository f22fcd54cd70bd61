"""The demo job: train full precision and W4A6 on a generated EM-like phantom and compare.

The recipe is the recommended one for low bits: train full precision, then fine-tune the
quantized network from it. Both models are written as model files, scored on phantoms that
training never saw, and drawn over one of them in a PNG. A minute or two on two CPU cores.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from torch import nn

from .config import InferConfig, QuantConfig, TrainConfig, UNetConfig
from .data import em_phantom_stack, zscore
from .data.io import atomic_path
from .infer import predict_probabilities
from .metrics import segmentation_scores
from .model import build_unet
from .modelio import SegmentationModel, save_model
from .quant import bit_report, prepare
from .recipes import (
    ACT_BITS,
    DEMO_CROP,
    DEMO_FINE_TUNE_STEPS,
    DEMO_STEPS,
    WEIGHT_BITS,
    QuantChoice,
    train_config,
)
from .train import SliceSet, StepEvent, Trainer, ValidationEvent


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo run."""

    fp_steps: int = DEMO_STEPS
    quant_steps: int = DEMO_FINE_TUNE_STEPS
    weight_bits: int = WEIGHT_BITS
    act_bits: int = ACT_BITS
    base_width: int = UNetConfig.base_width
    crop: int = DEMO_CROP
    seed: int = 0
    out_dir: str = "demo-output"

    def __post_init__(self) -> None:
        for name in ("fp_steps", "quant_steps", "base_width", "crop"):
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
    file_bytes: int


def _phantom_slices(slices: int, size: int, seed: int) -> SliceSet:
    images, membranes = em_phantom_stack(slices, size, size, seed=seed)
    return SliceSet.from_stacks(np.stack([zscore(s) for s in images]), membranes)


def _train_config(config: DemoConfig, fine_tune: bool) -> TrainConfig:
    """The recipe's settings for the demo's steps, on its smaller crops."""
    steps = config.quant_steps if fine_tune else config.fp_steps
    recipe = train_config(fine_tune=fine_tune, steps=steps)
    return replace(recipe, crop=config.crop, seed=config.seed)


def _train(
    model: nn.Module,
    data: tuple[SliceSet, SliceSet],
    config: TrainConfig,
    log: Callable[[str], None],
) -> nn.Module:
    trainer = Trainer(model, data[0], data[1], config)
    for event in trainer.run():
        if isinstance(event, StepEvent) and event.step % 100 == 0:
            log(f"  step {event.step}/{event.steps}  loss {event.loss:.4f}")
        elif isinstance(event, ValidationEvent) and event.step == event.steps:
            log(f"  best validation Dice {event.best_dice:.4f} at step {event.best_step}")
    return trainer.best_model()


def _row(label: str, bundle: SegmentationModel, path: Path, test: SliceSet) -> DemoRow:
    report = bit_report(bundle.model)
    probabilities = predict_probabilities(bundle.model, np.stack(test.images), InferConfig())
    scores = segmentation_scores(probabilities >= InferConfig.threshold, np.stack(test.masks))
    return DemoRow(
        label=label,
        dice_membrane=scores.dice_mean,
        mean_weight_bits=report.mean_weight_bits,
        stored_bytes=report.stored_bytes,
        fp32_bytes=report.fp32_bytes,
        file_bytes=path.stat().st_size,
    )


def run_demo(config: DemoConfig, log: Callable[[str], None] = print) -> list[DemoRow]:
    """Train FP, fine-tune the quantized model from it, score both, write files and a PNG."""
    data = (_phantom_slices(8, 192, config.seed), _phantom_slices(2, 192, config.seed + 1))
    test = _phantom_slices(2, 256, config.seed + 2)
    out = Path(config.out_dir)
    unet = UNetConfig(base_width=config.base_width)

    log(f"training full precision, {config.fp_steps} steps")
    fp_model = _train(build_unet(unet), data, _train_config(config, fine_tune=False), log)

    quant = QuantChoice("fixed", config.weight_bits, config.act_bits).config()
    log(f"fine-tuning {quant.label} from it, {config.quant_steps} steps")
    q_config = _train_config(config, fine_tune=True)
    quant_model = _train(prepare(copy.deepcopy(fp_model), quant), data, q_config, log)

    rows, masks = [], []
    for label, model, q in (("FP", fp_model, QuantConfig()), (quant.label, quant_model, quant)):
        bundle = SegmentationModel(model, unet, q, info={"label": label, "demo": True})
        path = out / f"{label.lower()}.safetensors"
        save_model(path, bundle)
        rows.append(_row(label, bundle, path, test))
        probabilities = predict_probabilities(model, test.images[0][None], InferConfig())
        masks.append(probabilities[0] >= InferConfig.threshold)
    overlay = out / "demo-overlay.png"
    write_overlay(overlay, test.images[0], test.masks[0], masks)
    log(
        f"wrote {out / 'fp.safetensors'}, {out / (quant.label.lower() + '.safetensors')}, {overlay}"
    )
    return rows


def write_overlay(
    path: Path, image: np.ndarray, truth: np.ndarray, masks: list[np.ndarray]
) -> None:
    """Side-by-side PNG: the image with ground truth, then each predicted mask (membranes red,
    misses of the ground truth blue)."""
    import imageio.v3 as iio

    grey = np.clip((image - image.min()) / max(float(np.ptp(image)), 1e-6) * 255, 0, 255)
    panels = []
    for mask in [truth.astype(bool), *masks]:
        rgb = np.repeat(grey[..., None], 3, axis=2)
        rgb[mask] = 0.5 * rgb[mask] + 0.5 * np.array([255, 40, 40])
        missed = truth.astype(bool) & ~mask
        rgb[missed] = 0.5 * rgb[missed] + 0.5 * np.array([40, 80, 255])
        panels.append(rgb)
    gap = np.full((image.shape[0], 4, 3), 255.0)
    picture = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
    with atomic_path(path) as temporary:
        iio.imwrite(temporary, picture.astype(np.uint8), extension=".png")


def format_rows(rows: list[DemoRow]) -> str:
    """The demo's result table."""
    lines = [
        f"{'model':<8}{'Dice (membranes)':>18}{'weight bits':>13}{'stored bytes':>14}"
        f"{'vs FP32':>9}{'file bytes':>12}"
    ]
    for row in rows:
        lines.append(
            f"{row.label:<8}{row.dice_membrane:>18.4f}{row.mean_weight_bits:>13.2f}"
            f"{row.stored_bytes:>14}{row.fp32_bytes / row.stored_bytes:>8.2f}x"
            f"{row.file_bytes:>12}"
        )
    return "\n".join(lines)
