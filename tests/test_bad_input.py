"""Bad input on the command line: one line on stderr naming the file, the problem and the fix;
exit code 2 (a batch: 1 for a volume that failed, the others go on); no traceback; no output
file, not even a partial one, and an older output file left as it was.

The cases are the rows of the tables; ``bad_file`` (``tests/conftest.py``) makes each one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_unetquant.cli import main

# (case, what the message says). Every image case also names the file.
IMAGES = [
    ("missing.tif", "no such file or folder; check the path"),
    ("unreadable.tif", "permission denied; make it readable"),
    ("truncated.tif", "check that the file is complete"),
    ("truncated.nii.gz", "check that the file is complete"),
    ("truncated.png", "check that the file is complete"),
    ("corrupt.tif", "check that the file is complete and of that format"),
    ("truncated-dicom", "DICOM pixel data could not be decoded"),
    ("rgb.tif", "colour (RGB) image of shape (64, 64, 3); the network reads one grey channel"),
    ("4d.tif", "4D data of shape (2, 3, 64, 64); give 2D images or 3D stacks"),
    ("4d.nii.gz", "give one 3D volume (split 4D series first)"),
    ("empty.nii.gz", "the image is empty"),
    ("nan.tif", "the image holds NaN or Inf pixels; replace them"),
    ("inf.nii.gz", "the image holds NaN or Inf pixels; replace them"),
]
# Found before any volume is segmented: the whole batch is refused (exit 2), not one volume.
UP_FRONT = {"missing.tif", "unreadable.tif"}

LABELS = [
    ("labels-shape.tif", "labels must be on the image's grid"),
    ("labels-fraction.tif", "labels must be an integer mask, but they hold fractional or NaN"),
    ("labels-nan.tif", "labels must be an integer mask, but they hold fractional or NaN"),
    ("labels-empty.tif", "the labels contain no foreground; they hold 0 ("),
    ("rgb.tif", "colour (RGB)"),
    ("truncated.tif", "check that the file is complete"),
]
# Scoring against labels without foreground is defined (an empty slice pair scores 1).
TRAINING_ONLY = {"labels-empty.tif"}

MODELS = [
    ("model-missing.safetensors", "no such model file; check the path"),
    ("model-unreadable.safetensors", "permission denied; make it readable"),
    ("model-text.safetensors", "not a readable model file"),
    ("model-png.safetensors", "not a readable model file"),
    ("model-foreign.safetensors", "a safetensors file but not a napari-unetquant model"),
    ("model-future.safetensors", "version 3, this napari-unetquant reads versions 1, 2; upgrade"),
    ("model-truncated.safetensors", "not a readable model file"),
    ("model-no-config.safetensors", "the model's metadata is damaged"),
    ("model-bits.safetensors", "needs 2 to 8 stored bits, got 12"),
    ("model-depth.safetensors", "tensors do not match the configured network"),
    ("model-2-channels.safetensors", "the model takes 2 input channels"),
]
# A two-channel model can be inspected and exported; it only cannot run on grey images.
RUNS_IMAGES_ONLY = {"model-2-channels.safetensors"}

FAST = ["--steps", "2", "--crop", "32", "--batch-size", "2", "--validate-every", "1"]


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """An output folder holding files from an earlier run, which a refused command must leave
    exactly as they are."""
    folder = tmp_path / "out"
    folder.mkdir()
    for name in ("old.tif", "old.safetensors", "case.tif", "case.nii.gz"):
        (folder / name).write_bytes(b"an earlier result")
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _refused(
    argv: list[object],
    capsys: pytest.CaptureFixture[str],
    out: Path,
    message: str,
    code: int = 2,
) -> str:
    """Run ``argv``; check the exit code, the one-line message and the untouched ``out``."""
    before = _snapshot(out)
    assert main([str(a) for a in argv]) == code
    captured = capsys.readouterr()
    after = _snapshot(out)
    if code == 1:  # a batch reports its failed volume on stdout and in the CSV
        assert after.pop("segment.csv", None) is not None
        err = captured.out
        assert "1 of 1 volume(s) failed (see the CSV)" in captured.err
    else:
        err = captured.err
        assert err.count("\n") == 1, err
    assert after == before, "an output appeared or an earlier one changed"
    assert "Traceback" not in captured.err + captured.out
    assert message in err, err
    return err


def _named(case: str, err: str, path: Path) -> None:
    assert str(path) in err, f"{case}: the message does not name {path}"


@pytest.mark.parametrize(("case", "message"), IMAGES, ids=[c for c, _ in IMAGES])
@pytest.mark.parametrize("command", ["train", "segment", "evaluate", "batch"])
def test_bad_images_are_refused(
    command: str,
    case: str,
    message: str,
    bad_file: object,
    phantom_files: tuple[Path, Path],
    w4a6_model_file: Path,
    out: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    image = bad_file(case)  # type: ignore[operator]
    labels = phantom_files[1]
    model = w4a6_model_file
    argv: list[object] = {
        "train": ["train", "--images", image, "--labels", labels, "--out", out / "old.safetensors"],
        "segment": ["segment", "--model", model, "--image", image, "--out", out / "old.tif"],
        "evaluate": ["evaluate", "--model", model, "--images", image, "--labels", labels],
        "batch": ["segment", "--model", model, "--images", image, "--out-dir", out],
    }[command]
    if command == "train":
        argv += [*FAST, "--base-width", "4", "--depth", "2"]
    code = 1 if command == "batch" and case not in UP_FRONT else 2
    if command == "batch":  # the mask this image would get exists: it must stay as it was
        (out / f"{image.name.split('.')[0]}.tif").write_bytes(b"an earlier result")
    _named(case, _refused(argv, capsys, out, message, code), image)


@pytest.mark.parametrize(("case", "message"), LABELS, ids=[c for c, _ in LABELS])
@pytest.mark.parametrize("command", ["train", "evaluate", "batch"])
def test_bad_labels_are_refused(
    command: str,
    case: str,
    message: str,
    bad_file: object,
    phantom_files: tuple[Path, Path],
    w4a6_model_file: Path,
    out: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    labels = bad_file(case)  # type: ignore[operator]
    image, model = phantom_files[0], w4a6_model_file
    argv: list[object] = {
        "train": ["train", "--images", image, "--labels", labels, "--out", out / "old.safetensors"],
        "evaluate": ["evaluate", "--model", model, "--images", image, "--labels", labels],
        "batch": ["segment", "--model", model, "--images", image, "--labels", labels],
    }[command]
    argv += [*FAST, "--base-width", "4"] if command == "train" else []
    argv += ["--out-dir", out] if command == "batch" else []
    if command != "train" and case in TRAINING_ONLY:  # scoring against them is defined: it runs
        assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
        return
    _named(case, _refused(argv, capsys, out, message, 1 if command == "batch" else 2), labels)


@pytest.mark.parametrize(("case", "message"), MODELS, ids=[c for c, _ in MODELS])
@pytest.mark.parametrize("command", ["info", "export", "segment", "evaluate", "batch", "init"])
def test_bad_model_files_are_refused(
    command: str,
    case: str,
    message: str,
    bad_file: object,
    phantom_files: tuple[Path, Path],
    out: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = bad_file(case)  # type: ignore[operator]
    image, labels = phantom_files
    argv: list[object] = {
        "info": ["info", "--model", model],
        "export": ["export", "--model", model, "--out", out / "old.safetensors"],
        "segment": ["segment", "--model", model, "--image", image, "--out", out / "old.tif"],
        "evaluate": ["evaluate", "--model", model, "--images", image, "--labels", labels],
        "batch": ["segment", "--model", model, "--images", image, "--out-dir", out],
        "init": ["train", "--images", image, "--labels", labels, "--init", model, "--out"],
    }[command]
    argv += [out / "old.safetensors", *FAST] if command == "init" else []
    if command in ("info", "export") and case in RUNS_IMAGES_ONLY:  # no image: nothing to refuse
        assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
        return
    _named(case, _refused(argv, capsys, out, message), model)


@pytest.mark.parametrize(
    ("option", "bits", "message"),
    [
        ("--weight-bits", "0", "weight bits 0: fixed quantizer needs 2 to 8 stored bits"),
        ("--weight-bits", "9", "weight bits 9: fixed quantizer needs 2 to 8 stored bits"),
        ("--weight-bits", "31", "got 31; use 32 with method 'float' for full precision"),
        ("--act-bits", "-1", "activation bits -1: fixed quantizer needs 2 to 8 stored bits"),
        ("--act-bits", "33", "activation bits 33: fixed quantizer needs 2 to 8 stored bits"),
    ],
)
@pytest.mark.parametrize("command", ["train", "bits"])
def test_bit_widths_outside_1_to_8_or_32_are_refused_up_front(
    command: str,
    option: str,
    bits: str,
    message: str,
    phantom_files: tuple[Path, Path],
    out: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    labels = phantom_files[1]
    argv: list[object] = [command, option, bits]
    if command == "train":  # refused before the data are read: the paths need not exist
        argv += ["--images", "absent.tif", "--labels", labels, "--out", out / "old.safetensors"]
    _refused(argv, capsys, out, message)


@pytest.mark.parametrize("bits", ["1", "2", "8", "32"])
def test_bit_widths_at_the_limits_are_accepted(bits: str) -> None:
    assert main(["bits", "--weight-bits", bits, "--act-bits", bits]) == 0
