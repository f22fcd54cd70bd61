"""Where a quantized U-Net loses on a site it never saw: per subject, seen and unseen.

For each leave-one-person-out fold that ``benchmarks/loso.py`` trained (its cached runs), this
runs the FP and the W4A6 model over every subject's full slices and reports, per subject:

- Dice of FP and W4A6 (mean per slice, %), and the points W4A6 loses;
- the network input after normalisation (1st, 50th, 99th percentile), to see whether another
  scanner puts intensities elsewhere;
- saturation: the share of each quantized layer's input activations beyond its fixed-point
  format's largest value (the worst layer and the mean over layers), the share of non-zero
  activations that round to zero, and the activation steps the formats chose;
- BatchNorm shift: how far each BatchNorm layer's input mean per channel lies from its running
  mean, in running standard deviations (mean over channels, then the worst layer), for FP.

    python benchmarks/loso.py --seeds 1 --settings FP W4A6     # the models first
    python benchmarks/site_gap.py
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

import loso
import paper_table
from _common import RESULTS, machine, machine_line, update_readme, write_results
from napari_unetquant.data.io import read_volume
from napari_unetquant.data.preprocess import network_input
from napari_unetquant.infer import segment_volume
from napari_unetquant.metrics import segmentation_scores
from napari_unetquant.modelio import SegmentationModel, load_model
from napari_unetquant.quant import functional as qf
from napari_unetquant.quant.layers import QuantConvNd
from napari_unetquant.quant.quantizers import FixedPointQuantizer


def _runs(seed: int) -> dict[tuple[str, str], dict[str, Any]]:
    """(person, row) -> the cached run of ``loso.py`` for that fold."""
    found = {}
    for path in sorted(paper_table.RUNS.glob("GMloso-*.json")):
        run = json.loads(path.read_text())
        if run["seed"] == seed and "-scanner" not in path.stem:
            person = run["dataset"].split()[0].removeprefix("GMloso-")
            found[(person, run["row"])] = run
    return found


@contextmanager
def _activation_stats(model: nn.Module) -> Iterator[dict[str, list[float]]]:
    """Per forward pass, the saturated and flushed-to-zero shares of every fixed-point input
    quantizer, and every BatchNorm's input mean shift in running SDs."""
    stats: dict[str, list[float]] = defaultdict(list)
    handles = []
    for name, module in model.named_modules():
        quantizer = getattr(module, "input_quantizer", None)
        if isinstance(module, QuantConvNd) and isinstance(quantizer, FixedPointQuantizer):
            handles.append(module.register_forward_pre_hook(_saturation(name, quantizer, stats)))
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_pre_hook(_shift(name, module, stats)))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def _saturation(name: str, quantizer: FixedPointQuantizer, stats: dict[str, list[float]]) -> Any:
    def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach()
        frac = int(quantizer.frac_bits)
        limit = float(qf.fixed_point_limit(quantizer.magnitude_bits, frac))
        stats[f"sat:{name}"].append(float((x.abs() > limit).float().mean()))
        nonzero = x != 0
        flushed = nonzero & (x.abs() < 2.0 ** (-frac - 1))
        stats[f"zero:{name}"].append(float(flushed.sum() / nonzero.sum().clamp(min=1)))

    return hook


def _shift(name: str, bn: nn.modules.batchnorm._BatchNorm, stats: dict[str, list[float]]) -> Any:
    def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach()
        dims = [d for d in range(x.ndim) if d != 1]
        assert bn.running_mean is not None and bn.running_var is not None
        z = (x.mean(dim=dims) - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
        stats[f"bn:{name}"].append(float(z.abs().mean()))

    return hook


def _subject(bundle: SegmentationModel, volume: str) -> dict[str, Any]:
    image_path, label_path = loso._pair(volume)
    image, truth = read_volume(image_path), read_volume(label_path).array != 0
    with _activation_stats(bundle.model) as stats:
        probabilities = segment_volume(bundle, image, paper_table.SCORING, "cpu")
    dice = segmentation_scores(probabilities >= 0.5, truth).dice_mean
    inputs = network_input(image, bundle.preprocess)
    layers = {key: float(np.mean(values)) for key, values in stats.items()}
    result = {"dice": 100 * dice, "input_percentiles": np.percentile(inputs, [1, 50, 99]).tolist()}
    for kind in ("sat", "zero", "bn"):
        values = {k.split(":", 1)[1]: v for k, v in layers.items() if k.startswith(kind)}
        if values:
            worst = max(values, key=values.__getitem__)
            result[kind] = {
                "mean": float(np.mean(list(values.values()))),
                "worst": worst,
                "worst_value": values[worst],
            }
    return result


def _act_steps(bundle: SegmentationModel) -> str:
    """The activation steps of the quantized layers: ``2 (x8), 1 (x4)``, coarsest first."""
    steps: dict[float, int] = {}
    for module in bundle.model.modules():
        quantizer = getattr(module, "input_quantizer", None)
        if isinstance(module, QuantConvNd) and isinstance(quantizer, FixedPointQuantizer):
            step = 2.0 ** -int(quantizer.frac_bits)
            steps[step] = steps.get(step, 0) + 1
    return ", ".join(f"{step:g} (x{n})" for step, n in sorted(steps.items(), reverse=True))


def _role(person: str, volume: str) -> str:
    if volume in loso.PEOPLE[person][1]:
        return "unseen"
    return "validation" if volume.startswith(loso.VALIDATION[person]) else "train"


def analyse(seed: int) -> list[dict[str, Any]]:
    runs = _runs(seed)
    rows = []
    for person in loso.PEOPLE:
        if (person, "FP") not in runs or (person, "W4A6") not in runs:
            continue
        fp = load_model(runs[(person, "FP")]["model"])
        w4a6 = load_model(runs[(person, "W4A6")]["model"])
        volumes = [v for _, vols in loso.PEOPLE.values() for v in vols]
        for volume in volumes:
            a, b = _subject(fp, volume), _subject(w4a6, volume)
            rows.append(
                {
                    "fold": person,
                    "subject": volume,
                    "role": _role(person, volume),
                    "fp": a["dice"],
                    "w4a6": b["dice"],
                    "lost": a["dice"] - b["dice"],
                    "input_p1_p50_p99": a["input_percentiles"],
                    "saturated": b.get("sat", {}),
                    "flushed": b.get("zero", {}),
                    "bn_shift_fp": a.get("bn", {}),
                    "act_steps": _act_steps(w4a6),
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]], caption: str) -> str:
    lines = [
        "| unseen person (fold) | subject | role | FP Dice | W4A6 Dice | lost | input p1/p50/p99 "
        "| saturated (mean; worst layer) | flushed to 0 (mean) | W4A6 activation steps "
        "| BN shift, FP (mean; worst) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sat, zero, bn = r["saturated"], r["flushed"], r["bn_shift_fp"]
        p = "/".join(f"{v:.2f}" for v in r["input_p1_p50_p99"])
        lines.append(
            f"| {r['fold']} | {r['subject']} | {r['role']} | {r['fp']:.2f} | {r['w4a6']:.2f} "
            f"| {r['lost']:+.2f} | {p} | {100 * sat.get('mean', 0):.3f}%; "
            f"{sat.get('worst', '-')} {100 * sat.get('worst_value', 0):.2f}% "
            f"| {100 * zero.get('mean', 0):.1f}% | {r['act_steps']} | {bn.get('mean', 0):.2f}; "
            f"{bn.get('worst', '-')} {bn.get('worst_value', 0):.2f} |"
        )
    return "\n".join(lines) + f"\n\n{caption}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    rows = analyse(args.seed)
    if not rows:
        raise SystemExit(f"no cached loso runs in {RESULTS / 'runs'}: run benchmarks/loso.py")
    info = machine()
    caption = (
        f"Models of `benchmarks/loso.py` (seed {args.seed}, per-slice z-score); every "
        f"subject's full slices. {machine_line(info)}. "
        f"Generated by `python benchmarks/site_gap.py`."
    )
    text = markdown(rows, caption)
    write_results("site_gap", {"machine": info, "rows": rows}, text)
    print(text)
    if args.update_readme:
        update_readme("site_gap", text)


if __name__ == "__main__":
    main()
