"""Memory and time of segmenting large volumes, as the volume grows.

Synthetic CT-like stacks (``int16``, 512 x 512 in plane, 38 to 600 slices: 19 to 300 MiB in
memory) are written as NIfTI (``.nii.gz``) and segmented from file to file in a fresh process
per row, as ``unetquant segment`` does: the image is read a few slices at a time and the mask
written as it is made. Peak resident memory comes from the kernel (``ru_maxrss``): the whole
process's peak, and what segmentation added above the process with everything imported and the
model loaded. Every row runs the default engine (``--engine auto``: the fastest measured on
this CPU, its name in the table) but the integer path's (``--integer``), which runs on the
smallest stack only: on a CPU without fast int8 kernels (AVX2 alone) it is an order of
magnitude slower. For comparison, the last row holds the 300-slice volume and its float32
probabilities whole in memory (``read_volume`` + ``segment_volume`` + ``write_mask``: the
Python API on arrays).

    python benchmarks/large_volumes.py [--sizes 38 75 150 300 600] [--update-readme]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from _common import RESULTS, ROOT, machine, machine_line, update_readme, write_results
from napari_unetquant.config import InferConfig, QuantConfig, UNetConfig
from napari_unetquant.data.io import Volume, read_volume, write_mask, write_mask_stream
from napari_unetquant.infer import segment_volume
from napari_unetquant.jobs import segment_to_file
from napari_unetquant.model import build_unet
from napari_unetquant.modelio import SegmentationModel, load_model, save_model

SIZE = 512
MODELS = {"FP32": ("fp32.safetensors", False), "W4A6 packed": ("w4a6.safetensors", False)}
PLOT = ROOT / "docs" / "images" / "large-volumes.png"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_ct(slices: int) -> Iterator[np.ndarray]:
    """``int16`` slices of smooth, CT-like intensities (HU about -1000 to 1500), one at a time."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    body = ((rows - 0.5) ** 2 + (cols - 0.5) ** 2 < 0.16).astype(np.float32)
    for index in range(slices):
        noise = rng.normal(0, 30, (SIZE, SIZE))
        organ = np.exp(-((rows - 0.45 - 0.1 * np.sin(index / 40)) ** 2 + (cols - 0.55) ** 2) / 0.01)
        yield (-1000 + body * (1040 + 200 * organ) + noise).astype(np.int16)[None]


def child(model: str, image: str, out: str, integer: bool, whole: bool) -> None:
    bundle = load_model(model)  # what `unetquant segment` loads before it reads the image
    del bundle
    engines: list[str] = []  # the engine choice, as the command line prints it

    class _Engine(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = re.match(r"engine: ([\w-]+)", record.getMessage())
            engines.extend(found.groups() if found else ())

    logging.getLogger("napari_unetquant").addHandler(_Engine())
    logging.getLogger("napari_unetquant").setLevel(logging.INFO)
    baseline = _rss_mib()
    config = InferConfig(integer=integer)
    start = time.perf_counter()
    if whole:
        volume = read_volume(image)
        mask = (segment_volume(load_model(model), volume, config, "cpu") >= 0.5).astype(np.uint8)
        write_mask(out, mask, like=volume)
        foreground = int(mask.sum())
    else:
        foreground = segment_to_file(model, image, out, config, "cpu").foreground
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "baseline_mib": baseline,
                "peak_mib": _rss_mib(),
                "seconds": seconds,
                "foreground": foreground,
                "engine": "integer" if integer else (engines[-1] if engines else "pytorch"),
            }
        )
    )


def _models(folder: Path) -> None:
    unet = UNetConfig(base_width=16)
    for name, quant in (("fp32", QuantConfig()), ("w4a6", QuantConfig.from_bits(4, 6))):
        torch.manual_seed(0)
        model = build_unet(unet, quant).train()
        with torch.no_grad():
            model(torch.randn(4, 1, 128, 128))  # BatchNorm statistics and quantizer ranges
        bundle = SegmentationModel(model.eval(), unet, quant)
        save_model(folder / f"{name}.safetensors", bundle, packed=not quant.is_float)


def _run(
    folder: Path, label: str, slices: int, model: str, integer: bool, whole: bool
) -> dict[str, object]:
    image = folder / f"ct{slices}.nii.gz"
    command = [
        sys.executable,
        __file__,
        "--child",
        str(folder / model),
        str(image),
        str(folder / "mask.nii.gz"),
    ]
    command += (["--integer"] if integer else []) + (["--whole"] if whole else [])
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    volume = slices * SIZE * SIZE * 2 / 2**20
    added = result["peak_mib"] - result["baseline_mib"]
    row = {
        "setting": label,
        "engine": result["engine"],
        "slices": slices,
        "volume_mib": round(volume, 1),
        "peak_mib": round(result["peak_mib"], 1),
        "peak_ratio": round(result["peak_mib"] / volume, 2),
        "added_mib": round(added, 1),
        "added_ratio": round(added / volume, 2),
        "seconds": round(result["seconds"], 2),
        "ms_per_slice": round(1000 * result["seconds"] / slices, 1),
    }
    print(row, flush=True)
    return row


def measure(sizes: list[int]) -> list[dict[str, object]]:
    rows = []
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        _models(folder)
        geometry = Volume(np.zeros((1, 1, 1), np.int16), spacing=(0.8, 0.8))
        for slices in sizes:
            write_mask_stream(
                folder / f"ct{slices}.nii.gz",
                synthetic_ct(slices),
                (slices, SIZE, SIZE),
                np.int16,
                like=geometry,
            )
        for slices in sizes:  # the curve: FP32, streamed
            rows.append(_run(folder, "FP32, streamed", slices, MODELS["FP32"][0], False, False))
        largest = 300 if 300 in sizes else max(sizes)  # the 512 x 512 x 300 volume
        w4a6 = MODELS["W4A6 packed"][0]
        rows.append(_run(folder, "W4A6 packed, streamed", largest, w4a6, False, False))
        rows.append(
            _run(folder, "W4A6 packed, integer path, streamed", min(sizes), w4a6, True, False)
        )
        rows.append(
            _run(folder, "FP32, whole volume in memory", largest, MODELS["FP32"][0], False, True)
        )
    return rows


def linearity(rows: list[dict[str, object]]) -> dict[str, float]:
    """Least-squares ``seconds = fixed + per_slice * slices`` over the streamed FP32 curve."""
    curve = [r for r in rows if r["setting"] == "FP32, streamed"]
    x = np.array([r["slices"] for r in curve], float)
    y = np.array([r["seconds"] for r in curve], float)
    slope, intercept = np.polyfit(x, y, 1)
    fitted = slope * x + intercept
    r2 = 1 - float(((y - fitted) ** 2).sum()) / float(((y - y.mean()) ** 2).sum())
    return {"per_slice_s": float(slope), "fixed_s": float(intercept), "r2": r2}


def plot(rows: list[dict[str, object]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [r for r in rows if r["setting"] == "FP32, streamed"]
    slices = [r["slices"] for r in curve]
    figure, (memory, seconds) = plt.subplots(1, 2, figsize=(9, 3.4))
    memory.plot(slices, [r["volume_mib"] for r in curve], "k--", label="the volume (int16)")
    memory.plot(slices, [r["peak_mib"] for r in curve], "o-", label="process peak RSS")
    memory.plot(slices, [r["added_mib"] for r in curve], "s-", label="added by segmentation")
    memory.set(xlabel="slices (512 x 512)", ylabel="MiB", title="Memory, streamed FP32")
    memory.legend(fontsize=8)
    seconds.plot(slices, [r["seconds"] for r in curve], "o-")
    seconds.set(xlabel="slices (512 x 512)", ylabel="seconds", title="Time, streamed FP32")
    figure.tight_layout()
    for path in (RESULTS / "large_volumes.png", PLOT):
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)


def markdown(rows: list[dict[str, object]], fit: dict[str, float], info: dict[str, object]) -> str:
    lines = [
        "| setting | engine | slices | volume (MiB) | peak RSS (MiB) | peak / volume "
        "| added (MiB) | added / volume | time (s) | ms / slice |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['engine']} | {r['slices']} | {r['volume_mib']} | "
            f"{r['peak_mib']} | {r['peak_ratio']:.2f} | {r['added_mib']} | "
            f"{r['added_ratio']:.2f} | {r['seconds']} | {r['ms_per_slice']} |"
        )
    lines.append("")
    lines.append(
        f"Synthetic int16 CT stacks (512 x 512 in plane) in `.nii.gz`, segmented to `.nii.gz` "
        f"with a U-Net of base width 16, one fresh process per row. *Peak RSS*: the whole "
        f"process (Python, PyTorch, the model included); *added*: above that process before "
        f"segmentation. *Engine*: what ran (the default, `--engine auto`, chose it on this "
        f"CPU; `integer`: `--integer`). Streamed time fits `{fit['fixed_s']:.2f} s + "
        f"{1000 * fit['per_slice_s']:.1f} ms x slices` (R^2 = {fit['r2']:.4f}). "
        f"{machine_line(info)}. Generated by "
        f"`python benchmarks/large_volumes.py`."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[38, 75, 150, 300, 600])
    parser.add_argument(
        "--child", nargs=3, metavar=("MODEL", "IMAGE", "OUT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--integer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(*args.child, integer=args.integer, whole=args.whole)
        return
    info = machine()
    rows = measure(sorted(args.sizes))
    fit = linearity(rows)
    table = markdown(rows, fit, info)
    write_results("large_volumes", {"machine": info, "rows": rows, "fit": fit}, table)
    plot(rows)
    print(table)
    if args.update_readme:
        update_readme("large_volumes", table)


if __name__ == "__main__":
    main()
