"""The bit-width sweep: train or fine-tune a list of settings on one image and compare what
each one scores against what it stores."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config import QuantConfig, UNetConfig
from ..data.io import Volume, write_csv
from ..errors import SettingError
from ..events import Event
from ..modelio import SegmentationModel, model_classes, packed_file_bytes
from ..quant import bit_report
from ..recipes import train_config
from .training import start_training


@dataclass(frozen=True)
class SweepJob:
    """The settings to compare and how long to train each.

    Full-precision settings train first, from scratch, for ``fp_steps``; every quantized
    setting is then fine-tuned for ``fine_tune_steps`` from the sweep's full-precision model
    (or the one given to :func:`sweep`; without either, trained from scratch). ``None`` steps:
    the recipe's.
    """

    settings: tuple[QuantConfig, ...]
    fp_steps: int | None = None
    fine_tune_steps: int | None = None
    unet: UNetConfig = field(default_factory=UNetConfig)
    device: str = "auto"
    seed: int = 0
    foreground_value: int | None = None
    """The label value the masks mark (``None``: non-zero), recorded in every model."""
    classes: tuple[int, ...] | None = None
    """Two or more label values: multi-class models (the masks hold class indices), scored by
    the mean of the classes' validation Dice."""
    budgets: tuple[int, ...] = ()
    """Packed file sizes in bytes: after the settings, one fine-tune of the sweep's FP model
    per size, each layer's weight bits chosen to fit (:mod:`.budget`), activations and
    quantizer as ``budget_quant`` says."""
    budget_quant: QuantConfig = field(default_factory=lambda: QuantConfig.from_bits(8, 6))

    def __post_init__(self) -> None:
        if not self.settings and not self.budgets:
            raise ValueError("list the settings to compare, e.g. FP, W8A8, W4A6, ternary")
        for budget in self.budgets:
            if budget <= 0:
                raise SettingError(
                    f"a size budget of {budget} bytes: give positive sizes", "size_budget"
                )


@dataclass(frozen=True)
class SweepResult:
    """One setting of a bit-width sweep: validation Dice against what the model stores."""

    label: str
    dice: float
    mean_weight_bits: float
    stored_bytes: int
    fp32_bytes: int
    model: SegmentationModel
    packed_bytes: int = 0
    """The size of the model's packed file (what export writes; a float model's float file)."""
    size_budget: int | None = None

    def row(self) -> dict[str, Any]:
        """The CSV/table row (everything but the model)."""
        return {
            "setting": self.label,
            "validation_dice": round(self.dice, 4),
            "mean_weight_bits": round(self.mean_weight_bits, 3),
            "stored_bytes": self.stored_bytes,
            "fp32_bytes": self.fp32_bytes,
            "compression": round(self.fp32_bytes / self.stored_bytes, 2),
            "packed_file_bytes": self.packed_bytes,
            "size_budget_bytes": self.size_budget or "",
            "fine_tuned_from": self.model.info.get("init") or "",
        }


def sweep(
    image: Volume,
    labels: np.ndarray,
    job: SweepJob,
    fp_model: SegmentationModel | None = None,
) -> Iterator[Event | SweepResult]:
    """Train or fine-tune each setting of ``job`` on ``image`` and its foreground mask
    ``labels`` ``(S, H, W)``; yields the trainer's events (for progress) and each setting's
    :class:`SweepResult` as it finishes. Each quantized model's metadata names the model it
    was fine-tuned from (``info["init"]``). A given ``fp_model`` of other classes than the
    job's is not a starting point: the sweep trains its own."""
    ordered = sorted(job.settings, key=lambda quant: not quant.is_float)  # FP first
    wanted = job.classes if job.classes is not None and len(job.classes) > 1 else None
    if fp_model is not None and model_classes(fp_model) != wanted:
        fp_model = None
    if job.budgets and fp_model is None and not any(q.is_float for q in ordered):
        raise SettingError(
            "a size budget fine-tunes the sweep's full-precision model, and there is none: "
            "add FP to the settings",
            "size_budget",
        )
    runs: list[tuple[QuantConfig, int | None]] = [(quant, None) for quant in ordered]
    runs += [(job.budget_quant, budget) for budget in job.budgets]
    for quant, budget in runs:
        init = None if quant.is_float else fp_model
        steps = job.fp_steps if quant.is_float else job.fine_tune_steps
        config = train_config(
            fine_tune=init is not None, spatial_dims=job.unet.spatial_dims, steps=steps
        )
        config = replace(config, device=job.device, seed=job.seed)
        run = start_training(
            image,
            labels,
            quant,
            config,
            job.unet,
            init,
            foreground_value=job.foreground_value,
            classes=wanted,
            size_budget=budget,
        )
        yield from run.events()
        bundle = run.best()
        if quant.is_float:
            fp_model = bundle
        report = bit_report(bundle.model)
        label = (
            quant.label if budget is None else f"{bundle.info['label']} in {budget / 1024:.1f} KiB"
        )
        yield SweepResult(
            label,
            run.trainer.best_dice,
            report.mean_weight_bits,
            report.stored_bytes,
            report.fp32_bytes,
            bundle,
            packed_file_bytes(bundle),
            budget,
        )


def write_sweep_csv(path: str | Path, results: list[SweepResult]) -> Path:
    """The sweep's table as CSV (``.csv`` added when missing), written atomically; returns
    the path written."""
    target = Path(path)
    if target.suffix.lower() != ".csv":
        target = target.with_suffix(".csv")
    write_csv(target, [result.row() for result in results])
    return target
