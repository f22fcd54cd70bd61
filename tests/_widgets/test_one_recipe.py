"""The command line and the Train dock build the same run from the same choices: both ask the
core's recipe (``napari_unetquant.recipes``), neither types a training number of its own."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from napari_unetquant.cli import build_parser
from napari_unetquant.cli._options import quant_config_from_args
from napari_unetquant.cli._train import train_config_from_args
from napari_unetquant.config import QuantConfig, TrainConfig
from napari_unetquant.recipes import BATCH_3D, FINE_TUNE_LEARNING_RATE

PLUGIN = "napari-unetquant"
# (dock: quantizer, weight bits, act bits, paper formats; the same choice as CLI options)
CHOICES = [
    (("fixed", 4, 6, False), ["--weight-bits", "4", "--act-bits", "6"]),
    (("lsq", 3, 5, False), ["--quantizer", "lsq", "--weight-bits", "3", "--act-bits", "5"]),
    (("ternary", 4, 6, False), ["--quantizer", "ternary"]),
    (("binary", 8, 8, False), ["--quantizer", "binary"]),
    (("fixed", 4, 6, True), ["--weight-format", "Q0.4", "--act-format", "Q6.0"]),
    (("float", 4, 6, False), []),
]


def _cli(options: list[str], dims: int, fine_tune: bool) -> tuple[QuantConfig, TrainConfig]:
    argv = ["train", "--images", "x.tif", "--labels", "y.tif", "--out", "m.safetensors"]
    argv += [*options, "--steps", "300", "--spatial-dims", str(dims)]
    argv += ["--init", "fp.safetensors"] if fine_tune else []
    args = build_parser().parse_args(argv)
    return quant_config_from_args(args), train_config_from_args(args)


def test_the_dock_and_the_command_line_build_equal_configs(
    make_napari_viewer: Callable[..., Any],
) -> None:
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Train quantized U-Net")
    cases = itertools.product(CHOICES, (2, 3), (False, True))
    for (dock, options), dims, fine_tune in cases:
        widget.quantizer.value, widget.weight_bits.value, widget.act_bits.value = dock[:3]
        widget.paper.value = dock[3]
        widget.network.value, widget.steps.value = dims, 300
        cli_quant, cli_train = _cli(options, dims, fine_tune)
        case = (options, dims, fine_tune)
        assert widget.quant_config() == cli_quant, case
        assert widget.train_config(fine_tune=fine_tune) == cli_train, case
        # and the recipe is what both got: fine-tunes at half the rate, 3D on fewer patches
        assert (cli_train.learning_rate == FINE_TUNE_LEARNING_RATE) == fine_tune, case
        assert (cli_train.batch_size == BATCH_3D) == (dims == 3), case
        assert cli_train.validate_every == 30, case


def test_the_dock_shows_what_the_bits_mean(make_napari_viewer: Callable[..., Any]) -> None:
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Train quantized U-Net")
    widget.quantizer.value, widget.weight_bits.value, widget.act_bits.value = "fixed", 4, 6
    assert widget.format.value.startswith("weights: sign + 3 bits")
    assert widget.weight_bits.enabled
    widget.quantizer.value = "ternary"
    assert "2 stored bits" in widget.format.value and not widget.weight_bits.enabled
    widget.paper.value = True
    assert "Q0.4 (5 stored bits)" in widget.format.value
