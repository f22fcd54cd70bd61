"""Drop-in quantized layers and the ``prepare`` transform that swaps them into a model."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from ..config import FLOAT, QuantConfig, QuantizerConfig
from .quantizers import FixedPointQuantizer, Quantizer, build_quantizer

_Layer = TypeVar("_Layer", bound="QuantConvNd")


class QuantConvNd(_ConvNd):
    """What :class:`QuantConv2d` and :class:`QuantConv3d` share: a convolution that
    fake-quantizes its input activations and its weights.

    Input ``(N, C_in, *spatial)`` float32 -> output ``(N, C_out, *spatial')`` float32, computed
    with the quantized input and weight (the bias stays float, as in the paper). With both
    configs at full precision it computes exactly what the plain convolution computes. Weight
    scales are per output channel, over all other axes. Use it in ``isinstance`` checks that
    mean "any quantized convolution".
    """

    def __init__(
        self,
        *args: object,
        weight_quant: QuantizerConfig = FLOAT,
        act_quant: QuantizerConfig = FLOAT,
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.weight_quantizer: Quantizer = build_quantizer(
            weight_quant, "weight", self.out_channels
        )
        self.input_quantizer: Quantizer = build_quantizer(act_quant, "act")

    @classmethod
    def from_float(
        cls: type[_Layer],
        conv: _ConvNd,
        weight_quant: QuantizerConfig,
        act_quant: QuantizerConfig,
    ) -> _Layer:
        """A quantized copy of ``conv`` (same geometry, weights and bias copied)."""
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            weight_quant=weight_quant,
            act_quant=act_quant,
        )
        layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None and layer.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def quantized_weight(self) -> Tensor:
        """The weights as the layer uses them, ``(C_out, C_in, *kernel)``, on the quantizer grid."""
        weight: Tensor = self.weight_quantizer(self.weight)
        return weight

    def forward(self, x: Tensor) -> Tensor:
        inputs: Tensor = self.input_quantizer(x)
        out: Tensor = self._conv_forward(inputs, self.quantized_weight(), self.bias)
        return out

    @torch.no_grad()
    def forward_overwriting_input(self, x: Tensor, input_scale: float = 1.0) -> Tensor:
        """Inference only: the outputs of ``forward(x / input_scale)``, quantizing ``x`` in
        its own memory (``x`` is destroyed: pass only tensors nothing else reads).

        Fixed-point inputs (frozen format) become integer codes and their power-of-two step
        moves onto the weights (``conv(c * 2**-f, w) == conv(c, w * 2**-f)`` exactly in
        floating point); ``input_scale == 2**f`` says ``x`` already holds the values times
        ``2**f`` (the BatchNorm before applied it). Other quantizers: the same arithmetic as
        their forward pass, in place (``input_scale`` must be 1).
        """
        quantizer = self.input_quantizer
        weight = self.quantized_weight()
        if isinstance(quantizer, FixedPointQuantizer) and quantizer.frozen:
            codes = quantizer.codes_(x, prescaled=input_scale != 1.0)
            scaled = weight * 2.0 ** -int(quantizer.frac_bits)
            out: Tensor = self._conv_forward(codes, scaled, self.bias)
            return out
        if input_scale != 1.0:
            raise ValueError("only frozen fixed-point inputs can arrive pre-scaled")
        result: Tensor = self._conv_forward(quantizer.quantize_(x), weight, self.bias)
        return result

    def input_scale(self) -> float:
        """The power of two a producer may pre-multiply this layer's input by for
        :meth:`forward_overwriting_input` (``2**frac_bits`` for frozen fixed point), else 1."""
        quantizer = self.input_quantizer
        if isinstance(quantizer, FixedPointQuantizer) and quantizer.frozen:
            return 2.0 ** int(quantizer.frac_bits)
        return 1.0


class QuantConv2d(QuantConvNd, nn.Conv2d):
    """An ``nn.Conv2d`` that fake-quantizes its input activations and its weights (see
    :class:`QuantConvNd`): ``(N, C_in, H, W)`` -> ``(N, C_out, H', W')``."""


class QuantConv3d(QuantConvNd, nn.Conv3d):
    """An ``nn.Conv3d`` that fake-quantizes its input activations and its weights (see
    :class:`QuantConvNd`): ``(N, C_in, D, H, W)`` -> ``(N, C_out, D', H', W')``."""


CONVOLUTIONS: dict[type[nn.Module], type[QuantConvNd]] = {
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
}
"""The quantized layer that replaces each kind of convolution."""


def _quantized_class(conv: nn.Module) -> type[QuantConvNd]:
    for plain, quantized in CONVOLUTIONS.items():
        if isinstance(conv, plain):
            return quantized
    raise ValueError(f"{type(conv).__name__} is not a 2D or 3D convolution")


def conv_names(model: nn.Module) -> list[str]:
    """Qualified names of every ``nn.Conv2d`` and ``nn.Conv3d`` in ``model`` (quantized or
    not), in order."""
    kinds = tuple(CONVOLUTIONS)
    return [name for name, module in model.named_modules() if name and isinstance(module, kinds)]


def resolve_layer_configs(
    names: list[str], config: QuantConfig
) -> dict[str, tuple[QuantizerConfig, QuantizerConfig]]:
    """``{layer name: (weight config, input-activation config)}`` for ``names``.

    Every ``edge_layers`` pattern and override pattern must match at least one layer, so a
    typo cannot silently leave a layer at the wrong precision.
    """
    resolved = {name: (config.weight, config.act) for name in names}
    for pattern in config.edge_layers:
        for name in _matching(pattern, names, "edge_layers"):
            resolved[name] = (config.edge_precision, config.edge_precision)
    for override in config.overrides:
        for name in _matching(override.pattern, names, "override"):
            weight, act = resolved[name]
            resolved[name] = (override.weight or weight, override.act or act)
    return resolved


def _matching(pattern: str, names: list[str], what: str) -> list[str]:
    matches = [name for name in names if fnmatchcase(name, pattern)]
    if not matches:
        raise ValueError(
            f"{what} pattern {pattern!r} matches no convolution; the model's convolutions are "
            f"{', '.join(names)}"
        )
    return matches


def prepare(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replace every ``nn.Conv2d`` (``nn.Conv3d``) of ``model`` (in place) by a
    :class:`QuantConv2d` (:class:`QuantConv3d`) configured per layer from ``config``, keeping
    its trained weights; returns ``model``.

    Already-quantized layers are re-quantized with the new settings (e.g. an FP-trained U-Net
    prepared for W4A6 fine-tuning); their previous quantizer state is dropped.
    """
    resolved = resolve_layer_configs(conv_names(model), config)
    for name, (weight_quant, act_quant) in resolved.items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        conv = getattr(parent, child_name)
        layer = _quantized_class(conv).from_float(conv, weight_quant, act_quant)
        setattr(parent, child_name, layer)
    return model


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantConvNd]]:
    """``(name, layer)`` for every quantized convolution (2D or 3D) in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantConvNd)]
