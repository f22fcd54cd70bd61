"""The U-Net as QONNX, run by the ``qonnx`` package's executor against the PyTorch simulation,
before and after qonnx's cleanup and channels-last conversion."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.custom_op.general.quant import quant
from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
from qonnx.util.cleanup import cleanup_model

from napari_unetquant.config import QuantConfig, QuantizerConfig, UNetConfig
from napari_unetquant.errors import SettingError
from napari_unetquant.infer.onnx_graph import onnx_metadata
from napari_unetquant.infer.qonnx_graph import (
    activation_spec,
    export_qonnx,
    unet_qonnx,
    weight_spec,
)
from napari_unetquant.model import build_unet
from napari_unetquant.modelio import SegmentationModel, load_model, save_model
from napari_unetquant.quant.layers import QuantConv2d
from napari_unetquant.quant.quantizers import FixedPointQuantizer, build_quantizer

SIZE = (37, 50)  # odd, not a multiple of 2**depth: padded and cropped inside the graph


def all_quantized(label: str) -> QuantConfig:
    return dataclasses.replace(QuantConfig.from_label(label), edge_layers=())


SETTINGS = {
    "W4A6": QuantConfig.from_label("W4A6"),  # float edge layers (the default)
    "W4A6 all": all_quantized("W4A6"),
    "W8A8": QuantConfig.from_label("W8A8"),
    "W2A4 all": all_quantized("W2A4"),
    "Q0.4/Q6.0 all": all_quantized("Q0.4/Q6.0"),
    "W3A4-lsq all": all_quantized("W3A4-lsq"),
    "binary all": all_quantized("binary"),
    "ternary weights, A4": QuantConfig(
        weight=QuantizerConfig("ternary", bits=2), act=QuantizerConfig.from_bits("fixed", 4)
    ),
}
CHANNELS_LAST = ("W4A6", "W3A4-lsq all", "binary all")
"""The graph's shapes among the settings (float edge layers; per-channel weight scales;
``BipolarQuant``), converted to channels last: the conversion takes seconds per model."""


@functools.cache
def _trained(label: str) -> torch.nn.Module:
    return tiny_trained_unet(SETTINGS[label])


def tiny_trained_unet(quant: QuantConfig, upsample: str = "bilinear") -> torch.nn.Module:
    """A tiny U-Net given a few optimisation steps: formats chosen, BatchNorm not initial."""
    torch.manual_seed(0)
    model = build_unet(UNetConfig(base_width=4, depth=2, upsample=upsample), quant).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        loss = (model(torch.randn(4, 1, 32, 32)) - 1).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _run(model: ModelWrapper, image: np.ndarray) -> np.ndarray:
    (name,) = (value.name for value in model.graph.output)
    out = execute_onnx(model, {model.graph.input[0].name: image})
    return np.asarray(out[name])


def _expected_node(layer: QuantConv2d, role: str) -> tuple[str, int, int, int]:
    """What the quantizer is, from its configuration alone: (op, bitwidth, signed, narrow)."""
    quantizer = layer.weight_quantizer if role == "weight" else layer.input_quantizer
    config = quantizer.config
    if config.method == "binary":
        return ("BipolarQuant", 1, 1, 0)
    if config.method == "ternary":
        return ("Quant", 2, 1, 1)
    sign_magnitude = config.method == "fixed" and config.signed  # codes -(2**m-1)..2**m-1
    return ("Quant", config.bits, int(config.signed), int(sign_magnitude))


def _check_quant_nodes(proto: Any, model: torch.nn.Module) -> int:
    """Every quantizer of ``model`` has its node, with its bit width, signedness, range and
    (fixed point) power-of-two scale; returns the number of nodes."""
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    nodes = {
        node.name.rsplit("_", 1)[0]: node
        for node in proto.graph.node
        if node.op_type in ("Quant", "BipolarQuant")
    }
    expected = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantConv2d):
            continue
        for role, quantizer in (
            ("weight", layer.weight_quantizer),
            ("input", layer.input_quantizer),
        ):
            node = nodes.get(f"{name}.{role}_quant")
            if quantizer.config.is_float:
                assert node is None, f"{name}: a float {role} is quantized"
                continue
            expected += 1
            assert node is not None, f"{name}: no {role} quantizer node"
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            got: tuple[Any, ...] = (node.op_type, 1, 1, 0)
            if node.op_type == "Quant":
                bits = int(initializers[node.input[3]])
                got = ("Quant", bits, attributes["signed"], attributes["narrow"])
                assert attributes["rounding_mode"] == b"ROUND"
                assert float(initializers[node.input[2]]) == 0.0
            assert got == _expected_node(layer, role), name
            scale = initializers[node.input[1]]
            assert scale.dtype == np.float32
            assert scale.shape == ((layer.out_channels, 1, 1, 1) if role == "weight" else ())
            if isinstance(quantizer, FixedPointQuantizer) and role == "input":
                assert float(scale) == 2.0 ** -int(quantizer.frac_bits)
    assert len(nodes) == expected
    return expected


ACTIVATIONS = {
    "fixed Q2.3": QuantizerConfig.from_format("Q2.3"),
    "fixed unsigned Q3.3": QuantizerConfig(method="fixed", bits=6, int_bits=3, frac_bits=3,
                                           signed=False),
    "lsq4": QuantizerConfig.from_bits("lsq", 4),
    "lsq4 unsigned": QuantizerConfig(method="lsq", bits=4, signed=False),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_qonnx_quant_equals_the_quantizer_on_ties_and_beyond_the_range(name: str) -> None:
    quantizer = build_quantizer(ACTIVATIONS[name], "act")
    quantizer(torch.randn(1000))  # a learned step starts at 2 mean|x| / sqrt(Q_P)
    quantizer.eval()
    spec = activation_spec(quantizer, name)
    assert spec is not None
    step = float(spec.scale)
    lo, hi = spec.code_range
    codes = np.arange(2 * lo - 3, 2 * hi + 4, dtype=np.float32) / 2  # every half step: ties
    x = np.concatenate([codes * np.float32(step), np.float32([-1e6, 1e6, 0.0])])
    with torch.no_grad():
        expected = quantizer(torch.from_numpy(x)).numpy()
    got = quant(
        x, spec.scale, np.float32(0), np.float32(spec.bits), spec.signed, spec.narrow, "ROUND"
    )
    assert np.array_equal(got, expected)
    assert set(np.round(expected / step)) == set(range(lo, hi + 1))  # the whole range, no more


def test_unsigned_fixed_point_weights_use_the_full_unsigned_range() -> None:
    layer = QuantConv2d(
        2,
        3,
        3,
        padding=1,
        weight_quant=QuantizerConfig(method="fixed", bits=4, signed=False),
        act_quant=QuantizerConfig.from_bits("fixed", 4),
    )
    weight, spec = weight_spec(layer, "layer")
    assert spec is not None and (spec.bits, spec.signed, spec.narrow) == (4, False, False)
    assert spec.scale.shape == (3, 1, 1, 1)
    got = quant(weight, spec.scale, np.float32(0), np.float32(4), False, False, "ROUND")
    assert np.array_equal(got, weight)


@pytest.mark.parametrize("label", list(SETTINGS))
def test_qonnx_computes_the_simulation_before_and_after_qonnx_transformations(
    label: str,
) -> None:
    model = _trained(label)
    image = torch.randn(1, 1, *SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(image).numpy()
    proto = unet_qonnx(model, SIZE)
    assert _check_quant_nodes(proto, model) > 0
    raw = ModelWrapper(proto)
    graphs = [raw, cleanup_model(raw)]
    if label in CHANNELS_LAST:
        graphs.append(graphs[-1].transform(ConvertToChannelsLastAndClean()))
        domains = {node.op_type: node.domain for node in graphs[-1].graph.node}
        assert domains["Conv"] == domains["MaxPool"] == "qonnx.custom_op.channels_last"
    for graph in graphs:
        got = _run(graph, image.numpy())
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        assert np.array_equal(got > 0, expected > 0)


def test_learned_steps_are_float_scales_and_the_graph_has_brevitas_layout() -> None:
    model = _trained("W3A4-lsq all")
    proto = unet_qonnx(model, (32, 32))  # a multiple of 2**depth: no Pad, no crop
    ops = [node.op_type for node in proto.graph.node]
    assert "Pad" not in ops and "Slice" not in ops
    assert set(ops) == {
        "Quant", "Conv", "Relu", "BatchNormalization", "MaxPool", "Resize", "Concat"
    }  # fmt: skip
    producers = {node.output[0]: node for node in proto.graph.node}
    for conv in (node for node in proto.graph.node if node.op_type == "Conv"):
        weight_quant = producers[conv.input[1]]  # float initializer -> Quant -> Conv
        assert weight_quant.op_type == "Quant"
        assert weight_quant.input[0] in {t.name for t in proto.graph.initializer}
    steps = [
        float(onnx.numpy_helper.to_array(t))
        for t in proto.graph.initializer
        if ".input_quant.scale" in t.name
    ]
    assert len(steps) == 11  # every convolution's input
    assert not any(np.log2(step).is_integer() for step in steps)  # learnt, not powers of two


def test_a_packed_model_exports_the_same_qonnx_values(tmp_path: Path) -> None:
    quant = SETTINGS["W4A6"]
    model = _trained("W4A6")
    path = tmp_path / "w4a6.safetensors"
    save_model(path, SegmentationModel(model, model.config, quant), packed=True)
    packed = load_model(path).model
    image = np.random.default_rng(3).normal(size=(1, 1, *SIZE)).astype(np.float32)
    with torch.no_grad():
        expected = packed(torch.from_numpy(image)).numpy()
    proto = unet_qonnx(packed, SIZE)
    _check_quant_nodes(proto, packed)
    got = _run(ModelWrapper(proto), image)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(got > 0, expected > 0)
    assert np.array_equal(got, _run(ModelWrapper(unet_qonnx(model, SIZE)), image))


def test_what_qonnx_cannot_express_is_refused_with_the_fix() -> None:
    volumetric = build_unet(UNetConfig(base_width=4, depth=2, spatial_dims=3)).eval()
    with pytest.raises(SettingError, match="2D U-Nets"):
        unet_qonnx(volumetric)
    ternary = build_unet(UNetConfig(base_width=4, depth=2), QuantConfig.from_label("ternary"))
    with pytest.raises(SettingError, match="ternary activations"):
        unet_qonnx(ternary.eval())
    untrained = build_unet(UNetConfig(base_width=4, depth=2), QuantConfig.from_label("W4A6"))
    with pytest.raises(SettingError, match="never chosen"):
        unet_qonnx(untrained.eval())
    with pytest.raises(ValueError, match="image_size"):
        unet_qonnx(_trained("W4A6"), (0, 32))


def test_export_writes_a_checked_file_with_its_metadata_atomically(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "w4a6.qonnx.onnx"
    export_qonnx(_trained("W4A6"), path, {"threshold": 0.5, "preprocess_text": "z"})
    onnx.checker.check_model(str(path))
    metadata = onnx_metadata(path)
    assert metadata["format"] == "napari-unetquant-qonnx"
    assert metadata["input_shape"] == "[1, 1, 512, 512]"  # the default: segment's tile
    assert metadata["threshold"] == "0.5" and metadata["preprocess_text"] == "z"
    assert sorted(p.name for p in path.parent.iterdir()) == ["w4a6.qonnx.onnx"]
    loaded = ModelWrapper(str(path))
    assert loaded.get_tensor_shape("logits") == [1, 1, 512, 512]
