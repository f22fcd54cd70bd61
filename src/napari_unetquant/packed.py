"""Packed model files: weight codes at exactly their bit width, BatchNorm folded.

The packed layout stores, for every convolution with quantized weights ``L``:

- ``L.weight.codes``: ``uint8``, the codes packed at ``bits`` bits each (see
  :mod:`napari_unetquant.quant.packing`), C order over ``(C_out, C_in, kH, kW)`` (3D U-Nets:
  ``(C_out, C_in, kD, kH, kW)``);
- ``L.weight.scale``: ``float32 (C_out,)`` per-channel scales, except for fixed-point weights,
  whose one shift ``frac_bits`` is in the metadata (``scale = 2**-frac_bits``);
- ``L.bias`` and the input quantizer's state (fixed-point shift, learned step) as they are.

Every BatchNorm ``B`` is stored folded as ``B.alpha`` and ``B.beta`` (``y = x * alpha + beta``),
and full-precision layers (by default the first block and the last convolution) keep float32
weights. Loading rebuilds a network whose forward pass is bit-identical to the
quantization-aware model the file came from: the same codes, the same outputs, the same masks.

A packed network is for inference; :func:`unpacked_network` turns it back into a trainable one
(float weights exactly the dequantized codes, BatchNorm given statistics under which it computes
exactly the folded scale and shift), and :func:`calibrate_batch_norm` re-splits that BatchNorm
around statistics measured on data, so that fine-tuning starts from the network the file holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import QuantConfig, QuantizerConfig, UNetConfig
from .model import BATCH_NORMS, FoldedBatchNorm, UNet, build_unet, fold_batch_norm
from .quant.codes import FrozenWeight, WeightCodes, code_offset, dequantize, weight_codes
from .quant.functional import MAX_FRAC_BITS, fixed_point_code_range
from .quant.layers import QuantConvNd
from .quant.packing import pack_codes, unpack_codes
from .quant.quantizers import FixedPointQuantizer, LSQQuantizer, RunningStat

LAYOUT_STATE_DICT = "state_dict"
LAYOUT_PACKED = "packed"


def _running_peak(layer: QuantConvNd) -> RunningStat | None:
    """The running peak of a dynamic fixed-point input quantizer (frozen once trained)."""
    quantizer = layer.input_quantizer
    return quantizer.peak if isinstance(quantizer, FixedPointQuantizer) else None


def _packable(module: nn.Module) -> bool:
    return isinstance(module, QuantConvNd) and not module.weight_quantizer.config.is_float


def has_quantized_weights(model: nn.Module) -> bool:
    """True when some convolution of ``model`` stores integer weight codes: what the packed
    layout stores in a few bits (a network with float weights only gains nothing from it)."""
    return any(_packable(module) for module in model.modules())


@torch.no_grad()
def pack_model(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and per-layer metadata of ``model``'s packed form (evaluation state)."""
    model.eval()
    state = model.state_dict()
    tensors: dict[str, Tensor] = {}
    layers: dict[str, Any] = {}
    consumed: set[str] = set()
    for name, module in model.named_modules():
        if _packable(module):
            assert isinstance(module, QuantConvNd)
            quantizer = module.weight_quantizer
            codes = weight_codes(quantizer, module.weight)
            tensors[f"{name}.weight.codes"] = pack_codes(codes.codes - codes.offset, codes.bits)
            if codes.frac_bits is None:
                tensors[f"{name}.weight.scale"] = codes.scale
            layers[name] = {
                "method": quantizer.config.method,
                "bits": codes.bits,
                "shape": list(codes.shape),
                "frac_bits": codes.frac_bits,
                "offset": codes.offset,
                "scale_count": quantizer.scale_count,
            }
            consumed.add(f"{name}.weight")
            consumed.update(k for k in state if k.startswith(f"{name}.weight_quantizer."))
        peak = _running_peak(module) if isinstance(module, QuantConvNd) else None
        if peak is not None and bool(peak.initialized):
            # the frozen format (frac_bits) is kept; the running peak that chose it is not
            consumed.update(k for k in state if k.startswith(f"{name}.input_quantizer.peak."))
        if isinstance(module, BATCH_NORMS):
            alpha, beta = fold_batch_norm(module)
            tensors[f"{name}.alpha"], tensors[f"{name}.beta"] = alpha, beta
            consumed.update(k for k in state if k.startswith(f"{name}."))
    for key, value in state.items():
        if key not in consumed:
            tensors[key] = value
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, layers


def load_exactly(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """``model.load_state_dict(tensors, strict=True)``, with a ``ValueError`` that says what
    the mismatch means for a model file."""
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:  # torch's message spans lines: keep it on one
        raise ValueError(
            f"tensors do not match the configured network ({' '.join(str(error).split())}); "
            f"the file is damaged or was edited"
        ) from error


def packed_network(
    unet: UNetConfig, quant: QuantConfig, tensors: dict[str, Tensor], layers: dict[str, Any]
) -> nn.Module:
    """The network of a packed file: built from its configuration, weights dequantized once,
    BatchNorm folded. Raises ``ValueError`` when the tensors do not fit the configuration."""
    model = build_unet(unet, quant)
    tensors = dict(tensors)
    expected = sorted(name for name, module in model.named_modules() if _packable(module))
    if sorted(layers) != expected:
        raise ValueError(
            f"the packed layers {sorted(layers)} do not match the configured network's "
            f"quantized layers {expected}; the file is damaged or was edited"
        )
    for name, info in layers.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantConvNd)
        original = layer.weight_quantizer
        try:
            codes = _read_codes(name, info, tensors, tuple(layer.weight.shape), original.config)
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"{name}: the packing metadata is damaged ({type(error).__name__}: {error}); "
                f"export the model again"
            ) from error
        layer.weight_quantizer = FrozenWeight(original.config, codes, original.scale_count)
        tensors[f"{name}.weight"] = dequantize(codes)
    for name, module in model.named_modules():
        peak = _running_peak(module) if isinstance(module, QuantConvNd) else None
        missing = f"{name}.input_quantizer.peak.value" not in tensors
        if peak is not None and missing and f"{name}.input_quantizer.frac_bits" in tensors:
            assert isinstance(module, QuantConvNd)
            assert isinstance(module.input_quantizer, FixedPointQuantizer)
            frac = int(tensors[f"{name}.input_quantizer.frac_bits"])
            _, top = fixed_point_code_range(module.input_quantizer.magnitude_bits)
            covered = top * 2.0**-frac  # the peak the frozen format covers
            tensors[f"{name}.input_quantizer.peak.value"] = torch.tensor(covered)
            tensors[f"{name}.input_quantizer.peak.initialized"] = torch.tensor(True)
    for name, module in list(model.named_modules()):
        if isinstance(module, BATCH_NORMS):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, FoldedBatchNorm(module.num_features))
    load_exactly(model, tensors)
    model.eval()
    _fast_inference(model)
    return model


@torch.no_grad()
def unpacked_network(packed: nn.Module, unet: UNetConfig, quant: QuantConfig) -> nn.Module:
    """The trainable network of a packed one (:func:`packed_network`), in evaluation mode.

    Its float weights are exactly the dequantized codes, and the weight quantizers keep the
    packed step (learned steps) or shift (fixed point), so quantizing them again gives the same
    values. Every BatchNorm gets the folded scale and shift as its affine, with mean 0 and a
    variance whose sum with ``eps`` is exactly 1: its inference pass then computes exactly the
    folded arithmetic, and evaluation outputs are bit-identical to the packed network's. (The
    statistics the packed file dropped are unknown: :func:`calibrate_batch_norm` measures them
    before training in batch-statistics mode.) Raises ``ValueError`` for a network that is not
    a packed one of ``unet`` and ``quant``.
    """
    model = build_unet(unet, quant)
    state = dict(packed.state_dict())
    tensors: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, BATCH_NORMS):
            try:
                alpha, beta = state.pop(f"{name}.alpha"), state.pop(f"{name}.beta")
            except KeyError:
                raise ValueError(
                    f"{name}: not a folded BatchNorm; unpack only a network loaded from a packed "
                    f"model file"
                ) from None
            tensors[f"{name}.weight"], tensors[f"{name}.bias"] = alpha.clone(), beta.clone()
            tensors[f"{name}.running_mean"] = torch.zeros_like(alpha)
            tensors[f"{name}.running_var"] = _unit_variance(alpha, module.eps)
            tensors[f"{name}.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
        if _packable(module):
            assert isinstance(module, QuantConvNd)
            frozen = packed.get_submodule(name).weight_quantizer
            if not isinstance(frozen, FrozenWeight):
                raise ValueError(
                    f"{name}: its weights are not packed codes; unpack only a network loaded "
                    f"from a packed model file"
                )
            quantizer, codes = module.weight_quantizer, frozen.codes
            if isinstance(quantizer, LSQQuantizer):
                tensors[f"{name}.weight_quantizer.step"] = codes.scale.clone()
                tensors[f"{name}.weight_quantizer.initialized"] = torch.tensor(True)
            elif isinstance(quantizer, FixedPointQuantizer) and codes.frac_bits is not None:
                frac = torch.tensor(codes.frac_bits, dtype=torch.int32)
                tensors[f"{name}.weight_quantizer.frac_bits"] = frac
    tensors.update(state)  # weights (dequantized), biases, input quantizers as packed
    load_exactly(model, tensors)
    return model.eval()


def _unit_variance(like: Tensor, eps: float) -> Tensor:
    """A float32 variance ``v`` with ``v + eps == 1`` exactly, so that ``rsqrt(v + eps)`` is 1
    and the BatchNorm's folded scale is its affine weight, bit for bit."""
    variance = torch.full_like(like, 1.0) - eps
    for _ in range(8):  # the rounding of 1 - eps may be off by an ulp or two
        total = variance + eps
        if bool((total == 1.0).all()):
            return variance
        variance = torch.nextafter(variance, torch.where(total > 1.0, 0.0, 2.0))
    raise ValueError(f"no float32 variance makes BatchNorm exact with eps={eps}")


@torch.no_grad()
def calibrate_batch_norm(model: nn.Module, images: Tensor) -> None:
    """Re-split every BatchNorm of ``model`` around statistics measured on ``images``
    ``(N, C, *spatial)``, keeping its inference scale and shift (up to float rounding).

    A BatchNorm computes ``x * alpha + beta`` in evaluation but normalises by the batch's own
    statistics in training. An unpacked one (:func:`unpacked_network`) knows only ``alpha`` and
    ``beta``; here each one gets running statistics ``(mean, var)`` measured on its input, weight
    ``alpha * sqrt(var + eps)`` and bias ``beta + mean * alpha``, so that a training step on
    data like ``images`` starts from the network the packed file holds. One forward pass in
    evaluation mode, in order (each BatchNorm sees the inputs the ones before it produce);
    quantizers that were never run take their first statistics from it, as in a first step.
    """

    def resplit(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        assert isinstance(module, BATCH_NORMS)
        x = inputs[0].detach()
        dims = [0, *range(2, x.dim())]
        mean, variance = x.mean(dims), x.var(dims, unbiased=False)
        alpha, beta = fold_batch_norm(module)
        assert module.running_mean is not None and module.running_var is not None
        module.running_mean.copy_(mean)
        module.running_var.copy_(variance)
        module.weight.copy_(alpha * torch.sqrt(variance + module.eps))
        module.bias.copy_(beta + mean * alpha)

    was_training = model.training
    hooks = [
        module.register_forward_pre_hook(resplit)
        for module in model.modules()
        if isinstance(module, BATCH_NORMS)
    ]
    try:
        model.eval()
        model(images)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)


def _fast_inference(model: nn.Module) -> None:
    """Turn on the U-Net's in-place inference path (same outputs, fewer passes)."""
    if isinstance(model, UNet):
        model.fast_inference = True


def _read_codes(
    name: str,
    info: dict[str, Any],
    tensors: dict[str, Tensor],
    shape: tuple[int, ...],
    config: QuantizerConfig,
) -> WeightCodes:
    bits, frac, offset = info["bits"], info["frac_bits"], info["offset"]
    expected_offset = code_offset(config)
    if info["method"] != config.method or bits != config.bits or offset != expected_offset:
        raise ValueError(
            f"{name}: packed as {info['method']} {bits!r} bits (offset {offset!r}), configured "
            f"as {config.label}; the file is damaged or was edited"
        )
    if (frac is None) == (config.method == "fixed") or not (
        frac is None or (type(frac) is int and abs(frac) <= MAX_FRAC_BITS)  # 2**-frac is finite
    ):
        raise ValueError(f"{name}: the fixed-point shift {frac!r} does not fit {config.label}")
    if list(shape) != list(info["shape"]):
        raise ValueError(f"{name}: packed shape {info['shape']} but the network has {shape}")
    packed = tensors.pop(f"{name}.weight.codes", None)
    if packed is None:
        raise ValueError(f"{name}: the packed weight codes are missing; the file is damaged")
    codes = unpack_codes(packed, bits, shape) + offset
    if frac is None:
        scale = tensors.pop(f"{name}.weight.scale", None)
        if scale is None or scale.shape != (shape[0],):
            raise ValueError(f"{name}: the per-channel weight scales are missing or misshapen")
    else:
        scale = torch.full((shape[0],), 2.0 ** -int(frac))
    return WeightCodes(codes, scale.float(), bits, None if frac is None else int(frac), offset)


# --- what a file on disk holds ----------------------------------------------------------------


@dataclass(frozen=True)
class LayerBytes:
    """Bytes one convolution (with its BatchNorm) takes in a file, and in the FP32 file."""

    name: str
    weight_label: str
    act_label: str
    weight_bits: int
    parameters: int
    bytes: int
    fp32_bytes: int

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / max(self.bytes, 1)


@dataclass(frozen=True)
class FileReport:
    """A model file's size by layer, against the FP32 ``state_dict`` file of the same network."""

    layers: tuple[LayerBytes, ...]
    header_bytes: int
    file_bytes: int
    fp32_file_bytes: int

    @property
    def ratio(self) -> float:
        return self.fp32_file_bytes / self.file_bytes

    def table(self) -> str:
        rows = [f"{'layer':<16}{'w/a':>14}{'params':>10}{'bytes':>10}{'FP32':>10}{'ratio':>8}"]
        for layer in self.layers:
            bits = f"{layer.weight_label}/{layer.act_label}"
            rows.append(
                f"{layer.name:<16}{bits:>14}{layer.parameters:>10}{layer.bytes:>10}"
                f"{layer.fp32_bytes:>10}{layer.ratio:>7.2f}x"
            )
        rows.append(f"{'header+metadata':<16}{'':>24}{self.header_bytes:>10}")
        rows.append(
            f"{'file on disk':<16}{'':>24}{self.file_bytes:>10}{self.fp32_file_bytes:>10}"
            f"{self.ratio:>7.2f}x"
        )
        return "\n".join(rows)


def safetensors_layout(path: str | Path) -> tuple[int, dict[str, int]]:
    """Header size and ``{tensor name: bytes}`` of a safetensors file (reads the header only)."""
    with Path(path).open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    sizes = {
        key: int(entry["data_offsets"][1]) - int(entry["data_offsets"][0])
        for key, entry in header.items()
        if key != "__metadata__"
    }
    return 8 + length, sizes


def fp32_state_dict_bytes(unet: UNetConfig) -> int:
    """Size of the FP32 ``state_dict`` of the same U-Net saved as safetensors (no metadata)."""
    from safetensors.torch import save

    model = build_unet(unet)
    return len(save({k: v.contiguous() for k, v in model.state_dict().items()}))


def file_report(path: str | Path, model: nn.Module, unet: UNetConfig) -> FileReport:
    """Per-layer bytes of the model file at ``path`` holding ``model``."""
    header, sizes = safetensors_layout(path)
    fp32 = build_unet(unet).state_dict()
    rows = []
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantConvNd):
            continue
        groups = [f"{name}."]
        block, _, conv = name.rpartition(".")
        if conv.startswith("conv"):
            groups.append(f"{block}.bn{conv[4:]}.")
        stored = sum(size for key, size in sizes.items() if key.startswith(tuple(groups)))
        reference = sum(
            t.numel() * t.element_size() for k, t in fp32.items() if k.startswith(tuple(groups))
        )
        weight_config = layer.weight_quantizer.config
        rows.append(
            LayerBytes(
                name=name,
                weight_label=weight_config.label,
                act_label=layer.input_quantizer.config.label,
                weight_bits=weight_config.bits,
                parameters=layer.weight.numel() + (0 if layer.bias is None else layer.bias.numel()),
                bytes=stored,
                fp32_bytes=reference,
            )
        )
    return FileReport(tuple(rows), header, Path(path).stat().st_size, fp32_state_dict_bytes(unet))
