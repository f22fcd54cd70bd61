"""The C export, compiled with the system's C compiler and run: its masks equal
``unetquant segment --integer``'s pixel for pixel, its logits the integer network's (bit for bit
where every layer is integer), and the memory it reports is what :func:`c_memory` computes."""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_unetquant.config import (
    InferConfig,
    LayerOverride,
    QuantConfig,
    QuantizerConfig,
    UNetConfig,
)
from napari_unetquant.errors import SettingError
from napari_unetquant.infer.export_c import CExport, c_memory, export_c, pack_codes
from napari_unetquant.infer.integer import IntegerUNet
from napari_unetquant.model import build_unet

_W4A6 = QuantConfig.from_label("W4A6")
CONFIGS = {  # name: (quantization, every layer integer); ``nearest`` names upsample so
    "W4A6-int": (dataclasses.replace(_W4A6, edge_layers=()), True),
    "W8A8-int": (dataclasses.replace(QuantConfig.from_label("W8A8"), edge_layers=()), True),
    "W3A4-lsq-int": (dataclasses.replace(QuantConfig.from_label("W3A4-lsq"), edge_layers=()), True),
    "Q0.4/Q6.0-int": (
        dataclasses.replace(QuantConfig.from_label("Q0.4/Q6.0"), edge_layers=()),
        True,
    ),
    "W4A6-float-edges": (_W4A6, False),
    # quantized inputs, float weights: codes turned into values, float upsampling sources
    "W4A6-float-weights": (
        dataclasses.replace(_W4A6, overrides=(LayerOverride("*.conv2", weight=QuantizerConfig()),)),
        False,
    ),
    # quantized weights, float inputs: a float layer fed by integer layers' float results
    "W4A6-float-inputs": (
        dataclasses.replace(_W4A6, overrides=(LayerOverride("dec1.conv1", act=QuantizerConfig()),)),
        False,
    ),
    "W4A6-nearest-int": (dataclasses.replace(_W4A6, edge_layers=()), True),
    "W4A6-nearest-float-weights": (
        dataclasses.replace(_W4A6, overrides=(LayerOverride("*.conv2", weight=QuantizerConfig()),)),
        False,
    ),
    # multi-class: three output channels, the label map in the values of ``CLASSES``
    "W4A6-int-classes": (dataclasses.replace(_W4A6, edge_layers=()), True),
    "W4A6-float-edges-classes": (_W4A6, False),
}
CLASSES = (2, 7)
"""The label values of the multi-class models' channels 1 and 2 (what ``info["classes"]``
names)."""


@functools.cache
def _float_weights(out_classes: int = 1) -> dict[str, torch.Tensor]:
    """A small float U-Net trained to segment bright pixels (masks with both classes), or
    bright and dark pixels (three channels)."""
    torch.manual_seed(0)
    config = UNetConfig(base_width=4, depth=2, out_classes=out_classes)
    model = build_unet(config, QuantConfig.from_label("FP"))
    _train(model.train(), steps=25, lr=2e-2)
    return model.state_dict()


def _train(model: torch.nn.Module, steps: int, lr: float) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend on a busy machine
    try:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(steps):
            image = torch.randn(4, 1, 32, 32)
            logits = model(image)
            if logits.shape[1] == 1:
                loss = F.binary_cross_entropy_with_logits(logits, (image > 0.3).float())
            else:
                classes = (image > 0.3).long() + 2 * (image < -0.3).long()  # bright, dark
                loss = F.cross_entropy(logits, classes[:, 0])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)


def _model(quant: QuantConfig, upsample: str = "bilinear", out_classes: int = 1) -> torch.nn.Module:
    """The float U-Net's weights, quantized by ``quant`` and fine-tuned for two steps (which
    also chooses the activation formats and learned steps)."""
    torch.manual_seed(1)
    config = UNetConfig(base_width=4, depth=2, upsample=upsample, out_classes=out_classes)
    model = build_unet(config, quant)
    # the quantizers' state is new
    model.load_state_dict(_float_weights(out_classes), strict=False)
    _train(model.train(), steps=2, lr=1e-3)
    return model.eval()


def _compiler() -> str:
    compiler = shutil.which("cc")
    if compiler is None:
        pytest.fail("no C compiler: the C export's tests need `cc` on PATH (install gcc)")
    return compiler


@dataclasses.dataclass
class Program:
    model: torch.nn.Module
    export: CExport
    all_integer: bool
    classes: tuple[int, ...] | None  # a multi-class model's label values

    @property
    def directory(self) -> Path:
        return Path(self.export.directory)

    def run(
        self, image: np.ndarray, *extra: str, out: str = "out.u8"
    ) -> subprocess.CompletedProcess[str]:
        image.astype("<f4").tofile(self.directory / "in.f32")
        height, width = image.shape
        command = ["./unet", "in.f32", out, str(height), str(width), *extra]
        environment = {**os.environ, "UNET_LOGITS": "logits.f32"}
        return subprocess.run(
            command, cwd=self.directory, capture_output=True, text=True, env=environment
        )

    def outputs(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The program's mask (or label map) and logits ``(C, H, W)`` for ``image``."""
        result = self.run(image)
        assert result.returncode == 0, result.stderr
        shape = image.shape
        mask = np.fromfile(self.directory / "out.u8", np.uint8).reshape(shape)
        logits = np.fromfile(self.directory / "logits.f32", np.float32).reshape((*shape, -1))
        return mask, logits.transpose(2, 0, 1)  # written channels last


@pytest.fixture(scope="module", params=list(CONFIGS))
def program(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Program:
    quant, all_integer = CONFIGS[request.param]
    upsample = "nearest" if "nearest" in request.param else "bilinear"
    classes = CLASSES if request.param.endswith("-classes") else None
    model = _model(quant, upsample, 1 if classes is None else len(classes) + 1)
    directory = tmp_path_factory.mktemp("c") / "unet"
    info: dict[str, object] = {"label": quant.label, "source": "model.pt"}
    if classes is not None:
        info["classes"] = list(classes)
    export = export_c(model, directory, info)
    command = [_compiler(), "-O2", "-std=c99", "-Wall", "-Wextra", "-Werror", *export.files]
    build = subprocess.run(
        [*command, "-lm", "-o", "unet"], cwd=directory, capture_output=True, text=True
    )
    assert build.returncode == 0, build.stderr  # no warnings either (-Werror)
    return Program(model, export, all_integer, classes)


def _cli_mask(program: Program, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``unetquant segment --integer``'s decision on one window, and the integer network's
    logits ``(C, H, W)``: the sigmoid (float32) at the threshold, or the label value of the
    channel with the largest logit."""
    logits = IntegerUNet(program.model)(torch.from_numpy(image)[None, None])[0]
    if program.classes is None:
        probability = torch.sigmoid(logits[0]).numpy()
        return (probability >= InferConfig().threshold).astype(np.uint8), logits.numpy()
    values = np.array([0, *program.classes], np.uint8)
    return values[logits.argmax(dim=0).numpy()], logits.numpy()


@pytest.mark.parametrize("shape", [(37, 50), (1, 1), (6, 67)])
def test_masks_equal_the_integer_network(program: Program, shape: tuple[int, int]) -> None:
    image = np.random.default_rng(shape[1]).normal(size=shape).astype(np.float32)
    expected_mask, expected_logits = _cli_mask(program, image)
    mask, logits = program.outputs(image)
    assert logits.shape == (1 if program.classes is None else 3, *shape)
    assert np.array_equal(mask, expected_mask)
    if program.all_integer:  # integer arithmetic throughout: the same float32 logits
        assert np.array_equal(logits, expected_logits)
    else:  # float32 layers: PyTorch's summation order differs
        np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5)
    if shape == (37, 50):
        present = np.unique(mask).tolist()
        assert present == ([0, 1] if program.classes is None else [0, *program.classes])
        for value in present:  # every class covers part of the image
            assert 0.02 < (mask == value).mean() < 0.98


DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include "unet.h"

/* driver IN.f32 OUT.u8 HEIGHT WIDTH: unet_segment's mask, and its status on stdout */
int main(int argc, char **argv)
{
    if (argc != 5)
        return 2;
    int height = atoi(argv[3]), width = atoi(argv[4]);
    size_t count = (size_t)height * width;
    float *slice = malloc(count * sizeof(float));
    unsigned char *mask = calloc(count, 1);
    FILE *in = fopen(argv[1], "rb");
    if (slice == NULL || mask == NULL || in == NULL)
        return 3;
    if (fread(slice, sizeof(float), count, in) != count)
        return 3;
    fclose(in);
    printf("%d\n", unet_segment(slice, height, width, mask));
    FILE *out = fopen(argv[2], "wb");
    if (out == NULL || fwrite(mask, 1, count, out) != count || fclose(out) != 0)
        return 4;
    free(slice);
    free(mask);
    return 0;
}
"""


def test_the_library_entry_computes_the_programs_mask(program: Program) -> None:
    """Built without its command line (-DUNET_NO_MAIN, no warning), ``unet_segment`` gives
    the program's mask, and refuses a non-finite value without touching the mask."""
    (program.directory / "driver.c").write_text(DRIVER)
    flags = [_compiler(), "-O2", "-std=c99", "-Wall", "-Wextra", "-Werror", "-DUNET_NO_MAIN"]
    command = [*flags, *program.export.files, "driver.c", "-lm", "-o", "library"]
    build = subprocess.run(command, cwd=program.directory, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    image = np.random.default_rng(4).normal(size=(37, 50)).astype(np.float32) * 2
    expected, _ = program.outputs(image)

    def library(values: np.ndarray) -> tuple[str, np.ndarray]:
        values.astype("<f4").tofile(program.directory / "lib.f32")
        run = ["./library", "lib.f32", "lib.u8", *map(str, values.shape)]
        result = subprocess.run(run, cwd=program.directory, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        mask = np.fromfile(program.directory / "lib.u8", np.uint8).reshape(values.shape)
        return result.stdout.strip(), mask

    status, mask = library(image)
    assert status == "0" and np.array_equal(mask, expected)
    assert len(np.unique(expected)) == (2 if program.classes is None else 3)
    image[5, 7] = np.nan
    status, mask = library(image)
    assert status == "-2" and not mask.any()


def test_memory_report_equals_c_memory(program: Program) -> None:
    for height, width in [(37, 50), (64, 24)]:
        image = np.zeros((height, width), np.float32)
        result = program.run(image, "--memory")
        assert result.returncode == 0, result.stderr
        report = dict(line.split() for line in result.stdout.splitlines())
        expected = c_memory(program.export.description, height, width)
        assert int(report["weight_bytes"]) == expected.weight_bytes == program.export.weight_bytes
        assert int(report["peak_activation_bytes"]) == expected.peak_activation_bytes


def test_wrong_input_size_fails_without_output(program: Program) -> None:
    image = np.zeros((10, 12), np.float32)
    image.astype("<f4").tofile(program.directory / "in.f32")
    result = subprocess.run(
        ["./unet", "in.f32", "bad.u8", "10", "13"],
        cwd=program.directory,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "fewer than HEIGHT * WIDTH" in result.stderr
    assert not (program.directory / "bad.u8").exists()
    assert not (program.directory / "bad.u8.tmp").exists()
    result = program.run(np.zeros((10, 12), np.float32), "--memory", "extra", out="bad.u8")
    assert result.returncode == 2 and "usage" in result.stderr
    assert not (program.directory / "bad.u8").exists()


def test_bad_arguments_and_values_fail(program: Program) -> None:
    directory = program.directory

    def run(*arguments: str) -> subprocess.CompletedProcess[str]:
        command = ["./unet", "in.f32", "error.u8", *arguments]
        return subprocess.run(command, cwd=directory, capture_output=True, text=True)

    np.zeros((4, 4), "<f4").tofile(directory / "in.f32")
    for size in (["0", "4"], ["4", "x"], ["-4", "4"], ["4"]):
        result = run(*size)
        assert result.returncode == 2
        assert "HEIGHT and WIDTH" in result.stderr or "usage" in result.stderr
    result = run("2", "4")
    assert result.returncode == 1 and "more than HEIGHT * WIDTH" in result.stderr
    np.array([[1.0, np.nan], [0.0, 0.0]], "<f4").tofile(directory / "in.f32")
    result = run("2", "2")
    assert result.returncode == 1 and "not a finite number" in result.stderr
    (directory / "in.f32").unlink()
    result = run("2", "2")
    assert result.returncode == 1 and "cannot open in.f32" in result.stderr
    assert not (directory / "error.u8").exists() and not (directory / "error.u8.tmp").exists()


def test_header_documents_the_model(program: Program) -> None:
    text = (program.directory / "unet.c").read_text()
    header = text[: text.index("*/")]
    assert "U-Net from model.pt" in header and "./unet IN.f32 OUT.u8 HEIGHT WIDTH" in header
    assert "low nibble" in header
    assert "--memory" in header and "enc2.conv1" in header
    unet_h = (program.directory / "unet.h").read_text()
    if program.classes is None:
        assert "sigmoid(logit) >= 0.5" in header and "UNET_THRESHOLD 0.5" in unet_h
        assert "unet_label_values" not in unet_h
    else:
        assert "channel 1: 2, channel 2: 7" in " ".join(header.split())
        assert "UNET_OUT_CHANNELS 3" in unet_h and "UNET_THRESHOLD" not in unet_h
        assert "unet_label_values[UNET_OUT_CHANNELS] = {0, 2, 7}" in text


# --- packing and refusals --------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(2, 9))
def test_packed_codes_round_trip(bits: int) -> None:
    codes = np.random.default_rng(bits).integers(-(2 ** (bits - 1)), 2 ** (bits - 1), 101)
    packed = np.frombuffer(pack_codes(codes, bits), np.uint8)
    assert len(packed) == -(-101 * bits // 8)
    stream = np.unpackbits(packed, bitorder="little")[: 101 * bits].reshape(101, bits)
    raw = (stream.astype(np.int64) << np.arange(bits)).sum(axis=1)
    assert np.array_equal(np.where(raw >= 2 ** (bits - 1), raw - 2**bits, raw), codes)


def test_packing_bit_order() -> None:
    assert pack_codes(np.array([1, -2]), 4) == bytes([0xE1])  # first code in the low nibble
    assert pack_codes(np.array([-1, 0, 1]), 3) == bytes([0b01000111, 0b0])
    with pytest.raises(ValueError, match="do not fit 3 signed bits"):
        pack_codes(np.array([4]), 3)


def test_export_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    model = _model(QuantConfig.from_label("W4A6"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(SettingError, match="not an empty directory") as error:
        export_c(model, tmp_path / "taken")
    assert error.value.settings == ("out",) and "--" not in str(error.value)
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    export = export_c(model, tmp_path / "empty")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == sorted(export.files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "taken"]  # no leftovers


def test_export_refuses_what_c_cannot_run(tmp_path: Path) -> None:
    quant = QuantConfig.from_label("W4A6")
    volume = build_unet(UNetConfig(base_width=4, depth=2, spatial_dims=3), quant)
    with pytest.raises(SettingError, match="2D U-Nets only; this model is 3D") as error:
        export_c(volume, tmp_path / "a")
    assert error.value.settings == () and "--" not in str(error.value)
    classes = build_unet(UNetConfig(base_width=4, depth=2, out_classes=3), quant)
    with pytest.raises(SettingError, match=r"label values \[2, 300\] do not all fit 1 to 255"):
        export_c(classes, tmp_path / "b", {"classes": [2, 300]})
    with pytest.raises(SettingError, match=r"names 1 classes .* 3 output channels"):
        export_c(classes, tmp_path / "b1", {"classes": [2]})
    channels = build_unet(UNetConfig(base_width=4, depth=2, in_channels=2), quant)
    with pytest.raises(SettingError, match="2 input channel"):
        export_c(channels, tmp_path / "b2")
    full_precision = _model(QuantConfig.from_label("FP"))
    with pytest.raises(SettingError, match="no layer with quantized weights and activations") as no:
        export_c(full_precision, tmp_path / "c")
    assert no.value.settings == ("weight_bits", "act_bits")
    assert list(tmp_path.iterdir()) == []


def test_c_memory_needs_the_c_choices(program: Program) -> None:
    description = program.export.description
    plain = {**description, "layers": [dict(layer) for layer in description["layers"]]}
    for layer in plain["layers"]:
        layer["outputs"] = [
            {k: v for k, v in o.items() if k != "storage"} for o in layer["outputs"]
        ]
    with pytest.raises(ValueError, match="lacks the C program's storage choices"):
        c_memory(plain, 32, 32)
    with pytest.raises(ValueError, match="at least 1"):
        c_memory(description, 0, 32)
