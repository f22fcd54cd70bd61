"""Integer-only inference: int8 kernels, int32 accumulators, exact where scales are powers of 2."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_unetquant.config import (
    InferConfig,
    LayerOverride,
    QuantConfig,
    QuantizerConfig,
    UNetConfig,
)
from napari_unetquant.data import Volume, em_phantom_stack
from napari_unetquant.errors import SettingError
from napari_unetquant.infer import segment_volume
from napari_unetquant.infer.integer import IntegerUNet
from napari_unetquant.infer.integer_ops import round_shift
from napari_unetquant.model import BatchNorm2d, FoldedBatchNorm, build_unet
from napari_unetquant.modelio import SegmentationModel, load_model, save_model
from napari_unetquant.quant import QuantConv2d


def test_round_shift_rounds_half_to_even_like_torch_round() -> None:
    values = torch.arange(-4000, 4000, dtype=torch.int64)
    for shift in (1, 2, 3, 7):
        expected = torch.round(values.double() / 2**shift).to(torch.int64)
        assert torch.equal(round_shift(values.clone(), shift), expected)
    assert torch.equal(round_shift(values.clone(), -2), values * 4)


def test_fast_requantization_equals_the_int64_reference_over_the_whole_range() -> None:
    model = _train(QuantConfig.from_label("W4A4-lsq"), steps=5)
    net = IntegerUNet(model)
    generator = torch.Generator().manual_seed(5)
    checked = 0
    for producer, outputs in net.outputs.items():
        conv = net.convs[producer]
        for consumer, fmt, extra in outputs:
            if not conv.integer or fmt is None:
                continue
            requant = conv.requant(consumer, fmt, extra)
            bound = conv.accumulator_bound
            acc = torch.randint(
                -bound,
                bound + 1,
                (4096, conv.layer.out_channels),
                generator=generator,
                dtype=torch.int32,
            )
            acc[0], acc[1] = bound, -bound  # the extremes the proof covers
            assert torch.equal(requant(acc), requant.reference(acc).double())
            checked += 1
    assert checked >= 12


def _power_of_two_network(
    edge_layers: tuple[str, ...], upsample: str = "bilinear"
) -> torch.nn.Module:
    """A U-Net whose every scale is a power of two: weights Q1.2, activations Q5.0, BatchNorm
    scales +-2**k, shifts and biases on a 1/4 grid. Every float sum is then exact, in the
    simulation as in integers."""
    quant = QuantConfig(
        weight=QuantizerConfig.from_format("Q1.2"),
        act=QuantizerConfig.from_format("Q5.0"),
        edge_layers=edge_layers,
    )
    model = build_unet(UNetConfig(base_width=4, depth=2, upsample=upsample), quant).eval()
    generator = torch.Generator().manual_seed(3)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantConv2d) and module.bias is not None:
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.6)
                module.bias.copy_(torch.randint(-8, 9, module.bias.shape, generator=generator) / 4)
        if isinstance(module, BatchNorm2d):
            folded = FoldedBatchNorm(module.num_features)
            channels = module.num_features
            exponents = torch.randint(-2, 2, (channels,), generator=generator).float()
            signs = torch.where(torch.rand(channels, generator=generator) < 0.2, -1.0, 1.0)
            folded.alpha.copy_(signs * 2.0**exponents)
            folded.beta.copy_(torch.randint(-12, 13, (channels,), generator=generator) / 4)
            block, _, child = name.rpartition(".")
            setattr(model.get_submodule(block), child, folded)
    return model


@pytest.mark.parametrize("upsample", ["bilinear", "nearest"])
@pytest.mark.parametrize("edge_layers", [("enc1.*", "head"), ()], ids=["float-edges", "all"])
def test_exactly_the_simulated_model_where_scales_are_powers_of_two(
    edge_layers: tuple[str, ...], upsample: str
) -> None:
    model = _power_of_two_network(edge_layers, upsample)
    x = torch.randn(2, 1, 36, 44) * 3
    with torch.no_grad():
        expected = model(x)
    logits = IntegerUNet(model)(x)
    assert torch.equal(logits, expected)
    assert float(expected.std()) > 0.1  # a network that computes something


def _train(quant: QuantConfig, steps: int = 60) -> torch.nn.Module:
    """A small U-Net trained for real on EM-like phantoms."""
    images, masks = em_phantom_stack(4, 64, 64, seed=11)
    x = torch.from_numpy((images - images.mean()) / images.std())[:, None].float()
    y = torch.from_numpy(masks)[:, None].float()
    model = build_unet(UNetConfig(base_width=8, depth=3), quant).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize(
    "quant",
    [
        QuantConfig.from_label("W4A6"),
        QuantConfig.from_label("Q0.4/Q6.0"),
        QuantConfig.from_label("W4A4-lsq"),
        dataclasses.replace(QuantConfig.from_label("W3A5"), edge_layers=()),
    ],
    ids=lambda q: f"{q.label}-{len(q.edge_layers)}edges",
)
def test_masks_match_the_simulated_model_on_unseen_images(quant: QuantConfig) -> None:
    model = _train(quant)
    images, _ = em_phantom_stack(3, 96, 80, seed=99)
    x = torch.from_numpy((images - images.mean()) / images.std())[:, None].float()
    with torch.no_grad():
        expected = model(x) > 0
    masks = IntegerUNet(model)(x) > 0
    agreement = float((masks == expected).float().mean())
    assert agreement >= 0.9999, agreement
    assert 0.05 < float(expected.float().mean()) < 0.95  # a real segmentation, not all one class


def test_quantized_layers_run_on_the_int8_kernel_with_bounded_accumulators(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _train(QuantConfig.from_label("W4A6"), steps=5)
    net = IntegerUNet(model)
    seen: list[tuple[torch.dtype, torch.dtype, int]] = []
    original = torch._int_mm

    def spy(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
        result = original(a, b, out=out)
        seen.append((a.dtype, result.dtype, int(result.abs().max())))
        return result

    monkeypatch.setattr(torch, "_int_mm", spy)
    net(torch.randn(1, 1, 64, 64) * 4)
    assert len(net.integer_layers) == 12
    assert len(seen) >= 12 and all(a == torch.int8 and r == torch.int32 for a, r, _ in seen)
    bound = max(net.convs[name].accumulator_bound for name in net.integer_layers)
    assert bound < 2**31
    assert max(peak for _, _, peak in seen) <= bound


def test_unsupported_models_are_refused_with_the_fix() -> None:
    with pytest.raises(SettingError, match="no quantized layer") as error:
        IntegerUNet(build_unet(UNetConfig(base_width=4, depth=2)))
    assert error.value.settings == ("integer", "weight_bits", "act_bits")
    ternary = build_unet(UNetConfig(base_width=4, depth=2), QuantConfig.from_label("ternary"))
    with pytest.raises(SettingError, match="without integer inference") as error:
        IntegerUNet(ternary)
    assert error.value.settings == ("integer",)
    with pytest.raises(ValueError, match="U-Net only"):
        IntegerUNet(torch.nn.Conv2d(1, 1, 3))
    wide = QuantConfig(weight=QuantConfig.paper().weight, act=QuantizerConfig.from_format("Q8.0"))
    with pytest.raises(SettingError, match="int8 kernels") as error:
        IntegerUNet(build_unet(UNetConfig(base_width=4, depth=2), wide).eval())
    assert error.value.settings == ("weight_bits", "act_bits", "integer")


def test_an_untrained_dynamic_format_is_refused_with_the_fix() -> None:
    untrained = build_unet(UNetConfig(base_width=4, depth=2), QuantConfig.from_label("W4A6"))
    with pytest.raises(SettingError, match=r"never chosen .* train the model") as error:
        IntegerUNet(untrained.eval())
    assert error.value.settings == ("integer",)


def test_3d_models_are_refused_up_front_with_the_fix() -> None:
    unet = UNetConfig(base_width=2, depth=2, spatial_dims=3)
    model = build_unet(unet, QuantConfig.from_label("W4A6")).eval()
    message = r"^integer inference runs 2D U-Nets only; this model is 3D: run it without integer"
    with pytest.raises(SettingError, match=message) as error:
        IntegerUNet(model)
    assert error.value.settings == ("integer",)


def test_integer_inference_off_the_cpu_is_refused_with_the_fix() -> None:
    model = _train(QuantConfig.from_label("W4A6"), steps=1)
    bundle = SegmentationModel(model, UNetConfig(base_width=8, depth=3), QuantConfig())
    volume = Volume(np.zeros((1, 16, 16), np.float32))
    with pytest.raises(SettingError, match="runs on the CPU, not cuda; use the CPU") as error:
        segment_volume(bundle, volume, InferConfig(integer=True), "cuda")
    assert error.value.settings == ("device", "integer")


def test_input_of_any_size_is_padded_and_cropped_like_the_model() -> None:
    """One network, reused across sizes and batches: its kept buffers never leak stale
    values (padding borders, larger earlier activations)."""
    model = _power_of_two_network(("enc1.*", "head"))
    net = IntegerUNet(model)
    for shape in [(2, 1, 40, 48), (1, 1, 17, 23), (3, 1, 8, 8), (1, 1, 17, 23), (2, 1, 40, 48)]:
        x = torch.randn(shape) * 3
        with torch.no_grad():
            assert torch.equal(net(x), model(x))
    assert np.isfinite(net(torch.zeros(1, 1, 8, 8)).numpy()).all()


@pytest.mark.slow
@pytest.mark.parametrize(
    "quant",
    [
        dataclasses.replace(QuantConfig.from_label("W4A6"), edge_layers=("enc1.conv1", "head")),
        dataclasses.replace(
            QuantConfig.from_label("W4A6"),
            overrides=(LayerOverride("*.conv2", weight=QuantizerConfig()),),
        ),
        dataclasses.replace(QuantConfig.from_label("W4A4-lsq"), edge_layers=()),
    ],
    ids=["first-conv-float", "conv2-float-weights", "lsq-all"],
)
def test_packed_files_run_on_integers_like_the_model_they_came_from(
    quant: QuantConfig, tmp_path: Path
) -> None:
    model = _train(quant, steps=20)
    path = tmp_path / "packed.safetensors"
    save_model(
        path, SegmentationModel(model, UNetConfig(base_width=8, depth=3), quant), packed=True
    )
    packed = load_model(path).model
    x = torch.randn(1, 1, 48, 40) * 2
    expected = IntegerUNet(model)(x)
    assert torch.equal(IntegerUNet(packed)(x), expected)
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))


def test_a_cached_integer_network_does_not_keep_its_model_alive() -> None:
    import gc
    import weakref

    from napari_unetquant.infer.predict import cached_integer_unet

    model = _train(QuantConfig.from_label("W4A6"), steps=2)
    net = cached_integer_unet(model)
    assert cached_integer_unet(model) is net  # built once
    net(torch.randn(1, 1, 32, 32))
    assert cached_integer_unet(model) is net  # running it changes nothing that counts
    with torch.no_grad():
        model.head.bias.add_(0.0)  # an in-place change of a parameter rebuilds it
    assert cached_integer_unet(model) is not net
    alive = weakref.ref(model)
    del model, net
    gc.collect()
    assert alive() is None
