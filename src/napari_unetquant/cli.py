"""The ``unetquant`` command line (also ``python -m napari_unetquant``).

A thin shell: parse arguments into configs, call the core, print. User mistakes end with one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .config import METHODS, QuantConfig, QuantizerConfig, UNetConfig

EXIT_USAGE = 2


def _add_quant_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weight-bits", type=int, default=4, help="stored weight bits (32 = FP)")
    parser.add_argument("--act-bits", type=int, default=6, help="stored activation bits (32 = FP)")
    parser.add_argument(
        "--quantizer",
        choices=[m for m in METHODS if m != "float"],
        default="fixed",
        help="fixed (dynamic fixed point), lsq (learned step), ternary or binary",
    )
    parser.add_argument("--weight-format", help="explicit fixed-point weight format, e.g. Q0.4")
    parser.add_argument("--act-format", help="explicit fixed-point activation format, e.g. Q6.0")
    parser.add_argument(
        "--quantize-edges",
        action="store_true",
        help="also quantize the first block and the last convolution (kept FP by default)",
    )


def quant_config_from_args(args: argparse.Namespace) -> QuantConfig:
    """The :class:`QuantConfig` that ``--weight-bits/--act-bits/--quantizer/--*-format`` ask for."""
    fixed_bits = {"ternary": 2, "binary": 1}

    def one(bits: int, name: str | None) -> QuantizerConfig:
        if name:
            return QuantizerConfig.from_format(name)
        bits = fixed_bits.get(args.quantizer, bits)
        return QuantizerConfig.from_bits(args.quantizer, bits)

    edges = () if args.quantize_edges else QuantConfig().edge_layers
    return QuantConfig(
        weight=one(args.weight_bits, args.weight_format),
        act=one(args.act_bits, args.act_format),
        edge_layers=edges,
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, format_rows, run_demo

    config = DemoConfig(
        fp_steps=args.fp_steps,
        quant_steps=args.quant_steps,
        weight_bits=args.weight_bits,
        act_bits=args.act_bits,
        seed=args.seed,
    )
    print(format_rows(run_demo(config)))
    return 0


def _cmd_bits(args: argparse.Namespace) -> int:
    from .model import build_unet
    from .quant import bit_report

    quant = quant_config_from_args(args)
    model = build_unet(UNetConfig(base_width=args.base_width, depth=args.depth), quant)
    print(f"{quant.label}: U-Net base width {args.base_width}, depth {args.depth}")
    print(bit_report(model).table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unetquant",
        description="Quantization-aware training of low-bit fixed-point U-Nets for medical image "
        "segmentation.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="train FP and W4A6 on a generated EM-like phantom and compare them"
    )
    demo.add_argument("--fp-steps", type=int, default=300)
    demo.add_argument("--quant-steps", type=int, default=150)
    demo.add_argument("--weight-bits", type=int, default=4)
    demo.add_argument("--act-bits", type=int, default=6)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_cmd_demo)

    bits = commands.add_parser(
        "bits", help="per-layer stored bits and memory of a U-Net at given bit widths"
    )
    _add_quant_arguments(bits)
    bits.add_argument("--base-width", type=int, default=16)
    bits.add_argument("--depth", type=int, default=3)
    bits.set_defaults(handler=_cmd_bits)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ValueError as error:
        print(f"unetquant {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"unetquant {args.command}: interrupted", file=sys.stderr)
        return 130
