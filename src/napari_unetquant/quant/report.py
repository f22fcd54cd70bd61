"""What a model really stores: bits per layer and the memory they add up to.

Accounting rules (the same ones the packed model format uses):

- a quantized convolution stores ``weights * weight_bits`` for its codes, 32 bits per float
  scale (learned steps, ternary and binary scales) or 8 bits per shift exponent (fixed point);
- biases, BatchNorm parameters and running statistics, and full-precision weights are float32;
- activation quantizers store their steps or exponents the same way.

The FP32 reference counts every parameter and floating-point buffer of the same network at 32
bits.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .layers import CONVOLUTIONS, QuantConvNd
from .quantizers import Quantizer

FLOAT_BITS = 32
EXPONENT_BITS = 8


@dataclass(frozen=True)
class LayerBits:
    """Storage of one convolution."""

    name: str
    weight_label: str
    act_label: str
    weight_bits: int
    act_bits: int
    weights: int
    stored_bits: int

    @property
    def stored_bytes(self) -> float:
        return self.stored_bits / 8


@dataclass(frozen=True)
class BitReport:
    """Per-layer storage, plus everything else the model keeps in float32."""

    layers: tuple[LayerBits, ...]
    other_float_values: int
    fp32_bits: int

    @property
    def stored_bits(self) -> int:
        return (
            sum(layer.stored_bits for layer in self.layers) + FLOAT_BITS * self.other_float_values
        )

    @property
    def stored_bytes(self) -> int:
        return -(-self.stored_bits // 8)

    @property
    def fp32_bytes(self) -> int:
        return self.fp32_bits // 8

    @property
    def compression(self) -> float:
        """FP32 size divided by stored size."""
        return self.fp32_bits / self.stored_bits

    @property
    def mean_weight_bits(self) -> float:
        """Convolution weight bits averaged over all weights (float layers count 32)."""
        weights = sum(layer.weights for layer in self.layers)
        return sum(layer.weight_bits * layer.weights for layer in self.layers) / max(weights, 1)

    def table(self) -> str:
        """A plain-text table, one row per convolution and a total."""
        rows = [f"{'layer':<18}{'weights':>9}{'w-bits':>8}{'a-bits':>8}{'bytes':>11}"]
        for layer in self.layers:
            rows.append(
                f"{layer.name:<18}{layer.weights:>9}{layer.weight_bits:>8}"
                f"{layer.act_bits:>8}{layer.stored_bytes:>11.0f}"
            )
        rows.append(
            f"{'total':<18}{'':>25}{self.stored_bytes:>11} "
            f"(FP32 {self.fp32_bytes} bytes, {self.compression:.2f}x smaller)"
        )
        return "\n".join(rows)


def _quantizer_bits(quantizer: Quantizer) -> int:
    if quantizer.config.is_float:
        return 0
    # fixed point stores shift exponents (also once loaded from a packed file), others floats
    per_scale = EXPONENT_BITS if quantizer.config.method == "fixed" else FLOAT_BITS
    return quantizer.scale_count * per_scale


def _layer_bits(name: str, layer: QuantConvNd) -> LayerBits:
    weight_q, act_q = layer.weight_quantizer, layer.input_quantizer
    weights = layer.weight.numel()
    bias = _numel(layer.bias)
    stored = (
        weights * weight_q.stored_bits
        + _quantizer_bits(weight_q)
        + _quantizer_bits(act_q)
        + bias * FLOAT_BITS
    )
    return LayerBits(
        name=name,
        weight_label=weight_q.config.label,
        act_label=act_q.config.label,
        weight_bits=weight_q.stored_bits,
        act_bits=act_q.stored_bits,
        weights=weights,
        stored_bits=stored,
    )


def bit_report(model: nn.Module) -> BitReport:
    """Storage of ``model``: quantized convolutions at their stored bits, the rest float32."""
    layers = []
    inside: set[int] = set()
    conv_values = 0
    for name, module in model.named_modules():
        if isinstance(module, QuantConvNd):
            layers.append(_layer_bits(name, module))
            inside.update(id(t) for t in [*module.parameters(), *module.buffers()])
            conv_values += module.weight.numel() + _numel(module.bias)
        elif isinstance(module, tuple(CONVOLUTIONS)):
            raise ValueError(
                f"layer {name!r} is a plain nn.{type(module).__name__}; call "
                f"prepare(model, config) first"
            )
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    other = sum(t.numel() for t in tensors if id(t) not in inside)
    return BitReport(
        layers=tuple(layers),
        other_float_values=other,
        fp32_bits=FLOAT_BITS * (conv_values + other),
    )


def _numel(tensor: Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel()
