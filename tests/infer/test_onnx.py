"""The U-Net as ONNX (float and int8 forms) in ONNX Runtime against the PyTorch simulation,
and the engine that runs inference chosen by measurement."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from napari_unetquant.config import InferConfig, QuantConfig, QuantizerConfig, UNetConfig
from napari_unetquant.errors import SettingError
from napari_unetquant.infer import engine
from napari_unetquant.infer.accumulator_grid import off_grid, snap_biases
from napari_unetquant.infer.onnx_graph import export_onnx, onnx_metadata, unet_onnx
from napari_unetquant.model import build_unet
from napari_unetquant.packed import pack_model, packed_network

UNSIGNED_A8 = QuantConfig(
    weight=QuantizerConfig.from_bits("fixed", 4),
    act=QuantizerConfig(method="fixed", bits=8, signed=False),
)
SETTINGS = {
    "FP": QuantConfig(),
    "W4A6": QuantConfig.from_label("W4A6"),
    "W8A8": QuantConfig.from_label("W8A8"),
    "W2A4 lsq": QuantConfig.from_bits(2, 4, "lsq"),
    "W4A8 unsigned": UNSIGNED_A8,
}


def calibrated(
    quant: QuantConfig, seed: int = 0, width: int = 8, depth: int = 3, upsample: str = "bilinear"
) -> torch.nn.Module:
    """A U-Net whose activation formats and BatchNorm statistics were set by a few training
    passes, with BatchNorm scales of both signs and one channel scaled to zero (the int8 form's
    three cases)."""
    torch.manual_seed(seed)
    unet = UNetConfig(base_width=width, depth=depth, upsample=upsample)
    model = build_unet(unet, quant).train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(2, 1, 64, 64))
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.BatchNorm2d) and not name.startswith("enc1"):
                module.weight[::3] *= -1
                module.weight[1] = 0.0
    return model.eval()


def run(proto: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (logits,) = session.run(["logits"], {"image": x.numpy()})
    return np.asarray(logits)


@pytest.mark.parametrize("label", list(SETTINGS))
@pytest.mark.parametrize("form", ["float", "int8"])
def test_both_forms_compute_the_simulation(label: str, form: str) -> None:
    model = calibrated(SETTINGS[label])
    x = torch.randn(2, 1, 61, 83)  # not a multiple of 2**depth: padded and cropped inside
    with torch.no_grad():
        expected = model(x).numpy()
    got = run(unet_onnx(model, form), x)
    assert got.shape == expected.shape
    if form == "float":  # the same arithmetic up to float32 summation order
        assert np.allclose(got, expected, rtol=1e-4, atol=1e-5), np.abs(got - expected).max()
        assert np.mean((got > 0) == (expected > 0)) >= 0.999
    else:  # a code may differ by one where the simulation lies within the bias's rounding
        # error (under 1/500 of a step) of half a step; an untrained network's logits hug 0,
        # so this moves some of its signs (auto checks each model on real data)
        assert np.mean((got > 0) == (expected > 0)) >= 0.98


@pytest.mark.parametrize("label", [k for k in SETTINGS if k != "FP"])
def test_biases_on_the_accumulator_grid_make_the_int8_form_the_simulation(label: str) -> None:
    model = calibrated(SETTINGS[label], seed=1)
    x = torch.randn(2, 1, 61, 83)
    assert off_grid(model) > 0.1
    with torch.no_grad():
        before = model(x).numpy()
    moved = snap_biases(model)
    assert len(moved) >= 8 and off_grid(model) < 1e-3
    with torch.no_grad():
        expected = model(x).numpy()
    # every code now equal: logits up to float32 summation order of the float head
    assert np.allclose(run(unet_onnx(model, "int8"), x), expected, rtol=1e-4, atol=1e-5)
    assert np.mean((before > 0) == (expected > 0)) >= 0.99  # the model barely moved


@pytest.mark.parametrize("form", ["float", "int8"])
def test_nearest_upsampling_exports_as_a_2x2_repeat(form: str) -> None:
    model = calibrated(SETTINGS["W4A6"], upsample="nearest")
    x = torch.randn(1, 1, 45, 70)
    with torch.no_grad():
        expected = model(x).numpy()
    proto = unet_onnx(model, form)
    resizes = [
        {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for node in proto.graph.node
        if node.op_type == "Resize"
    ]
    assert len(resizes) == 3 and all(r["mode"] == b"nearest" for r in resizes)
    got = run(proto, x)
    if form == "float":
        assert np.allclose(got, expected, rtol=1e-4, atol=1e-5), np.abs(got - expected).max()
    else:
        assert np.mean((got > 0) == (expected > 0)) >= 0.98


def test_the_int8_form_runs_quantized_layers_on_codes_and_the_edges_in_float() -> None:
    ops = [node.op_type for node in unet_onnx(calibrated(SETTINGS["W4A6"]), "int8").graph.node]
    assert ops.count("QLinearConv") >= 6  # both convolutions of enc2, enc3, bottleneck, ...
    assert "Conv" in ops  # enc1 and the head stay float, as the model keeps them
    float_ops = [node.op_type for node in unet_onnx(calibrated(SETTINGS["W4A6"])).graph.node]
    assert "QLinearConv" not in float_ops and "QuantizeLinear" in float_ops


def test_a_packed_model_exports_the_same_graph_values() -> None:
    model = calibrated(SETTINGS["W4A6"])
    tensors, layers = pack_model(model)
    packed = packed_network(model.config, SETTINGS["W4A6"], tensors, layers)
    x = torch.randn(1, 1, 64, 64)
    for form in ("float", "int8"):
        assert np.array_equal(run(unet_onnx(model, form), x), run(unet_onnx(packed, form), x))


def test_what_onnx_cannot_express_is_refused_with_the_fix() -> None:
    volumetric = build_unet(UNetConfig(base_width=4, depth=2, spatial_dims=3)).eval()
    with pytest.raises(SettingError, match="2D U-Nets"):
        unet_onnx(volumetric)
    ternary = build_unet(
        UNetConfig(base_width=4, depth=2),
        QuantConfig(
            weight=QuantizerConfig.from_bits("fixed", 4), act=QuantizerConfig("ternary", bits=2)
        ),
    ).eval()
    with pytest.raises(SettingError, match="ternary"):
        unet_onnx(ternary)
    with pytest.raises(ValueError, match="form must be"):
        unet_onnx(calibrated(QuantConfig()), "int4")


def test_export_writes_a_checked_file_with_its_metadata_atomically(tmp_path: Path) -> None:
    model = calibrated(SETTINGS["W4A6"])
    path = tmp_path / "deep" / "w4a6.onnx"
    export_onnx(model, path, "int8", {"threshold": 0.5, "preprocess_text": "z-score"})
    onnx.checker.check_model(str(path))
    metadata = onnx_metadata(path)
    assert metadata["form"] == "int8" and metadata["threshold"] == "0.5"
    assert metadata["preprocess_text"] == "z-score"
    assert sorted(p.name for p in path.parent.iterdir()) == ["w4a6.onnx"]  # no temporary left


def test_auto_measures_the_engines_and_keeps_the_fastest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = calibrated(SETTINGS["W4A6"])
    with caplog.at_level(logging.INFO, logger="napari_unetquant"):
        network, choice = engine.select_engine(model, "auto", (64, 64))
    assert set(choice.milliseconds) == {"pytorch", "onnx-float", "onnx-int8"}
    rejected = choice.reason.partition("; ")[2]  # an engine whose masks differ is timed, not run
    accepted = {k: v for k, v in choice.milliseconds.items() if f"{k} reproduced" not in rejected}
    assert choice.engine == min(accepted, key=accepted.__getitem__)
    assert choice.text in caplog.text and "per 64 x 64 window" in choice.text
    assert engine.select_engine(model, "auto", (64, 64))[0] is network  # measured once
    assert engine.last_choice(model) == choice
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert np.mean((network(x).numpy() > 0) == (model(x).numpy() > 0)) >= 0.999


def test_a_measurement_is_remembered_for_the_next_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = calibrated(SETTINGS["W4A6"])
    snap_biases(model)
    _, first = engine.select_engine(model, "auto", (64, 64))
    record = engine.engine_record()
    assert record.is_file() and record.parent == Path(os.environ["UNETQUANT_CACHE_DIR"])

    def no_race(*_: object) -> None:
        raise AssertionError("raced again")

    engine._CACHE.clear()  # a new process, and a model of the same architecture
    other = calibrated(SETTINGS["W4A6"], seed=3)
    snap_biases(other)
    race = engine._race
    monkeypatch.setattr(engine, "_race", no_race)
    _, again = engine.select_engine(other, "auto", (64, 64))
    assert again.engine == first.engine and "remembered in" in again.text
    assert again.milliseconds == pytest.approx(first.milliseconds)
    with pytest.raises(AssertionError, match="raced again"):  # another window: measured
        engine.select_engine(other, "auto", (32, 32))

    # the int8 form is taken from the record only for a model whose biases are on its grid
    entries = json.loads(record.read_text())
    for entry in entries.values():
        entry["milliseconds"]["onnx-int8"] = 0.001
    record.write_text(json.dumps(entries))
    engine._CACHE.clear()
    assert engine.select_engine(other, "auto", (64, 64))[1].engine == "onnx-int8"
    off = calibrated(SETTINGS["W4A6"], seed=4)
    assert engine.off_grid(off) > engine.GRID_TOLERANCE
    _, choice = engine.select_engine(off, "auto", (64, 64))
    assert choice.engine != "onnx-int8" and "remembered" in choice.text

    # a damaged record costs a measurement, never an error, and is written anew
    record.write_text("{not json")
    engine._CACHE.clear()
    monkeypatch.setattr(engine, "_race", race)
    assert "remembered" not in engine.select_engine(model, "auto", (64, 64))[1].text
    assert json.loads(record.read_text())


def test_named_engines_and_where_only_pytorch_applies() -> None:
    fp = calibrated(QuantConfig())
    assert engine.candidates(fp, "cpu") == ["pytorch", "onnx-float"]  # no codes: no int8 form
    network, choice = engine.select_engine(fp, "onnx-float", (32, 32))
    assert isinstance(network, engine.OnnxRuntimeNetwork) and choice.reason == "asked for"
    with pytest.raises(SettingError, match="cannot run this model here"):
        engine.select_engine(fp, "onnx-int8", (32, 32))
    untrained = build_unet(UNetConfig(base_width=4, depth=2), SETTINGS["W4A6"]).eval()
    network, choice = engine.select_engine(untrained, "auto", (32, 32))
    assert network is untrained and "untrained" in choice.text
    volumetric = build_unet(UNetConfig(base_width=4, depth=2, spatial_dims=3)).eval()
    assert engine.select_engine(volumetric, "auto", (32, 32))[1].engine == "pytorch"
    with pytest.raises(ValueError, match="unknown engine"):
        InferConfig(engine="tensorrt")


def test_the_integer_path_note_says_how_much_slower_and_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert engine.integer_slowdown() > 0
    monkeypatch.setitem(engine._SLOWDOWN, "ratio", 5.0)
    note = engine.integer_note()
    assert note is not None and "5.0x" in note and "int8 dot product" in note
    assert "\n" not in note
    monkeypatch.setitem(engine._SLOWDOWN, "ratio", 1.1)
    assert engine.integer_note() is None
