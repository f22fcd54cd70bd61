"""QuantConv2d, QuantConv3d and the prepare transform."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_unetquant.config import FLOAT, LayerOverride, QuantConfig, QuantizerConfig
from napari_unetquant.quant import (
    QuantConv2d,
    QuantConv3d,
    QuantConvNd,
    conv_names,
    prepare,
    resolve_layer_configs,
)


class TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(2, 4, 3, padding=1)
        self.inner = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 3, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.first(x))


def test_full_precision_quant_conv_equals_conv_exactly() -> None:
    conv = nn.Conv2d(3, 5, 3, padding=2, dilation=2, stride=2)
    quant = QuantConv2d.from_float(conv, FLOAT, FLOAT)
    x = torch.randn(2, 3, 17, 13)
    assert isinstance(quant, nn.Conv2d)
    assert torch.equal(quant(x), conv(x))


def test_quant_conv_uses_quantized_input_and_weight() -> None:
    weight_q, act_q = QuantizerConfig.from_format("Q0.4"), QuantizerConfig.from_format("Q2.1")
    conv = nn.Conv2d(2, 3, 3)
    quant = QuantConv2d.from_float(conv, weight_q, act_q)
    x = torch.randn(1, 2, 8, 8) * 3
    expected = nn.functional.conv2d(
        quant.input_quantizer(x), quant.weight_quantizer(conv.weight), conv.bias
    )
    assert torch.equal(quant(x), expected)
    assert torch.equal(quant.quantized_weight() * 16, (quant.quantized_weight() * 16).round())


def test_prepare_swaps_every_conv_and_keeps_weights() -> None:
    model = TwoConvs()
    before = model.first.weight.detach().clone()
    prepare(
        model,
        QuantConfig(
            weight=QuantizerConfig.from_bits("fixed", 4),
            act=QuantizerConfig.from_bits("fixed", 6),
            edge_layers=(),
        ),
    )
    assert conv_names(model) == ["first", "inner.1"]
    assert all(isinstance(m, QuantConv2d) for m in (model.first, model.inner[1]))
    assert torch.equal(model.first.weight, before)
    assert model.inner[1].weight_quantizer.stored_bits == 4


def test_edges_overrides_and_order() -> None:
    config = QuantConfig(
        weight=QuantizerConfig.from_bits("fixed", 4),
        act=QuantizerConfig.from_bits("fixed", 6),
        edge_layers=("first",),
        overrides=(
            LayerOverride("inner.*", weight=QuantizerConfig.from_bits("lsq", 2)),
            LayerOverride("inner.1", act=QuantizerConfig.from_bits("fixed", 8)),
        ),
    )
    resolved = resolve_layer_configs(["first", "inner.1"], config)
    assert resolved["first"] == (FLOAT, FLOAT)
    assert resolved["inner.1"] == (
        QuantizerConfig.from_bits("lsq", 2),
        QuantizerConfig.from_bits("fixed", 8),
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (QuantConfig(), "edge_layers pattern 'enc1.*' matches no convolution"),
        (
            QuantConfig(edge_layers=(), overrides=(LayerOverride("enc9", weight=FLOAT),)),
            "override pattern 'enc9' matches no convolution; the model's convolutions are "
            "first, inner.1",
        ),
    ],
)
def test_patterns_that_match_nothing_are_errors(config: QuantConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("*", r"\*")):
        prepare(TwoConvs(), config)


def test_prepare_requantizes_an_already_quantized_model() -> None:
    model = prepare(TwoConvs(), QuantConfig(edge_layers=()))
    weight = model.first.weight.detach().clone()
    prepare(model, QuantConfig(weight=QuantizerConfig.from_bits("lsq", 3), edge_layers=()))
    assert model.first.weight_quantizer.stored_bits == 3
    assert torch.equal(model.first.weight, weight)


def test_full_precision_quant_conv3d_equals_conv3d_exactly() -> None:
    conv = nn.Conv3d(2, 4, 3, padding=(1, 2, 2), dilation=(1, 2, 2), stride=(1, 2, 2))
    quant = QuantConv3d.from_float(conv, FLOAT, FLOAT)
    x = torch.randn(2, 2, 5, 13, 11)
    assert isinstance(quant, nn.Conv3d) and isinstance(quant, QuantConvNd)
    assert not isinstance(quant, QuantConv2d)
    assert torch.equal(quant(x), conv(x))


@pytest.mark.parametrize(
    ("weight_q", "act_q", "levels"),
    [
        (QuantizerConfig.from_format("Q0.4"), QuantizerConfig.from_format("Q2.1"), 31),
        (QuantizerConfig.from_bits("fixed", 3), QuantizerConfig.from_bits("fixed", 4), 7),
        (QuantizerConfig.from_bits("lsq", 3), QuantizerConfig.from_bits("lsq", 4), 8),
        (QuantizerConfig(method="ternary", bits=2), QuantizerConfig.from_bits("fixed", 4), 3),
        (QuantizerConfig(method="binary", bits=1), QuantizerConfig(method="binary", bits=1), 2),
    ],
    ids=["Q0.4/Q2.1", "W3A4", "W3A4-lsq", "ternary", "binary"],
)
def test_quant_conv3d_computes_on_the_grid(
    weight_q: QuantizerConfig, act_q: QuantizerConfig, levels: int
) -> None:
    conv = nn.Conv3d(2, 3, 3, padding=1)
    quant = QuantConv3d.from_float(conv, weight_q, act_q)
    x = torch.randn(1, 2, 4, 8, 8) * 3
    weight = quant.quantized_weight().detach()
    inputs = quant.input_quantizer(x)
    assert torch.equal(quant(x), nn.functional.conv3d(inputs, weight, conv.bias, padding=1))
    for channel in weight:  # at most `levels` values per output channel: the quantizer's grid
        assert 1 < len(torch.unique(channel)) <= levels
    assert len(torch.unique(inputs)) <= max(levels, 2**act_q.bits)


def test_prepare_swaps_3d_convolutions_too() -> None:
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 1))
    prepare(model, QuantConfig(edge_layers=()))
    assert conv_names(model) == ["0", "2"]
    assert type(model[0]) is QuantConv3d and type(model[2]) is QuantConv2d
