"""The U-Net as a standard ONNX graph, in two forms of the same network.

``form="float"`` is the quantization-aware simulation in ONNX operators: every convolution a
float ``Conv`` whose weights are the dequantized codes, every quantized input a ``Clip`` to the
format's range, ``QuantizeLinear`` and ``DequantizeLinear`` with the format's step as scale
(fixed point: ``2**-f``) and zero point 0, so ONNX rounds half to even exactly as the quantizer
does. Any ONNX runtime computes the simulation's values, up to float32 summation order.

``form="int8"`` runs the integer layers (quantized weights and inputs, codes within 8 bits) as
``QLinearConv`` on the codes, so a runtime with int8 kernels (ONNX Runtime's MLAS: VNNI, AVX2,
NEON) uses them. The layer's ReLU and BatchNorm fold into it exactly: after a convolution ``z``,
the network computes ``Q(alpha * relu(z) + beta)`` with ``Q`` the next layer's input format,
which for ``alpha > 0`` is ``clamp(Q(alpha * z + beta), Q(beta), hi)`` (``Q`` is monotone) and
for ``alpha < 0`` is ``clamp(Q(alpha * z + beta), lo, Q(beta))``. So each output channel is one
``QLinearConv`` (weight codes times the sign of ``alpha``, weight scale ``|alpha| * step``,
bias ``alpha * bias + beta`` on the accumulator grid) followed by a per-channel ``Max`` and
``Min`` on the codes (the layout: :mod:`.accumulator_grid`). The bias enters on the
accumulator grid: a model whose biases lie on it (:func:`~.accumulator_grid.snap_biases`, which
training applies) is computed exactly up to the float32 rounding of the requantisation's
multiply, so a code differs only where the simulation sits within a float32 rounding error of a
half step. A bias off the grid (a model trained before, or changed since) moves codes within a
hundredth of a step of a tie, a few tenths of a percent of a mask's pixels on a trained network
(``benchmarks/cpu_inference.py`` and the tests count them), so the engine choice
(:mod:`.engine`) checks masks before it runs this form.
Layers whose result is upsampled, and the float edge layers, stay float ``Conv``.

Both graphs take ``image`` ``(N, 1, H, W)`` float32 (normalised as the model's preprocessing
says), pad ``H`` and ``W`` up to a multiple of ``2**depth`` by edge replication, and return
``logits`` ``(N, out_classes, H, W)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import SettingError
from ..model.unet import UNet
from ..quant.layers import QuantConv2d
from .accumulator_grid import Int8Layout, int8_layout
from .integer_conv import _affine
from .integer_ops import ActFormat

OPSET = 21
FORMS = ("float", "int8")


@dataclass(frozen=True)
class _Tensor:
    """A tensor of the graph: float values (``fmt is None``) or ``fmt``'s codes."""

    name: str
    fmt: ActFormat | None = None


def _zero_point(fmt: ActFormat) -> np.uint8:
    """Codes travel as ``uint8`` (ONNX Runtime's fast int8 kernels take unsigned activations):
    ``stored = code + zero point``, 0 for unsigned formats and 128 for signed ones."""
    if fmt.lo >= 0 and fmt.hi <= 255:
        return np.uint8(0)
    if fmt.lo >= -128 and fmt.hi <= 127:
        return np.uint8(128)
    raise ValueError(f"codes {fmt.lo}..{fmt.hi} do not fit 8 bits")


def _key(fmt: ActFormat) -> tuple[float, int, int]:
    return (fmt.step, fmt.lo, fmt.hi)


def _fits_8_bits(fmt: ActFormat | None) -> bool:
    """Codes of ``fmt`` travel as ``uint8`` (see :func:`_zero_point`)."""
    if fmt is None:
        return False
    return fmt.hi <= 255 if fmt.lo >= 0 else fmt.lo >= -128 and fmt.hi <= 127


class _Graph:
    """Nodes and initializers under construction, with unique names."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def constant(self, value: Any, hint: str) -> str:
        from onnx import numpy_helper

        tensor = numpy_helper.from_array(np.asarray(value), self._name(hint))
        self.initializers.append(tensor)
        return str(tensor.name)

    def op(self, op_type: str, inputs: list[str], hint: str, **attributes: Any) -> str:
        from onnx import helper

        output = self._name(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attributes))
        return output


class _UNetGraph:
    """Builds :func:`unet_onnx`'s graph from an evaluation-mode U-Net."""

    def __init__(self, model: UNet, form: str) -> None:
        self.model = model
        self.form = form
        self.g = _Graph()
        self.formats: dict[str, ActFormat | None] = {}
        for name, module in model.named_modules():
            if isinstance(module, QuantConv2d):
                self.formats[name] = ActFormat.of(module.input_quantizer, name)

    # -- conversions between float values and codes ------------------------------------------

    def as_float(self, x: _Tensor) -> _Tensor:
        if x.fmt is None:
            return x
        g = self.g
        zero = g.constant(_zero_point(x.fmt), "zero")
        step = g.constant(np.float32(x.fmt.step), "step")
        return _Tensor(g.op("DequantizeLinear", [x.name, step, zero], "values"))

    def as_codes(self, x: _Tensor, fmt: ActFormat) -> _Tensor:
        """``fmt``'s codes of ``x``: clip to the format's range, then round half to even."""
        if x.fmt is not None and _key(x.fmt) == _key(fmt):
            return x
        g = self.g
        values = self.as_float(x).name
        step = g.constant(np.float32(fmt.step), "step")
        if self.form == "int8" and _fits_8_bits(fmt):
            # Rounding is monotone and the bounds are codes, so clamping the uint8 codes
            # equals clamping the values first, on a quarter of the bytes.
            offset = int(_zero_point(fmt))
            codes = g.op(
                "QuantizeLinear", [values, step, g.constant(np.uint8(offset), "zero")], "codes"
            )
            low, high = (g.constant(np.uint8(v + offset), "bound") for v in (fmt.lo, fmt.hi))
            return _Tensor(g.op("Clip", [codes, low, high], "clipped"), fmt)
        low = g.constant(np.float32(fmt.lo * fmt.step), "low")
        high = g.constant(np.float32(fmt.hi * fmt.step), "high")
        clipped = g.op("Clip", [values, low, high], "clipped")
        zero_point = g.constant(_zero_point(fmt), "zero")
        return _Tensor(g.op("QuantizeLinear", [clipped, step, zero_point], "codes"), fmt)

    def layer_input(self, x: _Tensor, name: str) -> _Tensor:
        """What layer ``name`` reads: ``x`` quantized to its input format (float values in the
        float form, codes in the int8 form), or float values for a float layer."""
        fmt = self.formats[name]
        if fmt is None:
            return self.as_float(x)
        if self.form == "float" or not _fits_8_bits(fmt):
            return self.as_float(self.as_codes(x, fmt))
        return self.as_codes(x, fmt)

    # -- layers --------------------------------------------------------------------------------

    def _layer(self, name: str) -> tuple[QuantConv2d, nn.Module | None]:
        layer = self.model.get_submodule(name)
        assert isinstance(layer, QuantConv2d)
        block, _, conv = name.rpartition(".")
        bn = self.model.get_submodule(f"{block}.bn{conv[4:]}") if conv != "head" else None
        return layer, bn

    def conv(self, name: str, x: _Tensor, consumers: list[ActFormat | None]) -> list[_Tensor]:
        """Layer ``name`` (with its ReLU and BatchNorm) on ``x``; one result per consumer
        format (``None``: float values)."""
        layer, bn = self._layer(name)
        x = self.layer_input(x, name)
        codes_out = [fmt for fmt in consumers if fmt is not None and _fits_8_bits(fmt)]
        if (
            self.form == "int8"
            and x.fmt is not None
            and bn is not None
            and codes_out
            and len(codes_out) == len(consumers)
        ):
            layout = int8_layout(name, layer, bn, x.fmt)
            if layout is not None:
                results: dict[tuple[float, int, int], _Tensor] = {}
                for fmt in codes_out:
                    if _key(fmt) not in results:
                        results[_key(fmt)] = self._qlinear(name, x, layout, fmt)
                return [results[_key(fmt)] for fmt in codes_out]
        values = self._float_conv(name, self.as_float(x), layer, bn)
        return [values for _ in consumers]

    def _float_conv(
        self, name: str, x: _Tensor, layer: QuantConv2d, bn: nn.Module | None
    ) -> _Tensor:
        g = self.g
        weight = layer.quantized_weight().detach().float().cpu().numpy()
        inputs = [x.name, g.constant(weight, f"{name}.weight")]
        if layer.bias is not None:
            inputs.append(g.constant(layer.bias.detach().float().cpu().numpy(), f"{name}.bias"))
        y = g.op("Conv", inputs, name, pads=[1, 1, 1, 1], kernel_shape=[3, 3])
        if bn is None:
            return _Tensor(y)
        alpha, beta = (
            t.float().cpu().numpy().reshape(1, -1, 1, 1)
            for t in _affine(name, bn, layer.out_channels)
        )
        y = g.op("Relu", [y], f"{name}.relu")
        y = g.op("Mul", [y, g.constant(alpha, f"{name}.alpha")], f"{name}.scaled")
        return _Tensor(g.op("Add", [y, g.constant(beta, f"{name}.beta")], f"{name}.normalised"))

    def _qlinear(self, name: str, x: _Tensor, layout: Int8Layout, fmt: ActFormat) -> _Tensor:
        """``Q_fmt(alpha * relu(conv(x) + bias) + beta)`` as ``QLinearConv`` and a clamp."""
        assert x.fmt is not None
        g = self.g
        sign, flat = layout.sign, layout.flat
        channels = sign.shape[0]
        # Q(beta) in float32, as the simulation rounds it when relu(z) is 0
        q_beta = np.clip(np.round(layout.beta * np.float32(1.0 / fmt.step)), fmt.lo, fmt.hi)
        low = np.where(sign > 0, q_beta, fmt.lo)
        low = np.where(flat, q_beta, low)
        high = np.where(sign < 0, q_beta, fmt.hi)
        high = np.where(flat, q_beta, high)
        zero = _zero_point(fmt)
        inputs = [
            x.name,
            g.constant(np.float32(x.fmt.step), "x_scale"),
            g.constant(_zero_point(x.fmt), "x_zero"),
            g.constant(layout.weight.astype(np.int8), f"{name}.weight_codes"),
            g.constant(layout.weight_scale.astype(np.float32), f"{name}.weight_scale"),
            g.constant(np.zeros(channels, np.int8), f"{name}.weight_zero"),
            g.constant(np.float32(fmt.step), "y_scale"),
            g.constant(zero, "y_zero"),
            g.constant(layout.grid_bias.astype(np.int32), f"{name}.grid_bias"),
        ]
        y = g.op("QLinearConv", inputs, f"{name}.codes", pads=[1, 1, 1, 1], kernel_shape=[3, 3])
        shape = (1, channels, 1, 1)
        low, high = (np.asarray(v + int(zero), np.uint8).reshape(shape) for v in (low, high))
        if low.any():
            y = g.op("Max", [y, g.constant(low, "low")], "low")
        y = g.op("Min", [y, g.constant(high, "high")], "high")
        return _Tensor(y, fmt)

    # -- the network -------------------------------------------------------------------------

    def block(self, block: str, x: _Tensor, consumers: list[ActFormat | None]) -> list[_Tensor]:
        (middle,) = self.conv(f"{block}.conv1", x, [self.formats[f"{block}.conv2"]])
        return self.conv(f"{block}.conv2", middle, consumers)

    def build(self) -> Any:
        from onnx import TensorProto, helper

        g = self.g
        depth = self.model.config.depth
        image, size = self._pad("image")
        x = _Tensor(image)
        skips = []
        for level in range(1, depth + 1):
            below = f"enc{level + 1}.conv1" if level < depth else "bottleneck.conv1"
            down, skip = self.block(
                f"enc{level}", x, [self.formats[below], self.formats[f"dec{level}.conv1"]]
            )
            skips.append(skip)
            x = _Tensor(g.op("MaxPool", [down.name], "pooled", kernel_shape=[2, 2], strides=[2, 2]))
            x = _Tensor(x.name, down.fmt)
        (x,) = self.block("bottleneck", x, [None])  # upsampled: float values
        for level in range(depth, 0, -1):
            consumer = f"dec{level}.conv1"
            scales = g.constant(np.array([1, 1, 2, 2], np.float32), "scales")
            # nearest: output pixel i reads input pixel floor(i / 2), a 2 x 2 repeat
            resize = {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}
            if self.model.config.upsample == "nearest":
                resize = {
                    "mode": "nearest",
                    "coordinate_transformation_mode": "asymmetric",
                    "nearest_mode": "floor",
                }
            up = _Tensor(g.op("Resize", [self.as_float(x).name, "", scales], "upsampled", **resize))
            parts = [up, skips[level - 1]]
            fmt = self.formats[consumer]
            if self.form == "int8" and _fits_8_bits(fmt):
                assert fmt is not None  # each part quantized alone: concatenated as bytes
                parts = [self.as_codes(part, fmt) for part in parts]
            else:
                parts = [self.as_float(part) for part in parts]
            joined = _Tensor(
                g.op("Concat", [p.name for p in parts], "joined", axis=1), parts[0].fmt
            )
            # the last block feeds the head; the others are upsampled (float values)
            (x,) = self.block(f"dec{level}", joined, [self.formats["head"] if level == 1 else None])
        (logits,) = self.conv("head", x, [None])
        axes = g.constant(np.array([2, 3], np.int64), "axes")
        starts = g.constant(np.array([0, 0], np.int64), "starts")
        g.nodes.append(
            helper.make_node("Slice", [self.as_float(logits).name, starts, size, axes], ["logits"])
        )
        config = self.model.config
        graph = helper.make_graph(
            g.nodes,
            "unet",
            [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "H", "W"])],
            [
                helper.make_tensor_value_info(
                    "logits", TensorProto.FLOAT, ["N", config.out_classes, "H", "W"]
                )
            ],
            g.initializers,
        )
        return helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="napari-unetquant",
        )

    def _pad(self, image: str) -> tuple[str, str]:
        """``image`` padded (edge replication) at the bottom and right to a multiple of
        ``2**depth``, and the original ``[H, W]`` (int64) to crop the logits back to."""
        g = self.g
        multiple = g.constant(np.array([self.model.config.size_multiple] * 2, np.int64), "m")
        shape = g.op("Shape", [image], "shape")
        begin, end = (g.constant(np.array([v], np.int64), "at") for v in (2, 4))
        size = g.op("Slice", [shape, begin, end], "size")
        short = g.op(
            "Mod", [g.op("Sub", [multiple, g.op("Mod", [size, multiple], "r")], "s"), multiple], "p"
        )
        zeros = g.constant(np.zeros(6, np.int64), "zeros")
        pads = g.op("Concat", [zeros, short], "pads", axis=0)
        return g.op("Pad", [image, pads], "padded", mode="edge"), size


def unet_onnx(model: nn.Module, form: str = "float") -> Any:
    """``model`` (a 2D napari-unetquant U-Net, quantized or not, packed or not) as an
    ``onnx.ModelProto`` of ``form`` ``"float"`` or ``"int8"`` (see the module's text).

    Raises :class:`~napari_unetquant.errors.SettingError` for what ONNX cannot express here:
    a 3D network, an activation method other than fixed point or a learned step, or a dynamic
    format never chosen (an untrained model).
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if not isinstance(model, UNet):
        raise ValueError("ONNX export takes the napari-unetquant U-Net")
    if model.config.spatial_dims != 2:
        raise SettingError(
            f"ONNX export covers 2D U-Nets; this model is {model.config.spatial_dims}D: run it "
            f"with the PyTorch engine",
            "engine",
        )
    model.eval()
    with torch.no_grad():
        return _UNetGraph(model, form).build()


ONNX_FORMAT = "napari-unetquant-onnx"


def export_onnx(
    model: nn.Module, path: str | Path, form: str, metadata: dict[str, Any] | None = None
) -> None:
    """Write ``model`` as an ONNX file of ``form`` (atomically), with ``metadata`` (JSON-able
    values) in the model's ``metadata_props``, each value JSON text."""
    proto = unet_onnx(model, form)
    save_checked(proto, path, {"format": ONNX_FORMAT, "form": form}, metadata)


def save_checked(
    proto: Any, path: str | Path, own: dict[str, Any], metadata: dict[str, Any] | None
) -> None:
    """Check ``proto`` and write it to ``path`` atomically, with the file's ``own`` entries and
    the caller's ``metadata`` (JSON-able values; never one of ``own``'s keys) in its
    ``metadata_props``, each value JSON text unless it is a string."""
    import onnx

    from ..data.io import atomic_path

    for key in own.keys() & (metadata or {}).keys():
        raise ValueError(f"metadata entry {key!r} is the file's own")
    for key, value in {**own, **(metadata or {})}.items():
        proto.metadata_props.add(
            key=key, value=value if isinstance(value, str) else json.dumps(value)
        )
    onnx.checker.check_model(proto)
    with atomic_path(Path(path)) as temporary:
        onnx.save(proto, str(temporary))


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, as text."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {entry.key: entry.value for entry in proto.metadata_props}
