"""The 3D U-Net: shapes by table, the 2D network's names and arithmetic, configuration errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_unetquant.config import QuantConfig, UNetConfig
from napari_unetquant.model import BatchNorm3d, UNet, build_unet
from napari_unetquant.quant import QuantConv3d, conv_names

SHAPES = [
    # (config, input shape (N, C, D, H, W), output shape)
    (UNetConfig(base_width=2, spatial_dims=3), (1, 1, 16, 16, 16), (1, 1, 16, 16, 16)),
    (UNetConfig(base_width=2, spatial_dims=3), (2, 1, 5, 19, 11), (2, 1, 5, 19, 11)),
    (UNetConfig(base_width=2, spatial_dims=3), (1, 1, 1, 1, 1), (1, 1, 1, 1, 1)),
    (UNetConfig(base_width=2, depth=1, spatial_dims=3), (1, 1, 3, 9, 8), (1, 1, 3, 9, 8)),
    (UNetConfig(base_width=2, depth=4, spatial_dims=3), (1, 1, 17, 7, 33), (1, 1, 17, 7, 33)),
    (
        UNetConfig(in_channels=2, out_classes=3, base_width=2, spatial_dims=3),
        (1, 2, 9, 12, 10),
        (1, 3, 9, 12, 10),
    ),
]


@pytest.mark.parametrize(("config", "shape_in", "shape_out"), SHAPES)
@pytest.mark.parametrize("quant", [QuantConfig(), QuantConfig.from_bits(4, 6)], ids=["FP", "W4A6"])
def test_output_shapes_3d(
    config: UNetConfig, shape_in: tuple[int, ...], shape_out: tuple[int, ...], quant: QuantConfig
) -> None:
    model = build_unet(config, quant).eval()
    with torch.no_grad():
        assert tuple(model(torch.randn(shape_in)).shape) == shape_out


def test_3d_network_keeps_the_2d_layer_names_with_3d_layers() -> None:
    flat = build_unet(UNetConfig(base_width=4, depth=2))
    volumetric = build_unet(UNetConfig(base_width=4, depth=2, spatial_dims=3))
    assert conv_names(volumetric) == conv_names(flat)
    shapes_2d = {k: tuple(v.shape) for k, v in flat.state_dict().items()}
    shapes_3d = {k: tuple(v.shape) for k, v in volumetric.state_dict().items()}
    assert shapes_3d.keys() == shapes_2d.keys()
    for key, shape in shapes_2d.items():  # conv kernels gain a depth axis of 3, nothing else
        expected = (*shape[:2], 3, *shape[2:]) if len(shape) == 4 else shape
        assert shapes_3d[key] == expected
    assert all(isinstance(volumetric.get_submodule(n), QuantConv3d) for n in conv_names(flat))
    assert isinstance(volumetric.get_submodule("dec1.bn2"), BatchNorm3d)


def test_3d_network_on_a_stack_of_equal_slices_is_the_2d_network() -> None:
    """With each 3x3x3 kernel zero outside its middle plane, a volume of identical slices runs
    through the 3D U-Net exactly as one slice runs through the 2D U-Net: the same padding to
    a multiple, pooling, upsampling, skips and cropping, along every axis."""
    flat = UNet(UNetConfig(base_width=4, depth=2)).eval()
    volumetric = UNet(UNetConfig(base_width=4, depth=2, spatial_dims=3)).eval()
    with torch.no_grad():
        for module in flat.modules():  # BatchNorm statistics that are not the identity
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        state = {}
        for key, value in flat.state_dict().items():
            if value.dim() == 4:
                kernel = torch.zeros(*value.shape[:2], 3, *value.shape[2:])
                kernel[:, :, 1] = value
                value = kernel
            state[key] = value
        volumetric.load_state_dict(state)
        image = torch.randn(2, 1, 21, 30)
        expected = flat(image)
        result = volumetric(image[:, :, None].expand(2, 1, 5, 21, 30).contiguous())
    assert result.shape == (2, 1, 5, 21, 30)
    for depth in range(5):
        torch.testing.assert_close(result[:, :, depth], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("quant", [QuantConfig.from_bits(4, 6), QuantConfig.from_bits(3, 4, "lsq")])
def test_3d_state_dict_round_trip_reproduces_outputs_exactly(quant: QuantConfig) -> None:
    config = UNetConfig(base_width=2, depth=2, spatial_dims=3)
    trained = build_unet(config, quant).train()
    for _ in range(3):  # move BatchNorm statistics, running peaks and learned steps
        trained(torch.randn(2, 1, 8, 12, 12))
    trained.eval()
    restored = build_unet(config, quant)
    restored.load_state_dict(trained.state_dict())
    restored.eval()
    x = torch.randn(1, 1, 6, 10, 10)
    with torch.no_grad():
        assert torch.equal(restored(x), trained(x))


@pytest.mark.parametrize("value", [1, 4, True, 2.0, "3"])
def test_spatial_dims_must_be_2_or_3(value: object) -> None:
    with pytest.raises(ValueError, match=r"spatial_dims must be 2 \(slices\) or 3 \(volumes\)"):
        UNetConfig(spatial_dims=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 1, 32, 32), r"3D UNet expects a batch of volumes shaped \(N, C, D, H, W\)"),
        ((1, 2, 4, 8, 8), r"built for 1 input channel\(s\) but the input has 2"),
        ((1, 1, 0, 8, 8), "empty image"),
    ],
)
def test_3d_input_errors(shape: tuple[int, ...], message: str) -> None:
    model = build_unet(UNetConfig(base_width=2, spatial_dims=3))
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(shape))


def test_2d_network_refuses_volumes() -> None:
    with pytest.raises(ValueError, match=r"expects a batch shaped \(N, C, H, W\)"):
        build_unet(UNetConfig(base_width=2))(torch.zeros(1, 1, 4, 8, 8))
