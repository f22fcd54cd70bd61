"""Integer inference and the deployed model on real data: agreement, speed, and where the time
goes.

Models are the paper table's seed-0 runs (``benchmarks/paper_table.py``; cached in
``benchmarks/results/runs``, trained first when missing). For each quantized row:

- agreement: the packed file's masks against the quantization-aware model's (identical by
  design), and the integer path's masks (``--integer``: int8 codes, int32 accumulators) against
  the float simulation, pixel by pixel over the whole test split, with the Dice of each;
- speed: the network alone on one 512 x 512 tile, and segmenting one 512 x 512 slice and the
  EM test volume (4 x 512 x 512) end to end, with the FP32 model, the packed W4A6 model
  (weights dequantized once, BatchNorm folded) and the integer path; interleaved repeats,
  medians and ratios to FP32;
- where the time goes: PyTorch's profiler over one 512 x 512 forward pass, convolution kernels
  against everything else.

    python benchmarks/integer_inference.py [--repeats 7] [--update-readme]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import paper_table
from _common import machine, machine_line, update_readme, write_results
from napari_unetquant.config import InferConfig, QuantConfig
from napari_unetquant.data import Volume
from napari_unetquant.data.preprocess import network_input
from napari_unetquant.infer import IntegerUNet, segment_volume
from napari_unetquant.metrics import SegmentationScores, segmentation_scores
from napari_unetquant.modelio import SegmentationModel, load_model, save_model
from napari_unetquant.train.dataset import read_pairs

ROWS = [
    "Q0.4/Q6.0 (paper)",
    "W8A8 fixed",
    "W8A8 lsq",
    "W4A6 fixed",
    "W4A6 lsq",
    "W4A4 fixed",
    "W4A4 lsq",
    "W2A4 fixed",
    "W2A4 lsq",
]
SPEED_ROW = "W4A6 fixed"


def _models(dataset: paper_table.Dataset) -> dict[str, str]:
    """``{row: model file}`` of seed 0, trained with the paper table's protocol if missing."""
    setup = paper_table.Setup()
    fp = paper_table._run(dataset, "FP", QuantConfig(), 0, 2000, None, setup)
    paths = {"FP": fp["model"]}
    for label, quant, _ in paper_table.ROWS:
        if label in ROWS:
            run = paper_table._run(dataset, label, quant, 0, 500, fp["model"], setup)
            paths[label] = run["model"]
    return paths


def _packed(bundle: SegmentationModel, folder: Path, name: str) -> SegmentationModel:
    path = folder / f"{name}.safetensors"
    save_model(path, bundle, packed=True)
    return load_model(path)


def agreement(dataset: paper_table.Dataset, folder: Path) -> list[dict[str, Any]]:
    pairs = read_pairs(
        [p[0] for p in dataset.test],
        [p[1] for p in dataset.test],
        foreground_value=dataset.foreground_value,
        require_foreground=False,
    )
    rows = []
    for label, path in _models(dataset).items():
        if label == "FP":
            continue
        bundle = load_model(path)
        packed = _packed(bundle, folder, "agreement")
        same, agree, total = True, 0, 0
        scores: dict[str, list[SegmentationScores]] = {"float": [], "integer": []}
        for pair in pairs:
            simulated = segment_volume(bundle, pair.image, InferConfig(), "cpu") >= 0.5
            from_file = segment_volume(packed, pair.image, InferConfig(), "cpu") >= 0.5
            integer = segment_volume(packed, pair.image, InferConfig(integer=True), "cpu") >= 0.5
            same &= bool(np.array_equal(simulated, from_file))
            agree += int((simulated == integer).sum())
            total += simulated.size
            scores["float"].append(segmentation_scores(simulated, pair.mask))
            scores["integer"].append(segmentation_scores(integer, pair.mask))
        rows.append(
            {
                "dataset": dataset.name,
                "row": label,
                "packed_identical": same,
                "pixels": total,
                "differing_pixels": total - agree,
                "agreement": agree / total,
                "dice_float": SegmentationScores.pooled(scores["float"]).dice_mean,
                "dice_integer": SegmentationScores.pooled(scores["integer"]).dice_mean,
            }
        )
        print(rows[-1], flush=True)
    return rows


def _median_times(runs: dict[str, Any], repeats: int) -> dict[str, float]:
    for run in runs.values():
        run()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def speed(dataset: paper_table.Dataset, folder: Path, repeats: int) -> list[dict[str, Any]]:
    paths = _models(dataset)
    fp32 = load_model(paths["FP"])
    packed = _packed(load_model(paths[SPEED_ROW]), folder, "speed")
    volume = read_pairs([dataset.test[0][0]], [dataset.test[0][1]], dataset.foreground_value)[0]
    inputs = {"one 512 x 512 slice": Volume(volume.image.array[:1]), "volume": volume.image}
    rows = []
    tile = torch.from_numpy(network_input(Volume(volume.image.array[:1]), fp32.preprocess))[None]
    networks = {
        "FP32": fp32.model,
        f"{SPEED_ROW} packed, float path": packed.model,
        f"{SPEED_ROW} packed, integer path": IntegerUNet(packed.model),
    }
    with torch.no_grad():
        runs = {name: (lambda n=network: n(tile)) for name, network in networks.items()}
        medians = _median_times(runs, 3 * repeats)
    for setting, seconds in medians.items():
        rows.append(_speed_row("network alone, one 512 x 512 tile", setting, seconds, medians))
    for name, image in inputs.items():
        settings = {
            "FP32": (fp32, InferConfig()),
            f"{SPEED_ROW} packed, float path": (packed, InferConfig()),
            f"{SPEED_ROW} packed, integer path": (packed, InferConfig(integer=True)),
        }
        runs = {
            setting: (lambda b=bundle, c=config, v=image: segment_volume(b, v, c, "cpu"))
            for setting, (bundle, config) in settings.items()
        }
        medians = _median_times(
            runs, repeats if image.array.shape[0] == 1 else max(3, repeats // 2)
        )
        shape = "x".join(map(str, image.array.shape))
        for setting, seconds in medians.items():
            rows.append(_speed_row(f"segment_volume, {name} ({shape})", setting, seconds, medians))
    return rows


def _speed_row(
    what: str, setting: str, seconds: float, medians: dict[str, float]
) -> dict[str, Any]:
    row = {
        "input": what,
        "setting": setting,
        "median_ms": round(1000 * seconds, 1),
        "ratio_to_fp32": round(seconds / medians["FP32"], 3),
        "speedup": round(medians["FP32"] / seconds, 2),
    }
    print(row, file=sys.stderr, flush=True)
    return row


def breakdown(dataset: paper_table.Dataset, folder: Path) -> list[dict[str, Any]]:
    """Self CPU time of the convolution kernels and of everything else, one forward pass."""
    from torch.profiler import profile

    paths = _models(dataset)
    networks = {
        "FP32": load_model(paths["FP"]).model,
        f"{SPEED_ROW} integer path": IntegerUNet(
            _packed(load_model(paths[SPEED_ROW]), folder, "b").model
        ),
    }
    x = torch.randn(1, 1, 512, 512)
    rows = []
    for name, network in networks.items():
        with torch.no_grad():
            network(x)
            with profile() as prof:
                network(x)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1000
        kernels = {
            "float conv (mkldnn)": "aten::mkldnn_convolution",
            "int8 GEMM (_int_mm)": "aten::_int_mm",
        }
        parts = {
            label: sum(e.self_cpu_time_total for e in events if e.key == key) / 1000
            for label, key in kernels.items()
        }
        rows.append(
            {
                "network": name,
                "total_ms": round(total, 1),
                **{k: round(v, 1) for k, v in parts.items()},
                "other_ms": round(total - sum(parts.values()), 1),
            }
        )
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def markdown(result: dict[str, Any], info: dict[str, Any]) -> str:
    lines = [
        "| data | setting | packed file = QAT masks | pixels differing (integer vs float) "
        "| agreement | Dice float (%) | Dice integer (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["agreement"]:
        lines.append(
            f"| {r['dataset']} | {r['row']} | {'identical' if r['packed_identical'] else 'NO'} | "
            f"{r['differing_pixels']} of {r['pixels']} | {100 * r['agreement']:.4f}% | "
            f"{100 * r['dice_float']:.2f} | {100 * r['dice_integer']:.2f} |"
        )
    lines += [
        "",
        "| allocator | input | setting | time (ms, median) | time / FP32 | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["speed"]:
        lines.append(
            f"| {r['allocator']} | {r['input']} | {r['setting']} | {r['median_ms']} | "
            f"{r['ratio_to_fp32']:.3f} | {r['speedup']:.2f}x |"
        )
    lines += [
        "",
        "| allocator | one 512 x 512 forward pass | total (ms) | float conv kernels (ms) "
        "| int8 GEMM kernels (ms) | everything else (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["breakdown"]:
        lines.append(
            f"| {r['allocator']} | {r['network']} | {r['total_ms']} | "
            f"{r['float conv (mkldnn)']} | {r['int8 GEMM (_int_mm)']} | {r['other_ms']} |"
        )
    lines.append("")
    lines.append(
        f"Seed-0 models of the paper table (U-Net base 16); agreement over every pixel of the "
        f"test splits; speed on the EM test stack: the network alone, and end to end "
        f"(`segment_volume`: normalisation, network, blending, resampling; one tile per batch "
        f"on the CPU), {result['repeats']} interleaved repeats (3x for the network alone), "
        f"one process per allocator setting (no mmap/trim: `MALLOC_MMAP_THRESHOLD_` and "
        f"`MALLOC_TRIM_THRESHOLD_` = 2**30); "
        f"{machine_line(info)}. Generated by `python benchmarks/integer_inference.py`."
    )
    return "\n".join(lines)


# glibc returns large freed blocks to the kernel and maps new ones on the next allocation, so
# every big tensor page-faults afresh; PyTorch's CPU tuning guide recommends a caching
# allocator instead. Both ways are timed, each in its own process.
ALLOCATORS = {
    "glibc default": {},
    "glibc, no mmap/trim": {
        "MALLOC_MMAP_THRESHOLD_": str(2**30),
        "MALLOC_TRIM_THRESHOLD_": str(2**30),
    },
}


def timings(repeats: int) -> dict[str, Any]:
    em = paper_table._isbi(paper_table.RUNS / "data")
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        return {"speed": speed(em, folder, repeats), "breakdown": breakdown(em, folder)}


def timed_in_processes(repeats: int) -> dict[str, list[dict[str, Any]]]:
    """:func:`timings` in a fresh process per allocator setting."""
    merged: dict[str, list[dict[str, Any]]] = {"speed": [], "breakdown": []}
    for allocator, variables in ALLOCATORS.items():
        command = [sys.executable, __file__, "--timing-child", "--repeats", str(repeats)]
        env = {**os.environ, **variables}
        output = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        result = json.loads(output.stdout.strip().splitlines()[-1])
        for key in merged:
            merged[key] += [{"allocator": allocator, **row} for row in result[key]]
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--timing-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    if args.timing_child:
        print(json.dumps(timings(args.repeats)))
        return
    info = machine()
    timed = timed_in_processes(args.repeats)
    em, gm = paper_table._isbi(paper_table.RUNS / "data"), paper_table._gm()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        result = {
            "repeats": args.repeats,
            "agreement": agreement(em, folder) + agreement(gm, folder),
            **timed,
        }
    table = markdown(result, info)
    write_results("integer_inference", {"machine": info, **result}, table)
    print(table)
    if args.update_readme:
        update_readme("integer_inference", table)


if __name__ == "__main__":
    main()
