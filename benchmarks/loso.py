"""Leave one subject out on spinal cord grey matter: does quantization hold up on a site that
training never saw?

The shared GM data hold four people from four sites (UCL, NWU, Philips, Milan; the Milan person
has two sessions). Each fold holds one person out as the unseen test site, selects the model on
a single-session subject of another site, and trains on the rest; FP trains from scratch and
each quantized setting is fine-tuned from the FP model of the same fold and seed. Dice is the
mean per-slice Dice of the held-out person's full slices on their original grid (the masks
``segment`` writes). Runs are cached in ``benchmarks/results/runs/`` like the paper table's.

    python benchmarks/loso.py                          # FP, W4A6, W4A4-lsq; 3 seeds, ~2 h
    python benchmarks/loso.py --seeds 1 --settings FP W4A6
    python benchmarks/loso.py --scanner-augment 1      # the candidate recipe
    # two processes, two folds each, then the table from the cache:
    OMP_NUM_THREADS=1 python benchmarks/loso.py --people sub-9418 sub-9584 &
    OMP_NUM_THREADS=1 python benchmarks/loso.py --people sub-9604 sub-9709 & wait
    python benchmarks/loso.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import paper_table
from _common import machine, machine_line, update_readme, write_results
from napari_unetquant.config import QuantConfig, QuantizerConfig

GM = paper_table.DATA / "spinal-gm"
PEOPLE = {  # person -> (site, volumes)
    "sub-9418": ("UCL", ("sub-9418",)),
    "sub-9584": ("NWU", ("sub-9584",)),
    "sub-9604": ("Philips", ("sub-9604",)),
    "sub-9709": ("Milan", ("sub-9709Ses1", "sub-9709Ses2")),
}
VALIDATION = {  # held-out person -> the single-session subject of another site that selects
    "sub-9418": "sub-9584",
    "sub-9584": "sub-9604",
    "sub-9604": "sub-9418",
    "sub-9709": "sub-9418",
}


_W4 = QuantizerConfig.from_bits("fixed", 4)
UNSIGNED_ACTS = {  # candidates: activations are ReLU outputs, so no bit need hold a sign
    "W4A6u": QuantConfig(
        weight=_W4, act=QuantizerConfig(method="fixed", bits=6, dynamic_rule="max", signed=False)
    ),
    # the activation format chosen by squared error (clipping rare peaks), unsigned
    "W4A6u-mse": QuantConfig(
        weight=_W4, act=QuantizerConfig(method="fixed", bits=6, dynamic_rule="mse", signed=False)
    ),
    # a learnt power-of-two activation step (LSQ rounded to 2**k): still fixed point, a shift
    "W4A6u-p2": QuantConfig(
        weight=_W4,
        act=QuantizerConfig(method="lsq", bits=6, power_of_two=True, signed=False),
    ),
}


def setting(label: str) -> QuantConfig:
    """``W4A6``-style labels, or a candidate of :data:`UNSIGNED_ACTS`."""
    return UNSIGNED_ACTS.get(label) or QuantConfig.from_label(label)


def _pair(volume: str) -> tuple[str, str]:
    return str(GM / volume / "image.nii.gz"), str(GM / volume / "gm.nii.gz")


def fold(person: str) -> paper_table.Dataset:
    """Train on every other person but the validation subject; test on ``person``."""
    validation = VALIDATION[person]
    train = [v for p, (_, vols) in PEOPLE.items() if p not in (person, validation) for v in vols]
    return paper_table.Dataset(
        name=f"GMloso-{person} (unseen {PEOPLE[person][0]})",
        train=tuple(_pair(v) for v in train),
        validation=(_pair(validation),),
        test=tuple(_pair(v) for v in PEOPLE[person][1]),
        foreground_value=None,
        loss="dice",
        elastic=True,
    )


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    setup = paper_table.Setup(scanner_augment=args.scanner_augment, intensity=args.intensity)
    qat = paper_table.Setup(
        scanner_augment=args.qat_scanner_augment or args.scanner_augment, intensity=args.intensity
    )
    settings = [(label, setting(label)) for label in args.settings]
    seeds = [args.only_seed] if args.only_seed is not None else range(args.seeds)
    results = []
    for seed in seeds:
        for person in args.people:
            dataset = fold(person)
            fp = paper_table._run(dataset, "FP", QuantConfig(), seed, args.fp_steps, None, setup)
            fp["person"] = person
            results.append(fp)
            for label, quant in settings:
                if quant.is_float:
                    continue
                steps, init = args.fine_tune_steps, fp["model"]
                result = paper_table._run(dataset, label, quant, seed, steps, init, qat)
                results.append({**result, "person": person})
    return results


def table(results: list[dict[str, Any]], labels: list[str]) -> list[dict[str, Any]]:
    """Per setting: Dice per unseen person (mean over seeds), their mean and sd, the worst, and
    the points lost against FP person by person."""

    def dice(label: str, person: str) -> float:
        runs = [r["dice_mean"] for r in results if r["row"] == label and r["person"] == person]
        return 100 * statistics.mean(runs)

    rows = []
    seeds = len({r["seed"] for r in results})
    for label in labels:
        per_person = {p: dice(label, p) for p in PEOPLE}
        lost = [dice("FP", p) - per_person[p] for p in PEOPLE]
        rows.append(
            {
                "setting": label,
                "seeds": seeds,
                **per_person,
                "mean": statistics.mean(per_person.values()),
                "sd": statistics.stdev(per_person.values()),
                "worst": min(per_person.values()),
                "points_lost": statistics.mean(lost),
                "most_lost": max(lost),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]], caption: str) -> str:
    heads = [f"{p} ({PEOPLE[p][0]})" for p in PEOPLE]
    lines = [
        "| setting | seeds | " + " | ".join(heads) + " | mean ± sd | worst | points lost "
        "(mean / most) |",
        "|---" * (len(heads) + 5) + "|",
    ]
    for row in rows:
        people = " | ".join(f"{row[p]:.2f}" for p in PEOPLE)
        lines.append(
            f"| {row['setting']} | {row['seeds']} | {people} | {row['mean']:.2f} ± "
            f"{row['sd']:.2f} | {row['worst']:.2f} | {row['points_lost']:+.2f} / "
            f"{row['most_lost']:+.2f} |"
        )
    return "\n".join(lines) + f"\n\n{caption}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only-seed", type=int, help="run one seed (to split over processes)")
    parser.add_argument("--settings", nargs="+", default=["FP", "W4A6", "W4A4-lsq"])
    parser.add_argument(
        "--people", nargs="+", default=list(PEOPLE), choices=list(PEOPLE), help="folds to run"
    )
    parser.add_argument("--fp-steps", type=int, default=2000)
    parser.add_argument("--fine-tune-steps", type=int, default=500)
    parser.add_argument(
        "--scanner-augment", type=float, default=0.0, help="train with this scanner augmentation"
    )
    parser.add_argument(
        "--qat-scanner-augment",
        type=float,
        default=0.0,
        help="scanner augmentation in the quantized fine-tunes only (FP as by default)",
    )
    parser.add_argument(
        "--intensity",
        choices=("slice", "local"),
        default="slice",
        help="intensity normalisation of the FP models (the fine-tunes keep it); 'slice' "
        "reproduces the tables made before 'local' became the default for NIfTI/DICOM",
    )
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    labels = ["FP", *[s for s in args.settings if s != "FP"]]
    results = run(args)
    info = machine()
    recipe = "local z-score (10 mm)" if args.intensity == "local" else "per-slice z-score"
    if args.scanner_augment:
        recipe += f"; scanner augmentation {args.scanner_augment:g}"
    elif args.qat_scanner_augment:
        recipe += f"; scanner augmentation {args.qat_scanner_augment:g} in the quantized fine-tunes"
    argv = [a for a in sys.argv[1:] if a != "--update-readme"]
    command = " ".join(["python benchmarks/loso.py", *argv])
    caption = (
        f"Spinal GM, leave one person out: test on the unseen person (full slices, original "
        f"grid, mean per-slice Dice %), model selected on a single-session subject of another "
        f"site, trained on the rest; FP {args.fp_steps} steps, quantized settings fine-tuned "
        f"{args.fine_tune_steps} steps from the fold's FP model; {recipe}; U-Net base 16. "
        f"{machine_line(info)}. Generated by `{command}`."
    )
    if set(args.people) != set(PEOPLE):
        return  # a part of the folds: the table comes from a run over all of them
    text = markdown(table(results, labels), caption)
    name = "loso" + (f"-scanner{args.scanner_augment:g}" if args.scanner_augment else "")
    name += f"-qat-scanner{args.qat_scanner_augment:g}" if args.qat_scanner_augment else ""
    name += f"-{args.intensity}" if args.intensity != "slice" else ""
    write_results(name, {"machine": info, "results": results}, text)
    print(text)
    if args.update_readme:
        update_readme(name, text)


if __name__ == "__main__":
    main()
