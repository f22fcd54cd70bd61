"""Config values: names, bit accounting and one test per configuration error."""

from __future__ import annotations

import pytest

from napari_unetquant.config import FLOAT, LayerOverride, QuantConfig, QuantizerConfig, UNetConfig


def test_paper_formats_store_one_bit_more_than_the_paper_counts() -> None:
    paper = QuantConfig.paper()
    assert (paper.weight.bits, paper.act.bits) == (5, 7)
    assert (paper.weight.format_name, paper.act.format_name) == ("Q0.4", "Q6.0")
    assert paper.label == "Q0.4/Q6.0"


@pytest.mark.parametrize(
    ("config", "label"),
    [
        (QuantConfig(), "FP"),
        (QuantConfig.from_bits(32, 32), "FP"),
        (QuantConfig.from_bits(4, 6), "W4A6"),
        (QuantConfig.from_bits(4, 4, "lsq"), "W4A4-lsq"),
        (QuantConfig.from_bits(2, 2, "ternary"), "ternary"),
        (QuantConfig.from_bits(1, 1, "binary"), "binary"),
        (QuantConfig(weight=QuantizerConfig.from_bits("fixed", 8)), "W8A32"),
    ],
)
def test_labels(config: QuantConfig, label: str) -> None:
    assert config.label == label
    if "/" not in label or label.startswith("Q"):
        assert QuantConfig.from_label(label) == config


def test_paper_label_round_trip_and_bad_labels() -> None:
    assert QuantConfig.from_label("Q0.4/Q6.0") == QuantConfig.paper()
    assert QuantConfig.from_label(" w4a6-LSQ ".lower()) == QuantConfig.from_bits(4, 6, "lsq")
    with pytest.raises(ValueError, match="cannot read the setting 'W4'"):
        QuantConfig.from_label("W4")


def test_dynamic_weights_fit_by_error_and_activations_cover_their_peak() -> None:
    config = QuantConfig.from_bits(4, 6)
    assert (config.weight.dynamic_rule, config.act.dynamic_rule) == ("mse", "max")
    assert QuantConfig.from_bits(4, 4, "lsq").act == QuantizerConfig(method="lsq", bits=4)


def test_one_bit_budgets_are_binary() -> None:
    assert QuantizerConfig.from_bits("fixed", 1) == QuantizerConfig(method="binary", bits=1)
    assert QuantConfig.from_bits(1, 4).label == "W1A4-binary/fixed"


def test_from_bits_32_is_float() -> None:
    assert QuantizerConfig.from_bits("lsq", 32) == FLOAT
    assert QuantConfig.from_bits(32, 32).is_float


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "int4"}, "unknown quantizer method 'int4'"),
        ({"method": "fixed", "bits": 1}, "1 bit: use method 'binary'"),
        ({"method": "fixed", "bits": 9}, "needs 2 to 8 stored bits, got 9"),
        ({"method": "lsq", "bits": 0}, "needs 2 to 8 stored bits, got 0"),
        ({"method": "ternary", "bits": 3}, "ternary stores 2 bits, got bits=3"),
        ({"method": "binary", "bits": 2}, "binary stores 1 bits, got bits=2"),
        ({"method": "float", "bits": 16}, "float stores 32 bits"),
        ({"method": "fixed", "bits": 5, "int_bits": 0}, "give both int_bits and frac_bits"),
        ({"method": "lsq", "bits": 5, "int_bits": 0, "frac_bits": 4}, "needs method 'fixed'"),
        ({"method": "fixed", "bits": 4, "int_bits": 0, "frac_bits": 4}, "stores 5 bits but bits=4"),
        ({"method": "fixed", "bits": 4, "power_of_two": True}, "learned-step quantizer only"),
        ({"method": "binary", "bits": 1, "signed": False}, "signed by definition"),
        ({"method": "fixed", "bits": 4, "dynamic_rule": "p99"}, "unknown dynamic_rule 'p99'"),
    ],
)
def test_quantizer_config_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizerConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("Q4", "not of the form Q<int>.<frac>"),
        ("0.4", "not of the form"),
        ("Q-1.4", "negative bit count"),
        ("Q9.9", "stores 19 bits; use 2 to 16 stored bits"),
        ("Q0.0", "stores 1 bits; use 2 to 16"),
    ],
)
def test_format_errors(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizerConfig.from_format(name)


def test_quant_config_errors() -> None:
    with pytest.raises(ValueError, match="must be a QuantizerConfig"):
        QuantConfig(weight=4)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"edge_layers must be a tuple of patterns, e.g. \('head',\)"
    ):
        QuantConfig(edge_layers="head")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sets neither weight nor act"):
        LayerOverride("enc2.*")
    with pytest.raises(ValueError, match="needs a layer name"):
        LayerOverride("", weight=FLOAT)


def test_configs_are_frozen() -> None:
    config = QuantConfig.paper()
    with pytest.raises(AttributeError):
        config.weight = FLOAT  # type: ignore[misc]


def test_edge_bits_make_every_layer_integer_with_8_bit_edges() -> None:
    """--edge-bits 8: the all-integer recipe for hardware (the nearest paper table's row)."""
    import dataclasses

    import torch

    from napari_unetquant.errors import SettingError
    from napari_unetquant.infer.integer import IntegerUNet
    from napari_unetquant.model import build_unet
    from napari_unetquant.recipes import QuantChoice

    quant = QuantChoice(weight_bits=4, act_bits=6, edge_bits=8).config()
    assert quant.edge_layers == QuantConfig().edge_layers
    assert quant.edge_precision == QuantizerConfig.from_bits("fixed", 8)
    assert quant == dataclasses.replace(
        QuantConfig.from_bits(4, 6), edge_precision=QuantizerConfig.from_bits("fixed", 8)
    )
    model = build_unet(UNetConfig(base_width=4, depth=2), quant).train()
    with torch.no_grad():
        model(torch.randn(2, 1, 32, 32))  # chooses the activation formats
    network = IntegerUNet(model.eval())
    assert network.integer_layers == list(network.convs)
    assert network.convs["enc1.conv1"].input_format.hi == 127  # 8-bit codes at the input
    with pytest.raises(SettingError, match="choose one") as error:
        QuantChoice(weight_bits=4, act_bits=6, edge_bits=8, quantize_edges=True)
    assert error.value.settings == ("edge_bits",)
    with pytest.raises(SettingError, match="edge bits 0") as error:
        QuantChoice(weight_bits=4, act_bits=6, edge_bits=0).config()
