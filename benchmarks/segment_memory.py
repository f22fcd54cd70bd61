"""Peak memory of segmenting a large volume, against the size of the volume itself.

A synthetic CT-like stack (``int16``, 300 x 512 x 512 by default, 150 MiB) is segmented in a
fresh process per setting with ``segment_array`` (what ``unetquant segment`` and the Segment
widget run): the FP32 model, the packed W4A6 model on the float path, and the same on
integer arithmetic. Peak resident memory is read from the kernel (``ru_maxrss``); the
process's memory after loading the model is subtracted, so the figure is what segmentation
itself adds.

    python benchmarks/segment_memory.py [--slices 300] [--update-readme]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import machine, machine_line, update_readme, write_results
from napari_unetquant.config import InferConfig, QuantConfig, UNetConfig
from napari_unetquant.data import Volume
from napari_unetquant.jobs import segment_array
from napari_unetquant.model import build_unet
from napari_unetquant.modelio import SegmentationModel, load_model, save_model

SETTINGS = {
    "FP32": ("fp32.safetensors", False),
    "W4A6 packed, float path": ("w4a6.safetensors", False),
    "W4A6 packed, integer path": ("w4a6.safetensors", True),
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_ct(slices: int, size: int = 512) -> np.ndarray:
    """An ``int16`` stack of smooth, CT-like intensities (HU between about -1000 and 1500)."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:size, 0:size] / size
    body = ((rows - 0.5) ** 2 + (cols - 0.5) ** 2 < 0.16).astype(np.float32)
    stack = np.empty((slices, size, size), np.int16)
    for index in range(slices):
        noise = rng.normal(0, 30, (size, size))
        organ = np.exp(-((rows - 0.45 - 0.1 * np.sin(index / 40)) ** 2 + (cols - 0.55) ** 2) / 0.01)
        stack[index] = (-1000 + body * (1040 + 200 * organ) + noise).astype(np.int16)
    return stack


def child(model_path: str, integer: bool, slices: int) -> None:
    torch.set_num_threads(torch.get_num_threads())
    volume = Volume(synthetic_ct(slices), spacing=(0.8, 0.8))
    bundle = load_model(model_path)
    baseline = _rss_mib()
    start = time.perf_counter()
    segmentation = segment_array(bundle, volume, InferConfig(integer=integer), "cpu")
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "volume_mib": volume.array.nbytes / 2**20,
                "baseline_mib": baseline,
                "peak_mib": _rss_mib(),
                "seconds": seconds,
                "foreground": int(segmentation.mask.sum()),
            }
        )
    )


def _models(folder: Path) -> None:
    unet = UNetConfig(base_width=16)
    for name, quant in (("fp32", QuantConfig()), ("w4a6", QuantConfig.from_bits(4, 6))):
        torch.manual_seed(0)
        model = build_unet(unet, quant).train()
        with torch.no_grad():
            model(torch.randn(4, 1, 128, 128))
        bundle = SegmentationModel(model.eval(), unet, quant)
        save_model(folder / f"{name}.safetensors", bundle, packed=not quant.is_float)


def measure(slices: int) -> list[dict[str, object]]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        _models(Path(folder))
        for label, (file, integer) in SETTINGS.items():
            command = [sys.executable, __file__, "--child", str(Path(folder) / file)]
            command += ["--slices", str(slices)] + (["--integer"] if integer else [])
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            result = json.loads(output.strip().splitlines()[-1])
            added = result["peak_mib"] - result["baseline_mib"]
            rows.append(
                {
                    "setting": label,
                    "volume_mib": round(result["volume_mib"], 1),
                    "added_peak_mib": round(added, 1),
                    "ratio_to_volume": round(added / result["volume_mib"], 2),
                    "seconds": round(result["seconds"], 1),
                }
            )
            print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict[str, object]], info: dict[str, object], slices: int) -> str:
    lines = [
        "| setting | volume (MiB) | peak memory added (MiB) | peak / volume | time (s) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['setting']} | {row['volume_mib']} | {row['added_peak_mib']} | "
            f"{row['ratio_to_volume']:.2f} | {row['seconds']} |"
        )
    lines.append("")
    lines.append(
        f"Segmenting a synthetic int16 CT stack of {slices} x 512 x 512 with a U-Net of base "
        f"width 16 (peak resident memory above the loaded model, one process per row); "
        f"{machine_line(info)}. Generated by `python benchmarks/segment_memory.py`."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--child", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--integer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.integer, args.slices)
        return
    info = machine()
    rows = measure(args.slices)
    table = markdown(rows, info, args.slices)
    write_results("segment_memory", {"machine": info, "slices": args.slices, "rows": rows}, table)
    print(table)
    if args.update_readme:
        update_readme("segment_memory", table)


if __name__ == "__main__":
    main()
