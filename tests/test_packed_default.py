"""A quantized model is saved small by default: ``unetquant train --out`` writes the packed file
for quantized weights (``--save-float`` the float one), packed files fine-tune (``--init``, the
sweep), and ``segment``, ``evaluate``, ``info`` and the demo work with them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import torch
from safetensors.torch import load_file

from napari_unetquant.cli import main
from napari_unetquant.config import QuantConfig, TrainConfig, UNetConfig
from napari_unetquant.model import build_unet
from napari_unetquant.modelio import SegmentationModel, load_model, read_metadata, save_model
from napari_unetquant.quant.layers import QuantConvNd

W4A6 = ["--weight-bits", "4", "--act-bits", "6"]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _train(files: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--images",
        str(files[0]),
        "--labels",
        str(files[1]),
        "--out",
        str(out),
        *extra,
    ]


def _segment(
    model: Path, image: Path, out: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> np.ndarray:
    command = ["segment", "--model", str(model), "--image", str(image), "--out", str(out)]
    code, _, err = _run([*command, *extra], capsys)
    assert code == 0, err
    return np.asarray(tifffile.imread(out))


@pytest.fixture
def fp_file(
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fast_train: list[str],
) -> Path:
    out = tmp_path / "fp.safetensors"
    code, stdout, err = _run(_train(phantom_files, out, *fast_train), capsys)
    assert code == 0, err
    assert "(FP, float, " in stdout and " KiB" in stdout
    assert read_metadata(out)["layout"] == "state_dict"  # full precision: the float file
    return out


@pytest.fixture
def packed_file(
    fp_file: Path,
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fast_train: list[str],
) -> Path:
    out = tmp_path / "w4a6.safetensors"
    code, stdout, err = _run(
        _train(phantom_files, out, "--init", str(fp_file), *W4A6, *fast_train), capsys
    )
    assert code == 0, err
    assert "(W4A6, packed, " in stdout and " KiB" in stdout
    return out


def test_quantized_training_writes_the_packed_file_unless_asked_for_the_float_one(
    packed_file: Path,
    fp_file: Path,
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fast_train: list[str],
) -> None:
    assert read_metadata(packed_file)["layout"] == "packed"
    assert load_model(packed_file).quant.label == "W4A6"
    float_file = tmp_path / "w4a6-float.safetensors"
    argv = _train(
        phantom_files, float_file, "--init", str(fp_file), *W4A6, "--save-float", *fast_train
    )
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    assert "(W4A6, float, " in stdout
    assert read_metadata(float_file)["layout"] == "state_dict"
    assert packed_file.stat().st_size < float_file.stat().st_size / 2
    # the same training run, written two ways: the same masks
    image = phantom_files[0]
    packed_mask = _segment(packed_file, image, tmp_path / "packed.tif", capsys)
    float_mask = _segment(float_file, image, tmp_path / "float.tif", capsys)
    assert np.array_equal(packed_mask, float_mask)
    assert not Path(f"{packed_file}.resume").exists()  # a finished run leaves no checkpoint


def test_the_option_is_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--save-float" in text and "packed (codes at their bit width, small)" in text
    assert "a float or a packed model file" in text


def _checkpoint_model(resume: Path, like: SegmentationModel) -> SegmentationModel:
    """The float model in a resume checkpoint: its best weights in the network of ``like``."""
    best = {
        k[len("best.") :]: v for k, v in load_file(str(resume)).items() if k.startswith("best.")
    }
    model = build_unet(like.unet, like.quant)
    model.load_state_dict(best, strict=True)
    return SegmentationModel(model.eval(), like.unet, like.quant, like.preprocess, dict(like.info))


def test_the_packed_file_segments_like_the_float_model_in_the_checkpoint(
    phantom_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from napari_unetquant.jobs import TrainJob, train_model
    from napari_unetquant.train import ValidationEvent

    image, labels = phantom_files
    out = tmp_path / "w4a6.safetensors"
    job = TrainJob(
        images=(str(image),),
        labels=(str(labels),),
        out=str(out),
        quant=QuantConfig.from_bits(4, 6),
        unet=UNetConfig(base_width=4, depth=2),
        train=TrainConfig(steps=6, batch_size=2, crop=32, validate_every=2),
    )
    for event in train_model(job):  # interrupted after a validation: the checkpoint stays
        if isinstance(event, ValidationEvent) and event.step == 4:
            break
    resume = Path(f"{out}.resume")
    assert resume.exists() and read_metadata(out)["layout"] == "packed"
    packed = load_model(out)
    float_file = tmp_path / "from-checkpoint.safetensors"
    save_model(float_file, _checkpoint_model(resume, packed))
    assert read_metadata(float_file)["layout"] == "state_dict"
    assert out.stat().st_size < float_file.stat().st_size / 2

    masks = {
        name: _segment(model, image, tmp_path / f"{name}.tif", capsys, *extra)
        for name, model, extra in [
            ("float", float_file, []),
            ("packed", out, []),
            ("float-integer", float_file, ["--integer"]),
            ("packed-integer", out, ["--integer"]),
        ]
    }
    assert np.array_equal(masks["packed"], masks["float"])  # fake-quant == packed, bit for bit
    assert np.array_equal(masks["packed-integer"], masks["float-integer"])
    evaluate = ["evaluate", "--images", str(image), "--labels", str(labels), "--json"]
    scores = [
        json.loads(_run([*evaluate, "--model", str(model)], capsys)[1])["dice_mean"]
        for model in (out, float_file)
    ]
    assert scores[0] == scores[1]


def _codes(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.endswith(".weight.codes")}


def test_init_from_a_packed_file_fine_tunes(
    packed_file: Path,
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "again.safetensors"
    argv = _train(phantom_files, out, "--init", str(packed_file), *W4A6, "--steps", "4")
    argv += ["--crop", "32", "--batch-size", "2", "--validate-every", "2", "--lr", "0.05"]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    assert "validation Dice" in err and "(W4A6, packed, " in stdout
    info = json.loads(_run(["info", "--model", str(out), "--json"], capsys)[1])
    assert info["training"]["init"] == str(packed_file) and info["packed"] is True
    assert info["training"]["steps"] >= 2
    before, after = _codes(packed_file), _codes(out)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained further
    # the fine-tuned model keeps what its source was trained with
    code, _, err = _run([*argv, "--base-width", "8"], capsys)
    assert code == 2 and "was trained with network" in err and "leave these unset" in err


# --- unpacking ---------------------------------------------------------------------------------


def _with_statistics(quant: QuantConfig) -> SegmentationModel:
    """A small network after a few training steps, on inputs far from unit variance (so that
    BatchNorm statistics matter)."""
    unet = UNetConfig(base_width=4, depth=2)
    model = build_unet(unet, quant).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(6):
        loss = model(3 * torch.randn(4, 1, 32, 32) + 1).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return SegmentationModel(model.eval(), unet, quant)


EXACT = ["W4A6", "W3A5", "Q0.4/Q6.0", "W4A4-lsq", "W3A6-lsq", "FP"]


@pytest.mark.parametrize("label", [*EXACT, "ternary", "binary"])
def test_unpacking_reproduces_the_quantized_weights_and_outputs(label: str, tmp_path: Path) -> None:
    from napari_unetquant.modelio import unpacked

    bundle = _with_statistics(QuantConfig.from_label(label))
    path = tmp_path / "packed.safetensors"
    save_model(path, bundle, packed=True)
    packed = load_model(path)
    trainable = unpacked(packed)
    assert trainable.layout == "state_dict" and trainable.quant == packed.quant
    x = 3 * torch.randn(2, 1, 36, 44) + 1
    with torch.no_grad():
        expected = packed.model(x)
        outputs = trainable.model(x)
        for name, layer in trainable.model.named_modules():
            if isinstance(layer, QuantConvNd):
                source = packed.model.get_submodule(name)
                assert isinstance(source, QuantConvNd)
                mine, theirs = layer.quantized_weight(), source.quantized_weight()
                if label in EXACT:
                    assert torch.equal(mine, theirs), name
                else:  # ternary and binary scales are a mean of the weights, to rounding
                    torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=0)
    if label in EXACT:
        assert torch.equal(outputs, expected)
    else:
        torch.testing.assert_close(outputs, expected, rtol=1e-5, atol=1e-5)
    again = tmp_path / "float.safetensors"
    save_model(again, trainable)  # a float model file again (no folded BatchNorm)
    assert load_model(again).layout == "state_dict"


def test_batchnorm_calibration_starts_training_where_the_packed_network_is(
    tmp_path: Path,
) -> None:
    from napari_unetquant.modelio import unpacked
    from napari_unetquant.packed import calibrate_batch_norm

    bundle = _with_statistics(QuantConfig.from_bits(4, 6))
    save_model(tmp_path / "p.safetensors", bundle, packed=True)
    packed = load_model(tmp_path / "p.safetensors")
    x = 3 * torch.randn(4, 1, 32, 32) + 1
    with torch.no_grad():
        expected = packed.model(x)
        trainable = unpacked(packed).model
        uncalibrated = copy.deepcopy(trainable).train()(x)
        calibrate_batch_norm(trainable, x)
        assert not trainable.training
        torch.testing.assert_close(trainable(x), expected, rtol=1e-4, atol=1e-5)
        in_training = copy.deepcopy(trainable).train()(x)  # batch statistics
    # without calibration a training step would start far from the model; with it, on it
    assert (uncalibrated - expected).abs().mean() > 100 * (in_training - expected).abs().mean()
    torch.testing.assert_close(in_training, expected, rtol=1e-4, atol=1e-5)


def test_calibration_batches_are_centre_crops_of_training_items() -> None:
    from napari_unetquant.jobs.training import calibration_batch
    from napari_unetquant.train import SliceSet, VolumeSet

    rng = np.random.default_rng(0)
    slices = SliceSet.from_arrays(
        [rng.random((40, 50)) for _ in range(5)], [np.zeros((40, 50))] * 5
    )
    config = TrainConfig(crop=32, batch_size=3, crop_depth=4)
    batch = calibration_batch(slices, config)
    assert batch.shape == (3, 1, 32, 32) and batch.dtype == torch.float32
    assert torch.equal(batch[0, 0], torch.from_numpy(slices.images[0][4:36, 9:41]))
    volumes = VolumeSet.from_arrays([rng.random((3, 20, 24))] * 2, [np.zeros((3, 20, 24))] * 2)
    assert calibration_batch(volumes, config).shape == (2, 1, 3, 20, 24)


def test_unpacking_a_network_that_is_not_packed_says_what_to_do() -> None:
    from napari_unetquant.packed import unpacked_network

    unet, quant = UNetConfig(base_width=4, depth=2), QuantConfig.from_bits(4, 6)
    with pytest.raises(ValueError, match="unpack only a network loaded from a packed model file"):
        unpacked_network(build_unet(unet, quant), unet, quant)


def test_the_sweep_fine_tunes_from_a_packed_fp_model(tmp_path: Path) -> None:
    from napari_unetquant.data import em_phantom_stack
    from napari_unetquant.data.io import Volume
    from napari_unetquant.jobs import SweepJob, SweepResult, model_name, sweep

    images, membranes = em_phantom_stack(3, 48, 48, seed=3)
    image = Volume(images.astype(np.float32), source="phantom")
    job = SweepJob(
        settings=(QuantConfig(), QuantConfig.from_bits(4, 6)),
        fp_steps=2,
        fine_tune_steps=2,
        unet=UNetConfig(base_width=4, depth=2),
        foreground_value=1,
    )
    results = [r for r in sweep(image, membranes, job) if isinstance(r, SweepResult)]
    assert [r.label for r in results] == ["FP", "W4A6"]  # FP first, W4A6 from it (in memory)
    assert results[1].model.info["init"] == model_name(results[0].model)
    assert [r.model.info["foreground_value"] for r in results] == [1, 1]

    path = tmp_path / "fp-packed.safetensors"
    save_model(path, results[0].model, packed=True)
    packed_fp = load_model(path)
    assert packed_fp.layout == "packed"
    only_quantized = SweepJob(
        settings=(QuantConfig.from_bits(4, 6),),
        fine_tune_steps=2,
        unet=job.unet,
        foreground_value=1,
    )
    again = [
        r for r in sweep(image, membranes, only_quantized, packed_fp) if isinstance(r, SweepResult)
    ]
    assert [r.label for r in again] == ["W4A6"] and 0.0 <= again[0].dice <= 1.0
    assert again[0].model.info["init"] == model_name(packed_fp)


def test_info_says_packed_its_bits_and_its_size(
    packed_file: Path,
    fp_file: Path,
    phantom_files: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fast_train: list[str],
) -> None:
    code, stdout, _ = _run(["info", "--model", str(packed_file)], capsys)
    size = packed_file.stat().st_size
    line = next(text for text in stdout.splitlines() if text.startswith("file"))
    assert code == 0 and "layout      packed" in stdout
    assert line.startswith("file        packed W4A6 (weight codes at their bit width, ")
    assert "bits per weight on average" in line
    assert f"{size / 1024:.1f} KiB ({size} bytes)" in line
    info = json.loads(_run(["info", "--model", str(packed_file), "--json"], capsys)[1])
    assert info["packed"] is True and info["packed_file_bytes"] == size == info["file_bytes"]
    assert 4 < info["mean_weight_bits"] < 32

    float_file = tmp_path / "w4a6-float.safetensors"
    argv = _train(
        phantom_files, float_file, "--init", str(fp_file), *W4A6, "--save-float", *fast_train
    )
    assert _run(argv, capsys)[0] == 0
    code, stdout, _ = _run(["info", "--model", str(float_file)], capsys)
    line = next(text for text in stdout.splitlines() if text.startswith("file"))
    assert line.startswith("file        float W4A6 (")
    assert f"packed: {size / 1024:.1f} KiB (unetquant export --model {float_file}" in line
    info = json.loads(_run(["info", "--model", str(float_file), "--json"], capsys)[1])
    assert info["packed"] is False and info["packed_file_bytes"] == size
    info = json.loads(_run(["info", "--model", str(fp_file), "--json"], capsys)[1])
    assert info["packed"] is False and info["packed_file_bytes"] is None  # nothing to pack


def test_the_demo_writes_the_packed_quantized_model_and_titles_its_panels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.axes import Axes

    from napari_unetquant.demo import DemoConfig, run_demo

    titles: list[str] = []
    original = Axes.set_title

    def record(self: Axes, label: str, *args: object, **kwargs: object) -> object:
        titles.append(label)
        return original(self, label, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Axes, "set_title", record)
    logged: list[str] = []
    config = DemoConfig(fp_steps=4, quant_steps=2, base_width=4, crop=32, out_dir=str(tmp_path))
    fp, quant = run_demo(config, log=logged.append)
    assert read_metadata(tmp_path / "w4a6.safetensors")["layout"] == "packed"
    assert read_metadata(tmp_path / "fp.safetensors")["layout"] == "state_dict"
    assert quant.file_bytes == (tmp_path / "w4a6.safetensors").stat().st_size < fp.file_bytes / 2
    assert "W4A6, packed" in logged[-1] and "FP, float" in logged[-1]
    assert titles[:2] == ["image", "ground truth"]
    assert [t.split(":")[0] for t in titles[2:]] == ["FP", "W4A6"]
    assert all(": Dice 0." in t or ": Dice 1.000" in t for t in titles[2:])
    picture = iio.imread(tmp_path / "demo-overlay.png")
    assert picture.shape[1] > 3 * picture.shape[0]  # four panels side by side


def test_a_packed_3d_model_fine_tunes_in_3d(tmp_path: Path) -> None:
    from napari_unetquant.data import em_phantom_stack
    from napari_unetquant.data.io import Volume
    from napari_unetquant.jobs import start_training

    unet, quant = UNetConfig(base_width=2, depth=2, spatial_dims=3), QuantConfig.from_bits(4, 6)
    model = build_unet(unet, quant).train()
    with torch.no_grad():
        model(3 * torch.randn(2, 1, 8, 16, 16) + 1)  # BatchNorm statistics away from 0 and 1
    save_model(
        tmp_path / "p3d.safetensors", SegmentationModel(model.eval(), unet, quant), packed=True
    )
    packed = load_model(tmp_path / "p3d.safetensors")
    images, membranes = em_phantom_stack(8, 32, 32, seed=5)
    config = TrainConfig(steps=2, batch_size=1, crop=16, crop_depth=4, validate_every=2)
    run = start_training(Volume(images.astype(np.float32)), membranes, quant, config, None, packed)
    events = list(run.events())
    assert events[-1].step == 2 and run.best().unet.spatial_dims == 3
