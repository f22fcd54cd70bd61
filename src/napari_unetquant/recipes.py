"""The training recipe: from what a user chooses to the configs a run uses.

Every shell (the command line, the napari docks, the demo, the sweep, the benchmarks) turns its
user's choices into a :class:`QuantChoice` and a few numbers and asks this module for the
:class:`~napari_unetquant.config.QuantConfig` and
:class:`~napari_unetquant.config.TrainConfig`; no shell types a training number of its own.

The recipe for low bits is the paper's and ours: train full precision, then fine-tune the
quantized network from it, for fewer steps and at half the learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import (
    FLOAT_BITS,
    METHODS,
    NATURAL_BITS,
    PAPER_ACT_FORMAT,
    PAPER_WEIGHT_FORMAT,
    QuantConfig,
    QuantizerConfig,
    TrainConfig,
)
from .errors import SettingError

FINE_TUNE_STEPS = 800
"""Steps of a fine-tune from a trained model when none are chosen (from scratch: 2000)."""
FINE_TUNE_LEARNING_RATE = 5e-4
"""A fine-tune's learning rate: half of training from scratch, so the trained weights stay."""
BATCH_3D = 2
"""3D patches (16 x 128 x 128) hold 16 crops' worth of voxels each: fewer per batch."""
WEIGHT_BITS, ACT_BITS = 4, 6
"""The bit widths offered first: the paper's W4A6."""
DOCK_STEPS, DOCK_FINE_TUNE_STEPS = 300, 150
"""The docks' first step counts: runs a person watches, a minute or two on two CPU cores."""
DEMO_STEPS, DEMO_FINE_TUNE_STEPS, DEMO_CROP = 400, 200, 96
"""The demo's run on its 192-pixel phantoms: a few minutes on two CPU cores."""
VALIDATIONS_PER_RUN = 10
VALIDATION_INTERVAL = (10, 100)
"""Validation about ten times a run, but never more often than every 10 or less often than
every 100 steps (each validation segments the validation slices whole)."""


@dataclass(frozen=True)
class QuantChoice:
    """What a user chose about quantization, before defaults are applied.

    Parameters
    ----------
    quantizer
        ``"float"``, ``"fixed"`` (dynamic fixed point), ``"lsq"``, ``"ternary"`` or ``"binary"``.
    weight_bits, act_bits
        Stored bits, sign included; ``None``: the quantizer's natural width (ternary 2,
        binary 1) or the caller's default. 32 means full precision whatever the quantizer.
    weight_format, act_format
        Paper-style fixed-point formats such as ``"Q0.4"``; they win over the bits.
    quantize_edges
        Also quantize the first block and the last convolution (full precision by default).
    edge_bits
        Quantize the first block and the last convolution to this many bits of fixed point
        (weights and inputs) instead, whatever the rest uses: 8 makes every layer integer (for
        hardware) where quantizing them like the rest can cost a lot (spinal GM, W4A6).
    """

    quantizer: str = "fixed"
    weight_bits: int | None = None
    act_bits: int | None = None
    weight_format: str | None = None
    act_format: str | None = None
    quantize_edges: bool = False
    edge_bits: int | None = None

    def __post_init__(self) -> None:
        if self.quantizer not in METHODS:
            raise ValueError(f"unknown quantizer {self.quantizer!r}; choose one of {METHODS}")
        if self.quantize_edges and self.edge_bits is not None:
            raise SettingError(
                "the edge layers are either quantized like the rest or given their own bits; "
                "choose one",
                "edge_bits",
            )

    @classmethod
    def paper(cls) -> QuantChoice:
        """The paper's exact formats: weights Q0.4, activations Q6.0."""
        return cls("fixed", weight_format=PAPER_WEIGHT_FORMAT, act_format=PAPER_ACT_FORMAT)

    def config(self, default_bits: int = FLOAT_BITS) -> QuantConfig:
        """The quantization this choice asks for; bits left out mean ``default_bits`` (fixed
        point and LSQ) or the natural width (ternary, binary, float)."""
        edges = () if self.quantize_edges else QuantConfig().edge_layers
        weight = self._one(self.weight_bits, self.weight_format, default_bits, "weight")
        act = self._one(self.act_bits, self.act_format, default_bits, "act")
        if self.edge_bits is None:
            return QuantConfig(weight=weight, act=act, edge_layers=edges)
        try:
            edge = QuantizerConfig.from_bits("fixed", self.edge_bits)
        except ValueError as error:
            raise SettingError(f"edge bits {self.edge_bits}: {error}", "edge_bits") from None
        return QuantConfig(weight=weight, act=act, edge_layers=edges, edge_precision=edge)

    def _one(self, bits: int | None, name: str | None, default: int, kind: str) -> QuantizerConfig:
        words = "weight" if kind == "weight" else "activation"
        try:
            if name:
                return QuantizerConfig.from_format(name)
            chosen = NATURAL_BITS.get(self.quantizer, default) if bits is None else bits
            if self.quantizer == "float":
                chosen = FLOAT_BITS
            return QuantizerConfig.from_bits(self.quantizer, chosen, activations=kind == "act")
        except ValueError as error:  # say which choice was wrong
            what = f"{words} format {name}" if name else f"{words} bits {bits}"
            setting = f"{kind}_format" if name else f"{kind}_bits"
            raise SettingError(f"{what}: {error}", setting) from None


def meaning(quant: QuantConfig) -> str:
    """One line on what the bits of ``quant`` mean, e.g. the Q(i.f) formats of fixed point."""
    if quant.is_float:
        return "32-bit floats"
    if quant == QuantConfig.paper():
        return "weights Q0.4 (5 stored bits), activations Q6.0 (7), as in the paper"
    return f"weights: {_meaning(quant.weight)}; activations: {_meaning(quant.act)}"


def _meaning(quantizer: QuantizerConfig) -> str:
    if quantizer.format_name is not None:
        return f"{quantizer.format_name} ({quantizer.bits} stored bits)"
    if quantizer.method == "fixed":
        return f"sign + {quantizer.bits - 1} bits, each layer picks its Q(i.f) split"
    if quantizer.method == "lsq":
        return f"{2**quantizer.bits} levels, learned step"
    return {
        "ternary": "{-a, 0, a}, 2 stored bits",
        "binary": "binary {-a, a}, 1 stored bit",
    }.get(quantizer.method, "32-bit floats")


def validation_interval(steps: int) -> int:
    """Steps between validations for a run of ``steps`` (the last step always validates)."""
    low, high = VALIDATION_INTERVAL
    return min(high, max(low, steps // VALIDATIONS_PER_RUN))


def train_config(
    *, fine_tune: bool, spatial_dims: int = 2, steps: int | None = None
) -> TrainConfig:
    """The recipe's training settings: ``fine_tune`` (from a trained model) takes fewer steps
    and half the learning rate; 3D U-Nets take fewer patches per batch; validation about ten
    times a run. Other settings (seed, device, crop...) are ``TrainConfig``'s defaults: change
    them with :func:`dataclasses.replace`."""
    if steps is None:
        steps = FINE_TUNE_STEPS if fine_tune else TrainConfig.steps
    return TrainConfig(
        steps=steps,
        learning_rate=FINE_TUNE_LEARNING_RATE if fine_tune else TrainConfig.learning_rate,
        batch_size=BATCH_3D if spatial_dims == 3 else TrainConfig.batch_size,
        validate_every=validation_interval(steps),
    )


def intensity_for(
    spacing: tuple[float, float] | None, ct_window: tuple[float, float] | None
) -> str:
    """The recipe's intensity normalisation of a new model: ``"local"`` z-scores for images
    with a physical pixel size (NIfTI, DICOM: MRI across scanners and sites), ``"slice"`` for
    images without one (TIFF, PNG: EM) and for CT windows (which replace both).

    Measured by ``benchmarks/loso.py --intensity local``: on spinal GM, leaving each of four
    sites out in turn, full precision went from 45.6 to 60.4 mean Dice and its worst site from
    21.3 to 58.3 (one seed); EM was not measured with it, so it keeps the per-slice z-score."""
    return "local" if spacing is not None and ct_window is None else "slice"
