"""Does hls4ml take the quantized U-Net, and bit-exactly? (the hls4ml route to an FPGA)

Two small all-integer U-Nets (base width 8, depth 2, W4A6 with the edge layers quantized too,
trained for 5 steps as in ``tests/infer/test_export.py``), one with bilinear and one with
nearest-neighbour upsampling (``UNetConfig(upsample="nearest")``), are exported by the
project's ``infer.qonnx_graph.unet_qonnx``, converted by hls4ml (Vitis backend) and its C++
emulation compiled with the system ``g++`` (``hls_model.compile()``; no Vivado/Vitis, never
synthesis). On a 64 x 64 input whose values lie on a 2**-10 grid (which the input type holds
exactly) hls4ml's logits and masks are compared with ``IntegerUNet(model)(x)``, the
``--integer`` path.

hls4ml 1.3 has no bilinear resize: its generated config builds the bilinear Resize as a nearest
one (a UserWarning is the only sign), and forcing ``Algorithm: bilinear`` fails in g++. Both
are reported; the run exits 1 unless the nearest U-Net is bit-exact (logits and masks equal).

hls4ml is heavy and pins nothing the project needs, so it runs in its own virtual environment::

    python3 -m venv /tmp/hlsvenv
    /tmp/hlsvenv/bin/pip install torch==2.13.0        # the CPU wheel
    /tmp/hlsvenv/bin/pip install hls4ml==1.3.0 qonnx onnx onnxruntime
    /tmp/hlsvenv/bin/pip install numpy scipy safetensors tifffile nibabel imageio
    /tmp/hlsvenv/bin/pip install -e . --no-deps

    /tmp/hlsvenv/bin/python benchmarks/hls4ml_route.py                  # prints the table
    /tmp/hlsvenv/bin/python benchmarks/hls4ml_route.py --update-readme  # also its README block

Options: ``--io-type io_parallel`` (default ``io_stream``). A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import sys
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnx import helper

from _common import machine, machine_line, update_readme, write_results
from napari_unetquant.config import QuantConfig, UNetConfig
from napari_unetquant.infer.integer import IntegerUNet
from napari_unetquant.infer.qonnx_graph import unet_qonnx
from napari_unetquant.model import build_unet

SIZE = 64
BACKEND = "Vitis"
PRECISION = "fixed<64,24>"
"""hls4ml's default type: the input, biases, BatchNorm and un-quantized intermediates (wide
enough to be exact); the Quant nodes give the activations their own ``ap_fixed`` types."""

CASES = (
    ("bilinear", None),  # hls4ml's generated config
    ("bilinear", "bilinear"),  # Resize forced to bilinear
    ("nearest", None),
)


def small_unet(upsample: str) -> torch.nn.Module:
    torch.manual_seed(0)
    quant = dataclasses.replace(QuantConfig.from_label("W4A6"), edge_layers=())
    model = build_unet(UNetConfig(base_width=8, depth=2, upsample=upsample), quant).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        loss = (model(torch.randn(4, 1, 32, 32)) - 1).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _transpose_below(mw: Any) -> bool:
    """Move one ``Transpose(0,3,1,2)`` that feeds a Resize, or every input of a
    ``Concat(axis=1)``, below that node, which then works on NHWC tensors (Resize scales
    ``[1,2,2,1]``, Concat axis 3). False when there is none left to move."""

    def to_nchw(tensor: str) -> Any:
        node = mw.find_producer(tensor)
        if node is None or node.op_type != "Transpose" or len(mw.find_consumers(tensor)) > 1:
            return None
        return node if list(node.attribute[0].ints) == [0, 3, 1, 2] else None

    for node in mw.graph.node:
        is_concat = node.op_type == "Concat" and node.attribute[0].i == 1
        if node.op_type != "Resize" and not is_concat:
            continue
        slots = range(len(node.input)) if is_concat else [0]
        transposes = [to_nchw(node.input[slot]) for slot in slots]
        if any(t is None for t in transposes):
            continue
        for slot, transpose in zip(slots, transposes, strict=True):
            node.input[slot] = transpose.input[0]
            mw.graph.node.remove(transpose)
        if is_concat:
            node.attribute[0].i = 3
        else:
            scales = mw.get_initializer(node.input[2])[[0, 2, 3, 1]]
            mw.set_initializer(f"{node.name}_scales_nhwc", scales.astype(np.float32))
            node.input[2] = f"{node.name}_scales_nhwc"
        n, c, h, w = mw.get_tensor_shape(node.output[0])
        nhwc = f"{node.output[0]}_nhwc"
        back = helper.make_node(
            "Transpose", [nhwc], [node.output[0]], f"{node.name}_to_nchw", perm=[0, 3, 1, 2]
        )
        mw.graph.node.insert(list(mw.graph.node).index(node) + 1, back)
        node.output[0] = nhwc
        mw.set_tensor_shape(nhwc, [n, h, w, c])
        return True
    return False


def for_hls4ml(proto: Any) -> Any:
    """The exporter's NCHW QONNX graph as hls4ml 1.3's ONNX frontend takes it."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
    from qonnx.util.cleanup import cleanup_model

    mw = ModelWrapper(proto)
    for node in mw.graph.node:
        if node.op_type == "Resize":
            # RoI '': "RuntimeError: Could not find the shape for input "; an empty RoI constant:
            # "ValueError: The truth value of an empty array is ambiguous" (numpy 2)
            mw.set_initializer(f"{node.name}_roi", np.zeros(1, np.float32))
            node.input[1] = f"{node.name}_roi"
    moved = True
    while moved:
        # Conv, BatchNormalization and MaxPool outside qonnx's channels-last domain: "RuntimeError:
        # Please convert the model to channels-last format with qonnx-to-channels-last"
        channels_last = ConvertToChannelsLastAndClean(make_input_channels_last=True)
        mw = cleanup_model(cleanup_model(mw).transform(channels_last))
        # qonnx leaves Resize (and Concat) channels-first between Transposes; hls4ml reads the
        # Resize shapes as NHWC: g++ "error: no matching function for call to
        # 'resize_nearest<...>(hls::stream<...16>&, hls::stream<...32>&)'"
        moved = False
        while _transpose_below(mw):
            moved = True
    return mw


class CompileFailed(Exception):
    """hls4ml's ``compile()`` failed: its exception's text and g++'s first error."""


def _first_error(log: str) -> str:
    return next((line.strip() for line in log.splitlines() if "error:" in line), "")


def run_hls4ml(mw: Any, x: np.ndarray, folder: Path, io_type: str, algorithm: str | None):
    """hls4ml's logits ``(1, classes, H, W)`` for ``x`` ``(1, 1, H, W)`` float32, the
    UserWarnings it gave and its timings; raises with g++'s first error when compilation fails.
    ``algorithm``: the config's ``Algorithm`` of every Resize (None: hls4ml's own)."""
    import hls4ml

    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = hls4ml.utils.config.config_from_onnx_model(
            mw, granularity="name", backend=BACKEND, default_precision=PRECISION
        )
        for layer in config["LayerName"].values():
            if algorithm is not None and "Algorithm" in layer:
                layer["Algorithm"] = algorithm
        model = hls4ml.converters.convert_from_onnx_model(
            mw, output_dir=str(folder), backend=BACKEND, io_type=io_type, hls_config=config
        )
        converted = time.perf_counter()
        try:
            model.compile()
        except Exception as error:  # hls4ml prints g++'s output, then raises a bare Exception
            text = f"{type(error).__name__}: {error}; g++: {_first_error(log.getvalue())}"
            raise CompileFailed(text) from error
        compiled = time.perf_counter()
        nhwc = list(mw.get_tensor_shape(mw.graph.input[0].name)) != list(x.shape)
        y = model.predict(np.ascontiguousarray(x.transpose(0, 2, 3, 1) if nhwc else x))
    out_shape = mw.get_tensor_shape(mw.graph.output[0].name)
    y = np.asarray(y, np.float64).reshape(out_shape)
    if out_shape[-1] != x.shape[-1]:  # an NHWC output
        y = y.transpose(0, 3, 1, 2)
    said = sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)})
    seconds = {"convert_s": converted - start, "compile_s": compiled - converted}
    return y, said, seconds


def measure(upsample: str, algorithm: str | None, folder: Path, io_type: str) -> dict[str, Any]:
    """One row: hls4ml's logits and masks against ``IntegerUNet``, or how hls4ml failed."""
    model = small_unet(upsample)
    rng = np.random.default_rng(0)
    x = (np.round(rng.normal(size=(1, 1, SIZE, SIZE)) * 1024) / 1024).astype(np.float32)
    with torch.no_grad():
        expected = IntegerUNet(model)(torch.from_numpy(x)).double().numpy()
    config = f"{algorithm} (set here)" if algorithm else "nearest (hls4ml's, generated)"
    row: dict[str, Any] = {"upsample": upsample, "algorithm": config}
    try:
        mw = for_hls4ml(unet_qonnx(model, image_size=(SIZE, SIZE)))
        y, said, seconds = run_hls4ml(mw, x, folder, io_type, algorithm)
    except CompileFailed as error:
        return {**row, "ok": False, "error": str(error)}
    except Exception as error:
        return {**row, "ok": False, "error": f"{type(error).__name__}: {error}"}
    difference = np.abs(y - expected)
    return {
        **row,
        "ok": True,
        "warnings": [text for text in said if "Resize" in text or "algorithm" in text],
        "max_abs_diff": float(difference.max()),
        "logits_differing": int((difference > 0).sum()),
        "mask_pixels_differing": int(((y > 0) != (expected > 0)).sum()),
        "pixels": int(expected.size),
        **{key: round(value, 1) for key, value in seconds.items()},
    }


def bit_exact(row: dict[str, Any]) -> bool:
    return row["ok"] and row["logits_differing"] == 0 and row["mask_pixels_differing"] == 0


def markdown(rows: list[dict[str, Any]], info: dict[str, Any], io_type: str) -> str:
    lines = [
        "| U-Net upsampling | Resize `Algorithm` in hls4ml's config | convert + compile | "
        "logits vs `--integer`: max abs diff | logits differing | mask pixels differing | "
        "g++ compile |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        head = f"| {row['upsample']} | {row['algorithm']} |"
        if not row["ok"]:
            lines.append(f"{head} failed: `{row['error']}` | - | - | - | - |")
            continue
        lines.append(
            f"{head} ok | {row['max_abs_diff']:.3g} | {row['logits_differing']} / "
            f"{row['pixels']} | {row['mask_pixels_differing']} / {row['pixels']} | "
            f"{row['compile_s']:.0f} s |"
        )
    said = sorted({text for row in rows for text in row.get("warnings", [])})
    warned = f"`{said[0]}` (one per Resize)" if said else "nothing"
    command = "/tmp/hlsvenv/bin/python benchmarks/hls4ml_route.py" + (
        f" --io-type {io_type}" if io_type != "io_stream" else ""
    )
    return "\n".join(lines) + (
        f"\n\nhls4ml {version('hls4ml')} (qonnx {version('qonnx')}), backend {BACKEND}, "
        f"{io_type}, default precision `{PRECISION}`, on the project's QONNX export "
        "(`unet_qonnx`) of an all-integer W4A6 U-Net (base width 8, depth 2, trained 5 steps), "
        f"a {SIZE} x {SIZE} input on a 2^-10 grid; hls4ml's C++ emulation (g++) against "
        "`IntegerUNet`, the `--integer` path. hls4ml 1.3 implements only a nearest resize: "
        "with its own config it builds the bilinear Resize as nearest, saying only "
        f"{warned}. {machine_line(info)}. Generated by `{command}`."
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--io-type", default="io_stream", choices=["io_stream", "io_parallel"])
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="hls4ml_route_") as folder:
        for index, (upsample, algorithm) in enumerate(CASES):
            rows.append(measure(upsample, algorithm, Path(folder) / f"case{index}", args.io_type))
            print(rows[-1], flush=True)
    info = machine()
    table = markdown(rows, info, args.io_type)
    nearest = next(row for row in rows if row["upsample"] == "nearest")
    payload = {"machine": info, "io_type": args.io_type, "precision": PRECISION, "rows": rows}
    write_results("hls4ml_route", {**payload, "nearest_bit_exact": bit_exact(nearest)}, table)
    print(table)
    if args.update_readme:
        update_readme("hls4ml_route", table)
    return 0 if bit_exact(nearest) else 1


if __name__ == "__main__":
    sys.exit(main())
