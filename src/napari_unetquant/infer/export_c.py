"""Export of the integer network as a dependency-free C99 program (``unetquant export --format c``).

The program is built from :func:`~.export.integer_file_contents`, the tensors and description
that ``unetquant export --integer`` writes, so the C and the integer file cannot disagree. It
computes what :class:`~napari_unetquant.infer.integer.IntegerUNet` computes, with the
arithmetic of ``docs/integer-format.md``: ``int8`` codes times weight codes in ``int32``
accumulators, requantization in ``int64`` with half-to-even rounding shifts, max pooling and
bilinear upsampling on codes, float32 for layers kept at full precision. Masks are equal pixel
for pixel to ``unetquant segment --integer`` on a slice that fits one window; float layers
agree to float32 summation order (``tests/infer/test_export_c.py`` compiles and compares).

Three files: ``unet.h`` (the data structures), ``weights.c`` (the network's constants, weight
codes packed at their bit width) and ``unet.c`` (the arithmetic, the network's dataflow written
out step by step, and ``main``). ``cc -O2 *.c -lm -o unet`` builds it; its header comment says
how to run it. The dataflow is a list of steps (:class:`_Step`) from which both the C and
:func:`c_memory` are derived, so the memory the program reports is the memory computed here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import textwrap
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..config import InferConfig
from ..errors import SettingError
from ..quant.layers import QuantConv2d
from .c_program import CONVERSIONS, HEADER_H, KERNELS, MAIN, PIXEL_LABELS, UPSAMPLING
from .export import integer_file_contents

C_FILES = ("unet.h", "weights.c", "unet.c")
STORAGE_BYTES = {"F32": 4, "I8": 1, "I16": 2, "I32": 4, "I64": 8}
"""Bytes per element of each activation storage type (``float``, ``int8_t`` ... ``int64_t``)."""
_REQUANT_ARRAYS = ("multiplier", "offset", "low", "high")


@dataclass(frozen=True)
class CExport:
    """What :func:`export_c` wrote: the directory, its files' names, the bytes of the
    network's constant data (packed weight codes and per-channel tables), and the network's
    :func:`c_description` (for :func:`c_memory`)."""

    directory: str
    files: tuple[str, ...]
    weight_bytes: int
    description: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class CMemory:
    """Memory of the C program for one slice: ``weight_bytes`` of constant data, and the peak
    of the heap buffers live at the same time (``peak_activation_bytes``: activations, the
    input image, the mask, and one layer's unpacked weights and row of accumulators)."""

    weight_bytes: int
    peak_activation_bytes: int


# --- the dataflow, shared by the C code and the memory figures -------------------------------


@dataclass(frozen=True)
class _Buffer:
    """An activation tensor ``(H >> (level - 1), W >> (level - 1), channels)`` on the heap."""

    name: str
    level: int
    channels: int
    storage: str

    def bytes(self, height: int, width: int) -> int:
        rows, columns = height >> (self.level - 1), width >> (self.level - 1)
        return rows * columns * self.channels * STORAGE_BYTES[self.storage]


@dataclass(frozen=True)
class _Step:
    """One step of the dataflow: allocate ``outputs``, compute them from ``inputs`` (``kind``:
    ``conv``, ``quantize``, ``dequantize``, ``pool`` or ``join``), free ``inputs``. ``layer``
    is the convolution, or the layer whose input format a conversion or join produces."""

    kind: str
    layer: str
    inputs: tuple[_Buffer, ...]
    outputs: tuple[_Buffer, ...]


def _signed_storage(low: int, high: int) -> str:
    """The narrowest of ``int8_t`` .. ``int64_t`` holding every integer in ``low..high``."""
    for storage, bits in (("I8", 8), ("I16", 16), ("I32", 32), ("I64", 64)):
        if -(2 ** (bits - 1)) <= low and high < 2 ** (bits - 1):
            return storage
    raise ValueError(f"values {low}..{high} do not fit 64 bits")


def _code_storage(fmt: dict[str, Any]) -> str:
    """The narrowest integer type holding every code of a format."""
    return _signed_storage(fmt["lo"], fmt["hi"])


def _rhe(value: int, shift: int) -> int:
    """``round(value / 2**shift)``, ties to even, on Python integers (the ``rhe`` of
    ``docs/integer-format.md``)."""
    if shift <= 0:
        return value << -shift
    return (value + (1 << (shift - 1)) - 1 + ((value >> shift) & 1)) >> shift


def _wide_storage(layer: dict[str, Any], output: dict[str, Any], t: dict[str, np.ndarray]) -> str:
    """Storage of an integer layer's unclamped upsampling source (codes with extra bits): the
    narrowest type holding ``clamp(rhe(M * acc + K, s), low, high)`` for every
    ``|acc| <= accumulator_bound``, per channel (``rhe`` and ``clamp`` are monotone, so the
    extremes come from ``acc = -bound`` and ``acc = +bound``)."""
    prefix, bound = f"{layer['name']}.to.{output['consumer']}", int(layer["accumulator_bound"])
    shift = output["shift"] - output["extra_bits"]
    low, high = 0, 0
    columns = (t[f"{prefix}.{part}"].tolist() for part in _REQUANT_ARRAYS)
    for m, k, lo, hi in zip(*columns, strict=True):
        if abs(m) * bound + abs(k) >= 2**52:
            raise ValueError(f"{layer['name']}: requantization reaches 2**52; cannot export")
        ends = [min(max(_rhe(k + sign * abs(m) * bound, shift), lo), hi) for sign in (-1, 1)]
        low, high = min(low, *ends), max(high, *ends)
    return _signed_storage(low, high)


def _stored_bits(codes: np.ndarray, weight_bits: int) -> int:
    """Bits per packed weight code: the layer's ``weight_bits``, more when its codes need more
    in two's complement (binary ``+-1``: 2; unsigned codes: one more)."""
    low, high = int(codes.min()), int(codes.max())
    bits = weight_bits
    while not -(2 ** (bits - 1)) <= low <= high < 2 ** (bits - 1):
        bits += 1
    return bits


def _c_choices(description: dict[str, Any], tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """``description`` with what the C program chose: each integer layer's ``stored_bits``
    (packed weight width) and each output's ``storage`` (``"F32"``, ``"I8"`` ... ``"I64"``)."""
    layers = []
    for layer in description["layers"]:
        layer = dict(layer)
        if layer["integer"]:
            weight = tensors[f"{layer['name']}.weight"]
            layer["stored_bits"] = _stored_bits(weight, int(layer["weight_bits"]))
        outputs = []
        for output in layer["outputs"]:
            if output["kind"] == "float" or (output["extra_bits"] and not layer["integer"]):
                storage = "F32"  # float layers hand upsampling sources over as values
            elif not output["extra_bits"]:
                storage = _code_storage(output["format"])
            else:
                storage = _wide_storage(layer, output, tensors)
            outputs.append({**output, "storage": storage})
        layers.append({**layer, "outputs": outputs})
    return {**description, "layers": layers}


def c_description(model: nn.Module) -> dict[str, Any]:
    """The description of ``model``'s integer network (:func:`~.export.integer_file_contents`)
    with the C program's choices: each integer layer's ``stored_bits`` and each output's
    ``storage``; what :func:`c_memory` needs. Raises
    :class:`~napari_unetquant.errors.SettingError` for a network C export cannot run."""
    return _contents(model)[1]


def _contents(model: nn.Module) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    _check_model(model)
    tensors, description = integer_file_contents(model)
    arrays = {name: tensor.numpy() for name, tensor in tensors.items()}
    return arrays, _c_choices(description, arrays)


class _Planner:
    """Builds the list of :class:`_Step` of a network description (the dataflow of
    ``docs/integer-format.md``), naming each buffer after what it holds."""

    def __init__(self, description: dict[str, Any]) -> None:
        self.layers = {layer["name"]: layer for layer in description["layers"]}
        self.depth = int(description["unet"]["depth"])
        self.steps: list[_Step] = []

    def plan(self) -> tuple[_Buffer, list[_Step]]:
        image = _Buffer("image", 1, int(self.layers["enc1.conv1"]["in_channels"]), "F32")
        x = image
        skips: list[_Buffer] = []
        for level in range(1, self.depth + 1):
            (x,) = self.conv(f"enc{level}.conv1", x)
            x, skip = self.conv(f"enc{level}.conv2", x, ("", f"skip{level}"))
            skips.append(skip)
            pooled = (level + 1, x.channels, x.storage)
            x = self.add("pool", f"enc{level}.conv2", (x,), pooled, f"pooled{level}")
        (x,) = self.conv("bottleneck.conv1", x)
        (x,) = self.conv("bottleneck.conv2", x)
        for level in range(self.depth, 0, -1):
            consumer = f"dec{level}.conv1"
            skip = skips[level - 1]
            joined = (level, x.channels + skip.channels, self.input_storage(consumer))
            x = self.add("join", consumer, (x, skip), joined, f"joined{level}")
            (x,) = self.conv(consumer, x)
            (x,) = self.conv(f"dec{level}.conv2", x)
        self.conv("head", x, ("logits",))
        return image, self.steps

    def input_storage(self, name: str) -> str:
        fmt = self.layers[name]["input"]
        return "F32" if fmt is None else _code_storage(fmt)

    def add(
        self,
        kind: str,
        layer: str,
        inputs: tuple[_Buffer, ...],
        output: tuple[int, int, str],
        name: str,
    ) -> _Buffer:
        level, channels, storage = output
        buffer = _Buffer(name, level, channels, storage)
        self.steps.append(_Step(kind, layer, inputs, (buffer,)))
        return buffer

    def conv(self, name: str, x: _Buffer, names: tuple[str, ...] = ("",)) -> tuple[_Buffer, ...]:
        """A convolution, after converting ``x`` to what the layer takes: integer layers take
        codes; a quantized input of a float layer is quantized, then turned into values."""
        layer = self.layers[name]
        prefix = name.replace(".", "_")
        if layer["input"] is not None and x.storage == "F32":
            codes = (x.level, x.channels, self.input_storage(name))
            x = self.add("quantize", name, (x,), codes, f"{prefix}_codes")
        if not layer["integer"] and x.storage != "F32":
            x = self.add("dequantize", name, (x,), (x.level, x.channels, "F32"), f"{prefix}_values")
        outputs = tuple(
            _Buffer(
                given or f"{prefix}_out",
                x.level,
                layer["out_channels"],
                output["storage"],
            )
            for given, output in zip(names, layer["outputs"], strict=True)
        )
        self.steps.append(_Step("conv", name, (x,), outputs))
        return outputs


def _plan(description: dict[str, Any]) -> tuple[_Buffer, list[_Step]]:
    return _Planner(description).plan()


def _upsample_mode(description: dict[str, Any]) -> str:
    """``"bilinear"`` (the paper's; descriptions from before the choice existed) or
    ``"nearest"``."""
    mode = str(description.get("upsample", "bilinear"))
    if mode not in UPSAMPLING:
        raise ValueError(f"C export cannot upsample with {mode!r}; it runs bilinear or nearest")
    return mode


# --- memory ----------------------------------------------------------------------------------


def _needs_float_epilogue(layer: dict[str, Any]) -> bool:
    """True when the layer's bias, BatchNorm (and accumulator scale) are used at run time:
    float layers, and integer layers with a float result."""
    return not layer["integer"] or any(o["kind"] == "float" for o in layer["outputs"])


def _layer_weight_bytes(layer: dict[str, Any]) -> int:
    out = int(layer["out_channels"])
    taps = 9 * int(layer["in_channels"]) * out
    if not layer["integer"]:
        total = 4 * taps
    else:
        total = math.ceil(taps * int(layer["stored_bits"]) / 8)
        total += sum(4 * 8 * out for o in layer["outputs"] if o["kind"] == "codes")
        total += 8 * out if _needs_float_epilogue(layer) else 0  # accumulator_scale
    if _needs_float_epilogue(layer):
        total += 4 * out * (3 if layer["relu_batchnorm"] else 1)  # bias, alpha, beta
    return total


def _scratch_bytes(layer: dict[str, Any], width: int) -> int:
    """A convolution's temporary buffers: its weights unpacked to ``int8`` (integer layers)
    or ``float`` (float layers), and one row of ``int32``/``float`` accumulators."""
    out = int(layer["out_channels"])
    taps = 9 * int(layer["in_channels"]) * out
    return taps * (1 if layer["integer"] else 4) + 4 * width * out


def c_memory(description: dict[str, Any], height: int, width: int) -> CMemory:
    """The memory the exported C program uses for one ``height`` x ``width`` slice.

    ``description`` is :func:`c_description` (or :attr:`CExport.description`): the integer
    network's description with the C program's storage choices.
    ``weight_bytes`` is the constant data of ``weights.c``; ``peak_activation_bytes`` the
    largest total of heap buffers alive at once (activations, the padded input, the mask, a
    layer's scratch), exactly what ``./unet IN OUT HEIGHT WIDTH --memory`` reports.
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be at least 1, got {height} x {width}")
    layers = {layer["name"]: layer for layer in description["layers"]}
    if any("storage" not in output for layer in layers.values() for output in layer["outputs"]):
        raise ValueError(
            "this description lacks the C program's storage choices; pass c_description(model) "
            "or the description of export_c's result"
        )
    multiple = 2 ** int(description["unet"]["depth"])
    rows, columns = -(-height // multiple) * multiple, -(-width // multiple) * multiple
    image, steps = _plan(description)
    live = peak = image.bytes(rows, columns)
    for step in steps:
        live += sum(buffer.bytes(rows, columns) for buffer in step.outputs)
        scratch = 0
        if step.kind == "conv":
            scratch = _scratch_bytes(layers[step.layer], columns >> (step.inputs[0].level - 1))
        peak = max(peak, live + scratch)
        live -= sum(buffer.bytes(rows, columns) for buffer in step.inputs)
    peak = max(peak, live + height * width)  # the mask, beside the logits
    weights = sum(_layer_weight_bytes(layer) for layer in layers.values())
    return CMemory(weights, peak)


def _c_name(layer: str) -> str:
    return layer.replace(".", "_")


def _float_literal(value: float) -> str:
    """A C ``float`` literal that reads back as the float32 ``value``."""
    if not math.isfinite(value):
        raise ValueError(f"cannot export a non-finite constant {value}")
    text = f"{float(np.float32(value)):.9g}"
    return (text if any(c in text for c in ".e") else text + ".0") + "f"


def _double_literal(value: float) -> str:
    if not math.isfinite(value):
        raise ValueError(f"cannot export a non-finite constant {value}")
    text = repr(float(value))
    return text if any(c in text for c in ".e") else text + ".0"


def _array(c_type: str, name: str, items: list[str], per_line: int = 8) -> str:
    lines = [", ".join(items[i : i + per_line]) for i in range(0, len(items), per_line)]
    body = ",\n".join(f"    {line}" for line in lines)
    return f"static const {c_type} {name}[{len(items)}] = {{\n{body}\n}};\n"


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Signed integer ``codes`` packed ``bits`` per code, two's complement: code ``k`` takes
    bits ``k * bits .. (k + 1) * bits - 1`` of the stream, stream bit ``j`` being bit ``j % 8``
    of byte ``j // 8`` (little endian; for 4 bits: the first code in the low nibble)."""
    flat = codes.astype(np.int64).ravel()
    if flat.size and (flat.min() < -(2 ** (bits - 1)) or flat.max() >= 2 ** (bits - 1)):
        raise ValueError(f"codes {flat.min()}..{flat.max()} do not fit {bits} signed bits")
    raw = (flat & ((1 << bits) - 1)).astype(np.uint64)
    stream = ((raw[:, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8).ravel()
    return np.packbits(stream, bitorder="little").tobytes()


def _format_c(name: str, fmt: dict[str, Any]) -> str:
    fixed = fmt["frac_bits"] is not None
    scale = 2.0 ** fmt["frac_bits"] if fixed else fmt["step"]
    return (
        f"static const unet_format {name} = {{.fixed_point = {int(fixed)}, "
        f".scale = {_float_literal(scale)}, .step = {_float_literal(fmt['step'])}, "
        f".lo = {fmt['lo']}, .hi = {fmt['hi']}}};\n"
    )


class _WeightsWriter:
    """``weights.c``: every layer's constant arrays and its :c:type:`unet_layer`."""

    def __init__(self, tensors: dict[str, np.ndarray], description: dict[str, Any]) -> None:
        self.tensors = tensors
        self.layers = {layer["name"]: layer for layer in description["layers"]}
        self.arrays: list[str] = []

    def add(self, c_type: str, name: str, items: list[str]) -> str:
        self.arrays.append(name)
        return _array(c_type, name, items, 12 if c_type == "uint8_t" else 4)

    def layer(self, layer: dict[str, Any]) -> str:
        name, c = layer["name"], _c_name(layer["name"])
        t, text = self.tensors, []
        fields = [f'.name = "{name}"', f".integer = {int(layer['integer'])}"]
        fields += [f".in_channels = {layer['in_channels']}"]
        fields += [f".out_channels = {layer['out_channels']}"]
        fields += [f".relu_batchnorm = {int(layer['relu_batchnorm'])}"]
        if layer["input"] is not None:
            fields.append(f".input = &{c}_input")
        if layer["integer"]:
            bits = layer["stored_bits"]
            packed = pack_codes(t[f"{name}.weight"], bits)
            text.append(self.add("uint8_t", f"{c}_weight_codes", [f"0x{b:02x}" for b in packed]))
            fields += [f".weight_bits = {bits}", f".weight_codes = {c}_weight_codes"]
        else:
            weight = [_float_literal(v) for v in t[f"{name}.weight"].ravel().tolist()]
            text.append(self.add("float", f"{c}_weight", weight))
            fields.append(f".weight = {c}_weight")
        if _needs_float_epilogue(layer):
            if layer["integer"]:
                scale = [_double_literal(v) for v in t[f"{name}.accumulator_scale"].tolist()]
                text.append(self.add("double", f"{c}_accumulator_scale", scale))
                fields.append(f".accumulator_scale = {c}_accumulator_scale")
            for part in ("bias", "alpha", "beta") if layer["relu_batchnorm"] else ("bias",):
                values = [_float_literal(v) for v in t[f"{name}.{part}"].tolist()]
                text.append(self.add("float", f"{c}_{part}", values))
                fields.append(f".{part} = {c}_{part}")
        outputs = [self.output(layer, output, text) for output in layer["outputs"]]
        fields.append(f".output_count = {len(outputs)}")
        body = "".join(f"    {field},\n" for field in fields)
        body += "    .outputs = {\n" + "".join(outputs) + "    },\n"
        return "".join(text) + f"const unet_layer {c} = {{\n{body}}};\n"

    def output(self, layer: dict[str, Any], output: dict[str, Any], text: list[str]) -> str:
        consumer, c = output["consumer"], _c_name(layer["name"])
        fields = [f'.consumer = "{consumer}"']
        if output["kind"] == "codes" and layer["integer"]:
            prefix = f"{layer['name']}.to.{consumer}"
            for part in _REQUANT_ARRAYS:
                values = [str(int(v)) for v in self.tensors[f"{prefix}.{part}"].tolist()]
                text.append(self.add("int64_t", f"{c}_to_{_c_name(consumer)}_{part}", values))
            fields.append(".kind = REQUANTIZED")
            fields.append(f".shift = {output['shift'] - output['extra_bits']}")
            fields += [f".{p} = {c}_to_{_c_name(consumer)}_{p}" for p in _REQUANT_ARRAYS]
        elif output["kind"] == "codes" and not output["extra_bits"]:
            fields.append(".kind = QUANTIZED")
            fields.append(f".format = &{_c_name(consumer)}_input")
        else:
            fields.append(".kind = FLOAT_VALUES")
        lines = _wrapped(fields, 86)
        return "        {" + "\n         ".join(lines) + "},\n"

    def text(self) -> str:
        """The file: formats first (float layers' results refer to their consumers'), then
        each layer's arrays and description, then the total size of the arrays."""
        layers = list(self.layers.values())
        formats = "".join(
            _format_c(f"{_c_name(layer['name'])}_input", layer["input"])
            for layer in layers
            if layer["input"] is not None
        )
        body = "\n".join(self.layer(layer) for layer in layers)
        total = " +\n    ".join(f"sizeof {name}" for name in self.arrays)
        return (
            "/* weights.c: the constants of the exported U-Net (generated; see unet.c). */\n"
            f'#include "unet.h"\n\n{formats}\n{body}\n'
            f"const size_t unet_weight_bytes =\n    {total};\n"
        )


def _dims(level: int) -> str:
    return "h, w" if level == 1 else f"h >> {level - 1}, w >> {level - 1}"


def _ref(buffer: _Buffer) -> str:
    return "image" if buffer.name == "image" else f"&{buffer.name}"


def _step_comment(step: _Step) -> str:
    source = step.inputs[0].name
    if step.kind == "conv":
        return f"/* {step.layer} */"
    if step.kind == "quantize":
        return f"/* {step.layer}'s input codes of {source} */"
    if step.kind == "dequantize":
        return f"/* {step.layer}'s input values of its codes {source} */"
    if step.kind == "pool":
        return f"/* 2x2 max pool of {source} */"
    return f"/* {step.layer}'s input: upsampled {source}, then {step.inputs[1].name} */"


def _step_c(step: _Step, nearest: bool) -> list[str]:
    """The C lines of one step of the dataflow (``nearest``: the network upsamples by
    repeating values)."""
    layer, inputs = _c_name(step.layer), [_ref(b) for b in step.inputs]
    lines = [_step_comment(step)]
    for out in step.outputs:
        lines.append(
            f"TRY(tensor_new(&{out.name}, {_dims(out.level)}, {out.channels}, {out.storage}));"
        )
    outputs = ", ".join(_ref(b) for b in step.outputs)
    if step.kind == "conv":
        lines.append(f"TRY(convolve(&{layer}, {inputs[0]}, (tensor *[]){{{outputs}}}));")
    elif step.kind in ("quantize", "dequantize"):
        lines.append(f"{step.kind}({inputs[0]}, {layer}.input, {outputs});")
    elif step.kind == "pool":
        lines.append(f"max_pool({inputs[0]}, {outputs});")
    elif nearest:
        lines.append(f"upsample_concat({inputs[0]}, {inputs[1]}, {outputs});")
    else:
        below, skip = inputs
        extra = "UNET_UPSAMPLE_EXTRA_BITS"
        lines.append(f"upsample_concat({below}, {extra}, {skip}, {layer}.input, {outputs});")
    lines += [f"tensor_free({name});" for name in inputs]
    return lines


def _wrapped(items: list[str], width: int) -> list[str]:
    """``items`` joined by commas into lines of at most ``width`` characters."""
    lines = [""]
    for item in items:
        if lines[-1] and len(lines[-1]) + len(item) + 2 > width:
            lines[-1] += ","
            lines.append("")
        lines[-1] += (", " if lines[-1] else "") + item
    return lines


def _network_c(steps: list[_Step], nearest: bool) -> str:
    """``run_network``: the dataflow written out, one block per step."""
    buffers = [b.name for step in steps for b in step.outputs]
    declarations = _wrapped([f"{name} = {{0}}" for name in buffers], 84)
    body = ["const int h = image->height, w = image->width; /* multiples of 2**UNET_DEPTH */"]
    body += [("tensor " if i == 0 else "       ") + line for i, line in enumerate(declarations)]
    body[-1] += ";"
    for step in steps:
        body += ["", *_step_c(step, nearest)]
    body += ["", "*result = logits;", "return 1;"]
    cleanup = ["tensor_free(image);", *[f"tensor_free(&{name});" for name in buffers], "return 0;"]
    indented = "".join(f"    {line}\n" if line else "\n" for line in body)
    return (
        "\n/* ---- the network (docs/integer-format.md, Dataflow) ---- */\n\n"
        "/* Each step allocates its result, computes it and frees what it consumed (only the\n"
        "   skip connections wait). Takes the padded image (freed), gives the padded logits;\n"
        "   returns 0, with everything freed, when memory runs out. */\n"
        "static int run_network(tensor *image, tensor *result)\n{\n"
        + indented
        + "\nout_of_memory:\n"
        + "".join(f"    {line}\n" for line in cleanup)
        + "}\n"
    )


def _comment(text: str) -> str:
    return text.replace("*/", "* /")


_C_TYPES = {"F32": "float", "I8": "int8_t", "I16": "int16_t", "I32": "int32_t", "I64": "int64_t"}


def _layer_table(description: dict[str, Any]) -> list[str]:
    """One line per layer: channels, arithmetic, input codes and how its results are stored."""
    lines = ["  layer             in -> out  arithmetic      input codes     results stored as"]
    for layer in description["layers"]:
        fmt = layer["input"]
        if fmt is None:
            codes = "float"
        elif fmt["frac_bits"] is not None:
            codes = f"{fmt['lo']}..{fmt['hi']} x 2**-{fmt['frac_bits']}"
        else:
            codes = f"{fmt['lo']}..{fmt['hi']} x {fmt['step']:.4g}"
        kind = f"int, {layer['stored_bits']}-bit wts" if layer["integer"] else "float"
        stored = ", ".join(_C_TYPES[output["storage"]] for output in layer["outputs"])
        lines.append(
            f"  {layer['name']:<17} {layer['in_channels']:>3} -> {layer['out_channels']:<4} "
            f"{kind:<15} {codes:<15} {stored}"
        )
    return lines


def _upsampling_text(description: dict[str, Any]) -> str:
    if _upsample_mode(description) == "nearest":
        return "Upsampling repeats each code 2 x 2 (nearest neighbour): a copy. "
    return (
        f"Bilinear upsampling: its sources keep {description['upsample_extra_bits']} extra "
        "fractional bits and are clamped only after upsampling: each takes the narrowest "
        "integer type holding clamp(rhe(multiplier * acc + offset, shift), low, high) for "
        "every accumulator within the layer's accumulator_bound (see the table below). "
    )


def _header_comment(
    description: dict[str, Any], info: dict[str, Any], values: tuple[int, ...] | None
) -> str:
    from .. import __version__

    unet, threshold = description["unet"], InferConfig().threshold
    depth = unet["depth"]
    label = info.get("label", "quantized")
    source = f" from {info['source']}" if "source" in info else ""
    preprocess = info.get("preprocess_text") or info.get("preprocess") or "as the model file says"
    width = 94
    parts = [
        f"unet.c: the {label} U-Net{source} as a C99 program computing its integer network "
        f"(napari-unetquant {__version__}, docs/integer-format.md). Generated: edit the model, "
        "not this file.",
        "",
        "Build: cc -O2 *.c -lm -o unet (C99, libc and libm only; on CPUs with fused "
        "multiply-add, e.g. ARM, add -ffp-contract=off so float32 layers round like PyTorch).",
        "",
        "Run: ./unet IN.f32 OUT.u8 HEIGHT WIDTH [--memory]",
        "IN.f32: one slice, HEIGHT x WIDTH float32 little endian, row-major (one row after "
        f"another), preprocessed: {preprocess}.",
        _output_text(threshold, values),
        f"Any HEIGHT and WIDTH from 1: the slice is padded at the bottom and right by edge "
        f"replication to a multiple of 2**{depth} = {2**depth}, the result cropped. The whole "
        "slice is one window: unetquant segment cuts larger slices into windows and blends "
        "them, so near window borders their masks can differ there.",
        "Errors (arguments, input size, non-finite values, memory, writing) print a message on "
        "stderr and exit with status 1 (2 for usage); OUT.u8 is written through OUT.u8.tmp and "
        "renamed, so it never exists half written.",
        "--memory prints, after the run, weight_bytes (the constant arrays of weights.c) and "
        "peak_activation_bytes (the largest total of heap buffers live at once: activations, "
        "the input, the mask, one layer's unpacked weights and row of accumulators).",
        "As a library (firmware, another program): build with -DUNET_NO_MAIN and call "
        "unet_segment(slice, height, width, mask) from unet.h, the same computation on a slice "
        "in memory.",
        "Environment UNET_LOGITS=PATH also writes the cropped logits (float32, this machine's "
        "byte order, HEIGHT x WIDTH x UNET_OUT_CHANNELS row-major, channels last) to PATH, for "
        "debugging.",
        "",
        "Weights: integer layers store their codes packed at their bit width, two's complement, "
        "order (out, ky, kx, in); code k occupies bits k*b .. k*b+b-1 of the byte stream, "
        "stream bit j being bit j % 8 of byte j / 8 (little endian: with 4 bits, the first "
        "code in the low nibble). Codes that need more bits take more (binary +-1: 2). "
        "Requantization tables are "
        "int64, accumulator scales double, bias and folded BatchNorm float. Float layers keep "
        "float32 weights, order (out, in, ky, kx).",
        "Activations: codes within 8 bits are int8_t (16 bits: int16_t), float values float. "
        + _upsampling_text(description)
        + "Accumulators are int32_t (accumulator_bound < 2**31); requantization computes in "
        "int64_t (|multiplier * acc + offset| < 2**52).",
    ]
    lines: list[str] = []
    for part in parts:
        lines += textwrap.wrap(_comment(part), width) or [""]
    lines += [
        "",
        "Layers (3x3 convolutions, stride 1, zero padding 1):",
        *_layer_table(description),
    ]
    shown = ("label", "source", "preprocess_text", "input", "output")  # ONNX's input, output
    extra = {k: v for k, v in info.items() if k not in shown}
    if extra:
        lines += ["", "Model information:"]
        for key, value in extra.items():
            text = value if isinstance(value, str) else json.dumps(value)
            lines += textwrap.wrap(_comment(f"{key}: {text}"), width, subsequent_indent="    ")
    return "/* " + "\n".join(f"   {line}".rstrip() for line in lines).lstrip() + "\n*/\n"


def _output_text(threshold: float, values: tuple[int, ...] | None) -> str:
    """What OUT.u8 holds: the binary mask, or the label map of a multi-class model."""
    if values is None:
        return (
            f"OUT.u8: the mask, HEIGHT x WIDTH bytes, 1 where sigmoid(logit) >= {threshold} "
            "(probability in float32, as unetquant segment computes it), else 0."
        )
    classes = ", ".join(f"channel {i}: {value}" for i, value in enumerate(values, 1))
    return (
        "OUT.u8: the label map, HEIGHT x WIDTH bytes, each the label value of the channel "
        f"with the largest logit (the most probable class; channel 0: 0, the background; "
        f"{classes}; unet_label_values in unet.h). unetquant segment takes the largest "
        "float32 softmax probability, which can differ only where two logits are within a "
        "float32 rounding of each other."
    )


def c_sources(model: nn.Module, info: dict[str, Any] | None = None) -> dict[str, str]:
    """The C program of ``model``'s integer network: ``{file name: text}`` for
    :data:`C_FILES`. Raises :class:`~napari_unetquant.errors.SettingError` for a network C
    export cannot run (3D, more than one input channel, no quantized layer, label values
    over 255). ``info["classes"]``: a multi-class model's label values, as in the ONNX
    export's metadata."""
    return _sources(model, info)[0]


def _sources(
    model: nn.Module, info: dict[str, Any] | None
) -> tuple[dict[str, str], dict[str, Any]]:
    values = _label_values(model, info or {})  # before the network: a quick refusal
    tensors, description = _contents(model)
    weights = _WeightsWriter(tensors, description)
    weights_text = weights.text()
    externs = "".join(
        f"extern const unet_layer {_c_name(layer['name'])};\n" for layer in description["layers"]
    )
    if values is None:
        output_macros = (
            f"#define UNET_THRESHOLD {_double_literal(InferConfig().threshold)} "
            "/* foreground: sigmoid(logit) >= UNET_THRESHOLD */\n"
        )
        mask_values = "0 or 1"
        pixel_label = PIXEL_LABELS["sigmoid"]
    else:
        output_macros = (
            "/* the label value of each output channel (0: the background) */\n"
            "extern const unsigned char unet_label_values[UNET_OUT_CHANNELS];\n"
        )
        mask_values = "the most probable class's label value (0: the background)"
        label_values = ", ".join(str(value) for value in (0, *values))
        pixel_label = PIXEL_LABELS["argmax"].replace("%(label_values)s", label_values)
    header = HEADER_H % {
        "depth": description["unet"]["depth"],
        "in_channels": description["unet"]["in_channels"],
        "extra_bits": description["upsample_extra_bits"],
        "out_channels": description["unet"]["out_classes"],
        "output_macros": output_macros,
        "mask_values": mask_values,
        "externs": externs.rstrip("\n"),
    }
    _, steps = _plan(description)
    used = {step.kind for step in steps}
    conversions = "".join(text for kind, text in CONVERSIONS.items() if kind in used)
    kernels = KERNELS.replace("%(conversions)s", conversions.lstrip("\n") + "\n")
    nearest = _upsample_mode(description) == "nearest"
    upsampling = UPSAMPLING[_upsample_mode(description)].strip("\n")
    kernels = kernels.replace("%(upsampling)s", upsampling)
    main = MAIN.replace("%(pixel_label)s", pixel_label.lstrip("\n"))
    comment = _header_comment(description, info or {}, values)
    program = comment + kernels + _network_c(steps, nearest) + main
    return {"unet.h": header, "weights.c": weights_text, "unet.c": program}, description


def _check_model(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("C export runs the napari-unetquant U-Net only")
    if config.spatial_dims != 2:
        raise SettingError(
            f"C export runs 2D U-Nets only; this model is {config.spatial_dims}D: export it as "
            f"a packed or ONNX file instead"
        )
    quantized = [
        m
        for m in model.modules()
        if isinstance(m, QuantConv2d)
        and not m.weight_quantizer.config.is_float
        and not m.input_quantizer.config.is_float
    ]
    if not quantized:  # IntegerUNet would refuse too, but in the words of integer inference
        raise SettingError(
            "C export writes the integer network of a quantized model, and this model has no "
            "layer with quantized weights and activations; export a model trained with "
            "quantized weights and activations",
            "weight_bits",
            "act_bits",
        )
    if config.in_channels != 1:
        raise SettingError(
            f"C export runs single-channel slices; this model has {config.in_channels} input "
            f"channels: export it as a packed or ONNX file instead"
        )


def _label_values(model: nn.Module, info: dict[str, Any]) -> tuple[int, ...] | None:
    """The label value of each output channel after the background for a multi-class
    ``model`` (``info["classes"]``, as the model file records them; without it the channel
    numbers 1, 2, ...), ``None`` for a binary one. Refuses values one byte cannot hold."""
    _check_model(model)
    config: Any = getattr(model, "config", None)  # present: checked above
    channels = int(config.out_classes)
    if channels == 1:
        return None
    classes = info.get("classes")
    if classes is None:
        return tuple(range(1, channels))
    values = tuple(int(value) for value in classes)
    if len(values) != channels - 1:
        raise SettingError(
            f"the model information names {len(values)} classes {list(values)} but the network "
            f"has {channels} output channels (the background and one per class); export the "
            f"model file as saved by training, whose information matches its network"
        )
    if not all(1 <= value <= 255 for value in values):
        raise SettingError(
            f"the C program writes one byte per pixel, and this model's label values "
            f"{list(values)} do not all fit 1 to 255: export it as an ONNX file or as the "
            f"integer network instead, whose metadata name each channel's label value"
        )
    return values


def export_c(
    model: nn.Module, directory: str | Path, info: dict[str, Any] | None = None
) -> CExport:
    """Write ``model``'s integer network as a C99 program into ``directory`` (created; it must
    not exist or be empty). ``info``: what the header comment says about the model (its
    ``label``, ``source``, ``preprocess_text`` and any other entries, as in the ONNX export's
    metadata). The files appear together or not at all: they are written into a temporary
    sibling directory, which is then renamed."""
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise SettingError(
            f"{target} already exists and is not an empty directory; choose a new directory "
            f"for the C program, or delete that one first",
            "out",
        )
    sources, description = _sources(model, info)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.part"
    temporary.mkdir()  # the user's umask applies, as for any directory they create
    try:
        for name, text in sources.items():
            with open(temporary / name, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())  # the data is on disk before the name points to it
        os.replace(temporary, target)  # onto a missing or empty directory (checked above)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)
    weight_bytes = sum(_layer_weight_bytes(layer) for layer in description["layers"])
    return CExport(str(target), C_FILES, weight_bytes, description)
