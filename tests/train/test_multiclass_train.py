"""Several classes in one model: label values as classes, label files painted in order, the
training job and command line that make a softmax model, and the refusals that say the fix."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_unetquant.cli import main
from napari_unetquant.data.preprocess import class_indices, class_values, paint_label_layers
from napari_unetquant.errors import SettingError
from napari_unetquant.jobs import TrainJob
from napari_unetquant.modelio import load_model, model_classes
from napari_unetquant.train import present_classes, read_pairs

TINY = Path(__file__).resolve().parents[3] / "shared" / "data" / "spinal-gm-tiny"
IMAGE, CORD, GM = (
    TINY / name for name in ("t2s.nii.gz", "t2s_seg.nii.gz", "t2s_gmseg_manual.nii.gz")
)
PAINTED = f"{CORD}+{GM}"


def test_label_values_become_class_indices_and_back() -> None:
    labels = np.array([[0, 3, 7], [7, 9, 3]])
    indices = class_indices(labels, (3, 7), "labels")
    assert indices.dtype == np.uint8 and indices.tolist() == [[0, 1, 2], [2, 0, 1]]
    assert class_values(indices, (3, 7)).tolist() == [[0, 3, 7], [7, 0, 3]]
    assert class_values(indices, (3, 700)).dtype == np.uint16
    # one value, or none, is the binary mask of today
    assert class_indices(labels, (7,)).tolist() == [[0, 0, 1], [1, 0, 0]]
    assert class_indices(labels, None).tolist() == [[0, 1, 1], [1, 1, 1]]
    with pytest.raises(ValueError, match="repeat"):
        class_indices(labels, (3, 3))
    with pytest.raises(ValueError, match="probability map"):
        class_indices(labels + 0.5, (3, 7))


def test_label_files_are_painted_in_order_later_over_earlier() -> None:
    cord = np.array([[0, 1, 1, 1]])
    gm = np.array([[0, 0, 1, 0]])
    assert paint_label_layers([cord, gm], ["cord", "gm"]).tolist() == [[0, 1, 2, 1]]
    with pytest.raises(ValueError, match="share the image's grid"):
        paint_label_layers([cord, gm[:, :3]], ["cord", "gm"])


def test_read_pairs_learns_grey_and_white_matter_from_the_shared_files() -> None:
    (pair,) = read_pairs([IMAGE], [PAINTED], classes=(1, 2))
    cord = nib.load(CORD).get_fdata() > 0
    gm = nib.load(GM).get_fdata() > 0
    assert set(np.unique(pair.mask)) == {0, 1, 2}
    # white matter is the cord without the grey matter, on the slices' axes
    assert int((pair.mask == 2).sum()) == int(gm.sum())
    assert int((pair.mask == 1).sum()) == int((cord & ~gm).sum())
    assert present_classes([PAINTED]) == (1, 2)
    with pytest.raises(SettingError, match=r"no foreground \(values 5, 6\)"):
        read_pairs([IMAGE], [PAINTED], classes=(5, 6))
    with pytest.raises(ValueError, match="do not exist"):
        read_pairs([IMAGE], [f"{CORD}+{TINY / 'missing.nii.gz'}"], classes=(1, 2))


def test_a_job_refuses_what_cannot_be_meant() -> None:
    files = {"images": ("a",), "labels": ("b",), "out": "m.safetensors"}
    with pytest.raises(ValueError, match="'some'"):
        TrainJob(**files, classes="some")  # type: ignore[arg-type]
    with pytest.raises(SettingError, match="give one"):
        TrainJob(**files, classes=(1, 2), foreground_value=1)  # type: ignore[arg-type]


@pytest.mark.slow
def test_train_classes_writes_a_softmax_model_that_fine_tunes_with_its_classes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fast_train: list[str]
) -> None:
    out = tmp_path / "gm-wm.safetensors"
    files = ["--images", str(IMAGE), "--labels", PAINTED, "--crop", "32"]
    code = main(["train", *files, "--out", str(out), "--classes", "all", *fast_train])
    assert code == 0, capsys.readouterr().err
    bundle = load_model(out)
    assert model_classes(bundle) == (1, 2) and bundle.unet.out_classes == 3
    assert bundle.info["foreground_value"] is None

    # a fine-tune keeps the classes; asking for others is refused with the fix
    tuned = tmp_path / "gm-wm-w4a6.safetensors"
    code = main(
        [
            "train",
            *files,
            "--out",
            str(tuned),
            "--init",
            str(out),
            "--weight-bits",
            "4",
            "--act-bits",
            "6",
            *fast_train,
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert model_classes(load_model(tuned)) == (1, 2)
    capsys.readouterr()
    code = main(["train", *files, "--out", str(tuned), "--init", str(out), "--classes", "1"])
    assert code == 2 and "classes [1, 2]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_code:
        main(["train", *files, "--out", str(tuned), "--classes", "1,x"])
    assert exit_code.value.code == 2 and "integer label values" in capsys.readouterr().err
