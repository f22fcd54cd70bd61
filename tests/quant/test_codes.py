"""Weight codes: integers times per-channel scales, bit-identical to every quantizer."""

from __future__ import annotations

import pytest
import torch

from napari_unetquant.config import QuantizerConfig
from napari_unetquant.quant import QuantConv2d, QuantConv3d
from napari_unetquant.quant.codes import dequantize, weight_codes
from napari_unetquant.quant.packing import code_range

CONFIGS = [
    QuantizerConfig.from_format("Q0.4"),
    QuantizerConfig.from_format("Q1.6"),
    QuantizerConfig.from_bits("fixed", 2),
    QuantizerConfig.from_bits("fixed", 4),
    QuantizerConfig.from_bits("fixed", 8),
    QuantizerConfig.from_bits("lsq", 3),
    QuantizerConfig.from_bits("lsq", 8),
    QuantizerConfig(method="lsq", bits=4, power_of_two=True),
    QuantizerConfig(method="lsq", bits=4, signed=False),
    QuantizerConfig(method="ternary", bits=2),
    QuantizerConfig(method="binary", bits=1),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
def test_codes_times_scales_are_the_quantized_weights_bit_for_bit(config: QuantizerConfig) -> None:
    layer = QuantConv2d(5, 7, 3, padding=1, weight_quant=config)
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.2, 6.0, 7).reshape(-1, 1, 1, 1))  # varied ranges
    layer.weight_quantizer(layer.weight)  # learned steps initialise on first use
    codes = weight_codes(layer.weight_quantizer, layer.weight)
    assert codes.codes.dtype == torch.int32 and codes.scale.shape == (7,)
    assert torch.equal(dequantize(codes), layer.quantized_weight().detach())
    lowest, highest = code_range(config.bits)
    stored = codes.codes - codes.offset
    assert lowest <= int(stored.min()) and int(stored.max()) <= highest
    if config.method == "fixed":
        assert codes.frac_bits is not None
        assert torch.equal(codes.scale, torch.full((7,), 2.0**-codes.frac_bits))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
def test_each_quantizer_gives_its_codes_and_leaves_the_weight_alone(
    config: QuantizerConfig,
) -> None:
    layer = QuantConv2d(3, 4, 3, padding=1, weight_quant=config)
    layer.weight_quantizer(layer.weight)
    weight = layer.weight.detach()
    before = weight.clone()
    codes, step, frac_bits = layer.weight_quantizer.integer_codes(weight)
    assert torch.equal(weight, before)
    assert torch.equal(codes, codes.round()) and step.shape == (4,)
    assert (frac_bits is not None) == (config.method == "fixed")
    assert torch.equal(codes * step.reshape(-1, 1, 1, 1), layer.quantized_weight().detach())


def test_float_weights_have_no_codes() -> None:
    layer = QuantConv2d(2, 2, 3)
    with pytest.raises(ValueError, match="no codes"):
        weight_codes(layer.weight_quantizer, layer.weight)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
def test_3d_weight_codes_have_one_scale_per_output_channel(config: QuantizerConfig) -> None:
    layer = QuantConv3d(3, 5, 3, padding=1, weight_quant=config)
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.2, 6.0, 5).reshape(-1, 1, 1, 1, 1))
    layer.weight_quantizer(layer.weight)
    codes = weight_codes(layer.weight_quantizer, layer.weight)
    assert codes.shape == (5, 3, 3, 3, 3) and codes.scale.shape == (5,)
    weight = layer.quantized_weight().detach()
    assert torch.equal(dequantize(codes), weight)
    for channel, scale in zip(weight, codes.scale, strict=True):  # each on its own grid
        assert len(torch.unique(channel)) <= 2**config.bits
        torch.testing.assert_close(channel / scale, (channel / scale).round())
