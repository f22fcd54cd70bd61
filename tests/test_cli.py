"""The command line, as users and other tools call it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from napari_unetquant.cli import main
from napari_unetquant.demo import DemoConfig, format_rows, run_demo


def test_help_works_through_python_dash_m() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "napari_unetquant", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert "demo" in result.stdout and "bits" in result.stdout


def test_bits_prints_per_layer_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bits", "--weight-bits", "4", "--act-bits", "6", "--base-width", "8"]) == 0
    out = capsys.readouterr().out
    assert "enc2.conv1" in out and "head" in out and "smaller" in out


def test_paper_formats_from_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bits", "--weight-format", "Q0.4", "--act-format", "Q6.0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Q0.4/Q6.0")
    row = next(line for line in out.splitlines() if line.startswith("enc2.conv1"))
    assert row.split()[1:4] == ["4608", "5", "7"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bits", "--weight-bits", "9"], "needs 2 to 8 stored bits, got 9"),
        (["bits", "--weight-format", "Q4"], "not of the form Q<int>.<frac>"),
        (["bits", "--depth", "0"], "depth must be a positive integer"),
        (["demo", "--fp-steps", "0"], "fp_steps must be positive"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_demo_trains_both_models_and_reports_real_bits() -> None:
    rows = run_demo(
        DemoConfig(fp_steps=6, quant_steps=4, base_width=4, crop=32), log=lambda _: None
    )
    fp, quant = rows
    assert (fp.label, quant.label) == ("FP", "W4A6")
    assert fp.mean_weight_bits == 32 and 4 < quant.mean_weight_bits < 5
    assert quant.stored_bytes < fp.stored_bytes == fp.fp32_bytes
    assert all(0.0 <= row.dice_membrane <= 1.0 for row in rows)
    table = format_rows(rows)
    assert "W4A6" in table and "Dice (membranes)" in table
