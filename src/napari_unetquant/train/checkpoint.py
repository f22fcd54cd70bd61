"""Resumable training checkpoints: model, best model, optimizer and schedule in one safetensors
file (no pickle), the scalar state as JSON metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from ..data.write import write_safetensors
from .trainer import Trainer

FORMAT = "napari-unetquant-checkpoint"


def checkpoint_path(model_path: str | Path) -> Path:
    """Where training to ``model_path`` keeps its resume checkpoint."""
    path = Path(model_path)
    return path.with_name(path.name + ".resume")


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def save_checkpoint(path: str | Path, trainer: Trainer, identity: dict[str, Any]) -> None:
    """Write ``trainer``'s state; ``identity`` (the configs) must match again on resume."""

    tensors = {
        f"model.{k}": v.detach().cpu().contiguous() for k, v in trainer.model.state_dict().items()
    }
    for key, value in (trainer.best_state or {}).items():
        tensors[f"best.{key}"] = value.contiguous()
    optimizer_tensors, optimizer_rest = _split_optimizer(trainer.optimizer.state_dict())
    tensors.update(optimizer_tensors)
    state = {
        "identity": identity,
        "step": trainer.step,
        "best_dice": trainer.best_dice,
        "best_step": trainer.best_step,
        "optimizer": optimizer_rest,
        "schedule": trainer.schedule.state_dict(),
    }
    write_safetensors(Path(path), tensors, {"format": FORMAT, "state": json.dumps(state)})


def load_checkpoint(path: str | Path, trainer: Trainer, identity: dict[str, Any]) -> None:
    """Restore ``trainer`` from ``path``; refuses a checkpoint of another configuration."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as error:
        raise ValueError(
            f"{path}: the resume checkpoint is unreadable ({error}); delete it to start afresh"
        ) from error
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a napari-unetquant training checkpoint")
    state = json.loads(metadata["state"])
    if state["identity"] != json.loads(json.dumps(identity)):
        raise ValueError(
            f"{path} was written by a training run with other settings; give the same options "
            f"as the interrupted run, or delete the checkpoint to start afresh"
        )

    def part(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    trainer.model.load_state_dict(part("model."))
    best = part("best.")
    trainer.best_state = best or None
    trainer.step, trainer.best_dice, trainer.best_step = (
        state["step"],
        state["best_dice"],
        state["best_step"],
    )
    optimizer_state: dict[str, Any] = {
        "state": {},
        "param_groups": state["optimizer"]["param_groups"],
    }
    for key, value in part("optimizer.").items():
        index, name = key.split(".", 1)
        optimizer_state["state"].setdefault(int(index), {})[name] = value
    for index, scalars in state["optimizer"]["scalars"].items():
        optimizer_state["state"].setdefault(int(index), {}).update(scalars)
    trainer.optimizer.load_state_dict(optimizer_state)
    trainer.schedule.load_state_dict(state["schedule"])
