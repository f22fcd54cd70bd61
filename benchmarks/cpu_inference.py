"""CPU inference: every engine, interleaved in one run, on this machine's CPU.

Models are the paper table's EM seed-0 runs (FP 2000 steps; W4A6 fixed point fine-tuned 500
steps from it; ``benchmarks/paper_table.py``, cached in ``benchmarks/results/runs``, trained
first when missing); the W4A6 model is packed as ``unetquant train`` saves it. Contenders:

- PyTorch FP32 eager (the FP model, ``--engine pytorch``): the reference of every ratio;
- the default FP path and the default quantized path (``--engine auto``: the fastest engine
  measured here, its name in the table);
- the W4A6 packed model in PyTorch (the float simulation) and the exact integer path
  (``--integer``);
- ONNX Runtime FP32 (the FP model's float ONNX form) and int8 (the W4A6 model's int8 form);
- ``torch.compile`` of the FP model (the network alone: compiling is per input shape).

Each is timed on the network alone (one 1 x 1 x 512 x 512 tile) and end to end
(``segment_volume``: normalisation, windows, network, blending) on one 512 x 512 slice and on
the 24 x 512 x 512 ISBI stack, rounds interleaved, medians; the first call of each (engine
choice, session building, compilation) is a warm-up, reported apart. The engine record starts
empty (a temporary ``UNETQUANT_CACHE_DIR``), so the default's first call includes its race.
Last, the command itself: ``unetquant segment`` of the stack in a fresh process per run (Python
and library imports, model loading, the engine, writing the mask), FP32 eager
(``--engine pytorch``) against each model's default, rounds interleaved; the first default
run of each model races the engines, the later ones start from the record. Masks on the 24 slices
are compared with the PyTorch model of the same weights (the quantization-aware simulation for
W4A6). The CPU's model and capability (AVX2, AVX-512, VNNI, AMX) are printed beside every
figure: int8 kernels that fly on one CPU crawl on another.

    python benchmarks/cpu_inference.py [--rounds 5] [--update-readme]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import paper_table
from _common import machine, machine_line, update_readme, write_results
from napari_unetquant.config import InferConfig, QuantConfig
from napari_unetquant.data import Volume
from napari_unetquant.data.io import read_volume
from napari_unetquant.data.preprocess import network_input
from napari_unetquant.infer import IntegerUNet, segment_volume
from napari_unetquant.infer.engine import OnnxRuntimeNetwork
from napari_unetquant.modelio import SegmentationModel, load_model, save_model

STACK = paper_table.DATA / "isbi2012" / "train-volume.tif"
W4A6 = "W4A6 fixed"


def _models(folder: Path, upsample: str) -> tuple[SegmentationModel, SegmentationModel]:
    em = paper_table._isbi(paper_table.RUNS / "data")
    setup = paper_table.Setup(upsample=upsample)
    fp = paper_table._run(em, "FP", QuantConfig(), 0, 2000, None, setup)
    quant = dict((label, q) for label, q, _ in paper_table.ROWS)[W4A6]
    w4a6 = paper_table._run(em, W4A6, quant, 0, 500, fp["model"], setup)
    packed = folder / "w4a6.safetensors"
    save_model(packed, load_model(w4a6["model"]), packed=True)
    return load_model(fp["model"]), load_model(packed)


class _Choices(logging.Handler):
    """The engine lines each contender's first call logs (``--engine auto``: its choice)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = ""
        self.lines: dict[str, list[str]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("engine: "):
            self.lines.setdefault(self.current, []).append(message)


CHOICES = _Choices()


def _race(
    runs: dict[str, Callable[[], Any]],
    rounds: int,
    once: tuple[str, ...] = (),
    outputs: dict[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """First-call seconds and median seconds of interleaved rounds, per contender; those in
    ``once`` run only their first call (their median is that call). ``outputs`` receives each
    contender's first result."""
    first = {}
    for name, run in runs.items():
        CHOICES.current = name
        start = time.perf_counter()
        result = run()
        first[name] = time.perf_counter() - start
        if outputs is not None:
            outputs[name] = result
        print(f"  warm-up {name}: {first[name]:.1f} s", file=sys.stderr, flush=True)
    CHOICES.current = ""
    times: dict[str, list[float]] = {name: [first[name]] if name in once else [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            if name in once:
                continue
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {
        name: {"first_s": first[name], "median_s": statistics.median(values)}
        for name, values in times.items()
    }


KERNELS = {
    "float conv (mkldnn)": "aten::mkldnn_convolution",
    "int8 GEMM (_int_mm)": "aten::_int_mm",
}


def breakdown(
    networks: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor
) -> dict[str, dict[str, float]]:
    """Where one forward pass's time goes (PyTorch's profiler, self CPU time): the float
    convolution kernels, the int8 matrix multiplies, everything else."""
    from torch.profiler import profile

    rows = {}
    for name, network in networks.items():
        with torch.no_grad():
            network(x)
            with profile() as prof:
                network(x)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1000
        parts = {
            label: sum(e.self_cpu_time_total for e in events if e.key == key) / 1000
            for label, key in KERNELS.items()
        }
        rows[name] = {"total_ms": total, **parts, "other_ms": total - sum(parts.values())}
        print(f"  {name}: {rows[name]}", file=sys.stderr, flush=True)
    return rows


def commands(folder: Path, fp: Path, w4a6: Path, rounds: int) -> dict[str, dict[str, float]]:
    """Seconds of whole ``unetquant segment`` processes on the stack: the first run of each
    and the median of the later ones, rounds interleaved."""
    runs = {
        "FP32, PyTorch eager": [str(fp), "--engine", "pytorch"],
        "FP, default (auto)": [str(fp)],
        "W4A6, default (auto)": [str(w4a6)],
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds + 1):
        for name, arguments in runs.items():
            command = [sys.executable, "-m", "napari_unetquant", "segment", "--model"]
            command += [*arguments, "--image", str(STACK), "--out", str(folder / "mask.tif")]
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
            print(f"  process {name}: {times[name][-1]:.1f} s", file=sys.stderr, flush=True)
    return {
        name: {"first_s": values[0], "median_s": statistics.median(values[1:])}
        for name, values in times.items()
    }


def measure(rounds: int, upsample: str = "bilinear") -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="cpu_inference."))
    os.environ["UNETQUANT_CACHE_DIR"] = str(folder / "cache")  # every engine choice raced
    fp, w4a6 = _models(folder, upsample)
    stack = read_volume(STACK)
    one = Volume(stack.array[:1])
    tile = torch.from_numpy(network_input(one, fp.preprocess))[None]

    compiled = torch.compile(fp.model)
    networks: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "FP32, PyTorch eager": fp.model,
        "FP32, ONNX Runtime": OnnxRuntimeNetwork(fp.model, "float"),
        "FP32, torch.compile": compiled,
        "W4A6 packed, PyTorch (simulation)": w4a6.model,
        "W4A6, ONNX Runtime int8": OnnxRuntimeNetwork(w4a6.model, "int8"),
        "W4A6, integer path": IntegerUNet(w4a6.model),
    }
    with torch.no_grad():
        alone = _race({k: (lambda n=n: n(tile)) for k, n in networks.items()}, 3 * rounds)

    where = breakdown({k: networks[k] for k in ("FP32, PyTorch eager", "W4A6, integer path")}, tile)

    settings = {
        "FP32, PyTorch eager": (fp, InferConfig(engine="pytorch")),
        "FP, default (auto)": (fp, InferConfig()),
        "FP32, ONNX Runtime": (fp, InferConfig(engine="onnx-float")),
        "W4A6, default (auto)": (w4a6, InferConfig()),
        "W4A6 packed, PyTorch (simulation)": (w4a6, InferConfig(engine="pytorch")),
        "W4A6, ONNX Runtime int8": (w4a6, InferConfig(engine="onnx-int8")),
        "W4A6, integer path": (w4a6, InferConfig(integer=True)),
    }
    end_to_end = {}
    masks: dict[str, np.ndarray] = {}
    logging.getLogger("napari_unetquant").addHandler(CHOICES)
    logging.getLogger("napari_unetquant").setLevel(logging.INFO)
    for label, image in (("one 512 x 512 slice", one), ("24 x 512 x 512 stack", stack)):
        runs = {
            k: (lambda b=b, c=c, v=image: segment_volume(b, v, c, "cpu"))
            for k, (b, c) in settings.items()
        }
        if label.startswith("one"):
            end_to_end[label] = _race(runs, rounds)
        else:  # the integer path's stack takes minutes on CPUs without VNNI: timed once
            first: dict[str, Any] = {}
            once = ("W4A6, integer path",)
            end_to_end[label] = _race(runs, max(2, rounds // 2), once, first)
            masks = {k: probabilities >= 0.5 for k, probabilities in first.items()}
    # what --engine auto chose on its first call (the first section's warm-up)
    chosen = {
        model: CHOICES.lines.get(f"{model}, default (auto)", ["(not logged)"])[0]
        for model in ("FP", "W4A6")
    }
    fp_file = folder / "fp.safetensors"
    save_model(fp_file, fp)
    process = commands(folder, fp_file, folder / "w4a6.safetensors", max(3, rounds // 2))
    shutil.rmtree(folder)
    agreement = {}
    for k, mask in masks.items():
        reference = masks[
            "W4A6 packed, PyTorch (simulation)" if "W4A6" in k else "FP32, PyTorch eager"
        ]
        agreement[k] = {"differing": int((mask != reference).sum()), "pixels": int(mask.size)}
    return {
        "network_alone": alone,
        "breakdown": where,
        "end_to_end": end_to_end,
        "process": process,
        "agreement": agreement,
        "auto_choice": chosen,
    }


def markdown(result: dict[str, Any], info: dict[str, Any]) -> str:
    reference = "FP32, PyTorch eager"
    lines = [
        "| input | contender | median ms | vs FP32 eager | speed-up | first call (s) "
        "| masks vs PyTorch |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    sections = [("network alone, one 512 x 512 tile", result["network_alone"])]
    sections += [(f"end to end, {k}", v) for k, v in result["end_to_end"].items()]
    sections += [("`unetquant segment` of the stack, whole process", result["process"])]
    for what, rows in sections:
        base = rows[reference]["median_s"]
        for name, row in rows.items():
            agree = result["agreement"].get(name) if what.startswith("end to end, 24") else None
            masks = (
                f"{100 * (1 - agree['differing'] / agree['pixels']):.4f}% ({agree['differing']} px)"
                if agree
                else ""
            )
            ratio = row["median_s"] / base
            lines.append(
                f"| {what} | {name} | {1000 * row['median_s']:.0f} | {ratio:.2f} | "
                f"{1 / ratio:.2f}x | {row['first_s']:.1f} | {masks} |"
            )
    lines += [
        "",
        "| one 512 x 512 forward pass, profiled | total (ms) | float conv kernels (ms) "
        "| int8 matrix multiplies (ms) | everything else (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in result["breakdown"].items():
        lines.append(
            f"| {name} | {r['total_ms']:.0f} | {r['float conv (mkldnn)']:.0f} | "
            f"{r['int8 GEMM (_int_mm)']:.0f} | {r['other_ms']:.0f} |"
        )
    choices = "; ".join(f"{k}: {v}" for k, v in result["auto_choice"].items())
    lines += [
        "",
        f"EM seed-0 models of the paper table (U-Net base 16, W4A6 fixed point packed); "
        f"medians of {result['rounds']} interleaved rounds ({3 * result['rounds']} for the "
        f"network alone, {max(2, result['rounds'] // 2)} for the stack, where the integer path "
        f"runs once), batch 1, one process; masks over the 24 slices against the PyTorch "
        f"model of the same weights (the quantization-aware simulation for W4A6). Whole "
        f"process: `unetquant segment --image train-volume.tif` in a fresh Python process "
        f"(imports, model loading, engine, writing the mask); first call: the first run (the "
        f"default races the engines), median: the {max(3, result['rounds'] // 2)} later runs "
        f"(the default starts from its record). The default "
        f"engine chose, on its first window: {choices}. {machine_line(info)} (CPU flags: "
        f"{' '.join(info['flags'])}), onnxruntime {result['onnxruntime']}. "
        f"Generated by `python benchmarks/cpu_inference.py`.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--upsample",
        choices=["bilinear", "nearest"],
        default="bilinear",
        help="the models' upsampling (nearest: paper_table.py --upsample nearest's EM runs); "
        "results in cpu_inference_nearest, never in the README's table",
    )
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    if args.update_readme and args.upsample != "bilinear":
        parser.error("the README's table is of the bilinear models; drop --update-readme")
    import onnxruntime

    info = machine()
    print(machine_line(info), f"flags: {' '.join(info['flags'])}", file=sys.stderr)
    measured = measure(args.rounds, args.upsample)
    result = {"rounds": args.rounds, "onnxruntime": onnxruntime.__version__, **measured}
    table = markdown(result, info)
    name = "cpu_inference" if args.upsample == "bilinear" else f"cpu_inference_{args.upsample}"
    write_results(name, {"machine": info, "upsample": args.upsample, **result}, table)
    print(table)
    if args.update_readme:
        update_readme("cpu_inference", table)


if __name__ == "__main__":
    main()
