"""Our sliding-window inference against MONAI's ``sliding_window_inference`` on the same network.

A 1024 x 1024 mosaic of the four ISBI 2012 test slices (so windows of 512 overlap) is
segmented by the paper table's seed-0 FP32 and packed W4A6 models with
``napari_unetquant.infer.predict_probabilities`` (512-pixel tiles, 25% overlap, Gaussian
blending with sigma = tile / 8) and with MONAI's ``sliding_window_inference`` with the same
window, overlap, batch and Gaussian sigma. Interleaved repeats, medians; the probabilities of
the two are compared too. Needs MONAI (``pip install -e '.[benchmarks]'``).

    python benchmarks/sliding_window.py [--repeats 5] [--update-readme]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

import paper_table
from _common import machine, machine_line, update_readme, write_results
from napari_unetquant.config import InferConfig
from napari_unetquant.data.preprocess import zscore
from napari_unetquant.infer import predict_probabilities
from napari_unetquant.modelio import load_model, save_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    try:
        from monai.inferers import sliding_window_inference
    except ImportError as error:
        raise SystemExit(
            f"MONAI is not installed ({error}); pip install -e '.[benchmarks]'"
        ) from None

    em = paper_table._isbi(paper_table.RUNS / "data")
    models = paper_table.ROWS
    fp = paper_table._run(em, "FP", models[0][1], 0, 2000, None, paper_table.Setup())
    quant = next(q for label, q, _ in models if label == "W4A6 fixed")
    w4a6 = paper_table._run(em, "W4A6 fixed", quant, 0, 500, fp["model"], paper_table.Setup())
    slices = tifffile.imread(paper_table.DATA / "isbi2012" / "train-volume.tif")[20:24]
    mosaic = np.block([[slices[0], slices[1]], [slices[2], slices[3]]]).astype(np.float32)
    image = zscore(mosaic[None])  # (1, 1024, 1024), as the models were trained
    config = InferConfig(batch_size=1)  # what segmentation uses on the CPU
    rows = []
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        packed_path = Path(folder) / "w4a6.safetensors"
        save_model(packed_path, load_model(w4a6["model"]), packed=True)
        for label, model in (
            ("FP32", load_model(fp["model"]).model),
            ("W4A6 packed", load_model(packed_path).model),
        ):
            tensor = torch.from_numpy(image[None])

            def ours(m: torch.nn.Module = model) -> np.ndarray:
                return predict_probabilities(m, image, config)

            def monai(m: torch.nn.Module = model, t: torch.Tensor = tensor) -> np.ndarray:
                logits = sliding_window_inference(
                    t,
                    (config.tile, config.tile),
                    config.batch_size,
                    m,
                    overlap=config.overlap,
                    mode="gaussian",
                    sigma_scale=0.125,
                )
                return torch.sigmoid(logits)[0].numpy()

            runs = {"napari-unetquant": ours, "MONAI": monai}
            results = {name: run() for name, run in runs.items()}
            times: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.repeats):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
            medians = {name: statistics.median(values) for name, values in times.items()}
            difference = np.abs(results["napari-unetquant"] - results["MONAI"])
            masks = (results["napari-unetquant"] >= 0.5) == (results["MONAI"] >= 0.5)
            rows.append(
                {
                    "model": label,
                    "ours_ms": round(1000 * medians["napari-unetquant"], 1),
                    "monai_ms": round(1000 * medians["MONAI"], 1),
                    "ratio": round(medians["napari-unetquant"] / medians["MONAI"], 3),
                    "max_probability_difference": float(difference.max()),
                    "mask_agreement": float(masks.mean()),
                }
            )
            print(rows[-1], flush=True)
    info = machine()
    lines = [
        "| model | ours (ms) | MONAI (ms) | ours / MONAI | max abs probability difference "
        "| mask agreement |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ours_ms']} | {r['monai_ms']} | {r['ratio']:.2f} | "
            f"{r['max_probability_difference']:.2g} | {100 * r['mask_agreement']:.3f}% |"
        )
    lines.append("")
    lines.append(
        f"1024 x 1024 mosaic of ISBI test slices, 512-pixel windows, 25% overlap, batch "
        f"{config.batch_size}, Gaussian sigma = window / 8 in both; {args.repeats} interleaved "
        f"repeats; {machine_line(info)}. Generated by `python benchmarks/sliding_window.py`."
    )
    table = "\n".join(lines)
    write_results("sliding_window", {"machine": info, "rows": rows}, table)
    print(table)
    if args.update_readme:
        update_readme("sliding_window", table)


if __name__ == "__main__":
    main()
