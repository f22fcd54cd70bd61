"""Quantization: primitives (``functional``), quantizer modules, quantized layers, bit reports."""

from .layers import (
    QuantConv2d,
    QuantConv3d,
    QuantConvNd,
    conv_names,
    prepare,
    quantized_layers,
    resolve_layer_configs,
)
from .quantizers import (
    BinaryQuantizer,
    FixedPointQuantizer,
    FloatQuantizer,
    LSQQuantizer,
    Quantizer,
    TernaryQuantizer,
    build_quantizer,
)
from .report import BitReport, LayerBits, bit_report

__all__ = [
    "BinaryQuantizer",
    "BitReport",
    "FixedPointQuantizer",
    "FloatQuantizer",
    "LSQQuantizer",
    "LayerBits",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvNd",
    "Quantizer",
    "TernaryQuantizer",
    "bit_report",
    "build_quantizer",
    "conv_names",
    "prepare",
    "quantized_layers",
    "resolve_layer_configs",
]
