"""The demo job: train full precision and W4A6 on a generated EM-like phantom and compare.

The recipe is the recommended one for low bits: train full precision, then fine-tune the
quantized network from it. Both models are written as model files (the full-precision one as
float weights, the quantized one packed: codes at their bit width), scored on phantoms that
training never saw, and drawn over one of them in a PNG with titled panels (image, ground
truth, each model with its Dice). A minute or two on two CPU cores.
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
from .metrics import dice_score, segmentation_scores
from .model import build_unet
from .modelio import SegmentationModel, save_model
from .packed import has_quantized_weights
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
    """Result of one model of the demo (``file_bytes``: its model file, packed when its
    weights are quantized)."""

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

    rows, masks, written = [], {}, []
    for label, model, q in (("FP", fp_model, QuantConfig()), (quant.label, quant_model, quant)):
        bundle = SegmentationModel(model, unet, q, info={"label": label, "demo": True})
        path = out / f"{label.lower()}.safetensors"
        packed = has_quantized_weights(model)  # the quantized model as it is deployed
        save_model(path, bundle, packed=packed)
        rows.append(_row(label, bundle, path, test))
        layout = "packed" if packed else "float"
        written.append(f"{path} ({label}, {layout}, {path.stat().st_size / 1024:.1f} KiB)")
        probabilities = predict_probabilities(model, test.images[0][None], InferConfig())
        masks[label] = probabilities[0] >= InferConfig.threshold
    overlay = out / "demo-overlay.png"
    write_overlay(overlay, test.images[0], test.masks[0], masks)
    log(f"wrote {', '.join(written)}, {overlay}")
    return rows


def write_overlay(
    path: Path, image: np.ndarray, truth: np.ndarray, masks: dict[str, np.ndarray]
) -> None:
    """Side-by-side PNG of titled panels: the image, the image with its ground truth, then each
    model's mask (``masks``: by label) with its Dice on this image in the title. Masks are red;
    in a model's panel, ground truth it missed is blue."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grey = np.clip((image - image.min()) / max(float(np.ptp(image)), 1e-6) * 255, 0, 255)
    truth = truth.astype(bool)
    panels = [("image", np.repeat(grey[..., None], 3, axis=2))]
    for title, mask, is_model in [
        ("ground truth", truth, False),
        *((f"{label}: Dice {dice_score(m, truth):.3f}", m, True) for label, m in masks.items()),
    ]:
        rgb = np.repeat(grey[..., None], 3, axis=2)
        rgb[mask] = 0.5 * rgb[mask] + 0.5 * np.array([255, 40, 40])
        if is_model:
            missed = truth & ~mask
            rgb[missed] = 0.5 * rgb[missed] + 0.5 * np.array([40, 80, 255])
        panels.append((title, rgb))
    figure = Figure(figsize=(3 * len(panels), 3.4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for axes, (title, rgb) in zip(figure.subplots(1, len(panels)), panels, strict=True):
        axes.imshow(rgb.astype(np.uint8), interpolation="nearest")
        axes.set_title(title, fontsize=11)
        axes.set_axis_off()
    with atomic_path(path) as temporary, temporary.open("wb") as handle:
        figure.savefig(handle, format="png")


def format_rows(rows: list[DemoRow]) -> str:
    """The demo's result table (``file bytes``: the model file written, packed for quantized
    weights)."""
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
