"""Which engine runs a model on this machine: chosen by measurement, never by assumption.

Engines (``InferConfig.engine``):

- ``"pytorch"``: the model itself (the quantization-aware simulation, or the packed network);
  also the only engine for 3D networks and for GPUs.
- ``"onnx-float"``: ONNX Runtime running the float form of :func:`~.onnx_graph.unet_onnx`
  (the simulation's arithmetic in ONNX operators, with ONNX Runtime's blocked convolutions).
- ``"onnx-int8"``: ONNX Runtime running the int8 form (``QLinearConv`` on the codes of every
  integer layer: MLAS int8 kernels, VNNI where the CPU has it, AVX2 ``vpmaddubsw`` where not).
- ``"auto"`` (the default): on the CPU, every engine that applies is timed on one window of
  the shape inference will use (one warm-up and three interleaved rounds, a second or two once
  per model, window and thread count in a process), and the fastest runs. Without ONNX Runtime
  installed, or on a GPU, ``auto`` is ``pytorch``.

What was measured is remembered on disk (:func:`engine_record`: ``engines.json`` in the user's
cache folder, or ``$UNETQUANT_CACHE_DIR``), keyed by what speed depends on (the network's
architecture and which layers run on codes, the window, the thread count, the CPU's model and
capability, the PyTorch and ONNX Runtime versions), so a later process on the same machine
(``unetquant segment`` on the next image) goes straight to the engine measured fastest, without
racing again, where that engine computes the model's own values by construction: the PyTorch
model, the float form (the same arithmetic), the int8 form when the model's biases lie on its
accumulator grid (:mod:`.accumulator_grid`). A model off the grid is raced and checked.

The choice is logged on the ``napari_unetquant`` logger (the command line prints it). The exact
integer path (``InferConfig.integer``) is a hardware reference, not an engine to race: where
the CPU has no fast int8 matrix multiply, :func:`integer_slowdown` measures by how much it is
slower and says so once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ENGINES
from ..errors import SettingError
from ..model.unet import UNet, check_input
from ..quant.layers import QuantConv2d
from ..quant.quantizers import FixedPointQuantizer
from .accumulator_grid import off_grid
from .integer_ops import ActFormat

LOG = logging.getLogger("napari_unetquant")

Network = Callable[[Tensor], Tensor]


def onnxruntime_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class OnnxRuntimeNetwork:
    """A U-Net run by ONNX Runtime on the CPU, called like the model: ``(N, 1, H, W)`` float32
    in, logits ``(N, out_classes, H, W)`` float32 out. ``form`` is ``"float"`` or ``"int8"``
    (see :mod:`.onnx_graph`); ``threads`` defaults to PyTorch's intra-op thread count."""

    def __init__(self, model: nn.Module, form: str, threads: int | None = None) -> None:
        import onnxruntime

        from .onnx_graph import unet_onnx

        assert isinstance(model, UNet)
        self.config = model.config
        self.form = form
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # no warnings on stderr for a working session
        self.session = onnxruntime.InferenceSession(
            unet_onnx(model, form).SerializeToString(),
            options,
            providers=["CPUExecutionProvider"],
        )

    def __call__(self, x: Tensor) -> Tensor:
        check_input(x, self.config)
        image = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run(["logits"], {"image": image})
        return torch.from_numpy(logits)


@dataclass(frozen=True)
class EngineChoice:
    """What ran and why: ``engine`` and, when it was measured, milliseconds per window of
    ``window`` (rows, columns) for each candidate."""

    engine: str
    window: tuple[int, int]
    milliseconds: dict[str, float]
    reason: str

    @property
    def text(self) -> str:
        """One line for a log or a status bar."""
        if not self.milliseconds:
            return f"engine: {self.engine} ({self.reason})"
        rows, columns = self.window
        times = ", ".join(f"{name} {ms:.0f} ms" for name, ms in self.milliseconds.items())
        how, _, rejected = self.reason.partition("; ")
        when = f", {how}" if how != "measured" else ""
        return (
            f"engine: {self.engine}, the fastest here per {rows} x {columns} window ({times}"
            f"{when})" + (f"; {rejected}" if rejected else "")
        )


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Any, tuple[Network, EngineChoice]]]
_CACHE = weakref.WeakKeyDictionary()


def _versions(model: nn.Module) -> tuple[int, ...]:
    return tuple(parameter._version for parameter in model.parameters())


def evaluation_mode(model: nn.Module) -> None:
    """Put ``model`` in evaluation mode where some part of it is not (``eval()`` walks and
    sets every module: milliseconds a call, paid per image otherwise)."""
    if any(module.training for module in model.modules()):
        model.eval()


def has_integer_layers(model: nn.Module) -> bool:
    """True when some convolution has quantized weights and quantized inputs (what the int8
    form runs on codes)."""
    return any(
        not layer.weight_quantizer.config.is_float and not layer.input_quantizer.config.is_float
        for layer in model.modules()
        if isinstance(layer, QuantConv2d)
    )


def candidates(model: nn.Module, device: torch.device | str) -> list[str]:
    """The engines that can run ``model`` on ``device``, PyTorch first."""
    names = ["pytorch"]
    cpu = torch.device(device).type == "cpu"
    two_d = isinstance(model, UNet) and model.config.spatial_dims == 2
    if cpu and two_d and onnxruntime_available():
        names.append("onnx-float")
        if has_integer_layers(model):
            names.append("onnx-int8")
    return names


def untrained(model: nn.Module) -> bool:
    """True when a dynamic fixed-point activation format was never chosen (the network was
    never run in training mode): only the PyTorch model computes anything for it."""
    return any(
        isinstance(q, FixedPointQuantizer) and q.role == "act" and not q.frozen
        for q in model.modules()
    )


def build_engine(model: nn.Module, engine: str) -> Network:
    """``model`` run by ``engine`` (not ``"auto"``)."""
    if engine == "pytorch":
        return model
    if engine in ("onnx-float", "onnx-int8"):
        if not onnxruntime_available():
            raise SettingError(
                f"engine {engine} needs ONNX Runtime: pip install onnx onnxruntime, or use the "
                f"pytorch engine",
                "engine",
            )
        try:
            return OnnxRuntimeNetwork(model, engine.removeprefix("onnx-"))
        except SettingError as error:
            raise SettingError(
                f"engine {engine} cannot run this model: {error}", "engine"
            ) from error
    raise SettingError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}", "engine")


AGREEMENT = 0.9999
"""The share of a window's mask that an ONNX Runtime engine must reproduce (against the PyTorch
model, at the threshold in use) for ``auto`` to consider it."""


@torch.no_grad()
def _race(
    networks: dict[str, Network], x: Tensor, rounds: int
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Median milliseconds per call of each network on ``x`` (interleaved rounds after one
    warm-up call each), and each network's output."""
    outputs = {name: network(x) for name, network in networks.items()}
    times: dict[str, list[float]] = {name: [] for name in networks}
    for _ in range(rounds):
        for name, network in networks.items():
            start = time.perf_counter()
            network(x)
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}, outputs


def last_choice(model: nn.Module) -> EngineChoice | None:
    """The engine :func:`select_engine` last chose for ``model`` in this process, if any."""
    per_model = _CACHE.get(model)
    return list(per_model.values())[-1][1] if per_model else None


class LazyEngine:
    """:func:`select_engine`'s network, chosen at the first call on that first window (so an
    image that cannot be read fails before any timing, and the race runs on real data), then
    called like the model."""

    def __init__(
        self,
        model: nn.Module,
        engine: str,
        window: tuple[int, int],
        device: torch.device | str,
        threshold: float = 0.5,
    ) -> None:
        self.config = getattr(model, "config", None)
        self._arguments = (model, engine, window, device)
        self._threshold = threshold
        self._network: Network | None = None

    def __call__(self, x: Tensor) -> Tensor:
        if self._network is None:
            self._network, _ = select_engine(*self._arguments, sample=x, threshold=self._threshold)
        return self._network(x)


def select_engine(
    model: nn.Module,
    engine: str,
    window: tuple[int, int],
    device: torch.device | str = "cpu",
    rounds: int = 3,
    sample: Tensor | None = None,
    threshold: float = 0.5,
) -> tuple[Network, EngineChoice]:
    """The network that runs ``model``'s windows of ``window`` (rows, columns) and why.

    ``engine`` ``"auto"`` runs every candidate (:func:`candidates`) on ``sample`` (a window the
    caller is about to segment; random values when ``None``), drops an ONNX Runtime engine whose
    mask at ``threshold`` (a multi-class model's most probable class, :func:`window_classes`)
    differs from the PyTorch model's on more than 0.01% of its pixels,
    and keeps the fastest of the rest (median of ``rounds`` interleaved timings). A named
    engine is used as asked (``SettingError`` when it cannot run here). Choices are kept per
    model (until its parameters change), window, device, engine and thread count.
    """
    if engine not in ENGINES:
        raise SettingError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}", "engine")
    evaluation_mode(model)
    options = candidates(model, device)
    if engine != "auto" and engine not in options:
        raise SettingError(
            f"engine {engine} cannot run this model here ({_why_not(model, device)}); use one "
            f"of {', '.join(['auto', *options])}",
            "engine",
        )
    key = (_versions(model), window, str(device), engine, torch.get_num_threads())
    per_model = _CACHE.setdefault(model, {})
    if key in per_model:
        per_model[key] = per_model.pop(key)  # the most recent use last (see last_choice)
        return per_model[key]
    if engine != "auto":
        chosen = (build_engine(model, engine), EngineChoice(engine, window, {}, "asked for"))
    elif len(options) == 1 or untrained(model):
        chosen = (model, EngineChoice("pytorch", window, {}, _why_not(model, device)))
    else:
        record_key = _speed_key(model, window, str(device))
        remembered = _remembered(model, options, window, record_key)
        if remembered is not None:
            chosen = remembered
        else:
            chosen = _measured(model, options, window, rounds, sample, threshold)
            _remember(record_key, model, window, chosen[1])
    LOG.info(chosen[1].text)
    for stale in [k for k in per_model if k[0] != key[0]]:  # the parameters changed since
        del per_model[stale]
    per_model[key] = chosen
    return chosen


def _measured(
    model: nn.Module,
    options: list[str],
    window: tuple[int, int],
    rounds: int,
    sample: Tensor | None,
    threshold: float,
) -> tuple[Network, EngineChoice]:
    networks: dict[str, Network] = {"pytorch": model}
    for name in options[1:]:
        try:
            networks[name] = build_engine(model, name)
        except SettingError as error:  # e.g. an activation method ONNX does not express
            LOG.debug("%s cannot run this model: %s", name, error)
    if sample is None:
        channels = model.config.in_channels if isinstance(model, UNet) else 1
        sample = torch.randn((1, channels, *window), generator=torch.Generator().manual_seed(0))
    times, outputs = _race(networks, sample, rounds)
    reference = window_classes(outputs["pytorch"], threshold)
    rejected = []
    for name, output in outputs.items():
        agreement = float((window_classes(output, threshold) == reference).float().mean())
        if agreement < AGREEMENT:
            rejected.append(f"{name} reproduced {100 * agreement:.3f}% of the mask")
    accepted = [name for name in times if not any(r.startswith(f"{name} ") for r in rejected)]
    best = min(accepted, key=times.__getitem__)
    reason = "measured" + (f"; not {', '.join(rejected)}" if rejected else "")
    return networks[best], EngineChoice(best, window, times, reason)


def window_classes(logits: Tensor, threshold: float) -> Tensor:
    """The classes of windows' logits ``(N, C, H, W)``, on the CPU, as segmentation makes them:
    ``logit >= logit(threshold)`` for one channel (``(N, 1, H, W)`` bool), the most probable
    channel for several (``(N, H, W)`` int64; softmax keeps the order of logits)."""
    if logits.shape[1] == 1:
        return logits.cpu() >= math.log(threshold / (1 - threshold))
    return logits.cpu().argmax(dim=1)


# --- measurements remembered between processes -----------------------------------------------

GRID_TOLERANCE = 1e-3
"""Largest distance of a folded bias from its accumulator grid (in grid units) for which the
int8 form counts as computing the model's own values (:func:`.accumulator_grid.off_grid`)."""

RECORD_FILE = "engines.json"


def engine_record() -> Path:
    """Where measured engine speeds are remembered: ``$UNETQUANT_CACHE_DIR/engines.json``, or
    ``engines.json`` in the user's cache folder (``~/.cache/napari-unetquant`` on Linux)."""
    folder = os.environ.get("UNETQUANT_CACHE_DIR")
    if not folder:
        import platformdirs

        folder = platformdirs.user_cache_dir("napari-unetquant", appauthor=False)
    return Path(folder) / RECORD_FILE


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _speed_key(model: nn.Module, window: tuple[int, int], device: str) -> dict[str, Any]:
    """What the engines' speeds depend on (not the weights): architecture, the layers that
    run on codes and their formats' ranges, window, threads, CPU, library versions."""
    import onnxruntime

    layers = []
    for name, layer in model.named_modules():
        if isinstance(layer, QuantConv2d):
            fmt = None
            if not layer.input_quantizer.config.is_float:
                try:
                    found = ActFormat.of(layer.input_quantizer, name)
                except SettingError:  # an activation method ONNX does not express
                    found = None
                fmt = None if found is None else [found.lo, found.hi]
            layers.append([name, layer.weight_quantizer.config.is_float, fmt])
    config = model.config if isinstance(model, UNet) else None
    return {
        "unet": asdict(config) if config is not None else type(model).__name__,
        "layers": layers,
        "window": list(window),
        "device": device,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _records() -> dict[str, Any]:
    """The remembered measurements; nothing when the file is missing or unreadable."""
    path = engine_record()
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        LOG.debug("ignoring %s (%s): engines are measured again", path, error)
        return {}
    return records if isinstance(records, dict) else {}


def _remember(
    key: dict[str, Any], model: nn.Module, window: tuple[int, int], choice: EngineChoice
) -> None:
    """Add ``choice``'s measurement to the record (atomically; a folder that cannot be
    written only costs the next process a new measurement)."""
    from ..data.write import atomic_path

    records = _records()
    records[_digest(key)] = {
        "milliseconds": choice.milliseconds,
        "measured": time.strftime("%Y-%m-%d %H:%M"),
        "key": key,
    }
    try:
        with atomic_path(engine_record()) as temporary:
            temporary.write_text(json.dumps(records, indent=1, sort_keys=True))
    except OSError as error:
        LOG.debug("could not remember the engine measurement in %s: %s", engine_record(), error)


def _remembered(
    model: nn.Module, options: list[str], window: tuple[int, int], key: dict[str, Any]
) -> tuple[Network, EngineChoice] | None:
    """The engine measured fastest for ``key`` before, where it computes ``model``'s own
    values by construction (see the module's text); ``None``: measure."""
    record = _records().get(_digest(key))
    if not isinstance(record, dict) or not isinstance(record.get("milliseconds"), dict):
        return None
    times = {name: float(ms) for name, ms in record["milliseconds"].items() if name in options}
    exact = [name for name in times if name != "onnx-int8" or off_grid(model) <= GRID_TOLERANCE]
    if not exact:
        return None
    best = min(exact, key=times.__getitem__)
    try:
        network = build_engine(model, best)
    except SettingError:
        return None
    when = f"measured {record.get('measured', 'before')}, remembered in {engine_record()}"
    return network, EngineChoice(best, window, times, when)


def _why_not(model: nn.Module, device: torch.device | str) -> str:
    if torch.device(device).type != "cpu":
        return f"ONNX Runtime runs here on the CPU only, not {device}"
    if not (isinstance(model, UNet) and model.config.spatial_dims == 2):
        return "ONNX export covers 2D U-Nets"
    if not onnxruntime_available():
        return "ONNX Runtime is not installed: pip install onnx onnxruntime"
    if untrained(model):
        return "an untrained network: its activation formats were never chosen"
    return "the int8 form needs quantized weights and activations"


_SLOWDOWN: dict[str, float] = {}


@torch.no_grad()
def integer_slowdown() -> float:
    """How many times slower this CPU multiplies int8 matrices (``torch._int_mm``, what the
    exact integer path uses) than float32 ones of the same shape (a 3x3 convolution of 32
    channels over a 256 x 256 image), measured once per process."""
    if "ratio" not in _SLOWDOWN:
        generator = torch.Generator().manual_seed(0)
        a = torch.randint(-31, 32, (65536, 288), dtype=torch.int8, generator=generator)
        b = torch.randint(-7, 8, (288, 32), dtype=torch.int8, generator=generator)
        af, bf = a.float(), b.float()
        times, _ = _race({"int8": lambda _: torch._int_mm(a, b), "float": lambda _: af @ bf}, a, 3)
        _SLOWDOWN["ratio"] = times["int8"] / times["float"]
    return _SLOWDOWN["ratio"]


def integer_note() -> str | None:
    """One line when the exact integer path is slow on this CPU (its int8 matrix multiply is
    over twice as slow as float32's), else ``None``."""
    ratio = integer_slowdown()
    if ratio < 2.0:
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    return (
        f"integer arithmetic is slow on this CPU ({capability}, no fast int8 dot product): its "
        f"int8 matrix multiply takes {ratio:.1f}x the time of float32's, so the exact integer "
        f"path runs several times slower than the default engine; it is the bit-exact hardware "
        f"reference, not the fast path"
    )
