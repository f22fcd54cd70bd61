"""``unetquant train --size-budget``: each quantized layer's weight bits chosen to fit the
packed file in the budget, recorded in the model, and every export keeping the widths."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from napari_unetquant.cli import main
from napari_unetquant.config import QuantConfig
from napari_unetquant.errors import SettingError
from napari_unetquant.infer.integer import IntegerUNet
from napari_unetquant.jobs import TrainJob, train_model
from napari_unetquant.jobs import budget as budget_module
from napari_unetquant.jobs.budget import BudgetPlan, allocated_quant, budget_method, headroom
from napari_unetquant.modelio import load_model, read_metadata
from napari_unetquant.quant import conv_names, resolve_layer_configs
from napari_unetquant.quant.allocation import BIT_CHOICES
from napari_unetquant.recipes import train_config


def _run(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _train(files: tuple[Path, Path], out: Path, *extra: object) -> list[object]:
    return ["train", "--images", files[0], "--labels", files[1], "--out", out, *extra]


@pytest.fixture
def fp_and_w3(
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fast_train: list[str],
) -> tuple[Path, Path]:
    """A tiny FP model, and its uniform W3A6 fine-tune (whose packed size is the budget)."""
    fp, w3 = tmp_path / "fp.safetensors", tmp_path / "w3.safetensors"
    code, _, err = _run(_train(phantom_files, fp, *fast_train), capsys)
    assert code == 0, err
    w3a6 = ["--weight-bits", "3", "--act-bits", "6"]
    code, _, err = _run(_train(phantom_files, w3, "--init", fp, *w3a6, *fast_train), capsys)
    assert code == 0, err
    return fp, w3


def test_a_budgeted_fine_tune_fits_and_records_its_widths(
    fp_and_w3: tuple[Path, Path],
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fast_train: list[str],
) -> None:
    fp, w3 = fp_and_w3
    # a tiny network: the allocation's metadata (under 1 KiB) is a tenth of its file, so the
    # budget gives it that much over the uniform W3 file
    budget = w3.stat().st_size + 1024
    out = tmp_path / "mixed.safetensors"
    options = ["--init", fp, "--act-bits", "6", "--size-budget", budget, *fast_train]
    code, stdout, err = _run(_train(phantom_files, out, *options), capsys)
    assert code == 0, err
    assert f"budget {budget / 1024:.1f} KiB" in stdout and "A6-mixed, packed" in stdout
    assert out.stat().st_size <= budget
    info = read_metadata(out)["info"]
    bits = info["weight_bits_per_layer"]
    bundle = load_model(out)
    # every convolution is allocated: the float edges may stay float (32) or take bits
    assert sorted(bits) == sorted(conv_names(bundle.model))
    assert set(bits.values()) <= {*BIT_CHOICES, 32}
    assert {bits[n] for n in bits if not n.startswith(("enc1.", "head"))} <= set(BIT_CHOICES)
    assert len(set(bits.values())) > 1, "a budget between the uniform sizes mixes widths"
    assert info["size_budget"] == budget and info["init"] == str(fp)
    traces = info["allocation"]["hessian_trace_per_weight"]
    assert sorted(traces) == sorted(bits) and all(np.isfinite(v) for v in traces.values())
    layers = read_metadata(out)["layers"]  # the packed codes are at the chosen widths
    assert {name: layers.get(name, {"bits": 32})["bits"] for name in bits} == bits
    quantized = {name: width for name, width in bits.items() if width != 32}
    assert bundle.quant == allocated_quant(
        QuantConfig.from_bits(8, 6), "fixed", quantized, conv_names(bundle.model)
    )
    resolved = resolve_layer_configs(conv_names(bundle.model), bundle.quant)
    assert {n: w.bits for n, (w, _) in resolved.items()} == bits

    code, stdout, _ = _run(["info", "--model", out], capsys)
    assert code == 0 and f"budget      {budget / 1024:.1f} KiB" in stdout
    assert stdout.splitlines()[0].startswith("label       W") and "mixed" in stdout
    code, stdout, _ = _run(["info", "--model", out, "--json"], capsys)
    summary = json.loads(stdout)
    assert summary["size_budget"] == budget and summary["weight_bits"].startswith("mixed ")


def test_every_export_keeps_the_layer_widths(
    fp_and_w3: tuple[Path, Path],
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fast_train: list[str],
) -> None:
    fp, w3 = fp_and_w3
    out = tmp_path / "mixed.safetensors"
    budget = w3.stat().st_size + 3072  # room for wider layers than the uniform file's
    options = ["--init", fp, "--act-bits", "6", "--edge-bits", "8", "--size-budget", budget]
    code, _, err = _run(_train(phantom_files, out, *options, *fast_train), capsys)
    assert code == 0, err
    bits = read_metadata(out)["info"]["weight_bits_per_layer"]
    assert "head" not in bits and "enc1.conv1" not in bits  # 8-bit edges stay as they are
    layers = read_metadata(out)["layers"]
    assert layers["head"]["bits"] == layers["enc1.conv1"]["bits"] == 8
    bundle = load_model(out)

    image = torch.randn(1, 1, 40, 36, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = bundle.model(image)
        integer = IntegerUNet(bundle.model)(image)
    agreement = ((integer > 0) == (expected > 0)).float().mean()
    assert float(agreement) > 0.99

    integer_file = tmp_path / "mixed.integer.safetensors"
    code, _, err = _run(["export", "--model", out, "--out", integer_file, "--integer"], capsys)
    assert code == 0, err
    from safetensors import safe_open

    with safe_open(str(integer_file), framework="pt") as handle:
        network = json.loads(handle.metadata()["network"])
    widths = {layer["name"]: layer.get("weight_bits") for layer in network["layers"]}
    assert {name: widths[name] for name in bits} == bits

    qonnx_file = tmp_path / "mixed.qonnx"
    code, _, err = _run(
        ["export", "--model", out, "--out", qonnx_file, "--format", "qonnx", "--input-size", 32],
        capsys,
    )
    assert code == 0, err
    graph = onnx.load(str(qonnx_file)).graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for name, width in bits.items():  # the weight Quant node of each layer, at its width
        found = [v for k, v in constants.items() if k.startswith(name) and "bitwidth" in k]
        assert float(width) in {float(v) for v in found}, (name, width, found)

    c_dir = tmp_path / "c"
    code, _, err = _run(["export", "--model", out, "--out", c_dir, "--format", "c"], capsys)
    assert code == 0, err
    build = ["cc", "-O2", "-std=c99", "unet.c", "weights.c", "-lm", "-o", "unet"]
    assert subprocess.run(build, cwd=c_dir, capture_output=True).returncode == 0
    slice_ = image[0, 0].numpy().astype("<f4")
    slice_.tofile(c_dir / "in.f32")
    run = subprocess.run(["./unet", "in.f32", "out.u8", "40", "36"], cwd=c_dir)
    assert run.returncode == 0
    mask = np.fromfile(c_dir / "out.u8", np.uint8).reshape(40, 36)
    probability = torch.sigmoid(integer[0, 0]).numpy()
    assert np.array_equal(mask, (probability >= 0.5).astype(np.uint8))


def test_the_trained_file_is_no_larger_than_its_plan_expects(
    fp_and_w3: tuple[Path, Path], phantom_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """The plan counts the final file's metadata before training (the longest text each
    result can have, a few bytes per layer of headroom): the trained file is at most the size
    it expects, and within that headroom of it (the count is exact, not a loose bound)."""
    fp, w3 = fp_and_w3
    job = TrainJob(
        images=(str(phantom_files[0]),),
        labels=(str(phantom_files[1]),),
        out=str(tmp_path / "mixed.safetensors"),
        quant=QuantConfig.from_bits(8, 6),
        train=replace(
            train_config(fine_tune=True, steps=4), crop=32, batch_size=2, validate_every=2
        ),
        init=str(fp),
        size_budget=w3.stat().st_size + 1024,
    )
    plans: list[BudgetPlan] = []
    original = budget_module.plan_budget

    def recording(*args: Any) -> BudgetPlan:
        plans.append(original(*args))
        return plans[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(budget_module, "plan_budget", recording)
        for _ in train_model(job):
            pass
    (plan,) = plans
    size = Path(job.out).stat().st_size
    slack = headroom(len(conv_names(load_model(job.out).model)))
    assert plan.expected_bytes - slack - 16 <= size <= plan.expected_bytes <= job.size_budget


def test_a_budget_needs_a_model_to_fine_tune_and_no_weight_bits(
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fast_train: list[str],
) -> None:
    out = tmp_path / "m.safetensors"
    code, _, err = _run(_train(phantom_files, out, "--size-budget", "50KiB", *fast_train), capsys)
    assert code != 0 and "full-precision model to start from" in err and "--init" in err
    options = ["--init", out, "--weight-bits", "4", "--size-budget", "50KiB"]
    code, _, err = _run(_train(phantom_files, out, *options), capsys)
    assert code != 0 and "drop --weight-bits" in err
    with pytest.raises(SystemExit):
        main(["train", "--images", "a", "--labels", "b", "--out", "c", "--size-budget", "lots"])
    assert "e.g. 100KiB" in capsys.readouterr().err
    options = ["--init", out, "--act-bits", "6", "--size-budget", "50KiB", "--save-float"]
    code, _, err = _run(_train(phantom_files, out, *options), capsys)
    assert code != 0 and "drop --save-float" in err
    with pytest.raises(SettingError, match="which ternary weights do not have") as error:
        budget_method(QuantConfig.from_bits(2, 2, "ternary"))
    assert error.value.settings == ("size_budget",)
    with pytest.raises(SettingError, match="leave the weight format out") as error:
        budget_method(QuantConfig.paper())
    assert error.value.settings == ("size_budget", "weight_format")
    assert not out.exists()
    with pytest.raises(ValueError, match="positive size"):
        TrainJob(images=("a",), labels=("b",), out="c", init="d", size_budget=0)


def test_a_budget_below_the_smallest_file_says_how_small_it_can_be(
    fp_and_w3: tuple[Path, Path],
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fast_train: list[str],
) -> None:
    fp, w3 = fp_and_w3
    out = tmp_path / "small.safetensors"
    options = ["--init", fp, "--act-bits", "6", "--size-budget", "6KiB", *fast_train]
    code, _, err = _run(_train(phantom_files, out, *options), capsys)
    assert code != 0
    assert "is below the smallest file of this network with 2-bit weights" in err
    assert "(option --size-budget)" in err and not out.exists()
    options = ["--init", w3, "--act-bits", "6", "--size-budget", "60KiB", *fast_train]
    code, _, err = _run(_train(phantom_files, out, *options), capsys)
    assert code != 0 and "sensitivity on a full-precision model" in err and not out.exists()


def test_headroom_grows_with_the_layers() -> None:
    assert headroom(2) < headroom(20) and headroom(0) >= 8
