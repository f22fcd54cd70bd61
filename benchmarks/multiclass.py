"""Grey and white matter of the spinal cord in one model: per-class Dice, FP and W4A6.

The paper table's spinal split (train on sub-9418, sub-9584 and sub-9709Ses1, validate on
sub-9709Ses2, test on sub-9604) with three classes: background, white matter (the cord without
the grey matter) and grey matter, from the shared files as they are (``cord.nii.gz+gm.nii.gz``:
cord painted as 1, grey matter over it as 2; ``--classes 1,2``). FP 2000 steps, then W4A6
fixed point fine-tuned 500 steps from it (the paper table's recipe: Dice loss, elastic deformation,
per-slice z-score),
``seeds`` seeds. Each model is scored twice on the test subject: ``unetquant evaluate --json``
(``dice_per_class``, pooled over the volume's slices as the README's tables are), and again
independently, from the label map ``unetquant segment`` writes against the painted labels
(volume Dice per class, NumPy).

    python benchmarks/multiclass.py [--seeds 3] [--fp-steps 2000] [--quant-steps 500]
                                    [--update-readme]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

import paper_table
from _common import RESULTS, machine, machine_line, update_readme, write_results
from napari_unetquant.cli import main as unetquant
from napari_unetquant.config import QuantConfig, UNetConfig
from napari_unetquant.data.io import read_labels, read_volume
from napari_unetquant.jobs import TrainJob, train_model
from napari_unetquant.recipes import train_config

RUNS = RESULTS / "runs"
SPINAL = paper_table.DATA / "spinal-gm"
CLASSES = {1: "WM", 2: "GM"}
ROWS = {"FP": QuantConfig(), "W4A6 fixed": QuantConfig.from_label("W4A6")}


def _subject(name: str) -> tuple[str, str]:
    folder = SPINAL / name
    return str(folder / "image.nii.gz"), f"{folder / 'cord.nii.gz'}+{folder / 'gm.nii.gz'}"


TRAIN = tuple(_subject(s) for s in ("sub-9418", "sub-9584", "sub-9709Ses1"))
VALIDATION = (_subject("sub-9709Ses2"),)
TEST = _subject("sub-9604")


def _train(label: str, seed: int, steps: int, init: str | None) -> tuple[Path, float]:
    """Train (or reuse) one model; its path and training seconds."""
    key = f"GMWM-{label.replace(' ', '-')}-s{seed}-{steps}" + ("-ft" if init else "")
    path = RUNS / f"{key}.safetensors"
    record = RUNS / f"{key}.seconds"
    if path.exists() and record.exists():
        return path, float(record.read_text())
    job = TrainJob(
        images=tuple(p[0] for p in TRAIN),
        labels=tuple(p[1] for p in TRAIN),
        val_images=tuple(p[0] for p in VALIDATION),
        val_labels=tuple(p[1] for p in VALIDATION),
        out=str(path),
        quant=ROWS[label],
        unet=None if init else UNetConfig(),
        train=replace(
            train_config(fine_tune=init is not None, steps=steps),
            seed=seed,
            loss="dice",
            elastic=True,
            validate_every=max(50, steps // 10),
        ),
        classes=(1, 2),
        init=init,
        intensity=None if init else "slice",  # the paper table's spinal rows
    )
    start = time.perf_counter()
    for _ in train_model(job):
        pass
    seconds = time.perf_counter() - start
    RUNS.mkdir(parents=True, exist_ok=True)
    record.write_text(f"{seconds:.1f}")
    return path, seconds


def _score(model: Path, folder: Path) -> dict[str, Any]:
    """``evaluate --json``'s per-class Dice, and the written label map's, re-scored."""
    image, labels = TEST
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = unetquant(
            ["evaluate", "--model", str(model), "--images", image, "--labels", labels, "--json"]
        )
    if code != 0:
        raise RuntimeError(f"unetquant evaluate failed ({code})")
    reported = json.loads(out.getvalue())
    mask_path = folder / f"{model.stem}.nii.gz"
    with contextlib.redirect_stdout(io.StringIO()):
        code = unetquant(
            ["segment", "--model", str(model), "--image", image, "--out", str(mask_path)]
        )
    if code != 0:
        raise RuntimeError(f"unetquant segment failed ({code})")
    written = read_volume(mask_path).array
    truth = read_labels(labels).array
    rescored = {}
    for value in CLASSES:
        predicted, true = written == value, truth == value
        total = int(predicted.sum() + true.sum())
        rescored[str(value)] = 2 * int((predicted & true).sum()) / total if total else 1.0
    return {
        "dice_per_class": {k: float(v) for k, v in reported["dice_per_class"].items()},
        "dice_volume_per_class": {
            k: float(v) for k, v in reported["dice_volume_per_class"].items()
        },
        "dice_mean_over_classes": float(reported["dice_mean_over_classes"]),
        "rescored_volume_dice": rescored,
        "values_written": sorted(int(v) for v in np.unique(written)),
    }


def measure(seeds: int, fp_steps: int, quant_steps: int) -> list[dict[str, Any]]:
    folder = RESULTS / "multiclass-masks"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in range(seeds):
        fp, fp_seconds = _train("FP", seed, fp_steps, None)
        quant, quant_seconds = _train("W4A6 fixed", seed, quant_steps, str(fp))
        for label, path, seconds in (("FP", fp, fp_seconds), ("W4A6 fixed", quant, quant_seconds)):
            row = {"row": label, "seed": seed, "train_seconds": seconds, **_score(path, folder)}
            rows.append(row)
            dice = ", ".join(f"{CLASSES[int(k)]} {v:.4f}" for k, v in row["dice_per_class"].items())
            print(f"  {label} seed {seed}: {dice} ({seconds:.0f} s)", flush=True)
    return rows


def _mean_sd(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    sd = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {sd:.2f}"


def markdown(rows: list[dict[str, Any]], info: dict[str, Any], seeds: int) -> str:
    lines = [
        "| setting | WM Dice (%) | GM Dice (%) | mean over classes (%) | WM volume Dice (%) "
        "| GM volume Dice (%) | volume Dice re-scored from the written label map (WM / GM, %) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for label in ROWS:
        mine = [r for r in rows if r["row"] == label]
        wm = [r["dice_per_class"]["1"] for r in mine]
        gm = [r["dice_per_class"]["2"] for r in mine]
        mean = [r["dice_mean_over_classes"] for r in mine]
        wm_volume = [r["dice_volume_per_class"]["1"] for r in mine]
        gm_volume = [r["dice_volume_per_class"]["2"] for r in mine]
        written = [r["rescored_volume_dice"] for r in mine]
        rescored = " / ".join(_mean_sd([w[value] for w in written]) for value in ("1", "2"))
        lines.append(
            f"| {label} | {_mean_sd(wm)} | {_mean_sd(gm)} | {_mean_sd(mean)} | "
            f"{_mean_sd(wm_volume)} | {_mean_sd(gm_volume)} | {rescored} |"
        )
    lines += [
        "",
        f"Spinal cord, three classes (background, white matter = cord without grey matter, grey "
        f"matter) in one softmax U-Net (base 16) trained with `--classes 1,2` on "
        f"`cord.nii.gz+gm.nii.gz` of sub-9418, sub-9584 and sub-9709Ses1 (validation "
        f"sub-9709Ses2), tested on sub-9604; FP 2000 steps, W4A6 fixed point fine-tuned 500 "
        f"steps from it; mean ± SD over {seeds} seed(s). Dice per class from `unetquant evaluate "
        f"--json`: `dice_per_class` (mean of per-slice Dice, as the paper table) and "
        f"`dice_volume_per_class` (pooled over the volume); the last column re-scores the "
        f"label map `unetquant segment` wrote against the painted labels with NumPy. "
        f"{machine_line(info)}. Generated by `python benchmarks/multiclass.py`.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fp-steps", type=int, default=2000)
    parser.add_argument("--quant-steps", type=int, default=500)
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    info = machine()
    rows = measure(args.seeds, args.fp_steps, args.quant_steps)
    table = markdown(rows, info, args.seeds)
    write_results("multiclass", {"machine": info, "rows": rows}, table)
    print(table)
    if args.update_readme:
        update_readme("multiclass", table)


if __name__ == "__main__":
    main()
