"""Bit accounting, checked by hand on small networks."""

from __future__ import annotations

import pytest
from torch import nn

from napari_unetquant.config import QuantConfig, QuantizerConfig, UNetConfig
from napari_unetquant.model import build_unet
from napari_unetquant.quant import bit_report, prepare


def test_bit_report_counts_codes_scales_biases_and_batchnorm_exactly() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 1))
    prepare(
        model,
        QuantConfig(
            weight=QuantizerConfig.from_bits("lsq", 4),
            act=QuantizerConfig.from_bits("fixed", 6),
            edge_layers=("2",),
        ),
    )
    report = bit_report(model)
    first, last = report.layers
    # 72 weights x 4 bits + 4 learned steps x 32 + one activation exponent x 8 + 4 biases x 32
    assert first.stored_bits == 72 * 4 + 4 * 32 + 8 + 4 * 32
    assert (first.weight_bits, first.act_bits) == (4, 6)
    # float edge layer: 4 weights + 1 bias at 32 bits
    assert last.stored_bits == 5 * 32
    # BatchNorm: weight, bias, running mean, running var (num_batches_tracked is an integer)
    assert report.other_float_values == 16
    assert report.fp32_bits == 32 * (72 + 4 + 4 + 1 + 16)
    assert report.stored_bytes == -(-(first.stored_bits + last.stored_bits + 16 * 32) // 8)


def test_full_precision_report_equals_fp32() -> None:
    report = bit_report(build_unet(UNetConfig(base_width=4)))
    assert report.stored_bits == report.fp32_bits
    assert report.compression == 1.0
    assert report.mean_weight_bits == 32


@pytest.mark.parametrize(("bits", "at_least"), [(8, 3.7), (4, 6.5), (2, 10.0)])
def test_compression_grows_as_bits_fall(bits: int, at_least: float) -> None:
    model = build_unet(UNetConfig(base_width=16), QuantConfig.from_bits(bits, 8))
    assert bit_report(model).compression > at_least


def test_plain_conv_is_refused() -> None:
    with pytest.raises(ValueError, match="call prepare"):
        bit_report(nn.Sequential(nn.Conv2d(1, 1, 1)))
