"""One 3x3 convolution of a trained U-Net (with its ReLU and BatchNorm) run on integer codes.

:class:`IntegerConv` reads a quantization-aware (or packed) layer once: its weight codes become
an ``int8`` matrix ``(9 * C_in, C_out)``, its bias and folded BatchNorm an :class:`Epilogue`.
At run time it takes ``int8`` codes ``(N, H, W, C_in)``, multiplies an im2col view of them with
``torch._int_mm`` into ``int32`` accumulators, and requantizes those to every consumer's codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SettingError
from ..model.unet import FoldedBatchNorm, fold_batch_norm
from ..quant.codes import weight_codes
from ..quant.layers import QuantConv2d
from .integer_ops import ActFormat, Buffers, Codes, Epilogue, Requant, Spec, as_float, fresh

ACCUMULATOR_BITS = 32
_CHUNK_BYTES = 1 << 23  # im2col columns per chunk (8 MiB): few calls, still cache-friendly


def _check_geometry(name: str, layer: QuantConv2d) -> None:
    """Refuse anything but the U-Net's 3x3 convolutions with padding 1."""
    if (
        layer.kernel_size != (3, 3)
        or layer.padding != (1, 1)
        or layer.stride != (1, 1)
        or layer.dilation != (1, 1)
        or layer.groups != 1
    ):
        raise ValueError(f"{name}: integer inference needs 3x3 convolutions, padding 1")


def _affine(name: str, bn: nn.Module | None, channels: int) -> tuple[Tensor, Tensor]:
    """``(alpha, beta)`` ``(C,)`` float32 of the BatchNorm after a layer (folded), or the
    identity ``(1, 0)`` when there is none."""
    if bn is None:
        return torch.ones(channels), torch.zeros(channels)
    if isinstance(bn, nn.BatchNorm2d):
        return fold_batch_norm(bn)
    if isinstance(bn, FoldedBatchNorm):
        return bn.alpha.detach(), bn.beta.detach()
    raise ValueError(f"{name}: unexpected normalisation {type(bn).__name__}")


class IntegerConv:
    """One 3x3 convolution (+ ReLU + BatchNorm) of the U-Net on integer codes.

    ``integer`` is true when both the weights and the input are quantized; the layer then
    computes on codes (:attr:`matrix`, :attr:`scale` the accumulator's real step per channel,
    :attr:`accumulator_bound`), and otherwise in float32 exactly as the model does.
    """

    def __init__(self, name: str, layer: QuantConv2d, bn: nn.Module | None) -> None:
        _check_geometry(name, layer)
        self.name = name
        self.layer = layer
        self.bn = bn
        self.input_format = ActFormat.of(layer.input_quantizer, name)
        self.integer = self.input_format is not None and not layer.weight_quantizer.config.is_float
        bias = layer.bias.detach().float() if layer.bias is not None else None
        self.bias = bias if bias is not None else torch.zeros(layer.out_channels)
        self.alpha, self.beta = _affine(name, bn, layer.out_channels)
        self._requants: dict[tuple[str, int], Requant] = {}
        if self.integer:
            self._prepare_integer()

    def _prepare_integer(self) -> None:
        assert self.input_format is not None
        codes = weight_codes(self.layer.weight_quantizer, self.layer.weight)
        weight = codes.codes  # (C_out, C_in, 3, 3)
        if (
            int(weight.min()) < -128
            or int(weight.max()) > 127
            or self.input_format.dtype != torch.int8
        ):
            raise SettingError(
                f"{self.name}: integer inference runs int8 kernels; this layer has "
                f"{codes.bits}-bit weights or wider than 8-bit input codes; use at most 8 bits "
                f"for weights and activations, or run without integer inference",
                "weight_bits",
                "act_bits",
                "integer",
            )
        self.matrix = weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).to(torch.int8)
        self.scale = codes.scale.double() * self.input_format.step  # accumulator step per channel
        self._scale32 = self.scale.float()
        peak = max(abs(self.input_format.lo), abs(self.input_format.hi))
        bound = int(weight.abs().sum(dim=(1, 2, 3)).max()) * peak
        if bound >= 2 ** (ACCUMULATOR_BITS - 1):
            raise SettingError(
                f"{self.name}: accumulators could reach {bound}, beyond int32; use fewer bits "
                f"for weights or activations",
                "weight_bits",
                "act_bits",
            )
        self.accumulator_bound = bound
        relu = self.bn is not None
        self.epilogue = Epilogue(self.scale, self.bias, self.alpha, self.beta, relu, bound)

    def requant(self, consumer: str, fmt: ActFormat, extra_bits: int = 0) -> Requant:
        """The requantization of this layer's accumulators to ``consumer``'s input codes."""
        key = (consumer, extra_bits)
        if key not in self._requants:
            self._requants[key] = self.epilogue.requant(fmt, extra_bits)
        return self._requants[key]

    def run(
        self, x: Tensor | Codes, outputs: list[Spec], buffers: Buffers = fresh
    ) -> dict[str, Tensor | Codes]:
        """Convolve ``x`` (float ``NCHW`` or codes) and produce one result per consumer;
        ``buffers`` provides the memory of integer results (reused between calls)."""
        if not self.integer:
            return self._run_float(x, outputs, buffers)
        if not isinstance(x, Codes):
            assert self.input_format is not None
            n, c, h, w = x.shape
            scratch = buffers(f"{self.name}.scaled", (n, h, w, c), x.dtype)
            x = Codes(self.input_format.codes(x, scratch), self.input_format)
        return self._run_integer(x, outputs, buffers)

    def _run_float(
        self, x: Tensor | Codes, outputs: list[Spec], buffers: Buffers
    ) -> dict[str, Tensor | Codes]:
        y = self.layer(as_float(x))  # the layer quantizes its own input exactly as in training
        if self.bn is not None:
            y = self.bn(F.relu(y))
        results: dict[str, Tensor | Codes] = {}
        for consumer, fmt, extra in outputs:
            if fmt is None or extra:
                results[consumer] = y  # float consumers, and float upsampling
            else:
                n, c, h, w = y.shape
                scratch = buffers(f"{self.name}>{consumer}.scaled", (n, h, w, c), y.dtype)
                results[consumer] = Codes(fmt.codes(y, scratch), fmt)
        return results

    def _run_integer(
        self, x: Codes, outputs: list[Spec], buffers: Buffers
    ) -> dict[str, Tensor | Codes]:
        padded = self._padded(x.values, buffers)
        batch, height, width, channels = x.values.shape
        rows = max(1, _CHUNK_BYTES // max(1, width * 9 * channels))
        requants = {c: (self.requant(c, f, e) if f is not None else None) for c, f, e in outputs}
        out_channels = self.matrix.shape[1]
        results = self._results(outputs, (batch, height, width, out_channels), buffers)
        for n in range(batch):
            for top in range(0, height, rows):
                count = min(rows, height - top)
                acc = self._accumulators(padded[n, top:], count, buffers)
                for consumer, requant in requants.items():
                    target = results[consumer][n, top : top + count].view(-1, out_channels)
                    if requant is None:
                        target.copy_(self._to_float(acc))
                    elif target.dtype == torch.float64:
                        requant(acc, out=target)
                    else:
                        values = buffers("requantized", tuple(acc.shape), torch.float64)
                        target.copy_(requant(acc, out=values))
        return {
            consumer: (
                results[consumer].permute(0, 3, 1, 2).contiguous()
                if fmt is None
                else Codes(results[consumer], fmt, extra)
            )
            for consumer, fmt, extra in outputs
        }

    def _padded(self, values: Tensor, buffers: Buffers) -> Tensor:
        """``values`` ``(N, H, W, C)`` with a border of zero codes (the zero padding)."""
        batch, height, width, channels = values.shape
        shape = (batch, height + 2, width + 2, channels)
        padded = buffers(f"{self.name}.padded", shape, values.dtype)
        for border in (padded[:, 0], padded[:, -1], padded[:, :, 0], padded[:, :, -1]):
            border.zero_()
        padded[:, 1:-1, 1:-1].copy_(values)
        return padded

    def _results(
        self, outputs: list[Spec], shape: tuple[int, ...], buffers: Buffers
    ) -> dict[str, Tensor]:
        """The ``(N, H, W, C_out)`` result of each consumer: float32 for float consumers,
        float64 for codes with extra bits, else the format's integer dtype."""
        results: dict[str, Tensor] = {}
        for consumer, fmt, extra in outputs:
            if fmt is None:  # float results leave the integer network: never reused
                results[consumer] = torch.empty(shape, dtype=torch.float32)
            else:
                dtype = torch.float64 if extra else fmt.dtype
                results[consumer] = buffers(f"{self.name}>{consumer}", shape, dtype)
        return results

    def _accumulators(self, padded: Tensor, count: int, buffers: Buffers) -> Tensor:
        """``int32`` accumulators ``(count * W, C_out)`` of ``count`` output rows, from the
        padded codes ``(H + 2, W + 2, C_in)`` starting at the chunk's first row."""
        width, channels = padded.shape[1] - 2, padded.shape[2]
        stride = padded.stride()
        view = padded.as_strided(
            (count, width, 3, 3, channels), (stride[0], stride[1], stride[0], stride[1], stride[2])
        )
        columns = buffers("im2col", (count * width, 9 * channels), torch.int8)
        columns.view(view.shape).copy_(view)  # im2col of this chunk
        acc = buffers("accumulators", (count * width, self.matrix.shape[1]), torch.int32)
        torch._int_mm(columns, self.matrix, out=acc)
        return acc

    def _to_float(self, acc: Tensor) -> Tensor:
        """The layer's float output (bias, ReLU, BatchNorm) from its accumulators."""
        z = torch.addcmul(self.bias, acc, self._scale32)  # int32 * float32 -> float32
        if self.bn is None:
            return z
        return torch.relu_(z).mul_(self.alpha).add_(self.beta)
