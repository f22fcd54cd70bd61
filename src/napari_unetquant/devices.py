"""Choosing the compute device: CUDA, then Apple MPS, then the CPU."""

from __future__ import annotations

import torch

from .errors import SettingError


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then MPS, then CPU; other names are checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name != "cpu" and name != "mps" and name != "cuda" and not _is_cuda_index(name):
        raise SettingError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps", "device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SettingError(
            f"device {name!r} asked for, but CUDA is not available; use the CPU", "device"
        )
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise SettingError(
            f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} "
            f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}",
            "device",
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise SettingError(
            "device 'mps' asked for, but MPS is not available; use the CPU", "device"
        )
    return torch.device(name)


def inference_device(name: str, integer: bool) -> torch.device:
    """Where inference runs: integer inference is CPU code, so ``auto`` means the CPU there."""
    if integer and name == "auto":
        return torch.device("cpu")
    return resolve_device(name)


def _is_cuda_index(name: str) -> bool:
    return name.startswith("cuda:") and name[5:].isdigit()
