"""What the C export (`unetquant export --format c`) needs on a microcontroller or a small CPU:
the bytes of its constant weight data and the peak bytes of its activation buffers, for a
512 x 512 slice and for 128 x 128 tiles, per quantization setting of the default U-Net (base
width 16, depth 3).

Each figure is computed by `napari_unetquant.infer.export_c.c_memory` from the network's
description and then checked against the compiled program itself (`cc -O2`), which counts
every buffer it allocates and prints its peak with `--memory`; the script stops if the two
disagree. Weight bytes depend on the bit widths and the layer shapes only; activation bytes on
the formats and the slice size (and, for bilinear networks, on the integer type the upsampling
sources need, which training sets; the networks here are calibrated by a few training-mode
passes on random input, and trained ones took the same types in the tests).

    python benchmarks/c_memory.py                  # prints the table
    python benchmarks/c_memory.py --update-readme  # also rewrites its README block
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from _common import machine, update_readme, write_results
from napari_unetquant.config import QuantConfig, UNetConfig
from napari_unetquant.infer.export_c import c_memory, export_c
from napari_unetquant.model import build_unet

SIZES = ((512, 512), (128, 128))


def _settings() -> list[tuple[str, UNetConfig, QuantConfig]]:
    default = UNetConfig()
    nearest = dataclasses.replace(default, upsample="nearest")
    every = {"edge_layers": ()}
    return [
        ("W4A6, float edge layers (default)", default, QuantConfig.from_label("W4A6")),
        ("W4A6, all layers", default, dataclasses.replace(QuantConfig.from_label("W4A6"), **every)),
        (
            "W4A6, all layers, nearest",
            nearest,
            dataclasses.replace(QuantConfig.from_label("W4A6"), **every),
        ),
        ("W8A8, all layers", default, dataclasses.replace(QuantConfig.from_label("W8A8"), **every)),
        ("W2A4, all layers", default, dataclasses.replace(QuantConfig.from_bits(2, 4), **every)),
    ]


def _calibrated(unet: UNetConfig, quant: QuantConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_unet(unet, quant).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 1, 64, 64))
    return model.eval()


def _measured(program: Path, height: int, width: int) -> dict[str, int]:
    """The compiled program's own report on a random slice of ``height`` x ``width``."""
    source, target = program / "in.f32", program / "out.u8"
    rng = np.random.default_rng(0)
    source.write_bytes(rng.normal(size=(height, width)).astype("<f4").tobytes())
    run = [str(program / "unet"), str(source), str(target), str(height), str(width), "--memory"]
    report = subprocess.run(run, check=True, capture_output=True, text=True).stdout
    return {key: int(value) for key, value in (line.split() for line in report.splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    compiler = shutil.which("cc")
    if compiler is None:
        raise SystemExit("no C compiler (cc) on PATH: install gcc")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for index, (label, unet, quant) in enumerate(_settings()):
            program = Path(folder) / f"net{index}"
            written = export_c(_calibrated(unet, quant), program)
            sources = sorted(str(p) for p in program.glob("*.c"))
            subprocess.run(
                [compiler, "-O2", *sources, "-lm", "-o", str(program / "unet")], check=True
            )
            row: dict[str, object] = {"setting": label, "weight_bytes": written.weight_bytes}
            for height, width in SIZES:
                computed = c_memory(written.description, height, width)
                measured = _measured(program, height, width)
                if (computed.weight_bytes, computed.peak_activation_bytes) != (
                    measured["weight_bytes"],
                    measured["peak_activation_bytes"],
                ):
                    raise SystemExit(
                        f"{label}: c_memory {computed} but the program says {measured}"
                    )
                row[f"peak_{height}"] = computed.peak_activation_bytes
            rows.append(row)
            print(row, flush=True)
    info = machine()
    lines = [
        "| setting (U-Net base 16, depth 3) | weights (constant data) | peak activations, "
        "512 x 512 slice | peak activations, 128 x 128 tile |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['setting']} | {row['weight_bytes'] / 1024:.1f} KiB | "
            f"{row['peak_512'] / 2**20:.2f} MiB | {row['peak_128'] / 1024:.0f} KiB |"
        )
    table = "\n".join(lines) + (
        "\n\nMemory of the C program `unetquant export --format c` writes, computed by "
        "`c_memory` and equal to what the compiled program (`cc -O2`) reports with `--memory` "
        "(every heap buffer live at once: activations, the input, the mask, one layer's "
        "unpacked weights and row of accumulators); the program runs a slice as one window, so "
        "activations grow with its area. Generated by `python benchmarks/c_memory.py`."
    )
    write_results("c_memory", {"machine": info, "rows": rows}, table)
    print(table)
    if args.update_readme:
        update_readme("c_memory", table)


if __name__ == "__main__":
    main()
