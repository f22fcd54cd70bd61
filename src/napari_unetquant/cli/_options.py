"""What several commands share: the quantization and inference options, and the words the
command line uses for the core's settings."""

from __future__ import annotations

import argparse

from ..config import ENGINES, FLOAT_BITS, METHODS, InferConfig, QuantConfig
from ..recipes import QuantChoice

OPTIONS = {
    "act_bits": "--act-bits",
    "act_format": "--act-format",
    "batch_size": "--batch-size",
    "classes": "--classes",
    "ct_window": "--ct-window",
    "intensity": "--intensity",
    "device": "--device",
    "edge_bits": "--edge-bits",
    "elastic": "--elastic",
    "engine": "--engine",
    "foreground_value": "--foreground-value",
    "init": "--init",
    "input_size": "--input-size",
    "integer": "--integer",
    "labels_dir": "--labels-dir",
    "network": "--base-width/--depth/--spatial-dims/--upsample",
    "out": "--out",
    "out_dir": "--out-dir",
    "processes": "torchrun --nproc_per_node",
    "resume": "--resume",
    "size_budget": "--size-budget",
    "spacing": "--spacing",
    "weight_bits": "--weight-bits",
    "weight_format": "--weight-format",
}
"""The option behind each setting a core error may name (``errors.SETTINGS``)."""


def add_quant_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weight-bits", type=int, help="stored weight bits, sign included (32 = full precision)"
    )
    parser.add_argument(
        "--act-bits", type=int, help="stored activation bits, sign included (32 = full precision)"
    )
    parser.add_argument(
        "--quantizer",
        choices=[m for m in METHODS if m != "float"],
        default="fixed",
        help="fixed (dynamic fixed point; default), lsq (learned step), ternary or binary",
    )
    parser.add_argument("--weight-format", help="paper-style fixed-point weight format, e.g. Q0.4")
    parser.add_argument("--act-format", help="paper-style fixed-point activation format, e.g. Q6.0")
    parser.add_argument(
        "--quantize-edges",
        action="store_true",
        help="also quantize the first block and the last convolution (full precision by default)",
    )
    parser.add_argument(
        "--edge-bits",
        type=int,
        help="quantize the first block and the last convolution to N-bit fixed point instead "
        "(8: an all-integer network for hardware that keeps the edges' precision; "
        "docs/deploying.md)",
    )


def quant_choice(args: argparse.Namespace) -> QuantChoice:
    """The quantization options as the recipe's :class:`QuantChoice`."""
    return QuantChoice(
        quantizer=args.quantizer,
        weight_bits=args.weight_bits,
        act_bits=args.act_bits,
        weight_format=args.weight_format,
        act_format=args.act_format,
        quantize_edges=args.quantize_edges,
        edge_bits=args.edge_bits,
    )


def quant_config_from_args(args: argparse.Namespace, default_bits: int = FLOAT_BITS) -> QuantConfig:
    """The :class:`QuantConfig` the quantization options ask for (bits left out:
    ``default_bits``, or the natural width of ternary and binary)."""
    return quant_choice(args).config(default_bits)


def add_infer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threshold", type=float, default=InferConfig.threshold, help="probability threshold"
    )
    parser.add_argument(
        "--tile", type=int, default=InferConfig.tile, help="sliding-window tile size (px)"
    )
    parser.add_argument(
        "--tile-3d",
        type=int,
        nargs=3,
        default=InferConfig.tile_3d,
        metavar=("SLICES", "ROWS", "COLS"),
        help="sliding-window box of 3D U-Nets",
    )
    add_device_argument(parser)
    parser.add_argument(
        "--integer",
        action="store_true",
        help="run quantized layers on integer codes (int8 kernels, int32 accumulators; CPU): "
        "the bit-exact hardware reference",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default=InferConfig.engine,
        help="what runs the network: auto (the fastest here: measured once per machine and "
        "network, then remembered), pytorch, onnx-float or onnx-int8 (ONNX Runtime)",
    )


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


def infer_config(args: argparse.Namespace) -> InferConfig:
    return InferConfig(
        tile=args.tile,
        tile_3d=tuple(args.tile_3d),
        threshold=args.threshold,
        integer=args.integer,
        engine=args.engine,
    )
