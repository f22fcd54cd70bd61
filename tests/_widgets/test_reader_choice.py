"""Which reader napari picks for NIfTI files and DICOM folders, opened as users open them.

napari's own reader also claims ``*.nii``, ``*.nii.gz`` and every folder, so in a fresh napari
a drop (or File > Open) on such a path asks which reader to use; this plugin is the choice
the dialog offers first, and a saved choice opens without asking. A plain
``viewer.open(path)`` always means napari's own reader (napari's documented default since
0.4.16): pass ``plugin="napari-unetquant"``, or ``plugin=None`` to let napari choose.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import napari
import nibabel as nib
import numpy as np
import pytest

from napari_unetquant._widgets._io import VOLUME_KEY, get_reader
from napari_unetquant.data.io import Volume

PLUGIN = "napari-unetquant"
DISPLAY_NAME = "U-Net Quant"


@pytest.fixture
def reader_dialogs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """napari's 'Choose reader' dialog, answered OK with the reader it preselects; each entry
    lists the readers one dialog offered, the preselected one first."""
    from napari._qt.dialogs.qt_reader_dialog import QtReaderDialog

    shown: list[list[str]] = []

    def accept(dialog: QtReaderDialog) -> int:
        checked = dialog.reader_btn_group.checkedButton()
        others = [b.text() for b in dialog.reader_btn_group.buttons() if b is not checked]
        shown.append([checked.text(), *others])
        return 1

    monkeypatch.setattr(QtReaderDialog, "exec_", accept)
    return shown


@pytest.fixture
def saved_reader_choices() -> Iterator[Any]:
    """napari's plugin settings, whose saved 'remember this choice' readers are put back as
    they were afterwards (napari saves its settings to the user's settings file)."""
    from napari.settings import get_settings

    plugins = get_settings().plugins
    before = dict(plugins.extension2reader)
    yield plugins
    plugins.extension2reader = before


def _drop(viewer: Any, *paths: Path) -> None:
    """What napari does when files are dropped on its canvas (QtViewer.dropEvent)."""
    from qtpy.QtCore import QMimeData, QPointF, Qt, QUrl
    from qtpy.QtGui import QDropEvent

    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    event = QDropEvent(
        QPointF(10, 10),
        Qt.DropAction.CopyAction,
        mime,
        Qt.MouseButton.NoButton,
        Qt.KeyboardModifier.NoModifier,
    )
    viewer.window._qt_viewer.dropEvent(event)


def _nii(folder: Path, shared_data: Path) -> Path:
    """The tiny spinal cord image as an uncompressed ``.nii`` (nibabel writes it)."""
    source = nib.load(shared_data / "spinal-gm-tiny" / "t2s.nii.gz")
    path = folder / "t2s.nii"
    nib.save(nib.Nifti1Image(np.asanyarray(source.dataobj), source.affine), path)
    return path


def _assert_opened_here(layer: Any, shape: tuple[int, ...]) -> None:
    assert isinstance(layer, napari.layers.Image)
    assert isinstance(layer.metadata.get(VOLUME_KEY), Volume)
    assert layer.data.shape == shape
    assert layer.source.reader_plugin == PLUGIN


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_a_nifti_dropped_on_a_fresh_napari_opens_with_this_plugin(
    make_napari_viewer: Callable[..., Any],
    reader_dialogs: list[list[str]],
    shared_data: Path,
    tmp_path: Path,
    suffix: str,
) -> None:
    viewer = make_napari_viewer()
    tiny = shared_data / "spinal-gm-tiny" / "t2s.nii.gz"
    path = tiny if suffix == ".nii.gz" else _nii(tmp_path, shared_data)
    _drop(viewer, path)
    # napari's own reader claims NIfTI too, so napari asks; this plugin is the offered choice
    assert reader_dialogs == [[DISPLAY_NAME, "napari builtins"]]
    [layer] = viewer.layers
    _assert_opened_here(layer, (9, 49, 54))


def test_a_saved_reader_choice_opens_nifti_without_asking(
    make_napari_viewer: Callable[..., Any],
    reader_dialogs: list[list[str]],
    saved_reader_choices: Any,
    shared_data: Path,
    tmp_path: Path,
) -> None:
    viewer = make_napari_viewer()
    # what ticking 'Remember this choice' in the dialog saves
    saved_reader_choices.extension2reader = {"*.nii.gz": PLUGIN, "*.nii": PLUGIN}
    [image] = viewer.open(shared_data / "spinal-gm" / "sub-9604" / "image.nii.gz", plugin=None)
    _assert_opened_here(image, (20, 288, 288))
    _drop(viewer, _nii(tmp_path, shared_data))
    assert reader_dialogs == []
    _assert_opened_here(viewer.layers[-1], (9, 49, 54))


def test_a_dicom_folder_dropped_on_a_fresh_napari_opens_with_this_plugin(
    make_napari_viewer: Callable[..., Any],
    reader_dialogs: list[list[str]],
    tmp_path: Path,
    ct_series: Callable[..., None],
) -> None:
    hu = np.random.default_rng(0).integers(-1000, 1000, (3, 6, 5)).astype(np.int16)
    ct_series(tmp_path / "scan", hu, "IM{:04d}", lambda i: [-20.0, -30.0, 2.5 * i])
    viewer = make_napari_viewer()
    _drop(viewer, tmp_path / "scan")
    assert reader_dialogs == [[DISPLAY_NAME, "napari builtins"]]
    [layer] = viewer.layers
    # NIfTI voxel order (i = DICOM column), as the core reads it
    _assert_opened_here(layer, (3, 5, 6))
    assert np.array_equal(layer.data, np.transpose(hu, (0, 2, 1)).astype(np.float32))
    # shown as DICOM viewers show a slice: its rows down the screen, its columns to the right
    origin = np.asarray(layer.data_to_world([0, 0, 0]))
    next_column = np.asarray(layer.data_to_world([0, 1, 0])) - origin
    next_row = np.asarray(layer.data_to_world([0, 0, 1])) - origin
    next_slice = np.asarray(layer.data_to_world([1, 0, 0])) - origin  # 2.5 mm superior
    assert np.allclose(next_column, [0, 0, 0.8]) and np.allclose(next_row, [0, 0.7, 0])
    assert np.allclose(next_slice, [-2.5, 0, 0])


def test_a_dicom_folder_opens_when_this_plugin_is_named(
    make_napari_viewer: Callable[..., Any], tmp_path: Path, ct_series: Callable[..., None]
) -> None:
    hu = np.random.default_rng(1).integers(-1000, 1000, (2, 4, 4)).astype(np.int16)
    ct_series(tmp_path / "scan", hu, "IM{:04d}", lambda i: [-20.0, -30.0, 2.5 * i])
    viewer = make_napari_viewer()
    [layer] = viewer.open(tmp_path / "scan", plugin=PLUGIN)
    _assert_opened_here(layer, (2, 4, 4))


def test_folders_without_dicom_files_or_slices_are_left_to_other_readers(
    tmp_path: Path, ct_series: Callable[..., None]
) -> None:
    dicom = tmp_path / "scan"
    ct_series(dicom, np.zeros((2, 4, 4), np.int16), "IM{:04d}")
    slices = tmp_path / "slices"
    slices.mkdir()
    (slices / "0001.png").write_bytes(b"")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not an image")
    (notes / "table.csv").write_text("a,b\n1,2\n")
    nested = tmp_path / "nested"
    (nested / "inner").mkdir(parents=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert get_reader(str(dicom)) is not None
    assert get_reader(str(slices)) is not None
    assert get_reader(str(notes)) is None  # napari's own folder reader can still open it
    assert get_reader(str(nested)) is None
    assert get_reader(str(empty)) is None
    assert get_reader([str(dicom), str(notes)]) is None


def test_a_folder_this_plugin_declines_is_refused_when_it_is_named(
    make_napari_viewer: Callable[..., Any], tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    viewer = make_napari_viewer()
    with pytest.raises(ValueError, match="refused the file"):
        viewer.open(tmp_path, plugin=PLUGIN)
    assert len(viewer.layers) == 0
