"""Frozen, validated configuration values.

Configs import no torch, so the CLI and the napari widgets can build and check them cheaply.
Every field is checked in ``__post_init__`` and a bad value raises ``ValueError`` with a message
that names the value and the fix.

Bit accounting
--------------
A width of ``b`` bits means ``b`` *stored* bits, sign included, so at most ``2**b`` levels.
A fixed-point format Q(i.f) stores ``1 + i + f`` bits (sign, integer and fractional bits): the
paper's weight format Q0.4 stores 5 bits and its activation format Q6.0 stores 7 bits, not the 4
and 6 the paper counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

FLOAT_BITS = 32
METHODS = ("float", "fixed", "lsq", "ternary", "binary")
NATURAL_BITS = {"float": FLOAT_BITS, "ternary": 2, "binary": 1}
"""Methods whose stored width is fixed by what they are; the others take 2 to 8 bits."""
DYNAMIC_RULES = ("max", "mse")
SPATIAL_DIMS = (2, 3)
UPSAMPLE_MODES = ("bilinear", "nearest")
_FORMAT_RE = re.compile(r"^Q(-?\d+)\.(-?\d+)$")
_LABEL_RE = re.compile(r"^W(\d+)A(\d+)(?:-(fixed|lsq))?$", re.IGNORECASE)


@dataclass(frozen=True)
class QuantizerConfig:
    """How one tensor (a layer's weights or its input activations) is quantized.

    Parameters
    ----------
    method
        ``"float"`` (no quantization, 32 bits), ``"fixed"`` (sign-magnitude fixed point),
        ``"lsq"`` (learned step size), ``"ternary"`` (TWN / TernaryNet style) or ``"binary"``.
    bits
        Stored bits, sign included. ``float``: 32; ``ternary``: 2; ``binary``: 1;
        ``fixed``: 2..8 (2..16 with an explicit format); ``lsq``: 2..8.
    int_bits, frac_bits
        Only for ``fixed``: an explicit Q(int_bits.frac_bits) format shared by all layers, as in
        the paper. Both ``None`` selects dynamic fixed point: each layer picks its own split of
        ``bits - 1`` magnitude bits from its tensor's range (still power-of-two steps).
    dynamic_rule
        Dynamic fixed point only: ``"max"`` picks the finest step whose range covers the largest
        magnitude; ``"mse"`` also tries one and two finer steps (clipping outliers) and keeps the
        one with the smallest squared error.
    clip_gradient
        Zero the straight-through gradient where the input lies outside the representable range.
    power_of_two
        Only for ``lsq``: round the learned step to a power of two (shift-only arithmetic).
    signed
        Whether negative values are representable. Unsigned formats spend no bit on a sign.
    """

    method: str = "float"
    bits: int = FLOAT_BITS
    int_bits: int | None = None
    frac_bits: int | None = None
    dynamic_rule: str = "mse"
    clip_gradient: bool = False
    power_of_two: bool = False
    signed: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown quantizer method {self.method!r}; choose one of {METHODS}")
        if self.dynamic_rule not in DYNAMIC_RULES:
            raise ValueError(
                f"unknown dynamic_rule {self.dynamic_rule!r}; choose one of {DYNAMIC_RULES}"
            )
        if (self.int_bits is None) != (self.frac_bits is None):
            raise ValueError("give both int_bits and frac_bits (a Q(i.f) format) or neither")
        if self.int_bits is not None and (self.int_bits < 0 or (self.frac_bits or 0) < 0):
            raise ValueError(
                f"Q{self.int_bits}.{self.frac_bits} has a negative bit count; use i, f >= 0"
            )
        if self.int_bits is not None and self.method != "fixed":
            raise ValueError(f"a Q(i.f) format needs method 'fixed', not {self.method!r}")
        if self.power_of_two and self.method != "lsq":
            raise ValueError("power_of_two applies to the learned-step quantizer only: use 'lsq'")
        if not self.signed and self.method in ("ternary", "binary"):
            raise ValueError(f"{self.method} values are signed by definition; drop signed=False")
        self._check_bits()

    def _check_bits(self) -> None:
        if self.method in NATURAL_BITS:
            expected = NATURAL_BITS[self.method]
            if self.bits != expected:
                raise ValueError(
                    f"{self.method} stores {expected} bits, got bits={self.bits}; "
                    f"use bits={expected} or another method"
                )
            return
        if self.int_bits is not None and self.frac_bits is not None:
            width = self.int_bits + self.frac_bits + int(self.signed)
            if width != self.bits:
                raise ValueError(
                    f"format {self.format_name} stores {width} bits but bits={self.bits}; "
                    f"use QuantizerConfig.from_format({self.format_name!r})"
                )
            if not 2 <= width <= 16 or self.int_bits + self.frac_bits < 1:
                raise ValueError(
                    f"format {self.format_name} stores {width} bits; use 2 to 16 stored bits"
                )
            return
        if not 2 <= self.bits <= 8:
            hint = " (1 bit: use method 'binary')" if self.bits == 1 else ""
            raise ValueError(
                f"{self.method} quantizer needs 2 to 8 stored bits, got {self.bits}{hint}; "
                f"use 32 with method 'float' for full precision"
            )

    @property
    def is_float(self) -> bool:
        return self.method == "float"

    @property
    def is_dynamic(self) -> bool:
        """True for fixed point whose format each layer chooses from its tensor's range."""
        return self.method == "fixed" and self.int_bits is None

    @property
    def format_name(self) -> str | None:
        """``"Q0.4"`` for an explicit fixed-point format, else ``None``."""
        if self.int_bits is None:
            return None
        return f"Q{self.int_bits}.{self.frac_bits}"

    @property
    def label(self) -> str:
        """A short human-readable name, e.g. ``fixed4``, ``Q0.4``, ``lsq4-pow2``, ``float``."""
        if self.format_name is not None:
            return self.format_name
        if self.method in ("float", "ternary", "binary"):
            return self.method
        suffix = "-pow2" if self.power_of_two else ""
        suffix += "u" if not self.signed else ""
        return f"{self.method}{self.bits}{suffix}"

    @classmethod
    def from_format(cls, name: str, *, clip_gradient: bool = False) -> QuantizerConfig:
        """A signed fixed-point quantizer from a format name such as ``"Q0.4"`` or ``"Q6.0"``."""
        match = _FORMAT_RE.match(name.strip())
        if match is None:
            raise ValueError(
                f"fixed-point format {name!r} is not of the form Q<int>.<frac>, e.g. 'Q0.4' "
                f"(weights) or 'Q6.0' (activations)"
            )
        int_bits, frac_bits = int(match.group(1)), int(match.group(2))
        if int_bits < 0 or frac_bits < 0:
            raise ValueError(
                f"format {name!r} has a negative bit count; use Q<i>.<f> with i, f >= 0"
            )
        return cls(
            method="fixed",
            bits=1 + int_bits + frac_bits,
            int_bits=int_bits,
            frac_bits=frac_bits,
            clip_gradient=clip_gradient,
        )

    @classmethod
    def from_bits(cls, method: str, bits: int, *, activations: bool = False) -> QuantizerConfig:
        """A quantizer of ``method`` with ``bits`` stored bits; ``bits == 32`` is full precision.

        One bit leaves a fixed-point or learned-step format no magnitude bit, so ``bits == 1``
        gives the binary quantizer whatever ``method`` says (W1A4 = binary weights).
        Dynamic fixed point picks weight formats by squared error (``"mse"``, clipping rare
        outliers) but activation formats that cover their running peak (``"max"``): activations
        at inference, on images from other scanners or sites, must not be clipped to a range
        fitted to the training images' bulk.
        """
        if bits == FLOAT_BITS:
            return FLOAT
        if bits == 1 and method in ("fixed", "lsq"):
            return cls(method="binary", bits=1)
        rule = "max" if activations and method == "fixed" else "mse"
        return cls(method=method, bits=bits, dynamic_rule=rule)


FLOAT = QuantizerConfig()
PAPER_WEIGHT_FORMAT = "Q0.4"
PAPER_ACT_FORMAT = "Q6.0"


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer quantization: ``pattern`` is a layer name or an fnmatch glob (``"dec*.conv2"``).

    ``weight`` and ``act`` replace the network-wide settings for matching layers; ``None`` keeps
    them. ``act`` quantizes the layer's *input* activations.
    """

    pattern: str
    weight: QuantizerConfig | None = None
    act: QuantizerConfig | None = None

    def __post_init__(self) -> None:
        if not self.pattern:
            raise ValueError("a LayerOverride needs a layer name or glob pattern, e.g. 'enc2.*'")
        if self.weight is None and self.act is None:
            raise ValueError(f"override {self.pattern!r} sets neither weight nor act; drop it")


@dataclass(frozen=True)
class QuantConfig:
    """Network-wide quantization with per-layer exceptions.

    Each convolution quantizes its weights with ``weight`` and its input activations with
    ``act``. Layers matching ``edge_layers`` (by default the first encoder block and the final
    convolution, as in the paper) use ``edge_precision`` for both instead; set
    ``edge_layers=()`` to quantize them too. ``overrides`` are applied last, in order.
    """

    weight: QuantizerConfig = FLOAT
    act: QuantizerConfig = FLOAT
    edge_layers: tuple[str, ...] = ("enc1.*", "head")
    edge_precision: QuantizerConfig = FLOAT
    overrides: tuple[LayerOverride, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name, value in (("weight", self.weight), ("act", self.act)):
            if not isinstance(value, QuantizerConfig):
                raise ValueError(f"QuantConfig.{name} must be a QuantizerConfig, got {value!r}")
        if isinstance(self.edge_layers, str):
            raise ValueError(
                f"edge_layers must be a tuple of patterns, e.g. ({self.edge_layers!r},)"
            )

    @property
    def is_float(self) -> bool:
        """True when no layer is quantized (edge precision and overrides included)."""
        configs = [self.weight, self.act, self.edge_precision]
        configs += [c for o in self.overrides for c in (o.weight, o.act) if c is not None]
        return all(c.is_float for c in configs)

    @property
    def label(self) -> str:
        """``FP``, ``W4A6`` (fixed point), ``W4A4-lsq``, ``Q0.4/Q6.0``, ``ternary``..."""
        weight, act = self.weight, self.act
        if weight.is_float and act.is_float:
            return "FP"
        if weight.format_name or act.format_name:
            return f"{weight.label}/{act.label}"
        if weight.method == act.method and weight.method in ("ternary", "binary"):
            return weight.method
        methods = [q.method for q in (weight, act) if not q.is_float]
        if len(set(methods)) > 1:
            return f"W{weight.bits}A{act.bits}-{'/'.join(methods)}"
        suffix = "" if methods[0] == "fixed" else f"-{methods[0]}"
        return f"W{weight.bits}A{act.bits}{suffix}"

    @classmethod
    def from_bits(cls, weight_bits: int, act_bits: int, method: str = "fixed") -> QuantConfig:
        """Stored-bit budgets such as W4A6 (ternary needs 2 and binary 1 bit; 32 is float)."""
        return cls(
            weight=QuantizerConfig.from_bits(method, weight_bits),
            act=QuantizerConfig.from_bits(method, act_bits, activations=True),
        )

    @classmethod
    def from_label(cls, text: str) -> QuantConfig:
        """The inverse of :attr:`label` for the common forms: ``FP``, ``W4A6`` (fixed point),
        ``W4A4-lsq``, ``Q0.4/Q6.0``, ``ternary``, ``binary``."""
        label = text.strip()
        if label.upper() == "FP":
            return cls()
        if label.lower() in ("ternary", "binary"):
            bits = NATURAL_BITS[label.lower()]
            return cls.from_bits(bits, bits, label.lower())
        if "/" in label and label.upper().startswith("Q"):
            weight, act = label.split("/", 1)
            return cls(
                weight=QuantizerConfig.from_format(weight), act=QuantizerConfig.from_format(act)
            )
        match = _LABEL_RE.match(label)
        if match is None:
            raise ValueError(
                f"cannot read the setting {text!r}; write FP, W4A6, W4A4-lsq, Q0.4/Q6.0, "
                f"ternary or binary"
            )
        method = (match.group(3) or "fixed").lower()
        try:
            return cls.from_bits(int(match.group(1)), int(match.group(2)), method)
        except ValueError as error:  # e.g. W9A6: name the setting, not only the bits
            raise ValueError(f"setting {text.strip()!r}: {error}") from None

    @classmethod
    def paper(cls) -> QuantConfig:
        """The paper's exact formats: weights Q0.4 (5 stored bits), activations Q6.0 (7)."""
        return cls(
            weight=QuantizerConfig.from_format(PAPER_WEIGHT_FORMAT),
            act=QuantizerConfig.from_format(PAPER_ACT_FORMAT),
        )


@dataclass(frozen=True)
class UNetConfig:
    """The paper's U-Net, sized by configuration.

    Encoder level ``k`` (1-based) has ``base_width * 2**(k-1)`` channels; ``depth`` is the number
    of pooling levels (the paper: 3, widths 64-128-256, bottleneck 256). The bottleneck keeps the
    deepest encoder width; each decoder level upsamples by 2, concatenates the skip and
    returns to that level's width. ``out_classes`` logits come from a final 3x3 convolution.
    ``spatial_dims`` 2 (the paper's, and the default) takes slices ``(N, C, H, W)``; 3 takes
    volumes ``(N, C, D, H, W)`` with 3x3x3 convolutions, pooling by 2 along every axis and
    trilinear upsampling.

    ``upsample`` is ``"bilinear"`` (the paper's; trilinear in 3D) or ``"nearest"`` (each value
    repeated 2 x 2): the variant FPGA tool flows such as hls4ml implement, and on integer codes
    a copy with no rounding at all.
    """

    in_channels: int = 1
    out_classes: int = 1
    base_width: int = 16
    depth: int = 3
    dropout: float = 0.0
    bn_momentum: float = 0.1
    spatial_dims: int = 2
    upsample: str = "bilinear"

    def __post_init__(self) -> None:
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(
                f"UNetConfig.upsample must be one of {', '.join(UPSAMPLE_MODES)}, got "
                f"{self.upsample!r}"
            )
        for name in ("in_channels", "out_classes", "base_width", "depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive integer, got {value!r}")
        if type(self.spatial_dims) is not int or self.spatial_dims not in SPATIAL_DIMS:
            raise ValueError(
                f"UNetConfig.spatial_dims must be 2 (slices) or 3 (volumes), got "
                f"{self.spatial_dims!r}; use spatial_dims=2 for the paper's 2D U-Net"
            )
        if self.depth > 6:
            raise ValueError(f"UNetConfig.depth={self.depth} is too deep; use 1 to 6 levels")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.bn_momentum <= 1.0:
            raise ValueError(f"UNetConfig.bn_momentum must be in (0, 1], got {self.bn_momentum}")

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels of encoder levels 1..depth."""
        return tuple(self.base_width * 2**level for level in range(self.depth))

    @property
    def size_multiple(self) -> int:
        """Input height and width (and depth, in 3D) are padded up to a multiple of this."""
        return int(2**self.depth)

    @classmethod
    def paper(cls) -> UNetConfig:
        """The paper's network: widths 64-128-256, bottleneck 256 (needs a GPU to train fast)."""
        return cls(base_width=64, depth=3)


LOSSES = ("bce_dice", "dice")
MASK_FORMATS = ("same", ".tif", ".nii.gz", ".nii")
"""Mask files of batch segmentation: ``same`` as the image (TIFF/NIfTI; ``.tif`` for other
images, ``.nii.gz`` for DICOM series) or one suffix for all."""


INTENSITY_NORMALISATIONS = ("slice", "local")
LOCAL_PIXELS_PER_MM = 2.0
"""Images without a spacing: ``local_mm`` counts this many pixels per mm (a 10 mm
neighbourhood is then 20 pixels)."""


@dataclass(frozen=True)
class PreprocessConfig:
    """How images become network inputs; saved in the model file and reused at inference.

    Parameters
    ----------
    spacing
        In-plane pixel spacing (mm, rows then columns) that images with a known spacing (NIfTI,
        DICOM) are resampled to; ``None`` keeps every image's own grid.
    ct_window
        ``(level, width)`` in Hounsfield units: intensities are clipped to the window and mapped
        to [-1, 1] instead of the intensity normalisation below.
    intensity
        ``"slice"``: each slice's z-score (mean and SD of the whole slice, so they depend on
        how much of the body the field of view holds). ``"local"``: each pixel's z-score
        against a Gaussian neighbourhood of SD ``local_mm`` (the same tissue gives about the
        same value whatever the field of view, padding or overall scanner gain).
    local_mm
        The neighbourhood of ``"local"``, in mm on images with a spacing; images without one
        (TIFF, PNG) use :data:`LOCAL_PIXELS_PER_MM` pixels per mm.
    """

    spacing: tuple[float, float] | None = None
    ct_window: tuple[float, float] | None = None
    intensity: str = "slice"
    local_mm: float = 10.0

    @property
    def intensity_text(self) -> str:
        """How intensities become network inputs, in words: ``"z-score per slice"``, ``"local
        z-score (10 mm)"`` or ``"CT window 40/400 HU"``."""
        if self.ct_window is not None:
            return f"CT window {self.ct_window[0]:g}/{self.ct_window[1]:g} HU"
        if self.intensity == "local":
            return f"local z-score ({self.local_mm:g} mm)"
        return "z-score per slice"

    @property
    def text(self) -> str:
        """The whole preprocessing in words (``info`` prints it)."""
        grid = (
            "each image's own grid"
            if self.spacing is None
            else f"resampled to {self.spacing[0]:.3g} x {self.spacing[1]:.3g} mm"
        )
        return f"{grid}; {self.intensity_text}"

    def __post_init__(self) -> None:
        if self.spacing is not None and (
            len(self.spacing) != 2 or not all(1e-3 <= s <= 100 for s in self.spacing)
        ):
            raise ValueError(
                f"spacing must be two numbers between 0.001 and 100 mm, got {self.spacing}"
            )
        if self.intensity not in INTENSITY_NORMALISATIONS:
            raise ValueError(
                f"unknown intensity normalisation {self.intensity!r}; choose one of "
                f"{INTENSITY_NORMALISATIONS}"
            )
        if not 0.5 <= self.local_mm <= 200:
            raise ValueError(f"local_mm must be between 0.5 and 200 mm, got {self.local_mm}")
        if self.ct_window is not None and (len(self.ct_window) != 2 or self.ct_window[1] <= 0):
            raise ValueError(
                f"ct_window must be (level, width) with a positive width, got {self.ct_window}; "
                f"e.g. (40, 400) for soft tissue"
            )


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; defaults are sized for a laptop CPU (2000 steps: ~8 min, 2 cores).

    ``steps`` Adam steps of ``batch_size`` random ``crop``-pixel crops, learning rate cosine-
    annealed from ``learning_rate``; ``loss`` ``"bce_dice"`` (0.5 BCE + 0.5 soft Dice, the
    paper's EM loss) or ``"dice"``; validation every ``validate_every`` steps keeps the best
    model; ``augment`` turns on flips, 90° turns, small affine and intensity changes, ``elastic``
    adds elastic deformation; ``foreground_oversample`` of the crops are centred on a random
    foreground pixel (small structures such as grey matter); ``device``: auto, cpu, cuda, mps.
    A 3D U-Net trains on ``(crop_depth, crop, crop)`` patches of whole volumes instead (slices
    mirrored where a volume is thinner), with flips, 90° turns, small in-plane affine and
    intensity changes (no elastic deformation). ``scanner_augment`` (0 to 1) adds what other
    scanners and sites change (gamma, bias field, blur, noise) to every crop.
    """

    steps: int = 2000
    batch_size: int = 8
    crop: int = 128
    learning_rate: float = 1e-3
    loss: str = "bce_dice"
    validate_every: int = 100
    augment: bool = True
    elastic: bool = False
    foreground_oversample: float = 0.33
    seed: int = 0
    device: str = "auto"
    crop_depth: int = 16
    scanner_augment: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.scanner_augment <= 1.0:
            raise ValueError(
                f"scanner_augment must be in [0, 1] (0: off, 1: full ranges), got "
                f"{self.scanner_augment}"
            )
        for name in ("steps", "batch_size", "crop", "validate_every", "crop_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.crop < 16:
            raise ValueError(f"crop must be at least 16 pixels, got {self.crop}")
        if not 0.0 <= self.foreground_oversample <= 1.0:
            raise ValueError(
                f"foreground_oversample must be in [0, 1], got {self.foreground_oversample}"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {LOSSES}")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        ):
            raise ValueError(f"unknown device {self.device!r}; use auto, cpu, cuda, cuda:N or mps")


ENGINES = ("auto", "pytorch", "onnx-float", "onnx-int8")
"""Inference engines (:attr:`InferConfig.engine`)."""


@dataclass(frozen=True)
class InferConfig:
    """Sliding-window inference: square ``tile`` (2D networks) or ``tile_3d`` boxes (slices,
    rows, columns; 3D networks), fractional ``overlap``, windows per batch.

    ``batch_size`` ``None`` picks 1 on the CPU (larger batches are slower per slice there:
    their activations leave the cache) and 4 on GPUs.

    ``integer`` runs the quantized layers on integer codes with int8 kernels and int32
    accumulators (CPU; see :mod:`napari_unetquant.infer.integer`) instead of the float
    simulation: the bit-exact hardware reference.

    ``engine`` runs everything else: ``"auto"`` times the engines that apply on this machine
    and keeps the fastest (see :mod:`napari_unetquant.infer.engine`), or one of
    ``"pytorch"``, ``"onnx-float"``, ``"onnx-int8"``.
    """

    tile: int = 512
    tile_3d: tuple[int, int, int] = (16, 128, 128)
    overlap: float = 0.25
    batch_size: int | None = None
    threshold: float = 0.5
    integer: bool = False
    engine: str = "auto"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; use one of {', '.join(ENGINES)}")
        if self.tile < 16:
            raise ValueError(f"tile must be at least 16 pixels, got {self.tile}")
        if len(self.tile_3d) != 3 or any(
            not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in self.tile_3d
        ):
            raise ValueError(
                f"tile_3d must be three positive whole numbers (slices, rows, columns), "
                f"got {self.tile_3d!r}"
            )
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(
                f"batch_size must be at least 1 (or None: automatic), got {self.batch_size}"
            )
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")

    def window(self, spatial_dims: int) -> tuple[int, int, int]:
        """The sliding window (slices, rows, columns) for a network of ``spatial_dims``."""
        return self.tile_3d if spatial_dims == 3 else (1, self.tile, self.tile)
