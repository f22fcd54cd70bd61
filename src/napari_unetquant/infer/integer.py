"""Integer-only inference: what fixed-point hardware computes for a quantized U-Net.

Every convolution whose weights and input activations are quantized runs on integer codes:
``int8`` codes of its input (``NHWC``) times ``int8`` weight codes, summed in ``int32``
accumulators by PyTorch's integer matrix multiply (``torch._int_mm``, an int8 GEMM kernel)
over an im2col view. Between layers the accumulator is requantized in integer arithmetic to
the next layer's input codes (see :class:`~.integer_ops.Requant`): bias, ReLU, the folded
BatchNorm and the next format's step are one multiplier and one offset per channel and a
rounding right shift. Where every scale is a power of two (the paper's fixed-point formats with
power-of-two BatchNorm scales) and biases and BatchNorm shifts lie on the grid they are added
to, this is exact; elsewhere a layer's largest multiplier keeps 30 significant bits (fewer only
for a layer whose accumulators could exceed ``2**22``; smaller channels of the layer keep fewer).

Bilinear upsampling runs on codes with 16 extra fractional bits (weights 1/16, 3/16, 9/16 are
exact), nearest-neighbour upsampling (``UNetConfig.upsample``) copies codes, max pooling runs
on codes (quantization is monotone, so they commute). Layers kept at full
precision (by default the first block and the final convolution) run in float32, exactly as in
the quantization-aware model; the integer codes are converted at their boundaries.

Accumulators are ``int32``: :class:`IntegerUNet` computes, for each layer, the largest
possible ``|accumulator|`` from its weight codes and its input's code range, and refuses a
network where that bound reaches ``2**31``. Requantization values are integers below ``2**52``:
exact in ``int64`` (:meth:`~.integer_ops.Requant.reference`) and in ``float64``, which the fast
path uses.

This module builds the network from a trained U-Net and runs its forward pass;
:mod:`.integer_conv` holds one convolution on codes, :mod:`.integer_ops` the arithmetic.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SettingError
from ..model.unet import UNet, _pad_to_multiple, check_input
from ..quant.layers import QuantConv2d
from .integer_conv import IntegerConv
from .integer_ops import UPSAMPLE_EXTRA_BITS, Codes, Spec, as_float, max_pool, upsample_codes


class IntegerUNet:
    """A quantization-aware or packed :class:`~napari_unetquant.model.UNet` run on integers.

    ``IntegerUNet(model)(x)`` takes the same input as ``model`` (``(N, 1, H, W)`` float32) and
    returns float32 logits; quantized layers compute on integer codes. 2D U-Nets only (a 3D one
    is refused when building). CPU only: building it puts ``model`` in evaluation mode on the
    CPU, and it reads ``model``'s layers as they are then (rebuild it after changing them;
    :func:`~napari_unetquant.infer.predict.cached_integer_unet` does).

    :attr:`outputs` is the dataflow: for each convolution, the consumers its result feeds, each
    with that consumer's input format and the extra fractional bits kept for upsampling.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, UNet):
            raise ValueError("integer inference runs the napari-unetquant U-Net only")
        if model.config.spatial_dims != 2:
            dims = model.config.spatial_dims
            raise SettingError(
                f"integer inference runs 2D U-Nets only; this model is {dims}D: run it without "
                f"integer inference (the float simulation runs it)",
                "integer",
            )
        model = model.eval().cpu()  # an inference wrapper: the model stays in evaluation mode
        self.config = model.config  # no reference to the model itself (caches key on it)
        self.convs: dict[str, IntegerConv] = {}
        for name, module in model.named_modules():
            if isinstance(module, QuantConv2d):
                block, _, conv = name.rpartition(".")
                bn = model.get_submodule(f"{block}.bn{conv[4:]}") if conv != "head" else None
                self.convs[name] = IntegerConv(name, module, bn)
        if not self.integer_layers:
            raise SettingError(
                "this model has no quantized layer; integer inference needs a quantized model "
                "(train one with quantized weights and activations)",
                "integer",
                "weight_bits",
                "act_bits",
            )
        self.outputs = self._dataflow()
        self._local = threading.local()

    @property
    def integer_layers(self) -> list[str]:
        return [name for name, conv in self.convs.items() if conv.integer]

    @property
    def upsample_extra_bits(self) -> int:
        """Extra fractional bits of the codes that are upsampled: bilinear weights need them,
        nearest-neighbour upsampling copies codes (none)."""
        return UPSAMPLE_EXTRA_BITS if self.config.upsample == "bilinear" else 0

    def _spec(self, consumer: str, extra: int = 0) -> Spec:
        fmt = self.convs[consumer].input_format if consumer in self.convs else None
        return (consumer, fmt, extra if fmt is not None else 0)

    def _dataflow(self) -> dict[str, list[Spec]]:
        depth = self.config.depth
        outputs: dict[str, list[Spec]] = {}
        blocks = [f"enc{level}" for level in range(1, depth + 1)] + ["bottleneck"]
        blocks += [f"dec{level}" for level in range(depth, 0, -1)]
        for block in blocks:
            outputs[f"{block}.conv1"] = [self._spec(f"{block}.conv2")]
        for level in range(1, depth + 1):
            after = f"enc{level + 1}.conv1" if level < depth else "bottleneck.conv1"
            outputs[f"enc{level}.conv2"] = [self._spec(after), self._spec(f"dec{level}.conv1")]
        upsampled = f"dec{depth}.conv1"
        extra = self.upsample_extra_bits
        outputs["bottleneck.conv2"] = [self._spec(upsampled, extra)]
        for level in range(depth, 1, -1):
            outputs[f"dec{level}.conv2"] = [self._spec(f"dec{level - 1}.conv1", extra)]
        outputs["dec1.conv2"] = [self._spec("head")]
        outputs["head"] = [("logits", None, 0)]
        return outputs

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        check_input(x, self.config)
        height, width = x.shape[-2:]
        current: Tensor | Codes = _pad_to_multiple(x.float().cpu(), self.config.size_multiple)
        depth = self.config.depth
        skips: list[Tensor | Codes] = []
        for level in range(1, depth + 1):
            below, skip = self._block(f"enc{level}", current)
            skips.append(skip)
            current = max_pool(below)
        (below,) = self._block("bottleneck", current)
        for level in range(depth, 0, -1):
            joined = self._join(below, skips[level - 1], f"dec{level}.conv1")
            (below,) = self._block(f"dec{level}", joined)
        (logits,) = self._run("head", below)
        assert isinstance(logits, Tensor)
        return logits[..., :height, :width]

    def _run(self, name: str, x: Tensor | Codes) -> list[Tensor | Codes]:
        specs = self.outputs[name]
        results = self.convs[name].run(x, specs, self._buffer)
        return [results[consumer] for consumer, _, _ in specs]

    def _block(self, block: str, x: Tensor | Codes) -> list[Tensor | Codes]:
        (middle,) = self._run(f"{block}.conv1", x)
        return self._run(f"{block}.conv2", middle)

    def _join(self, below: Tensor | Codes, skip: Tensor | Codes, consumer: str) -> Tensor | Codes:
        """``cat(upsample(below), skip)`` in the consumer's input representation."""
        fmt = self.convs[consumer].input_format
        nearest = self.config.upsample == "nearest"
        if fmt is None or not isinstance(below, Codes):
            up = as_float(below)
            if nearest:
                up = F.interpolate(up, scale_factor=2, mode="nearest")
            else:
                up = F.interpolate(up, scale_factor=2, mode="bilinear", align_corners=False)
            joined = torch.cat([up, as_float(skip)], dim=1)
            if fmt is None:
                return joined
            return Codes(fmt.codes(joined), fmt)
        if nearest:  # codes in the consumer's format already: each one repeated 2 x 2
            up_codes = below.values.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
        else:
            up_codes = upsample_codes(below, fmt, self._buffer, f"{consumer}.upsampled")
        assert isinstance(skip, Codes)
        n, h, w, _ = up_codes.shape
        channels = up_codes.shape[3] + skip.values.shape[3]
        joined = self._buffer(f"{consumer}.joined", (n, h, w, channels), up_codes.dtype)
        return Codes(torch.cat([up_codes, skip.values], dim=3, out=joined), fmt)

    def _buffer(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A tensor of ``shape`` kept for the next call (per thread): big fresh allocations
        page-fault on every call, reused ones do not. Results that leave the network (the
        logits) are never such buffers."""
        pool: dict[str, Tensor] = self._local.__dict__.setdefault("pool", {})
        numel = math.prod(shape)
        buffer = pool.get(key)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            buffer = torch.empty(numel, dtype=dtype)
            pool[key] = buffer
        return buffer[:numel].view(shape)
