"""A size budget for a fine-tune: each quantized layer's weight bits chosen so that the packed
model file fits ``budget`` bytes with the least estimated loss increase
(:mod:`napari_unetquant.quant.allocation`), measured on the model being fine-tuned and its
training data.

The size is the packed file's exact size, made in memory (:func:`~napari_unetquant.modelio.
packed_file_bytes`): codes, scales, float layers and metadata, this allocation included. What
fine-tuning changes in it is the text of a few numbers (each layer's fixed-point shift, the
validation Dice, the steps), so the plan keeps :func:`headroom` bytes for them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
import torch

from ..config import FLOAT_BITS, LayerOverride, QuantConfig, QuantizerConfig, TrainConfig
from ..errors import SettingError
from ..modelio import SegmentationModel, packed_file_bytes, unpacked
from ..quant import conv_names, resolve_layer_configs
from ..quant.allocation import (
    BIT_CHOICES,
    LayerChoice,
    allocate,
    code_bytes,
    hessian_traces,
    quantization_errors,
)
from ..train import SliceSet, VolumeSet
from ..train.losses import bce_dice_loss, soft_dice_loss

SENSITIVITY_SAMPLES = 16
"""Rademacher vectors per Hutchinson estimate (HAWQ-V2 reports traces settling within ~50;
the allocation only needs their order of magnitude per layer)."""

SENSITIVITY_CROPS = 16
"""Training crops the loss is taken over, two batches of eight."""

METHODS = ("fixed", "lsq")
"""Weight quantizers whose width a budget can choose (ternary and binary have one width)."""


@dataclass(frozen=True)
class BudgetPlan:
    """The widths a budget chose: ``quant`` (the fine-tune's quantization, one override per
    allocated layer), the layers and the file size the plan expects."""

    quant: QuantConfig
    layers: tuple[LayerChoice, ...]
    budget: int
    method: str
    act_bits: int
    expected_bytes: int

    @property
    def mean_bits(self) -> float:
        """Weight bits per quantized weight (layers left float not counted, as a uniform
        setting's label does not count its float edges)."""
        layers = [layer for layer in self.layers if layer.bits != FLOAT_BITS]
        total = sum(layer.weights for layer in layers)
        return sum(layer.weights * layer.bits for layer in layers) / max(total, 1)

    @property
    def label(self) -> str:
        """``W2.71A6-mixed``: the mean weight bits, the activation bits."""
        suffix = "mixed" if self.method == "fixed" else f"{self.method}-mixed"
        return f"W{self.mean_bits:.2f}A{self.act_bits}-{suffix}"

    def info(self) -> dict[str, Any]:
        """What the model file records: the budget, each layer's bits and its sensitivity."""
        return {
            "label": self.label,
            "size_budget": self.budget,
            "weight_bits_per_layer": {layer.name: layer.bits for layer in self.layers},
            "allocation": {
                "method": "hessian-trace x quantization-error, exact",  # docs: allocation.py
                "choices": list(BIT_CHOICES),
                "samples": SENSITIVITY_SAMPLES,
                "hessian_trace_per_weight": {
                    layer.name: float(f"{layer.trace:.3g}") for layer in self.layers
                },
            },
        }


def budget_method(quant: QuantConfig) -> str:
    """The weight quantizer a budget allocates widths of: ``quant``'s, or fixed point when
    its weights are float."""
    method = "fixed" if quant.weight.is_float else quant.weight.method
    if quant.weight.format_name:
        raise SettingError(
            f"a size budget chooses each layer's weight bits, and {quant.weight.label} fixes "
            f"them; leave the weight format out",
            "size_budget",
            "weight_format",
        )
    if method not in METHODS:
        raise SettingError(
            f"a size budget chooses each layer's weight bits, which {method} weights do not "
            f"have; use fixed-point or learned-step weights",
            "size_budget",
        )
    return method


def headroom(layers: int) -> int:
    """Bytes a plan keeps free for what fine-tuning changes in the file's metadata: a shift
    per layer may gain two characters, and the header is padded to 8 bytes."""
    return 8 + 3 * layers


def allocated_quant(
    quant: QuantConfig, method: str, bits: dict[str, int], names: list[str] | None = None
) -> QuantConfig:
    """``quant`` with each layer of ``bits`` given its weight width: an override per block
    (``enc2.*``) where every convolution of ``names`` (the network's) in it has the same
    width, else per layer (the file's metadata stays short)."""
    names = names or list(bits)
    base = quant.weight if not quant.weight.is_float else QuantizerConfig.from_bits(method, 8)
    overrides = []
    done: set[str] = set()
    for name, width in bits.items():
        if name in done:
            continue
        block = name.split(".")[0]
        members = [n for n in names if n.split(".")[0] == block]
        if len(members) > 1 and all(bits.get(n) == width for n in members):
            pattern, done = f"{block}.*", done | set(members)
        else:
            pattern = name
        overrides.append(LayerOverride(pattern, weight=replace(base, bits=width)))
    return replace(quant, weight=base, overrides=quant.overrides + tuple(overrides))


def sensitivity_batches(
    data: SliceSet | VolumeSet, config: TrainConfig
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:data:`SENSITIVITY_CROPS` training crops, evenly spread over the items, each centred on
    its item's foreground (the image centre without one), in batches of ``config.batch_size``:
    the same every time."""
    count = min(SENSITIVITY_CROPS, len(data))
    chosen = [int(i) for i in np.linspace(0, len(data) - 1, count).round()]
    crop = (config.crop_depth, config.crop, config.crop)[-data.images[0].ndim :]
    images, masks = [], []
    size = [min(c, *(data.images[i].shape[a] for i in chosen)) for a, c in enumerate(crop)]
    for index in chosen:
        image, mask = data.images[index], data.masks[index]
        where = np.argwhere(mask > 0)
        centre = where.mean(axis=0) if len(where) else np.array(image.shape) / 2
        corner = [
            int(np.clip(round(c - want / 2), 0, extent - want))
            for c, want, extent in zip(centre, size, image.shape, strict=True)
        ]
        box = tuple(slice(c, c + want) for c, want in zip(corner, size, strict=True))
        images.append(image[box])
        masks.append(mask[box])
    step = max(1, config.batch_size)
    return [
        (
            torch.from_numpy(np.stack(images[i : i + step])[:, None].astype(np.float32)),
            torch.from_numpy(np.stack(masks[i : i + step]).astype(np.int64)),
        )
        for i in range(0, len(images), step)
    ]


def plan_budget(
    init: SegmentationModel,
    quant: QuantConfig,
    data: SliceSet | VolumeSet,
    config: TrainConfig,
    budget: int,
    info: Callable[[BudgetPlan], dict[str, Any]],
) -> BudgetPlan:
    """The weight widths of a fine-tune of the full-precision ``init`` quantized as ``quant``
    whose packed file fits ``budget`` bytes, minimising the summed Hessian trace x
    quantization error. Every layer ``quant`` quantizes gets one of
    :data:`~napari_unetquant.quant.allocation.BIT_CHOICES`; the edge layers that ``quant``
    keeps float (the first block and the head, by default) may also stay float, so a tight
    budget can quantize their weights to free bytes for others (their inputs stay float); edge
    layers given bits (``edge_precision``) keep them. ``info(plan)``: the metadata the trained
    model's file will carry with that plan (what the size counts). Raises
    :class:`SettingError` when no choice fits."""
    method = budget_method(quant)
    if not init.quant.is_float:
        raise SettingError(
            f"a size budget measures each layer's sensitivity on a full-precision model, and "
            f"the model to fine-tune is {init.quant.label}; fine-tune its full-precision model",
            "size_budget",
            "init",
        )
    source = unpacked(init)
    model = source.model
    base = allocated_quant(quant, method, {})
    resolved = resolve_layer_configs(conv_names(model), base)
    edges = {n for pattern in base.edge_layers for n in resolved if fnmatchcase(n, pattern)}
    names = [n for n, (weight, _) in resolved.items() if not weight.is_float or n in edges]
    names = [n for n in names if n not in edges or resolved[n][0].is_float]
    if not any(n not in edges for n in names):
        raise SettingError(
            "a size budget chooses the bits of quantized layers, and this setting quantizes "
            "none; quantize the weights",
            "size_budget",
        )
    widths = {n: BIT_CHOICES + ((FLOAT_BITS,) if n in edges else ()) for n in names}
    modules = dict(model.named_modules())
    loss_fn = bce_dice_loss if config.loss == "bce_dice" else soft_dice_loss
    batches = sensitivity_batches(data, config)
    traces = hessian_traces(model, names, batches, loss_fn, SENSITIVITY_SAMPLES, config.seed)
    weights = {name: modules[name].weight.detach() for name in names}
    costs = [[_weight_bytes(weights[n].numel(), b) for b in widths[n]] for n in names]
    scores = []
    for n in names:
        errors = [*quantization_errors(weights[n], base.weight, BIT_CHOICES), 0.0]
        scores.append([max(traces[n], 0.0) * e for e in errors[: len(widths[n])]])
    act_bits = quant.act.bits

    plans: dict[tuple[int, ...], BudgetPlan] = {}

    def plan_of(choice: list[int]) -> BudgetPlan:
        if tuple(choice) in plans:
            return plans[tuple(choice)]
        bits = {n: widths[n][k] for n, k in zip(names, choice, strict=True)}
        layers = tuple(LayerChoice(n, weights[n].numel(), traces[n], bits[n]) for n in names)
        quantized = {n: b for n, b in bits.items() if b != FLOAT_BITS}
        allocated = allocated_quant(quant, method, quantized, list(resolved))
        plan = BudgetPlan(allocated, layers, budget, method, act_bits, 0)
        size = start_bytes(source, plan, batches[0][0], info(plan)) + headroom(len(resolved))
        plans[tuple(choice)] = replace(plan, expected_bytes=size)
        return plans[tuple(choice)]

    def fitting(capacity: int) -> BudgetPlan | None:
        """The best plan for ``capacity`` bytes of weights, if its whole file fits."""
        try:
            plan = plan_of(allocate(costs, scores, capacity))
        except ValueError:  # even the narrowest weights exceed the capacity
            return None
        return plan if plan.expected_bytes <= budget else None

    # the file beyond the weights (metadata, BatchNorm, scales) depends a little on the
    # choice: the least and the most of it bracket the capacity for the weights, and a search
    # keeps the largest capacity whose plan fits the whole file in the budget
    extremes = [plan_of([0] * len(names)), plan_of([len(widths[n]) - 1 for n in names])]
    weight_bytes = [sum(row[0] for row in costs), sum(row[-1] for row in costs)]
    overheads = [p.expected_bytes - w for p, w in zip(extremes, weight_bytes, strict=True)]
    low, high = budget - max(overheads), budget - min(overheads) + 1
    best, step = fitting(low), 64
    while best is None and low >= weight_bytes[0]:  # the bracket was not wide enough
        high, low, step = low, low - step, step * 2
        best = fitting(low)
    if best is None:
        raise SettingError(
            f"a budget of {_kib(budget)} is below the smallest file of this network with "
            f"{BIT_CHOICES[0]}-bit weights, {_kib(extremes[0].expected_bytes)}: raise the "
            f"budget, or train a smaller network",
            "size_budget",
        )
    while high - low > 1:  # the largest capacity that fits, to the byte
        middle = (low + high) // 2
        plan = fitting(middle)
        if plan is None:
            high = middle
        else:
            low, best = middle, plan
    return best


def _weight_bytes(weights: int, bits: int) -> int:
    """Bytes of a layer's weights: packed codes, or float32 (``FLOAT_BITS``)."""
    return 4 * weights if bits == FLOAT_BITS else code_bytes(weights, bits)


def start_bytes(
    source: SegmentationModel, plan: BudgetPlan, images: torch.Tensor, info: dict[str, Any]
) -> int:
    """The packed size of the fine-tune's starting network under ``plan`` (one forward pass
    on ``images`` chooses its formats, as the first training step does) with ``info``."""
    from .training import requantized

    model = requantized(source, plan.quant).train()
    with torch.no_grad():
        model(images)
    bundle = SegmentationModel(model, source.unet, plan.quant, source.preprocess, info)
    return packed_file_bytes(bundle)


def _kib(size: int) -> str:
    return f"{size / 1024:.1f} KiB ({size} bytes)"
