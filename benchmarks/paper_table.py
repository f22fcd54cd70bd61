"""The paper's table on real data: Dice per quantization setting on EM (ISBI 2012) and spinal
cord grey matter, scored on data that training never saw.

Protocol (see ../shared/docs/BENCHMARKS.md):
- EM: train on ISBI slices 0-19 (the trainer holds out 17-19 to pick its best checkpoint),
  score slices 20-23; membranes (label 0) are the foreground, interior Dice reported beside.
- GM: train on sub-9418 (UCL), sub-9584 (NWU) and sub-9709Ses1 (Milan), pick checkpoints on
  sub-9709Ses2, score sub-9604 (Philips, a site training never saw) on full slices in the
  original grid. Resampled to the median training spacing, elastic augmentation, Dice loss.
- FP is trained from scratch; every quantized row is fine-tuned from the FP model of its seed.
- Runs are cached in benchmarks/results/runs/ (delete a file to redo it).

    python benchmarks/paper_table.py                      # the full protocol
    python benchmarks/paper_table.py --quick              # one seed, short runs (~10 min)
    python benchmarks/paper_table.py --update-readme      # also rewrite the README block
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from _common import RESULTS, machine, machine_line, update_readme, write_results
from napari_unetquant.config import InferConfig, QuantConfig, QuantizerConfig, UNetConfig
from napari_unetquant.jobs import TrainJob, evaluate_files, train_model
from napari_unetquant.metrics import SegmentationScores
from napari_unetquant.modelio import load_model
from napari_unetquant.quant import bit_report
from napari_unetquant.recipes import train_config

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RUNS = RESULTS / "runs"
# Dice of the models as trained (PyTorch), whatever engine is fastest on this CPU: the
# engines' agreement with it is benchmarks/cpu_inference.py's.
SCORING = InferConfig(engine="pytorch")

# (row label, quantization, runs with every seed?)
ROWS: list[tuple[str, QuantConfig, bool]] = [
    ("FP", QuantConfig(), True),
    ("Q0.4/Q6.0 (paper)", QuantConfig.paper(), False),
    ("W8A8 fixed", QuantConfig.from_bits(8, 8), False),
    ("W8A8 lsq", QuantConfig.from_bits(8, 8, "lsq"), False),
    ("W4A6 fixed", QuantConfig.from_bits(4, 6), True),
    ("W4A6 fixed, all layers", replace(QuantConfig.from_bits(4, 6), edge_layers=()), False),
    (
        "W4A6 fixed, 8-bit edges",
        replace(QuantConfig.from_bits(4, 6), edge_precision=QuantizerConfig.from_bits("fixed", 8)),
        False,
    ),
    ("W4A6 lsq", QuantConfig.from_bits(4, 6, "lsq"), False),
    ("W4A4 fixed", QuantConfig.from_bits(4, 4), False),
    ("W4A4 lsq", QuantConfig.from_bits(4, 4, "lsq"), True),
    ("W2A4 fixed", QuantConfig.from_bits(2, 4), False),
    ("W2A4 lsq", QuantConfig.from_bits(2, 4, "lsq"), False),
    ("ternary", QuantConfig.from_bits(2, 2, "ternary"), False),
    ("binary", QuantConfig.from_bits(1, 1, "binary"), False),
]


@dataclass(frozen=True)
class Dataset:
    name: str
    train: tuple[tuple[str, str], ...]
    validation: tuple[tuple[str, str], ...]
    test: tuple[tuple[str, str], ...]
    foreground_value: int | None
    loss: str
    elastic: bool


def _isbi(cache: Path) -> Dataset:
    """ISBI stacks split into TIFF files (real files, as a user would give them)."""
    cache.mkdir(parents=True, exist_ok=True)
    volume = tifffile.imread(DATA / "isbi2012" / "train-volume.tif")
    labels = tifffile.imread(DATA / "isbi2012" / "train-labels.tif")
    paths = {}
    for part, chosen in (("train", slice(0, 20)), ("test", slice(20, 24))):
        image_path, label_path = cache / f"isbi-{part}.tif", cache / f"isbi-{part}-labels.tif"
        tifffile.imwrite(image_path, volume[chosen], photometric="minisblack")
        tifffile.imwrite(label_path, labels[chosen], photometric="minisblack")
        paths[part] = ((str(image_path), str(label_path)),)
    return Dataset("EM (ISBI 2012)", paths["train"], (), paths["test"], 0, "bce_dice", False)


def _gm() -> Dataset:
    def subject(name: str) -> tuple[str, str]:
        folder = DATA / "spinal-gm" / name
        return str(folder / "image.nii.gz"), str(folder / "gm.nii.gz")

    return Dataset(
        "Spinal GM",
        tuple(subject(s) for s in ("sub-9418", "sub-9584", "sub-9709Ses1")),
        (subject("sub-9709Ses2"),),
        (subject("sub-9604"),),
        None,
        "dice",
        True,
    )


@dataclass(frozen=True)
class Setup:
    """The network width and the device (``--paper-size`` and ``--device``)."""

    base_width: int = 16
    device: str = "auto"
    scanner_augment: float = 0.0
    intensity: str = "slice"
    upsample: str = "bilinear"


def _run(
    dataset: Dataset,
    label: str,
    quant: QuantConfig,
    seed: int,
    steps: int,
    init: str | None,
    setup: Setup,
    size_budget: int | None = None,
) -> dict[str, Any]:
    """Train (or reuse) one model and score it on the test split (``size_budget``: bytes of
    the packed file, each layer's weight bits chosen to fit; mixed_precision.py)."""
    words = label.replace(",", "").split()
    key = f"{dataset.name.split()[0]}-{words[0]}-{'-'.join(words[1:]) or words[0]}-s{seed}-{steps}"
    if setup.upsample != Setup.upsample:
        key += f"-{setup.upsample}"
    if setup.base_width != Setup.base_width:
        key += f"-w{setup.base_width}"
    if setup.scanner_augment:
        key += f"-scanner{setup.scanner_augment:g}"
    if setup.intensity != Setup.intensity and init is None:  # a fine-tune keeps its model's
        key += f"-{setup.intensity}"
    if size_budget is not None:
        key += f"-budget{size_budget}"
    if init is not None:
        key += f"-from-{Path(init).stem}"
    key = key.replace("/", "_").replace(".", "").replace("(", "").replace(")", "")
    result_path, model_path = RUNS / f"{key}.json", RUNS / f"{key}.safetensors"
    if result_path.exists() and model_path.exists():
        return dict(json.loads(result_path.read_text()))
    job = TrainJob(
        images=tuple(p[0] for p in dataset.train),
        labels=tuple(p[1] for p in dataset.train),
        val_images=tuple(p[0] for p in dataset.validation),
        val_labels=tuple(p[1] for p in dataset.validation),
        out=str(model_path),
        quant=quant,
        unet=UNetConfig(base_width=setup.base_width, upsample=setup.upsample),
        train=replace(
            train_config(fine_tune=init is not None, steps=steps),
            seed=seed,
            loss=dataset.loss,
            elastic=dataset.elastic,
            validate_every=max(50, steps // 10),  # the protocol the README's table was run with
            scanner_augment=setup.scanner_augment,
            device=setup.device,
        ),
        foreground_value=dataset.foreground_value,
        init=init,
        intensity=setup.intensity if init is None else None,
        save_float=True,  # site_gap.py reads the float state (BatchNorm statistics, formats)
        size_budget=size_budget,
    )
    start = time.perf_counter()
    for _ in train_model(job):
        pass
    seconds = time.perf_counter() - start
    bundle = load_model(model_path)  # scored on the CPU wherever it trained: same numbers
    scores = evaluate_files(
        bundle,
        [p[0] for p in dataset.test],
        [p[1] for p in dataset.test],
        dataset.foreground_value,
        SCORING,
        "cpu",
    )
    pooled = SegmentationScores.pooled(scores)
    report = bit_report(bundle.model)
    result = {
        "dataset": dataset.name,
        "row": label,
        "seed": seed,
        "steps": steps,
        "train_seconds": round(seconds, 1),
        "dice_mean": pooled.dice_mean,
        "dice_volume": pooled.dice_volume,
        "iou_mean": pooled.iou_mean,
        "n_slices": pooled.n_slices,
        "validation_dice": bundle.info["validation_dice"],
        "weight_bits": quant.weight.bits,
        "act_bits": quant.act.bits,
        "mean_weight_bits": report.mean_weight_bits,
        "stored_bytes": report.stored_bytes,
        "fp32_bytes": report.fp32_bytes,
        "model": str(model_path),
        "init": init,
    }
    if dataset.foreground_value == 0:  # EM: the paper's code scored the cell interior
        interior = evaluate_interior(bundle, dataset)
        result["dice_interior"] = interior
    RUNS.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=2))
    print(
        f"  {dataset.name} {label} seed {seed}: Dice {pooled.dice_mean:.4f} ({seconds:.0f} s)",
        flush=True,
    )
    return result


def evaluate_interior(bundle: Any, dataset: Dataset) -> float:
    """Dice of the inverted membrane prediction against the interior (label 255)."""
    from napari_unetquant.data.io import read_volume
    from napari_unetquant.infer import segment_volume
    from napari_unetquant.metrics import segmentation_scores

    image_path, label_path = dataset.test[0]
    volume = read_volume(image_path)
    probabilities = segment_volume(bundle, volume, SCORING, "cpu")
    interior_true = read_volume(label_path).array != 0
    return segmentation_scores(probabilities < 0.5, interior_true).dice_mean


def run_dataset(
    dataset: Dataset,
    seeds: int,
    steps: tuple[int, int],
    setup: Setup,
    rows: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Every row's runs (``rows``: only these labels, FP always)."""
    fp_steps, quant_steps = steps
    results = []
    for seed in range(seeds):
        fp = _run(dataset, "FP", QuantConfig(), seed, fp_steps, None, setup)
        results.append(fp)
        for label, quant, every_seed in ROWS[1:]:
            if rows is not None and label not in rows:
                continue
            if seed == 0 or every_seed:
                results.append(_run(dataset, label, quant, seed, quant_steps, fp["model"], setup))
    return results


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sd per (dataset, row); the drop is against FP's mean on the same dataset."""
    rows = []
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        fp_mean = statistics.mean(
            r["dice_mean"] for r in results if r["dataset"] == dataset and r["row"] == "FP"
        )
        for label, _, _ in ROWS:
            runs = [r for r in results if r["dataset"] == dataset and r["row"] == label]
            if not runs:
                continue
            dice = [r["dice_mean"] for r in runs]
            rows.append(
                {
                    "dataset": dataset,
                    "row": label,
                    "seeds": len(runs),
                    "dice": statistics.mean(dice),
                    "dice_sd": statistics.stdev(dice) if len(dice) > 1 else None,
                    "drop": fp_mean - statistics.mean(dice),
                    "dice_interior": statistics.mean(
                        r.get("dice_interior", float("nan")) for r in runs
                    ),
                    "weight_bits": runs[0]["weight_bits"],
                    "act_bits": runs[0]["act_bits"],
                    "mean_weight_bits": runs[0]["mean_weight_bits"],
                    "stored_kib": runs[0]["stored_bytes"] / 1024,
                    "ratio": runs[0]["fp32_bytes"] / runs[0]["stored_bytes"],
                    **packed_file(runs[0]["model"]),
                }
            )
    return rows


def packed_file(model: str) -> dict[str, Any]:
    """Size of the trained model's packed file (what ``unetquant export`` writes) and its
    ratio to the FP32 ``state_dict`` file of the same network."""
    from napari_unetquant.modelio import save_model
    from napari_unetquant.packed import fp32_state_dict_bytes

    bundle = load_model(model)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "packed.safetensors"
        save_model(path, bundle, packed=True)
        size = path.stat().st_size
    fp32 = fp32_state_dict_bytes(bundle.unet)
    return {"packed_kib": size / 1024, "file_ratio": fp32 / size}


def markdown(rows: list[dict[str, Any]], caption: str) -> str:
    lines = [
        "| data | setting | seeds | Dice (%) | points lost vs FP | interior Dice (%) "
        "| stored bits W/A | packed file KiB | FP32 file / packed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sd = f" ± {100 * r['dice_sd']:.2f}" if r["dice_sd"] is not None else ""
        interior = "" if np.isnan(r["dice_interior"]) else f"{100 * r['dice_interior']:.2f}"
        lines.append(
            f"| {r['dataset']} | {r['row']} | {r['seeds']} | {100 * r['dice']:.2f}{sd} | "
            f"{100 * r['drop']:+.2f} | {interior} | {r['weight_bits']}/{r['act_bits']} | "
            f"{r['packed_kib']:.1f} | {r['file_ratio']:.2f}x |"
        )
    return "\n".join(lines) + "\n\n" + caption


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == dataset]
        for axis, key, name in (
            (axes[0], "mean_weight_bits", "mean stored weight bits"),
            (axes[1], "packed_kib", "packed model file (KiB)"),
        ):
            axis.scatter([r[key] for r in mine], [100 * r["dice"] for r in mine], label=dataset)
            for r in mine:
                axis.annotate(r["row"].split(" (")[0], (r[key], 100 * r["dice"]), fontsize=7)
            axis.set_xlabel(name)
            axis.set_ylabel("Dice (%)")
            axis.set_xscale("log", base=2)
    axes[0].legend()
    figure.suptitle("Dice against bits and model size (U-Net base 16, CPU protocol)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def command_options(args: argparse.Namespace) -> str:
    """The options that change what the table holds, as the command line says them."""
    text = f" --upsample {args.upsample}" if args.upsample != "bilinear" else ""
    if args.seeds != 3 and not args.quick:
        text += f" --seeds {args.seeds}"
    if args.rows:
        text += " --rows " + " ".join(f"'{row}'" for row in args.rows)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one seed, short runs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fp-steps", type=int, default=2000)
    parser.add_argument("--quant-steps", type=int, default=500)
    parser.add_argument(
        "--paper-size",
        action="store_true",
        help="the paper's network (widths 64-128-256; meant for a GPU) instead of base 16",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--datasets", nargs="+", default=["em", "gm"], choices=["em", "gm"])
    parser.add_argument(
        "--upsample",
        choices=["bilinear", "nearest"],
        default="bilinear",
        help="the decoder's upsampling; nearest (the variant hls4ml implements) writes its own "
        "table, paper_table_nearest",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=[label for label, _, _ in ROWS[1:]],
        help="only these quantized rows (FP always runs)",
    )
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.fp_steps, args.quant_steps = 1, 300, 100
    datasets = {"em": lambda: _isbi(RUNS / "data"), "gm": _gm}
    results = []
    setup = Setup(
        base_width=64 if args.paper_size else 16, device=args.device, upsample=args.upsample
    )
    for name in args.datasets:
        dataset = datasets[name]()
        print(
            f"{dataset.name}: {args.seeds} seed(s), FP {args.fp_steps} steps, "
            f"quantized {args.quant_steps} steps, base width {setup.base_width}",
            flush=True,
        )
        steps = (args.fp_steps, args.quant_steps)
        results += run_dataset(dataset, args.seeds, steps, setup, args.rows)
    rows = summarise(results)
    info = machine()
    variant = (
        "nearest-neighbour upsampling (`--upsample nearest`, the variant hls4ml implements; "
        "the table above is the same recipe with bilinear upsampling); "
        if args.upsample == "nearest"
        else ""
    )
    caption = (
        f"U-Net base width {setup.base_width} (the paper: 64), {variant}crops 128, batch 8; "
        f"per-slice z-score inputs (as the paper); "
        f"FP {args.fp_steps} steps from scratch, quantized rows fine-tuned "
        f"{args.quant_steps} steps from the FP model of "
        f"the same seed (negative points lost: better than FP); training ran as one "
        f"single-threaded process per dataset. Dice = mean per-slice Dice on the test split "
        f"(EM: membranes of "
        f"slices 20-23; GM: sub-9604, full slices, original grid). Packed file: the trained "
        f"model as `unetquant export` writes it, against the FP32 `state_dict` file. "
        f"{machine_line(info)}. Generated by `python benchmarks/paper_table.py"
        f"{' --quick' if args.quick else ''}{command_options(args)}`."
    )
    table = markdown(rows, caption)
    name = "paper_table_quick" if args.quick else "paper_table"
    if args.upsample != "bilinear":
        name += f"_{args.upsample}"
    write_results(name, {"machine": info, "args": vars(args), "runs": results, "rows": rows}, table)
    plot(rows, RESULTS / f"{name}.png")
    print(table)
    if args.update_readme:
        update_readme(name, table)


if __name__ == "__main__":
    main()
