"""The U-Net as a QONNX graph: the quantized ONNX dialect that Brevitas exports and FINN and
hls4ml import, with each quantizer's exact bit width, scale, signedness and range.

The graph is the network of :mod:`.onnx_graph`'s float form (the same padding, pooling,
upsampling, concatenation and crop) with QONNX's ``Quant(x, scale, zeropt, bitwidth)`` nodes
(domain ``qonnx.custom_op.general``) where the quantization-aware model quantizes, laid out as
Brevitas lays out its exports:

- weights: a float initializer, a ``Quant`` with one scale per output channel
  (``(C_out, 1, 1, 1)``), then ``Conv`` (bias float). The initializer holds the weights on the
  grid (the dequantized codes), so a packed model, which keeps only its codes, exports the same
  graph, and the ``Quant`` maps it onto itself (checked here for every layer);
- activations: a ``Quant`` on each quantized convolution's input, that is after the previous
  layer's ReLU and BatchNorm, after ``MaxPool`` in the encoder and after ``Concat`` in the
  decoder (one format per tensor; max pooling commutes with the monotone quantizer);
- ReLU then BatchNorm (the paper's order) as ``Relu`` and ``BatchNormalization`` with the folded
  scale and shift (mean 0, variance 1, epsilon 0): FINN (``BatchNormToAffine``), hls4ml and
  qonnx's channels-last conversion take it as it is, and packed models (``FoldedBatchNorm``) hold
  only the folded pair. PyTorch computes ``x * alpha + beta`` with one fused multiply-add where
  ONNX runtimes round twice: a result can differ in its last bit, and a code by one where the
  model sits that close to a half step (the tests count none on their models).

``Quant`` clips ``x / scale`` to the code range and then rounds half to even
(``rounding_mode="ROUND"``: ``numpy.round``), as the quantizers do (``torch.round``). The
quantizers map to it as (``bitwidth``, ``signed``, ``narrow``; ``scale``):

- fixed point, signed: ``(bits, 1, 1)``: sign-magnitude codes ``-(2**m - 1) .. 2**m - 1``
  (``m = bits - 1``) are QONNX's narrow signed range; ``2**-frac_bits``;
- fixed point, unsigned: ``(bits, 0, 0)``; ``2**-frac_bits``;
- learned step (LSQ): ``(bits, signed, 0)``; the learned step, a float that is not a power of
  two unless the quantizer was trained with ``power_of_two``;
- ternary weights: ``(2, 1, 1)``; the per-channel TWN scale;
- binary: ``BipolarQuant`` (``+scale`` at 0 and above, ``-scale`` below); weights ``mean|w|``
  per channel, activations 1.

Ternary activations (a threshold at 0.7 mean ``|x|``, not a rounding midpoint) have no QONNX
form and are refused, as are 3D networks.

The graph has static shapes, as FINN and hls4ml need: ``image`` ``(1, 1, H, W)`` float32
(normalised as the model's preprocessing says) to ``logits`` ``(1, out_classes, H, W)``. When
``H`` or ``W`` is not a multiple of ``2**depth``, ``Pad`` (edge) and ``Slice`` nodes pad and
crop; a size that is a multiple (the default: the tile ``segment`` uses) needs neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import InferConfig
from ..errors import SettingError
from ..model.unet import UNet
from ..quant.codes import weight_codes
from ..quant.layers import QuantConv2d
from ..quant.quantizers import (
    BinaryQuantizer,
    FixedPointQuantizer,
    LSQQuantizer,
    Quantizer,
    TernaryQuantizer,
)
from .integer_conv import _affine
from .onnx_graph import _Graph, _Tensor, _UNetGraph, save_checked

QONNX_DOMAIN = "qonnx.custom_op.general"
QONNX_FORMAT = "napari-unetquant-qonnx"
OPSET = 13
"""The ONNX opset of the standard nodes (qonnx's executor runs them at it); FINN and hls4ml
read it."""
CONV_ATTRIBUTES: dict[str, Any] = {
    "kernel_shape": [3, 3],
    "pads": [1, 1, 1, 1],
    "strides": [1, 1],
    "dilations": [1, 1],
    "group": 1,
}
"""Every attribute written out, as PyTorch's exporter does: qonnx's channels-last ``Conv``
requires them (``MaxPool`` likewise gets its ``pads``)."""


@dataclass(frozen=True)
class QuantSpec:
    """One QONNX quantizer node: ``Quant`` with ``bits``, ``signed`` and ``narrow`` (codes
    ``-(2**(bits-1) - narrow) .. 2**(bits-1) - 1`` signed, ``0 .. 2**bits - 1`` unsigned), or
    ``BipolarQuant`` (``bipolar``: values ``+-scale``, ``+`` at 0).

    ``scale`` is float32: ``()`` for activations, ``(C_out, 1, 1, 1)`` for weights."""

    scale: np.ndarray
    bits: int
    signed: bool
    narrow: bool
    bipolar: bool = False

    @property
    def code_range(self) -> tuple[int, int]:
        """The lowest and highest code (``(-1, 1)`` for bipolar)."""
        if self.bipolar:
            return -1, 1
        if not self.signed:
            return 0, 2**self.bits - 1
        return -(2 ** (self.bits - 1)) + int(self.narrow), 2 ** (self.bits - 1) - 1


def activation_spec(quantizer: Quantizer, where: str) -> QuantSpec | None:
    """The QONNX quantizer of an activation quantizer (``None``: full precision).

    Raises :class:`~napari_unetquant.errors.SettingError` for a method QONNX cannot express
    (ternary) and for a format never chosen (an untrained model)."""
    config = quantizer.config
    if config.is_float:
        return None
    if isinstance(quantizer, FixedPointQuantizer):
        if not quantizer.frozen:
            raise _untrained(where)
        scale = np.float32(2.0 ** -int(quantizer.frac_bits))
        return QuantSpec(np.asarray(scale), config.bits, config.signed, config.signed)
    if isinstance(quantizer, LSQQuantizer):
        if not bool(quantizer.initialized):
            raise _untrained(where)
        step = quantizer.effective_step().float().reshape(()).cpu().numpy()
        return QuantSpec(step, config.bits, config.signed, False)
    if isinstance(quantizer, BinaryQuantizer):
        return QuantSpec(np.asarray(np.float32(1.0)), 1, True, False, bipolar=True)
    raise SettingError(
        f"{where}: QONNX has no quantizer for {config.label} activations (a threshold at 0.7 "
        f"mean |x| is not a rounding step); quantize the activations with fixed point or a "
        f"learned step (ternary weights export) and retrain, or export the packed model",
        "act_bits",
    )


def _untrained(where: str) -> SettingError:
    return SettingError(
        f"{where}: the activation format was never chosen (an untrained model); train the "
        f"model, or run it once in training mode, before exporting QONNX"
    )


def weight_spec(layer: QuantConv2d, where: str) -> tuple[np.ndarray, QuantSpec | None]:
    """The weights ``(C_out, C_in, 3, 3)`` float32 as the layer uses them (on the grid) and
    their QONNX quantizer (``None``: full precision). Checks that the quantizer maps the
    weights onto themselves, so the graph computes exactly what the layer does."""
    weight = layer.quantized_weight().detach().float().cpu().numpy()
    quantizer = layer.weight_quantizer
    config = quantizer.config
    if config.is_float:
        return weight, None
    codes = weight_codes(quantizer, layer.weight)
    scale = codes.scale.cpu().numpy().astype(np.float32).reshape(-1, 1, 1, 1)
    scale = np.where(scale > 0, scale, np.float32(1.0))  # a ternary channel of zeros
    if config.method == "binary":
        spec = QuantSpec(scale, 1, True, False, bipolar=True)
    elif isinstance(quantizer, TernaryQuantizer) or config.method == "ternary":
        spec = QuantSpec(scale, 2, True, True)
    else:  # fixed point (sign-magnitude: narrow) and learned steps, packed or not
        sign_magnitude = config.method == "fixed" and config.signed
        spec = QuantSpec(scale, config.bits, config.signed, sign_magnitude)
    if not np.array_equal(quantize(weight, spec), weight):
        raise ValueError(f"{where}: the weights do not lie on their {config.label} grid")
    return weight, spec


def quantize(x: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """What QONNX's ``Quant`` (or ``BipolarQuant``) node computes, in float32: ``x / scale``
    clipped to the codes, rounded half to even, times ``scale``."""
    if spec.bipolar:
        return np.asarray(np.where(x >= 0, np.float32(1), np.float32(-1)) * spec.scale)
    lo, hi = spec.code_range
    codes = np.round(np.clip(x / spec.scale, np.float32(lo), np.float32(hi)))
    return np.asarray(codes * spec.scale, np.float32)


class _QonnxGraph(_UNetGraph):
    """:class:`~.onnx_graph._UNetGraph`'s float network, with QONNX quantizer nodes in place
    of ``Clip``, ``QuantizeLinear`` and ``DequantizeLinear``, and a static input size."""

    def __init__(self, model: UNet, size: tuple[int, int]) -> None:
        # not the base's __init__: its ActFormat refuses what QONNX expresses (binary inputs);
        # with no formats, the float form's network carries float values throughout
        self.model = model
        self.form = "float"
        self.g = _Graph()
        self.size = size
        self.padded = tuple(-extent % model.config.size_multiple for extent in size)
        self.inputs: dict[str, QuantSpec | None] = {}
        for name, module in model.named_modules():
            if isinstance(module, QuantConv2d):
                self.inputs[name] = activation_spec(module.input_quantizer, name)
        self.formats = dict.fromkeys(self.inputs)

    def quant(self, x: str, spec: QuantSpec, hint: str) -> str:
        """A ``Quant`` (or ``BipolarQuant``) node on tensor ``x``."""
        g = self.g
        scale = g.constant(spec.scale, f"{hint}.scale")
        if spec.bipolar:
            return g.op("BipolarQuant", [x, scale], hint, domain=QONNX_DOMAIN)
        inputs = [
            x,
            scale,
            g.constant(np.float32(0.0), f"{hint}.zeropt"),
            g.constant(np.float32(spec.bits), f"{hint}.bitwidth"),
        ]
        return g.op(
            "Quant",
            inputs,
            hint,
            domain=QONNX_DOMAIN,
            signed=int(spec.signed),
            narrow=int(spec.narrow),
            rounding_mode="ROUND",
        )

    def layer_input(self, x: _Tensor, name: str) -> _Tensor:
        spec = self.inputs[name]
        return x if spec is None else _Tensor(self.quant(x.name, spec, f"{name}.input_quant"))

    def _float_conv(
        self, name: str, x: _Tensor, layer: QuantConv2d, bn: nn.Module | None
    ) -> _Tensor:
        g = self.g
        weight, spec = weight_spec(layer, name)
        weights = g.constant(weight, f"{name}.weight")
        if spec is not None:
            weights = self.quant(weights, spec, f"{name}.weight_quant")
        inputs = [x.name, weights]
        if layer.bias is not None:
            inputs.append(g.constant(layer.bias.detach().float().cpu().numpy(), f"{name}.bias"))
        y = g.op("Conv", inputs, name, **CONV_ATTRIBUTES)
        if bn is None:
            return _Tensor(y)
        y = g.op("Relu", [y], f"{name}.relu")
        alpha, beta = (t.float().cpu().numpy() for t in _affine(name, bn, layer.out_channels))
        channels = alpha.shape[0]
        statistics = [
            g.constant(alpha, f"{name}.bn_scale"),
            g.constant(beta, f"{name}.bn_shift"),
            g.constant(np.zeros(channels, np.float32), f"{name}.bn_mean"),
            g.constant(np.ones(channels, np.float32), f"{name}.bn_var"),
        ]
        bn_out = g.op(
            "BatchNormalization", [y, *statistics], f"{name}.bn", epsilon=0.0, momentum=0.9
        )
        return _Tensor(bn_out)

    def _pad(self, image: str) -> tuple[str, str]:
        """``image`` padded at the bottom and right (edge) by the static amounts, and the
        ``[H, W]`` to crop back to."""
        g = self.g
        size = g.constant(np.array(self.size, np.int64), "size")
        if not any(self.padded):
            return image, size
        pads = g.constant(np.array([0, 0, 0, 0, 0, 0, *self.padded], np.int64), "pads")
        return g.op("Pad", [image, pads], "padded", mode="edge"), size


def unet_qonnx(model: nn.Module, image_size: tuple[int, int] | None = None) -> Any:
    """``model`` (a 2D napari-unetquant U-Net, quantized or not, packed or not, trained) as a
    QONNX ``onnx.ModelProto`` for images ``(1, 1, H, W)``, ``image_size = (H, W)`` (default: the
    tile ``segment`` uses, square), with every tensor's shape annotated.

    Raises :class:`~napari_unetquant.errors.SettingError` for what QONNX cannot express here
    (a 3D network, ternary activations) and for an untrained model's activation formats.
    """
    from onnx import helper

    if not isinstance(model, UNet):
        raise ValueError("QONNX export takes the napari-unetquant U-Net")
    if model.config.spatial_dims != 2:
        raise SettingError(
            f"QONNX export covers 2D U-Nets; this model is {model.config.spatial_dims}D: "
            f"train a 2D U-Net (spatial dimensions 2) to export QONNX",
            "network",
        )
    tile = InferConfig().tile
    size = image_size if image_size is not None else (tile, tile)
    if len(size) != 2 or any(int(extent) < 1 for extent in size):
        raise ValueError(f"image_size must be (H, W) with H, W >= 1, got {size!r}")
    model.eval()
    with torch.no_grad():
        builder = _QonnxGraph(model, (int(size[0]), int(size[1])))
        proto = builder.build()
    if not any(builder.padded):
        _drop_final_slice(proto)
    for node in proto.graph.node:
        if node.op_type == "MaxPool":
            node.attribute.append(helper.make_attribute("pads", [0, 0, 0, 0]))
    _set_static_shapes(proto, builder.size, model.config.out_classes)
    del proto.opset_import[:]
    proto.opset_import.extend(
        [helper.make_opsetid("", OPSET), helper.make_opsetid(QONNX_DOMAIN, 1)]
    )
    _annotate_shapes(proto)
    return proto


def _drop_final_slice(proto: Any) -> None:
    """Remove the crop to the input size when nothing was padded: the last node (a ``Slice``
    from the full size) then writes ``logits`` itself."""
    crop = proto.graph.node[-1]
    assert crop.op_type == "Slice" and list(crop.output) == ["logits"]
    for node in proto.graph.node:
        for index, name in enumerate(node.output):
            if name == crop.input[0]:
                node.output[index] = "logits"
    used = {name for node in proto.graph.node if node is not crop for name in node.input}
    del proto.graph.node[-1]
    kept = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)


def _set_static_shapes(proto: Any, size: tuple[int, int], classes: int) -> None:
    for value, channels in ((proto.graph.input[0], 1), (proto.graph.output[0], classes)):
        dims = value.type.tensor_type.shape.dim
        for dim, extent in zip(dims, (1, channels, *size), strict=True):
            dim.Clear()
            dim.dim_value = extent


def _annotate_shapes(proto: Any) -> None:
    """Fill ``value_info`` with every tensor's shape (QONNX's executor needs them): ONNX shape
    inference on a copy whose quantizer nodes are ``Identity`` (they keep the shape)."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    for node in probe.graph.node:
        if node.domain == QONNX_DOMAIN:
            del node.input[1:]
            del node.attribute[:]
            node.op_type, node.domain = "Identity", ""
    inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=True)
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(inferred.graph.value_info)


def export_qonnx(
    model: nn.Module,
    path: str | Path,
    metadata: dict[str, Any] | None = None,
    image_size: tuple[int, int] | None = None,
) -> None:
    """Write ``model`` as a QONNX file (atomically) for images ``image_size`` (see
    :func:`unet_qonnx`), with ``metadata`` (JSON-able values) in the model's
    ``metadata_props``, each value JSON text, beside ``format`` and ``input_shape``."""
    proto = unet_qonnx(model, image_size)
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    save_checked(proto, path, {"format": QONNX_FORMAT, "input_shape": shape}, metadata)
