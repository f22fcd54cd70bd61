"""Biases on the int8 accumulator grid: what lets int8 kernels compute the model's own values.

An integer layer (quantized weights and inputs, with its ReLU and BatchNorm) computes
``Q(alpha * relu(conv(x) + bias) + beta)``. Its int8 form (``QLinearConv`` in
:mod:`.onnx_graph`; the same layout in any int8 runtime) multiplies the input codes with
weight codes scaled up by an integer (:data:`INT8_WEIGHT_PEAK`) into ``int32`` accumulators
whose unit is worth :attr:`Int8Layout.accumulator_step` (``input step * |alpha| * weight step
/ scale-up``) and adds the folded bias ``alpha * bias + beta`` as an ``int32`` of that unit.
A float bias falls between two such integers: the int8 form then computes a value up to half
a unit away, about a hundredth of an activation step, which flips a code wherever the
simulation sits that close to a rounding tie (a few per thousand codes; on a trained network
the flips spread through the layers and move tenths of a percent of a mask).

:func:`snap_biases` moves each integer layer's bias so that its folded bias lies on that grid
(by less than half a unit: a hundredth of an activation step, far below anything Dice sees).
The model then *is* what the int8 form computes: the quantization-aware simulation, the exact
integer path and ONNX Runtime's int8 kernels agree up to float32 rounding of the final
multiply. Training snaps the model it returns (:meth:`~napari_unetquant.train.trainer.Trainer.
best_model`), as integer-only inference stores a bias at its accumulator's precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import SettingError
from ..quant.codes import weight_codes
from ..quant.layers import QuantConv2d
from .integer_conv import _affine
from .integer_ops import ActFormat

INT8_WEIGHT_PEAK = 64
"""Largest ``|weight code|`` an int8 layer is given: codes are scaled up to it (a finer
accumulator grid for the bias) but no further, so that ``2 * 255 * 64`` stays below
``2**15``, the int16 pair sums of AVX2's ``vpmaddubsw`` (ONNX Runtime's kernel without VNNI)."""


@dataclass(frozen=True)
class Int8Layout:
    """One integer layer as int8 kernels run it, per output channel ``c``: the accumulator
    ``sum(x_code * weight[c])`` plus ``grid_bias[c]``, times ``accumulator_step[c]``, is the
    layer's ``alpha * (conv(x) + bias) + beta`` (``flat[c]``: ``alpha`` is 0, weights 0)."""

    weight: np.ndarray  # (C_out, C_in, 3, 3) int64 within int8: codes * sign(alpha) * scale-up
    weight_scale: np.ndarray  # (C_out,) float64: |alpha| * weight step / scale-up (1 if flat)
    accumulator_step: np.ndarray  # (C_out,) float64: input step * weight_scale
    folded_bias: np.ndarray  # (C_out,) float64: alpha * bias + beta
    sign: np.ndarray  # (C_out,) float64: sign of alpha
    alpha: np.ndarray  # (C_out,) float32
    beta: np.ndarray  # (C_out,) float32

    @property
    def flat(self) -> np.ndarray:
        """Channels whose ``alpha`` is 0 (weights 0: the clamp gives ``Q(beta)``)."""
        flat: np.ndarray = self.sign == 0
        return flat

    @property
    def grid_bias(self) -> np.ndarray:
        """The folded bias in accumulator units, rounded half to even (``int64``)."""
        units = np.rint(self.folded_bias / self.accumulator_step)
        return np.where(self.flat, 0, units).astype(np.int64)


def int8_layout(
    name: str, layer: QuantConv2d, bn: nn.Module | None, input_format: ActFormat | None
) -> Int8Layout | None:
    """``layer``'s int8 layout, or ``None`` when it has none: float weights or input, weight
    codes beyond int8, or no BatchNorm after it (the head)."""
    if bn is None or input_format is None or layer.weight_quantizer.config.is_float:
        return None
    codes = weight_codes(layer.weight_quantizer, layer.weight)
    values = codes.codes.detach().cpu().numpy().astype(np.int64)
    if values.size and np.abs(values).max() > 127:
        return None
    step = codes.scale.detach().double().cpu().numpy()
    channels = values.shape[0]
    alpha32, beta32 = (t.float().cpu().numpy() for t in _affine(name, bn, channels))
    alpha, beta = alpha32.astype(np.float64), beta32.astype(np.float64)
    bias = np.zeros(channels) if layer.bias is None else layer.bias.detach().double().numpy()
    peak = np.maximum(np.abs(values).reshape(channels, -1).max(axis=1), 1)
    scale_up = np.maximum(INT8_WEIGHT_PEAK // peak, 1)
    sign = np.sign(alpha)
    weight = values * (sign * scale_up).astype(np.int64).reshape(-1, 1, 1, 1)
    weight_scale = np.where(sign == 0, 1.0, np.abs(alpha) * step / scale_up)
    return Int8Layout(
        weight=weight,
        weight_scale=weight_scale,
        accumulator_step=input_format.step * weight_scale,
        folded_bias=alpha * bias + beta,
        sign=sign,
        alpha=alpha32,
        beta=beta32,
    )


def integer_layers(model: nn.Module) -> dict[str, tuple[QuantConv2d, nn.Module | None]]:
    """Every quantized convolution of a U-Net by name, with the BatchNorm after it (``None``
    for the head)."""
    layers: dict[str, tuple[QuantConv2d, nn.Module | None]] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, QuantConv2d):
            block, _, conv = name.rpartition(".")
            bn = model.get_submodule(f"{block}.bn{conv[4:]}") if conv.startswith("conv") else None
            layers[name] = (layer, bn)
    return layers


def _layouts(model: nn.Module) -> dict[str, tuple[QuantConv2d, Int8Layout]]:
    """The int8 layout of every layer that has one; none for an activation method integer
    kernels do not run, or formats never chosen (an untrained model)."""
    layouts = {}
    for name, (layer, bn) in integer_layers(model).items():
        try:
            layout = int8_layout(name, layer, bn, ActFormat.of(layer.input_quantizer, name))
        except SettingError:
            continue
        if layout is not None:
            layouts[name] = (layer, layout)
    return layouts


def off_grid(model: nn.Module) -> float:
    """The largest distance of an integer layer's folded bias from its accumulator grid, in
    units of that grid (0 to 0.5; 0 for a model without integer layers)."""
    worst = 0.0
    for _, layout in _layouts(model).values():
        units = layout.folded_bias / layout.accumulator_step
        worst = max(worst, float(np.abs(units - np.rint(units))[~layout.flat].max(initial=0)))
    return worst


@torch.no_grad()
def snap_biases(model: nn.Module) -> list[str]:
    """Move each integer layer's bias so that its folded bias lies on the int8 accumulator
    grid (see the module's text); returns the names of the layers moved. A no-op for float
    models and for layers without an int8 layout."""
    moved = []
    for name, (layer, layout) in _layouts(model).items():
        if layer.bias is None:
            continue
        target = layout.grid_bias * layout.accumulator_step  # alpha * bias + beta, on the grid
        alpha, beta = layout.alpha.astype(np.float64), layout.beta.astype(np.float64)
        safe = np.where(layout.flat, 1.0, alpha)
        old = layer.bias.detach().double().cpu().numpy()
        bias = np.where(layout.flat, old, (target - beta) / safe)
        layer.bias.copy_(torch.from_numpy(bias).to(layer.bias))
        moved.append(name)
    return moved
