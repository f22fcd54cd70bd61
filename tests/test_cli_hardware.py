"""The hardware routes of docs/deploying.md from the command line: a U-Net with nearest
upsampling and every layer quantized (the variant hls4ml implements), trained with
``unetquant train``, then exported as the integer file, as QONNX and as a C program, each
checked against ``unetquant segment`` (the C program: against ``--integer``, pixel for pixel)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_unetquant.cli import main

pytestmark = pytest.mark.slow


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def all_integer_model(
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fast_train: list[str],
) -> Path:
    """FP with nearest upsampling, then W4A6 with the edge layers quantized too."""
    image, labels = phantom_files
    data = ["train", "--images", str(image), "--labels", str(labels)]
    fp = tmp_path / "fp-nearest.safetensors"
    longer = [*fast_train, "--steps", "80"]  # enough for masks with both classes
    code, _, err = _run([*data, "--out", str(fp), *longer, "--upsample", "nearest"], capsys)
    assert code == 0, err
    model = tmp_path / "w4a6-nearest.safetensors"
    quantized = ["--weight-bits", "4", "--act-bits", "6", "--quantize-edges"]
    argv = [*data, "--out", str(model), "--init", str(fp), *quantized, *longer]
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    return model


def _segment(
    model: Path, image: Path, out: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> np.ndarray:
    command = ["segment", "--model", str(model), "--image", str(image), "--out", str(out)]
    code, _, err = _run([*command, *extra], capsys)
    assert code == 0, err
    return tifffile.imread(out)


def test_nearest_all_integer_model_exports_qonnx_and_a_reproducible_integer_file(
    all_integer_model: Path,
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import onnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    from napari_unetquant.data.io import read_volume
    from napari_unetquant.data.preprocess import network_input
    from napari_unetquant.modelio import load_model

    image, _ = phantom_files
    code, stdout, _ = _run(["info", "--model", str(all_integer_model)], capsys)
    assert code == 0 and "nearest upsampling" in stdout

    integer_file = tmp_path / "net.safetensors"
    command = ["export", "--model", str(all_integer_model), "--out", str(integer_file)]
    code, stdout, _ = _run([*command, "--integer"], capsys)
    assert code == 0 and "all 11 layers are integer: the file is reproducible bit for bit" in stdout

    qonnx_file = tmp_path / "net.qonnx.onnx"
    command = ["export", "--model", str(all_integer_model), "--out", str(qonnx_file)]
    code, stdout, _ = _run([*command, "--format", "qonnx", "--input-size", "64"], capsys)
    assert code == 0 and "(QONNX, input 64 x 64)" in stdout and "smaller" not in stdout
    wrapper = ModelWrapper(str(qonnx_file))
    metadata = {p.key: p.value for p in wrapper.model.metadata_props}
    assert json.loads(metadata["threshold"]) == 0.5 and "64, 64" in metadata["input"]
    resizes = [
        {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for node in wrapper.graph.node
        if node.op_type == "Resize"
    ]
    assert len(resizes) == 2 and all(r["mode"] == b"nearest" for r in resizes)

    pytorch = tmp_path / "pytorch.tif"
    simulated = _segment(all_integer_model, image, pytorch, capsys, "--engine", "pytorch")
    slices = network_input(read_volume(image), load_model(all_integer_model).preprocess)
    source, target = wrapper.graph.input[0].name, wrapper.graph.output[0].name
    outputs = [execute_onnx(wrapper, {source: x[None, None]})[target] for x in slices]
    logits = np.concatenate(outputs)[:, 0]
    probability = 1 / (1 + np.exp(-logits.astype(np.float32)))
    assert 0.05 < simulated.mean() < 0.95  # both classes: a comparison that can fail
    assert np.mean((probability >= 0.5) == simulated) >= 0.9999

    code, _, err = _run([*command, "--input-size", "64"], capsys)
    assert code == 2 and "QONNX export only" in err and "(option --input-size)" in err
    with pytest.raises(SystemExit) as exited:
        main([*command, "--format", "qonnx", "--input-size", "0"])
    assert exited.value.code == 2 and "input size '0'" in capsys.readouterr().err


def test_the_c_export_builds_and_reproduces_segment_integer_pixel_for_pixel(
    all_integer_model: Path,
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The commands docs/deploying.md gives, run as written."""
    from napari_unetquant.data.io import read_volume
    from napari_unetquant.data.preprocess import network_input
    from napari_unetquant.modelio import load_model

    compiler = shutil.which("cc")
    assert compiler, "no C compiler: install gcc (make system-deps does)"
    image, _ = phantom_files
    program = tmp_path / "unet-c"
    command = ["export", "--model", str(all_integer_model), "--out", str(program)]
    code, stdout, err = _run([*command, "--format", "c"], capsys)
    assert code == 0, err
    assert f"build: cd {program} && cc -O2 *.c -lm -o unet" in stdout
    assert "all 11 layers are integer: it reproduces --integer bit for bit" in stdout
    assert sorted(p.name for p in program.iterdir()) == ["unet.c", "unet.h", "weights.c"]
    sources = sorted(str(p) for p in program.glob("*.c"))
    subprocess.run([compiler, "-O2", *sources, "-lm", "-o", str(program / "unet")], check=True)

    expected = _segment(all_integer_model, image, tmp_path / "integer.tif", capsys, "--integer")
    slices = network_input(read_volume(image), load_model(all_integer_model).preprocess)
    for index, x in enumerate(slices):
        source, target = tmp_path / f"slice{index}.f32", tmp_path / f"mask{index}.u8"
        source.write_bytes(x.astype("<f4").tobytes())
        height, width = x.shape
        run = [str(program / "unet"), str(source), str(target), str(height), str(width)]
        subprocess.run(run, check=True)
        mask = np.frombuffer(target.read_bytes(), np.uint8).reshape(height, width)
        assert np.array_equal(mask, expected[index]), index
    assert 0.05 < expected.mean() < 0.95  # both classes: a comparison that can fail

    code, _, err = _run([*command, "--format", "c"], capsys)  # the directory exists now
    assert code == 2 and "(option --out)" in err
