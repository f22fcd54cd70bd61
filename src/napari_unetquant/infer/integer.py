"""Integer-only inference: what fixed-point hardware computes for a quantized U-Net.

Every convolution whose weights and input activations are quantized runs on integer codes:
``int8`` codes of its input (``NHWC``) times ``int8`` weight codes, summed in ``int32``
accumulators by PyTorch's integer matrix multiply (``torch._int_mm``, an int8 GEMM kernel)
over an im2col view. Between layers the accumulator is requantized in integer arithmetic
to the next layer's input codes (see :class:`Requant`): bias, ReLU, the folded BatchNorm and the
next format's step are one multiplier and one offset per channel and a rounding right shift.
Where every scale is a power of two (the paper's fixed-point formats with power-of-two
BatchNorm scales) and biases and BatchNorm shifts lie on the grid they are added to, this is
exact; elsewhere a layer's largest multiplier keeps 30 significant bits (fewer only for a layer
whose accumulators could exceed ``2**22``; smaller channels of the layer keep fewer).

Bilinear upsampling runs on codes with 16 extra fractional bits (weights 1/16, 3/16, 9/16 are
exact), max pooling on codes (quantization is monotone, so they commute). Layers kept at full
precision (by default the first block and the final convolution) run in float32, exactly as in
the quantization-aware model; the integer codes are converted at their boundaries.

Accumulators are ``int32``: :class:`IntegerUNet` computes, for each layer, the largest
possible ``|accumulator|`` from its weight codes and its input's code range, and refuses a
network where that bound reaches ``2**31``. Requantization values are integers below ``2**52``:
exact in ``int64`` (:meth:`Requant.reference`) and in ``float64``, which the fast path uses.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.unet import (
    FoldedBatchNorm2d,
    UNet,
    _pad_to_multiple,
    check_input,
    fold_batch_norm,
)
from ..quant.codes import weight_codes
from ..quant.layers import QuantConv2d
from ..quant.quantizers import FixedPointQuantizer, LSQQuantizer, Quantizer

ACCUMULATOR_BITS = 32
MULTIPLIER_BITS = 31
UPSAMPLE_EXTRA_BITS = 16
_CHUNK_BYTES = 1 << 23  # im2col columns per chunk (8 MiB): few calls, still cache-friendly


@dataclass(frozen=True)
class ActFormat:
    """Input codes of a quantized convolution: ``value = code * step``, ``lo <= code <= hi``.

    ``frac_bits`` is set for fixed-point formats (``step == 2**-frac_bits``)."""

    step: float
    lo: int
    hi: int
    frac_bits: int | None
    step_tensor: Tensor

    @classmethod
    def of(cls, quantizer: Quantizer, where: str) -> ActFormat | None:
        """The format of an activation quantizer; ``None`` for full precision."""
        config = quantizer.config
        if config.is_float:
            return None
        if isinstance(quantizer, FixedPointQuantizer):
            if not quantizer.frozen:
                raise ValueError(
                    f"{where}: the activation format was never chosen (an untrained model); "
                    f"train the model, or run it once in training mode, before --integer"
                )
            frac = int(quantizer.frac_bits)
            top = 2**quantizer.magnitude_bits - 1
            step = torch.tensor(2.0**-frac)
            return cls(2.0**-frac, -top if config.signed else 0, top, frac, step)
        if isinstance(quantizer, LSQQuantizer):
            step = quantizer.effective_step().reshape(()).float().cpu()
            return cls(float(step), -quantizer.q_negative, quantizer.q_positive, None, step)
        raise ValueError(
            f"{where}: integer inference supports fixed-point and learned-step activations, not "
            f"{config.label}; segment this model without --integer"
        )

    def codes(self, y: Tensor, scaled: Tensor | None = None) -> Tensor:
        """Codes ``(N, H, W, C)`` of float values ``(N, C, H, W)``, computed exactly as the
        quantizer does, in this format's integer dtype (``scaled``: scratch ``(N, H, W, C)``
        of ``y``'s dtype)."""
        n, c, h, w = y.shape
        if scaled is None:
            scaled = torch.empty(n, h, w, c, dtype=y.dtype)
        if self.frac_bits is not None:
            torch.mul(y, 2.0**self.frac_bits, out=scaled.permute(0, 3, 1, 2))
        else:
            torch.div(y, self.step_tensor, out=scaled.permute(0, 3, 1, 2))
        return scaled.clamp_(self.lo, self.hi).round_().to(self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        fits = self.lo >= -128 and self.hi <= 127
        return torch.int8 if fits else torch.int32


def round_shift(values: Tensor, shift: int) -> Tensor:
    """``round(values / 2**shift)`` with ties to even, in place on an integer tensor."""
    if shift <= 0:
        return values.mul_(1 << -shift)
    odd = (values >> shift) & 1
    return values.add_(odd).add_((1 << (shift - 1)) - 1).bitwise_right_shift_(shift)


@dataclass(frozen=True)
class Requant:
    """``int32`` accumulators ``(pixels, C)`` -> codes of the next format, per channel ``c``:

    ``code = clamp(round((M[c] * acc + K[c]) / 2**shift), low[c], high[c])``

    with ``M = alpha * S / step`` and ``K = (alpha * bias + beta) / step``, both scaled by
    ``2**shift`` and rounded to integers (``S`` the accumulator's step, ``alpha, beta`` the
    folded BatchNorm, ``step`` the next format's), rounding half to even. ReLU is folded into
    ``low``/``high``: after it the output cannot go below (``M > 0``) or above (``M < 0``)
    ``round(beta / step)``. ``extra_bits`` keeps that many more fractional bits and skips the
    range clamp (for upsampling before the final rounding).

    ``shift`` is chosen so that ``|M| <= 2**30`` and ``|M * acc + K| < 2**52`` for every
    accumulator the layer can produce: :meth:`reference` evaluates the formula in ``int64``,
    ``__call__`` evaluates the same integers in ``float64``, where below ``2**53`` every
    product, sum and power-of-two scaling is exact, so both give identical codes (tested).
    """

    multiplier: Tensor  # int64 (C,)
    offset: Tensor  # int64 (C,)
    low: Tensor  # int64 (C,)
    high: Tensor  # int64 (C,)
    shift: int
    extra_bits: int

    def __post_init__(self) -> None:
        scale = 2.0 ** -(self.shift - self.extra_bits)
        object.__setattr__(self, "_m", self.multiplier.double() * scale)
        object.__setattr__(self, "_k", self.offset.double() * scale)
        object.__setattr__(self, "_lo", self.low.double())
        object.__setattr__(self, "_hi", self.high.double())

    def __call__(self, acc: Tensor, out: Tensor | None = None) -> Tensor:
        """Codes (``float64``, integer-valued) of accumulators ``acc``, into ``out`` if given."""
        m, k = self._m, self._k  # type: ignore[attr-defined]
        values = torch.addcmul(k, acc, m) if out is None else torch.addcmul(k, acc, m, out=out)
        return values.round_().clamp_(self._lo, self._hi)  # type: ignore[attr-defined]

    def reference(self, acc: Tensor) -> Tensor:
        """The same codes computed in ``int64`` integer arithmetic."""
        values = acc.to(torch.int64).mul_(self.multiplier).add_(self.offset)
        values = round_shift(values, self.shift - self.extra_bits)
        return values.clamp_(self.low, self.high)


def _requant(
    scale: Tensor,
    bias: Tensor,
    alpha: Tensor,
    beta: Tensor,
    fmt: ActFormat,
    accumulator_bound: int,
    relu: bool,
    extra_bits: int = 0,
) -> Requant:
    multiplier = alpha.double() * scale / fmt.step
    # the float bias enters at full precision: ReLU(acc * S + bias) = S * ReLU(acc + bias / S)
    relu_offset = beta.double() / fmt.step
    offset = relu_offset + alpha.double() * bias.double() / fmt.step
    largest = max(float(multiplier.abs().max()), 2.0**-60)
    reach = largest * accumulator_bound + float(offset.abs().max()) + 1.0
    shift = min(
        MULTIPLIER_BITS - 1 - math.ceil(math.log2(largest)),
        52 - math.ceil(math.log2(reach)),
    )
    # values kept with extra bits stay below 2**49, so upsampling them is exact in float64
    if shift - extra_bits < 3:
        raise ValueError(
            "a requantization multiplier or offset is too large to keep the step's precision; "
            "the network's BatchNorm scales or biases are out of range"
        )
    m = torch.round(multiplier * 2.0**shift).to(torch.int64)
    k = torch.round(offset * 2.0**shift).to(torch.int64)
    floor = round_shift(torch.round(relu_offset * 2.0**shift).to(torch.int64), shift - extra_bits)
    unclamped = extra_bits > 0  # upsampling sources: clamped after interpolation
    lo = torch.full_like(m, -(1 << 52) if unclamped else fmt.lo)
    hi = torch.full_like(m, (1 << 52) if unclamped else fmt.hi)
    if relu:
        lo = torch.where(m > 0, torch.maximum(lo, floor), lo)
        hi = torch.where(m < 0, torch.minimum(hi, floor), hi)
        lo = torch.minimum(lo, hi)
    return Requant(m, k, lo, hi, shift, extra_bits)


# --- tensors flowing through the network -----------------------------------------------------


@dataclass
class Codes:
    """Integer activations ``(N, H, W, C)`` in ``fmt``; with ``extra_bits`` more fractional
    bits (upsampling sources) they are integer-valued ``float64``."""

    values: Tensor
    fmt: ActFormat
    extra_bits: int = 0


Spec = tuple[str, ActFormat | None, int]  # (consumer name, its input format, extra bits)
Buffers = Callable[[str, tuple[int, ...], torch.dtype], Tensor]


def fresh(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A new, uninitialised tensor (the :data:`Buffers` that keeps nothing)."""
    return torch.empty(shape, dtype=dtype)


class IntegerConv:
    """One 3x3 convolution (+ ReLU + BatchNorm) of the U-Net on integer codes."""

    def __init__(self, name: str, layer: QuantConv2d, bn: nn.Module | None) -> None:
        if (
            layer.kernel_size != (3, 3)
            or layer.padding != (1, 1)
            or layer.stride != (1, 1)
            or layer.dilation != (1, 1)
            or layer.groups != 1
        ):
            raise ValueError(f"{name}: integer inference needs 3x3 convolutions, padding 1")
        self.name = name
        self.layer = layer
        self.bn = bn
        self.input_format = ActFormat.of(layer.input_quantizer, name)
        self.integer = self.input_format is not None and not layer.weight_quantizer.config.is_float
        bias = layer.bias.detach().float() if layer.bias is not None else None
        self.bias = bias if bias is not None else torch.zeros(layer.out_channels)
        if bn is None:
            self.alpha, self.beta = torch.ones(layer.out_channels), torch.zeros(layer.out_channels)
        elif isinstance(bn, nn.BatchNorm2d):
            self.alpha, self.beta = fold_batch_norm(bn)
        elif isinstance(bn, FoldedBatchNorm2d):
            self.alpha, self.beta = bn.alpha.detach(), bn.beta.detach()
        else:
            raise ValueError(f"{name}: unexpected normalisation {type(bn).__name__}")
        self._requants: dict[tuple[str, int], Requant] = {}
        if self.integer:
            self._prepare_integer()

    def _prepare_integer(self) -> None:
        assert self.input_format is not None
        quantizer = self.layer.weight_quantizer
        codes = weight_codes(quantizer, self.layer.weight)
        weight = codes.codes  # (C_out, C_in, 3, 3)
        if (
            int(weight.min()) < -128
            or int(weight.max()) > 127
            or self.input_format.dtype != torch.int8
        ):
            raise ValueError(
                f"{self.name}: integer inference runs int8 kernels; this layer has "
                f"{codes.bits}-bit weights or wider than 8-bit input codes"
            )
        self.matrix = weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).to(torch.int8)
        self.scale = codes.scale.double() * self.input_format.step  # accumulator step per channel
        self._scale32 = self.scale.float()
        peak = max(abs(self.input_format.lo), abs(self.input_format.hi))
        bound = int(weight.abs().sum(dim=(1, 2, 3)).max()) * peak
        if bound >= 2 ** (ACCUMULATOR_BITS - 1):
            raise ValueError(
                f"{self.name}: accumulators could reach {bound}, beyond int32; use fewer bits"
            )
        self.accumulator_bound = bound

    def requant(self, consumer: str, fmt: ActFormat, extra_bits: int = 0) -> Requant:
        """The requantization of this layer's accumulators to ``consumer``'s input codes."""
        key = (consumer, extra_bits)
        if key not in self._requants:
            self._requants[key] = _requant(
                self.scale,
                self.bias,
                self.alpha,
                self.beta,
                fmt,
                self.accumulator_bound,
                self.bn is not None,
                extra_bits,
            )
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
        if isinstance(x, Codes):
            x = x.values.permute(0, 3, 1, 2).float() * x.fmt.step_tensor
        y = self.layer(x)  # the layer quantizes its own input exactly as in training
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
        batch, height, width, channels = x.values.shape
        padded = buffers(
            f"{self.name}.padded", (batch, height + 2, width + 2, channels), x.values.dtype
        )
        for border in (padded[:, 0], padded[:, -1], padded[:, :, 0], padded[:, :, -1]):
            border.zero_()  # zero codes around the image: the convolution's zero padding
        padded[:, 1:-1, 1:-1].copy_(x.values)
        stride = padded.stride()
        rows = max(1, _CHUNK_BYTES // max(1, width * 9 * channels))
        requants = {c: (self.requant(c, f, e) if f is not None else None) for c, f, e in outputs}
        out_channels = self.matrix.shape[1]
        results: dict[str, Tensor] = {}
        for consumer, fmt, extra in outputs:
            dtype = torch.float32 if fmt is None else (torch.float64 if extra else fmt.dtype)
            shape = (batch, height, width, out_channels)
            if fmt is None:  # float results leave the integer network: never reused
                results[consumer] = torch.empty(shape, dtype=dtype)
            else:
                results[consumer] = buffers(f"{self.name}>{consumer}", shape, dtype)
        for n in range(batch):
            for top in range(0, height, rows):
                count = min(rows, height - top)
                view = padded[n, top:].as_strided(
                    (count, width, 3, 3, channels),
                    (stride[1], stride[2], stride[1], stride[2], stride[3]),
                )
                pixels = count * width
                columns = buffers("im2col", (pixels, 9 * channels), torch.int8)
                columns.view(view.shape).copy_(view)  # im2col of this chunk
                acc = buffers("accumulators", (pixels, out_channels), torch.int32)
                torch._int_mm(columns, self.matrix, out=acc)
                for consumer, requant in requants.items():
                    target = results[consumer][n, top : top + count].view(-1, out_channels)
                    if requant is None:
                        target.copy_(self._to_float(acc))
                    elif target.dtype == torch.float64:
                        requant(acc, out=target)
                    else:
                        values = buffers("requantized", tuple(acc.shape), torch.float64)
                        target.copy_(requant(acc, out=values))
        wrapped: dict[str, Tensor | Codes] = {}
        for consumer, fmt, extra in outputs:
            value = results[consumer]
            if fmt is None:
                wrapped[consumer] = value.permute(0, 3, 1, 2).contiguous()
            else:
                wrapped[consumer] = Codes(value, fmt, extra)
        return wrapped

    def _to_float(self, acc: Tensor) -> Tensor:
        """The layer's float output (bias, ReLU, BatchNorm) from its accumulators."""
        z = torch.addcmul(self.bias, acc, self._scale32)  # int32 * float32 -> float32
        if self.bn is None:
            return z
        return torch.relu_(z).mul_(self.alpha).add_(self.beta)


def upsample_codes(
    x: Codes, fmt: ActFormat, buffers: Buffers = fresh, key: str = "upsample"
) -> Tensor:
    """Bilinear 2x upsampling (``align_corners=False``) of codes with extra bits, rounded to
    ``fmt``'s codes: every output is ``(9a + 3b + 3c + d) / 16`` of its four neighbours.

    The integer sums are evaluated by PyTorch's bilinear kernel in float64, exactly: with the
    weights ``1/4`` and ``3/4`` per axis no product or sum of integers below ``2**49`` (see
    :func:`_requant`) is rounded. The one rounding is the final shift, half to even.
    """
    n, h, w, c = x.values.shape
    size = (n, 2 * h, 2 * w, c)
    upsampled = buffers(f"{key}.float64", size, x.values.dtype)  # NHWC memory
    torch.ops.aten.upsample_bilinear2d.out(
        x.values.permute(0, 3, 1, 2),
        [2 * h, 2 * w],
        False,
        2.0,
        2.0,
        out=upsampled.permute(0, 3, 1, 2),
    )  # what F.interpolate(scale_factor=2, mode="bilinear") computes, into the buffer
    upsampled.mul_(2.0**-x.extra_bits).round_().clamp_(fmt.lo, fmt.hi)
    codes = buffers(f"{key}.codes", size, fmt.dtype)
    return codes.copy_(upsampled)


def _max_pool(x: Tensor | Codes) -> Tensor | Codes:
    """2x2 max pooling of float activations, or of codes ``(N, H, W, C)`` (row pairs, then
    column pairs)."""
    if not isinstance(x, Codes):
        return F.max_pool2d(x, 2)
    n, h, w, c = x.values.shape
    rows = x.values.view(n, h // 2, 2, w, c)
    rows = torch.maximum(rows[:, :, 0], rows[:, :, 1]).view(n, h // 2, w // 2, 2, c)
    return Codes(torch.maximum(rows[:, :, :, 0], rows[:, :, :, 1]), x.fmt, x.extra_bits)


class IntegerUNet:
    """A quantization-aware or packed :class:`~napari_unetquant.model.UNet` run on integers.

    ``IntegerUNet(model)(x)`` takes the same input as ``model`` (``(N, 1, H, W)`` float32) and
    returns float32 logits; quantized layers compute on integer codes. 2D U-Nets only (a 3D one
    is refused when building). CPU only: building it
    puts ``model`` in evaluation mode on the CPU, and it reads ``model``'s layers as they are
    then (rebuild it after changing them; ``infer.predict.integer_network`` does).

    :attr:`outputs` is the dataflow: for each convolution, the consumers its result feeds, each
    with that consumer's input format and the extra fractional bits kept for upsampling.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, UNet):
            raise ValueError("integer inference runs the napari-unetquant U-Net only")
        if model.config.spatial_dims != 2:
            dims = model.config.spatial_dims
            raise ValueError(
                f"integer inference runs 2D U-Nets only; this model is {dims}D: drop --integer "
                f"(the float simulation runs it)"
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
            raise ValueError(
                "this model has no quantized layer; integer inference needs a quantized model "
                "(train one with --weight-bits/--act-bits)"
            )
        self.outputs = self._dataflow()
        self._local = threading.local()

    @property
    def integer_layers(self) -> list[str]:
        return [name for name, conv in self.convs.items() if conv.integer]

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
        outputs["bottleneck.conv2"] = [self._spec(upsampled, UPSAMPLE_EXTRA_BITS)]
        for level in range(depth, 1, -1):
            outputs[f"dec{level}.conv2"] = [
                self._spec(f"dec{level - 1}.conv1", UPSAMPLE_EXTRA_BITS)
            ]
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
            current = _max_pool(below)
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
        if fmt is None or not isinstance(below, Codes):
            up = _as_float(below)
            up = F.interpolate(up, scale_factor=2, mode="bilinear", align_corners=False)
            joined = torch.cat([up, _as_float(skip)], dim=1)
            if fmt is None:
                return joined
            return Codes(fmt.codes(joined), fmt)
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


def _as_float(x: Tensor | Codes) -> Tensor:
    if isinstance(x, Codes):
        if x.extra_bits:
            raise AssertionError("float consumers get float tensors from their producers")
        return x.values.permute(0, 3, 1, 2).float() * x.fmt.step_tensor
    return x
