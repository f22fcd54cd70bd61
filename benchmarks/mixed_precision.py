"""Mixed precision under a size budget against uniform precision, at the same file size.

For EM (ISBI 2012) and spinal GM, with the paper table's splits and recipe
(benchmarks/paper_table.py): the FP model of each seed (2000 steps), its uniform W3A6 and
W2A6 fixed-point fine-tunes (500 steps), and two budgeted fine-tunes (500 steps,
``TrainJob.size_budget``: each layer's weight bits from 2, 3, 4, 5, 6, 8, or float for the
edge layers, by Hessian sensitivity and an exact allocation) whose budgets are the byte sizes
of that seed's uniform W3A6 and W2A6 packed files. Every file size is the packed file's, made
as ``unetquant export`` writes it. Dice is the mean per-slice Dice on the test split; 3 seeds.

The plot puts every model on Dice against packed KiB, per dataset, with the Pareto front of all
of them (the models no other is both smaller than and better than).

Runs are cached in benchmarks/results/runs/ with the paper table's (delete a file to redo it).

    python benchmarks/mixed_precision.py [--seeds 3] [--datasets em gm] [--update-readme]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from _common import RESULTS, machine, machine_line, update_readme, write_results
from napari_unetquant.config import QuantConfig
from napari_unetquant.modelio import load_model, packed_file_bytes
from paper_table import RUNS, Dataset, Setup, _gm, _isbi, _run

FP_STEPS, QUANT_STEPS = 2000, 500
UNIFORM = {"W3A6": QuantConfig.from_bits(3, 6), "W2A6": QuantConfig.from_bits(2, 6)}
BUDGETED = QuantConfig.from_bits(8, 6)  # the quantizer and activations; widths per layer


def packed_bytes(model: str) -> int:
    return packed_file_bytes(load_model(model))


def run_seed(dataset: Dataset, seed: int, setup: Setup) -> list[dict[str, Any]]:
    """The FP model, the uniform fine-tunes and the budgeted ones at their sizes."""
    fp = _run(dataset, "FP", QuantConfig(), seed, FP_STEPS, None, setup)
    rows = []
    for label, quant in UNIFORM.items():
        uniform = _run(dataset, f"{label} fixed", quant, seed, QUANT_STEPS, fp["model"], setup)
        size = packed_bytes(uniform["model"])
        rows.append({**uniform, "kind": "uniform", "setting": label, "packed_bytes": size})
        mixed = _run(
            dataset, "mixed A6", BUDGETED, seed, QUANT_STEPS, fp["model"], setup, size_budget=size
        )
        info = load_model(mixed["model"]).info
        rows.append(
            {
                **mixed,
                "kind": "budget",
                "setting": f"budget = {label} size",
                "packed_bytes": packed_bytes(mixed["model"]),
                "budget_bytes": size,
                "label": info["label"],
                "weight_bits_per_layer": info["weight_bits_per_layer"],
            }
        )
    return rows


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds per dataset and setting."""
    rows = []
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        for setting in dict.fromkeys(r["setting"] for r in results if r["dataset"] == dataset):
            runs = [r for r in results if r["dataset"] == dataset and r["setting"] == setting]
            dice = [r["dice_mean"] for r in runs]
            rows.append(
                {
                    "dataset": dataset,
                    "setting": setting,
                    "kind": runs[0]["kind"],
                    "seeds": len(runs),
                    "dice": statistics.mean(dice),
                    "dice_sd": statistics.stdev(dice) if len(dice) > 1 else None,
                    "packed_kib": statistics.mean(r["packed_bytes"] for r in runs) / 1024,
                    "largest_bytes": max(r["packed_bytes"] for r in runs),
                    "budget_bytes": runs[0].get("budget_bytes"),
                    "mean_weight_bits": statistics.mean(r["mean_weight_bits"] for r in runs),
                    "per_seed": dice,
                    "labels": [r.get("label", setting) for r in runs],
                }
            )
    return rows


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """For each budget: does the budgeted model beat the uniform one of its size (mean over
    seeds), with no file larger than the budget?"""
    lines = []
    for row in rows:
        if row["kind"] != "budget":
            continue
        label = row["setting"].split("= ")[1].split()[0]
        uniform = next(r for r in rows if r["dataset"] == row["dataset"] and r["setting"] == label)
        gain = 100 * (row["dice"] - uniform["dice"])
        fits = row["largest_bytes"] <= max(row["budget_bytes"], 0)
        lines.append(
            f"{row['dataset']}, at the {label} size: budgeted {100 * row['dice']:.2f} against "
            f"uniform {100 * uniform['dice']:.2f} ({gain:+.2f} points); largest budgeted file "
            f"{row['largest_bytes']} bytes, {'within' if fits else 'OVER'} its budget"
        )
    return lines


def markdown(rows: list[dict[str, Any]], caption: str) -> str:
    lines = [
        "| data | setting | seeds | Dice (%) | per seed | mean weight bits | packed file KiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sd = f" ± {100 * r['dice_sd']:.2f}" if r["dice_sd"] is not None else ""
        seeds = ", ".join(f"{100 * d:.2f}" for d in r["per_seed"])
        lines.append(
            f"| {r['dataset']} | {r['setting']} | {r['seeds']} | {100 * r['dice']:.2f}{sd} | "
            f"{seeds} | {r['mean_weight_bits']:.2f} | {r['packed_kib']:.1f} |"
        )
    return "\n".join(lines) + "\n\n" + caption


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both size (smaller) and Dice (higher), by size."""
    front: list[tuple[float, float]] = []
    for size, dice in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or dice > front[-1][1]:
            front.append((size, dice))
    return front


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    figure, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for axis, dataset in zip(axes[0], datasets, strict=True):
        mine = [r for r in results if r["dataset"] == dataset]
        for kind, marker, name in (("uniform", "o", "uniform"), ("budget", "*", "budgeted")):
            chosen = [r for r in mine if r["kind"] == kind]
            axis.scatter(
                [r["packed_bytes"] / 1024 for r in chosen],
                [100 * r["dice_mean"] for r in chosen],
                marker=marker,
                s=70 if marker == "*" else 30,
                label=f"{name} (each seed)",
            )
        front = pareto([(r["packed_bytes"] / 1024, 100 * r["dice_mean"]) for r in mine])
        axis.plot(*zip(*front, strict=True), "k--", lw=1, label="Pareto front")
        axis.set_xlabel("packed model file (KiB)")
        axis.set_ylabel("Dice (%)")
        axis.set_title(dataset)
        axis.legend(fontsize=8)
    figure.suptitle("Mixed precision under a size budget against uniform W3A6 and W2A6")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--datasets", nargs="+", default=["em", "gm"], choices=["em", "gm"])
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    datasets = {"em": lambda: _isbi(RUNS / "data"), "gm": _gm}
    setup = Setup()
    results = []
    for seed in range(args.seeds):  # seed by seed: a partial run has every dataset
        for name in args.datasets:
            results += run_seed(datasets[name](), seed, setup)
    rows = summarise(results)
    info = machine()
    checks = verdicts(rows)
    caption = (
        f"U-Net base width 16, the paper table's recipe: FP {FP_STEPS} steps, every other row "
        f"fine-tuned {QUANT_STEPS} steps from the FP model of its seed; activations 6-bit "
        f"fixed point; the uniform rows keep the first block and the last convolution float. "
        f"Budgeted rows: each layer's weight bits chosen from 2, 3, 4, 5, 6, 8 (and float for "
        f"the first block and the last convolution, whose inputs stay float) to fit the packed "
        f"file in the size of the same seed's uniform file (Hutchinson Hessian trace x "
        f"quantization error, exact allocation; `unetquant train --size-budget`); the mean "
        f"weight bits count the quantized layers. Dice = mean per-slice Dice on the "
        f"test split (EM: slices 20-23; GM: sub-9604). Packed file: as `unetquant export` "
        f"writes it (mean over seeds). Dice does not depend on the machine; the runs here "
        f"trained as one single-threaded process per dataset (`--datasets em` and "
        f"`--datasets gm` side by side, then this command over the cached runs). "
        f"{machine_line(info)}. Generated by "
        f"`python benchmarks/mixed_precision.py"
        f"{f' --seeds {args.seeds}' if args.seeds != 3 else ''}"
        f"{' --datasets ' + ' '.join(args.datasets) if args.datasets != ['em', 'gm'] else ''}`."
        "\n\n" + "\n".join(f"- {line}" for line in checks)
    )
    table = markdown(rows, caption)
    write_results("mixed_precision", {"machine": info, "runs": results, "rows": rows}, table)
    image = RESULTS / "mixed_precision.png"
    plot(results, image)
    print(table)
    if args.update_readme:
        docs = Path(__file__).resolve().parents[1] / "docs" / "images" / "mixed-precision.png"
        plot(results, docs)
        update_readme("mixed_precision", table)


if __name__ == "__main__":
    main()
