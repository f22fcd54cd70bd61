"""The U-Net: shapes by table, names, training, configuration and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_unetquant.config import QuantConfig, QuantizerConfig, TrainConfig, UNetConfig
from napari_unetquant.data import em_phantom_stack, zscore
from napari_unetquant.model import UNet, build_unet
from napari_unetquant.quant import QuantConv2d, conv_names
from napari_unetquant.train import SliceSet, StepEvent, Trainer

SHAPES = [
    # (config, input shape, output shape)
    (UNetConfig(base_width=4), (1, 1, 64, 64), (1, 1, 64, 64)),
    (UNetConfig(base_width=4), (2, 1, 37, 51), (2, 1, 37, 51)),
    (UNetConfig(base_width=4), (1, 1, 1, 1), (1, 1, 1, 1)),
    (UNetConfig(base_width=4, depth=1), (3, 1, 9, 8), (3, 1, 9, 8)),
    (UNetConfig(base_width=2, depth=5), (1, 1, 33, 65), (1, 1, 33, 65)),
    (UNetConfig(in_channels=3, out_classes=4, base_width=4), (2, 3, 24, 20), (2, 4, 24, 20)),
]


@pytest.mark.parametrize(("config", "shape_in", "shape_out"), SHAPES)
@pytest.mark.parametrize("quant", [QuantConfig(), QuantConfig.from_bits(4, 6)], ids=["FP", "W4A6"])
def test_output_shapes(
    config: UNetConfig, shape_in: tuple[int, ...], shape_out: tuple[int, ...], quant: QuantConfig
) -> None:
    model = build_unet(config, quant).eval()
    with torch.no_grad():
        assert tuple(model(torch.randn(shape_in)).shape) == shape_out


def test_layer_names_are_stable_and_readable() -> None:
    names = conv_names(build_unet(UNetConfig(base_width=4, depth=2)))
    assert names == [
        "enc1.conv1",
        "enc1.conv2",
        "enc2.conv1",
        "enc2.conv2",
        "bottleneck.conv1",
        "bottleneck.conv2",
        "dec2.conv1",
        "dec2.conv2",
        "dec1.conv1",
        "dec1.conv2",
        "head",
    ]


def test_paper_widths_and_channels() -> None:
    model = UNet(UNetConfig.paper())
    channels = {
        n: (m.in_channels, m.out_channels)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d)
    }
    assert channels["enc1.conv1"] == (1, 64)
    assert channels["enc3.conv2"] == (256, 256)
    assert channels["bottleneck.conv1"] == (256, 256)
    assert channels["dec3.conv1"] == (512, 256)
    assert channels["dec2.conv1"] == (384, 128)
    assert channels["dec1.conv1"] == (192, 64)
    assert channels["head"] == (64, 1)


def test_edges_stay_full_precision_by_default_and_can_be_quantized() -> None:
    config = UNetConfig(base_width=4)
    default = build_unet(config, QuantConfig.from_bits(4, 6))
    layers = {n: m for n, m in default.named_modules() if isinstance(m, QuantConv2d)}
    assert layers["enc1.conv1"].weight_quantizer.stored_bits == 32
    assert layers["enc1.conv2"].input_quantizer.stored_bits == 32
    assert layers["head"].weight_quantizer.stored_bits == 32
    assert layers["enc2.conv1"].weight_quantizer.stored_bits == 4
    assert layers["enc2.conv1"].input_quantizer.stored_bits == 6
    everything = build_unet(
        config,
        QuantConfig(
            weight=QuantizerConfig.from_bits("fixed", 4),
            act=QuantizerConfig.from_bits("fixed", 6),
            edge_layers=(),
        ),
    )
    assert all(
        m.weight_quantizer.stored_bits == 4
        for m in everything.modules()
        if isinstance(m, QuantConv2d)
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "quant",
    [QuantConfig.from_bits(4, 6), QuantConfig.from_bits(4, 4, "lsq"), QuantConfig.paper()],
    ids=["W4A6-fixed", "W4A4-lsq", "Q0.4/Q6.0"],
)
def test_quantized_model_learns_a_generated_image(quant: QuantConfig) -> None:
    images, labels = em_phantom_stack(3, 64, 64, seed=3)
    slices = SliceSet.from_stacks(np.stack([zscore(s) for s in images]), labels)
    model = build_unet(UNetConfig(base_width=8, depth=2), quant)
    config = TrainConfig(steps=60, batch_size=4, crop=48, validate_every=60, augment=False)
    trainer = Trainer(model, slices, None, config)
    before = trainer.validation_dice()  # evaluation mode: frozen formats and statistics
    losses = [e.loss for e in trainer.run() if isinstance(e, StepEvent)]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    assert trainer.validation_dice() > before + 0.1


@pytest.mark.parametrize(
    "quant",
    [
        QuantConfig.from_bits(4, 6),
        QuantConfig.from_bits(3, 4, "lsq"),
        QuantConfig.from_bits(2, 2, "ternary"),
    ],
    ids=["W4A6", "W3A4-lsq", "ternary"],
)
def test_state_dict_round_trip_reproduces_outputs_exactly(quant: QuantConfig) -> None:
    config = UNetConfig(base_width=4, depth=2)
    trained = build_unet(config, quant)
    trained.train()
    for _ in range(3):  # move BatchNorm statistics, running peaks and learned steps
        trained(torch.randn(2, 1, 24, 24))
    trained.eval()
    restored = build_unet(config, quant)
    restored.load_state_dict(trained.state_dict())
    restored.eval()
    x = torch.randn(1, 1, 24, 24)
    with torch.no_grad():
        assert torch.equal(restored(x), trained(x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_channels": 0}, "in_channels must be a positive integer"),
        ({"out_classes": -1}, "out_classes must be a positive integer"),
        ({"base_width": 2.5}, "base_width must be a positive integer"),
        ({"depth": 0}, "depth must be a positive integer"),
        ({"depth": 7}, "too deep"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"bn_momentum": 0.0}, "bn_momentum must be in"),
        ({"upsample": "bicubic"}, "upsample must be one of bilinear, nearest"),
    ],
)
def test_configuration_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UNetConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 32, 32), r"expects a batch shaped \(N, C, H, W\)"),
        ((1, 3, 32, 32), r"built for 1 input channel\(s\) but the input has 3"),
        ((1, 1, 0, 8), "empty image"),
    ],
)
def test_input_errors(shape: tuple[int, ...], message: str) -> None:
    model = build_unet(UNetConfig(base_width=2))
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(shape))
