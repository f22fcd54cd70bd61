"""Commands about model files and networks: ``info``, ``export``, ``bits`` and the ``demo``."""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
from dataclasses import asdict
from pathlib import Path

from .. import demo as demo_job
from ..config import SPATIAL_DIMS, UNetConfig
from ..demo import DemoConfig, format_rows
from ..jobs import export_model
from ..jobs.exporting import EXPORT_FORMATS, ONNX_FORMS
from ..model import build_unet
from ..modelio import SegmentationModel, load_model, save_model
from ..packed import LAYOUT_PACKED, file_report, has_quantized_weights
from ..quant import bit_report
from ..recipes import WEIGHT_BITS
from ._options import add_quant_arguments, quant_config_from_args


def add_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    info = commands.add_parser(
        "info", help="layout (packed or float), bits, size and training summary of a model file"
    )
    info.add_argument("--model", required=True)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=run_info)

    export = commands.add_parser(
        "export",
        help="write a packed model file (codes at their bit width), the integer network, or ONNX",
    )
    export.add_argument("--model", required=True)
    export.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="file to write (--format c: a new or empty directory)",
    )
    export.add_argument(
        "--integer",
        action="store_true",
        help="write the integer network for hardware (docs/integer-format.md); = --format integer",
    )
    export.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="packed",
        help="packed (default), integer, onnx: a standard ONNX file for ONNX Runtime or "
        "OpenVINO, the float form for TensorRT (docs/deploying.md), or qonnx: QONNX (Quant "
        "nodes with each layer's bit widths) for FINN and hls4ml, or c: a dependency-free C99 "
        "program of the integer network (docs/deploying.md)",
    )
    export.add_argument(
        "--onnx-form",
        choices=ONNX_FORMS,
        default="auto",
        help="ONNX only: int8 (QLinearConv on the codes; the default for quantized models) or "
        "float (the simulation in float operators; FP models)",
    )
    export.add_argument(
        "--input-size",
        type=_input_size,
        metavar="ROWS[,COLS]",
        help="QONNX only: the graph's static input size in pixels (default 512: one window of "
        "unetquant segment); e.g. 64 for a small FPGA design",
    )
    export.set_defaults(handler=run_export)

    demo = commands.add_parser(
        "demo", help="train FP and W4A6 on a generated EM-like phantom and compare them"
    )
    demo.add_argument("--fp-steps", type=int, default=DemoConfig.fp_steps)
    demo.add_argument("--quant-steps", type=int, default=DemoConfig.quant_steps)
    demo.add_argument("--weight-bits", type=int, default=DemoConfig.weight_bits)
    demo.add_argument("--act-bits", type=int, default=DemoConfig.act_bits)
    demo.add_argument("--seed", type=int, default=DemoConfig.seed)
    demo.add_argument("--out-dir", default=DemoConfig.out_dir, help="where models and the PNG go")
    demo.set_defaults(handler=run_demo)

    bits = commands.add_parser(
        "bits", help="per-layer stored bits and memory of a U-Net at given bit widths"
    )
    add_quant_arguments(bits)
    bits.add_argument("--base-width", type=int, default=UNetConfig.base_width)
    bits.add_argument("--depth", type=int, default=UNetConfig.depth)
    bits.add_argument(
        "--spatial-dims",
        type=int,
        choices=SPATIAL_DIMS,
        default=UNetConfig.spatial_dims,
        help="2D or 3D U-Net",
    )
    bits.set_defaults(handler=run_bits)


def model_summary(path: str) -> dict[str, object]:
    """What ``unetquant info --json`` reports about a model file."""
    return _summary_and_table(path)[0]


def _summary_and_table(path: str) -> tuple[dict[str, object], str]:
    """The JSON summary of a model file and its per-layer table."""
    bundle = load_model(path)
    report = bit_report(bundle.model)
    quant = bundle.quant
    on_disk = file_report(path, bundle.model, bundle.unet)
    mixed = bundle.info.get("weight_bits_per_layer")  # a size budget's allocation
    widths = sorted(set(mixed.values())) if isinstance(mixed, dict) and mixed else None
    summary: dict[str, object] = {
        "label": bundle.info.get("label", quant.label) if widths else quant.label,
        "weight_bits": f"mixed {widths[0]}-{widths[-1]}" if widths else quant.weight.bits,
        "size_budget": bundle.info.get("size_budget"),
        "act_bits": quant.act.bits,
        "quantizer": quant.weight.method if not quant.weight.is_float else quant.act.method,
        "weight_format": quant.weight.format_name,
        "act_format": quant.act.format_name,
        "parameters": sum(p.numel() for p in bundle.model.parameters()),
        "layout": bundle.layout,
        "packed": bundle.layout == LAYOUT_PACKED,
        "file_bytes": on_disk.file_bytes,
        "packed_file_bytes": _packed_bytes(path, bundle),
        "fp32_file_bytes": on_disk.fp32_file_bytes,
        "file_ratio": on_disk.ratio,
        "stored_bytes": report.stored_bytes,
        "fp32_bytes": report.fp32_bytes,
        "mean_weight_bits": report.mean_weight_bits,
        "network": _network_text(bundle.unet),
        "spatial_dims": bundle.unet.spatial_dims,
        "unet": asdict(bundle.unet),
        "preprocess": asdict(bundle.preprocess),
        "inputs": bundle.preprocess.text,
        "training": bundle.info,
        "layers": [asdict(layer) for layer in report.layers],
        "layer_bytes": [asdict(layer) for layer in on_disk.layers],
    }
    if bundle.layout == LAYOUT_PACKED:
        return summary, on_disk.table()
    return summary, (
        f"{report.table()}\nthis file holds float32 weights ({on_disk.file_bytes} bytes); the "
        f"table shows the stored bits 'unetquant export' packs them to"
    )


def _packed_bytes(path: str, bundle: SegmentationModel) -> int | None:
    """The size of the model's packed file: this file's when it is packed, else what
    ``unetquant export`` would write (``None`` when no weight is quantized: nothing to pack)."""
    if bundle.layout == LAYOUT_PACKED:
        return Path(path).stat().st_size
    if not has_quantized_weights(bundle.model):
        return None
    with tempfile.TemporaryDirectory() as folder:
        packed = Path(folder) / "packed.safetensors"
        save_model(packed, bundle, packed=True)
        return packed.stat().st_size


def _file_line(summary: dict[str, object], path: str) -> str:
    """What the file is and its size, against the FP32 file (and the packed file it makes)."""
    size, fp32, packed = (
        summary["file_bytes"],
        summary["fp32_file_bytes"],
        summary["packed_file_bytes"],
    )
    assert isinstance(size, int) and isinstance(fp32, int)
    against = f"the FP32 state_dict file of this network: {fp32 / 1024:.1f} KiB"
    if summary["packed"]:
        return (
            f"packed {summary['label']} (weight codes at their bit width, "
            f"{summary['mean_weight_bits']:.2f} bits per weight on average; BatchNorm folded): "
            f"{size / 1024:.1f} KiB ({size} bytes); {against} ({fp32 / size:.2f}x smaller)"
        )
    holds = "float32 weights, BatchNorm statistics"
    if not isinstance(packed, int):  # full-precision weights: nothing to pack
        return f"float {summary['label']} ({holds}): {size / 1024:.1f} KiB ({size} bytes)"
    return (
        f"float {summary['label']} ({holds}, quantizer state; for fine-tuning): "
        f"{size / 1024:.1f} KiB ({size} bytes); packed: {packed / 1024:.1f} KiB "
        f"(unetquant export --model {path} --out PACKED); {against}"
    )


def _network_text(unet: UNetConfig) -> str:
    """``2D U-Net, base width 16, depth 3`` (and ``, nearest upsampling`` for that variant)."""
    text = f"{unet.spatial_dims}D U-Net, base width {unet.base_width}, depth {unet.depth}"
    return text + (", nearest upsampling" if unet.upsample == "nearest" else "")


def run_info(args: argparse.Namespace) -> int:
    summary, table = _summary_and_table(args.model)
    if args.json:
        print(json.dumps(summary))
        return 0
    keys = ("label", "network", "weight_bits", "act_bits", "quantizer", "parameters", "layout")
    for key in keys:
        print(f"{key:<12}{summary[key]}")
    print(f"{'file':<12}{_file_line(summary, args.model)}")
    if summary["size_budget"] is not None:
        budget = int(str(summary["size_budget"]))
        print(f"{'budget':<12}{budget / 1024:.1f} KiB ({budget} bytes) for the packed file")
    print(f"{'inputs':<12}{summary['inputs']}")
    training = summary["training"]
    assert isinstance(training, dict)
    print(
        f"{'validation':<12}Dice {training.get('validation_dice')} at step "
        f"{training.get('best_step')} of {training.get('steps')}"
    )
    print(table)
    return 0


def _input_size(text: str) -> tuple[int, int]:
    """``64`` or ``64,96``: rows and columns, each at least 1."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"input size {text!r}: give one number of pixels (e.g. 64) or ROWS,COLS (e.g. 64,96)"
        )
    return values[0], values[1]


def run_export(args: argparse.Namespace) -> int:
    if args.integer and args.format not in ("packed", "integer"):
        raise ValueError(f"--integer and --format {args.format} disagree: give one of them")
    if args.onnx_form != "auto" and args.format != "onnx":
        raise ValueError("--onnx-form applies to --format onnx only")
    written = export_model(
        args.model,
        args.out,
        integer=args.integer,
        format=args.format,
        onnx_form=args.onnx_form,
        input_size=args.input_size,
    )
    size = f"{written.file_bytes / 1024:.1f} KiB ({written.file_bytes} bytes)"
    if args.format == "c":
        size = f"weights {size} as constant arrays"
        print(f"wrote {written.path} ({written.layout}): {size}")
        print(f"build: cd {shlex.quote(written.path)} && cc -O2 *.c -lm -o unet")
        print(
            "run: ./unet IN.f32 OUT.u8 HEIGHT WIDTH [--memory] (IN.f32: one slice prepared as "
            "the header of unet.c says)"
        )
        for note in written.notes:
            print(note.replace("the integer path", "--integer"))
        return 0
    if written.ratio >= 1:
        size += (
            f", {written.ratio:.2f}x smaller than the FP32 state_dict file "
            f"({written.fp32_file_bytes} bytes)"
        )
    print(f"wrote {written.path} ({written.layout}): {size}")
    for note in written.notes:
        print(note)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    config = DemoConfig(
        fp_steps=args.fp_steps,
        quant_steps=args.quant_steps,
        weight_bits=args.weight_bits,
        act_bits=args.act_bits,
        seed=args.seed,
        out_dir=args.out_dir,
    )
    print(format_rows(demo_job.run_demo(config)))
    return 0


def run_bits(args: argparse.Namespace) -> int:
    quant = quant_config_from_args(args, default_bits=WEIGHT_BITS)
    unet = UNetConfig(base_width=args.base_width, depth=args.depth, spatial_dims=args.spatial_dims)
    model = build_unet(unet, quant)
    print(f"{quant.label}: {_network_text(unet)}")
    print(bit_report(model).table())
    return 0
