"""NIfTI and DICOM volumes are shown the radiological way, and masks keep the file's affine.

napari draws world axis 1 downwards and world axis 2 to the right (``camera.orientation2d``
``('down', 'right')``). Radiological: anterior at the top of the screen, the patient's right
on the screen's left, whatever order the file stores its voxels in.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import napari
import nibabel as nib
import numpy as np
import pytest

from napari_unetquant._widgets._io import VOLUME_KEY, layer_geometry, read_layers
from napari_unetquant.data.io import Volume

PLUGIN = "napari-unetquant"
RAS = {"right": 0, "anterior": 1, "superior": 2}


def _screen_step(layer: Any, affine: np.ndarray, towards: str) -> np.ndarray:
    """Where, in world (= screen for axes 1 and 2) coordinates, a step of one voxel along the
    voxel axis that points most ``towards`` (RAS) goes on ``layer``."""
    ras = RAS[towards]
    voxel_axis = int(np.argmax(np.abs(affine[ras, :3])))  # i, j or k
    sign = np.sign(affine[ras, voxel_axis])
    step = np.zeros(3)
    step[[1, 2, 0][voxel_axis]] = sign  # the layer's axes are (k, i, j)
    world = np.asarray(layer.data_to_world(step)) - np.asarray(layer.data_to_world(np.zeros(3)))
    return np.sign(np.round(world, 6))


@pytest.mark.parametrize(
    ("subject", "codes"), [("sub-9604", ("L", "P", "S")), ("sub-9418", ("L", "A", "S"))]
)
def test_axial_slices_show_anterior_up_and_the_patients_right_on_the_left(
    make_napari_viewer: Callable[..., Any], shared_data: Path, subject: str, codes: tuple[str, ...]
) -> None:
    path = shared_data / "spinal-gm" / subject / "image.nii.gz"
    affine = nib.load(path).affine
    assert nib.aff2axcodes(affine) == codes  # the two files store their voxels differently
    viewer = make_napari_viewer()
    camera = getattr(viewer, "scene", viewer).camera  # napari < 0.9: viewer.camera
    assert tuple(camera.orientation2d) == ("down", "right")
    [layer] = viewer.open(path, plugin=PLUGIN)
    assert isinstance(layer, napari.layers.Image)
    # the data array is the file's, untouched: (S, H, W) = data[:, :, s]
    assert np.array_equal(layer.data[3], np.asanyarray(nib.load(path).dataobj)[:, :, 3])
    assert tuple(_screen_step(layer, affine, "anterior")) == (0, -1, 0)  # up
    assert tuple(_screen_step(layer, affine, "right")) == (0, 0, -1)  # to the left
    assert tuple(_screen_step(layer, affine, "superior")) == (-1, 0, 0)  # the slider axis
    # a slice of the volume is one slice on screen, one voxel per voxel, in mm
    assert np.allclose(
        np.abs(np.linalg.det(layer._data_to_world.affine_matrix[:3, :3])),
        np.abs(np.linalg.det(affine[:3, :3])),
    )
    # the volume's centre sits where the file puts it (world axes: inferior, posterior, left)
    centre = (np.array(nib.load(path).shape) - 1) / 2  # i, j, k
    ras = affine[:3, :3] @ centre + affine[:3, 3]
    assert np.allclose(layer.data_to_world(centre[[2, 0, 1]]), -ras[[2, 1, 0]])


def test_both_orientations_of_the_same_anatomy_land_on_the_same_screen_axes(
    shared_data: Path,
) -> None:
    image = nib.load(shared_data / "spinal-gm" / "sub-9604" / "image.nii.gz")
    data = np.asanyarray(image.dataobj)
    # the same voxels stored flipped along j and swapped i <-> j: still the same patient
    flip_j = np.diag([1.0, -1.0, 1.0, 1.0])
    flip_j[1, 3] = data.shape[1] - 1
    swap = np.eye(4)[[1, 0, 2, 3]]
    variants = [
        (data, image.affine),
        (data[:, ::-1], image.affine @ flip_j),
        (np.swapaxes(data, 0, 1), image.affine @ swap),
    ]
    shown = []
    for array, affine in variants:
        volume = Volume(np.moveaxis(array, 2, 0), affine=affine)
        geometry = layer_geometry(volume)
        layer = napari.layers.Image(volume.array, **geometry)
        # every voxel of the original lands on one world point, whichever way it was stored
        probe = np.array([7, 200, 31])  # (i, j, s) in the original file
        if array is not data:
            probe = (np.linalg.inv(affine) @ image.affine @ [*probe, 1])[:3].round().astype(int)
        shown.append(np.asarray(layer.data_to_world([probe[2], probe[0], probe[1]])))
    assert np.allclose(shown[0], shown[1]) and np.allclose(shown[0], shown[2])


# (slices stacked along, RAS direction of voxel axes i, j, k; where a step towards RAS +x, +y
# and +z lands: world axis and sign, axis 1 being down the screen and axis 2 to the right)
PLANES = {
    "axial": ([[0, 1, 0], [-1, 0, 0], [0, 0, 1]], {"R": (2, -1), "A": (1, -1), "S": (0, -1)}),
    "coronal": ([[1, 0, 0], [0, 0, -1], [0, 1, 0]], {"R": (2, -1), "A": (0, 1), "S": (1, -1)}),
    "sagittal": ([[0, 1, 0], [0, 0, 1], [1, 0, 0]], {"R": (0, -1), "A": (2, -1), "S": (1, -1)}),
}


@pytest.mark.parametrize("plane", PLANES)
def test_the_acquired_plane_is_the_one_shown_in_its_radiological_orientation(plane: str) -> None:
    """Axial: anterior up, patient's right on the left; coronal: superior up, patient's right
    on the left; sagittal: superior up, anterior on the left. The slider runs across slices."""
    columns, expected = PLANES[plane]
    affine = np.eye(4)
    affine[:3, :3] = np.array(columns, dtype=np.float64).T * [0.5, 0.7, 3.0]
    affine[:3, 3] = [12.0, -30.0, 45.0]
    volume = Volume(np.zeros((5, 8, 9)), affine=affine)
    layer = napari.layers.Image(volume.array, **layer_geometry(volume))
    linear = layer._data_to_world.affine_matrix[:3, :3]
    assert np.count_nonzero(linear[0]) == 1 and linear[0, 0] != 0  # the slider: data axis 0
    for name, (world_axis, sign) in expected.items():
        ras = np.zeros(3)
        ras["RAS".index(name)] = 1
        voxel = np.linalg.solve(affine[:3, :3], ras)  # that direction in voxels (i, j, k)
        world = linear @ voxel[[2, 0, 1]]
        assert np.argmax(np.abs(world)) == world_axis and np.sign(world[world_axis]) == sign


def test_the_voxel_view_shows_the_array_as_stored(shared_data: Path) -> None:
    path = shared_data / "spinal-gm" / "sub-9604" / "image.nii.gz"
    [(_, meta, _)] = read_layers(str(path), view="voxel")
    assert "affine" not in meta
    assert np.allclose(meta["scale"], (3.0, 0.6007, 0.6007), atol=1e-3)


def _saved(labels: Any, out: Path) -> nib.Nifti1Image:
    labels.save(str(out), plugin=PLUGIN)
    image: nib.Nifti1Image = nib.load(out)
    return image


def _assert_same_affine(written: nib.Nifti1Image, source: nib.Nifti1Image) -> None:
    """The written mask has the source's affine, bit for bit.

    Masks are written with sform and qform both set from the source's affine. A source with an
    sform (most files) gets it back exactly. A source with only a qform (sub-9604's image) gets
    it back exactly as the qform; the sform, which nibabel reads first, is that affine rounded
    to the header's float32 (a few nanometres)."""
    if source.header["sform_code"] > 0:
        assert np.array_equal(written.affine, source.affine)
    else:
        assert np.array_equal(written.header.get_qform(), source.affine)
        assert np.allclose(written.affine, source.affine, rtol=0, atol=1e-6)


@pytest.mark.parametrize("subject", ["sub-9604", "sub-9418"])
def test_a_mask_painted_on_a_new_labels_layer_keeps_the_source_affine(
    make_napari_viewer: Callable[..., Any], shared_data: Path, tmp_path: Path, subject: str
) -> None:
    path = shared_data / "spinal-gm" / subject / "image.nii.gz"
    source = nib.load(path)
    viewer = make_napari_viewer()
    [image] = viewer.open(path, plugin=PLUGIN)
    viewer.layers.selection.active = image
    viewer._new_labels()  # the "New labels layer" button: the image's transform, no metadata
    labels = viewer.layers[-1]
    assert isinstance(labels, napari.layers.Labels) and VOLUME_KEY not in labels.metadata
    assert np.array_equal(labels.affine.affine_matrix, image.affine.affine_matrix)
    painted = np.zeros(labels.data.shape, np.uint8)
    painted[4, 100:120, 130:140] = 1
    painted[5, 10, 20] = 2
    labels.data = painted
    written = _saved(labels, tmp_path / "painted.nii.gz")
    _assert_same_affine(written, source)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(source.affine)
    assert np.array_equal(np.asanyarray(written.dataobj), np.moveaxis(painted, 0, 2))


def test_a_labels_file_opened_on_the_image_overlays_it_and_saves_its_affine(
    make_napari_viewer: Callable[..., Any], shared_data: Path, tmp_path: Path
) -> None:
    folder = shared_data / "spinal-gm" / "sub-9604"
    viewer = make_napari_viewer()
    [image] = viewer.open(folder / "image.nii.gz", plugin=PLUGIN)
    [gm] = viewer.open(folder / "gm.nii.gz", plugin=PLUGIN)
    assert isinstance(gm, napari.layers.Labels)
    # the image's affine is a qform, the mask's an sform: they agree to a few hundredths of a mm
    assert np.allclose(gm.affine.affine_matrix, image.affine.affine_matrix, atol=0.05)
    assert np.allclose(gm.scale, image.scale)
    source = nib.load(folder / "gm.nii.gz")
    written = _saved(gm, tmp_path / "gm.nii")
    _assert_same_affine(written, source)
    assert np.array_equal(np.asanyarray(written.dataobj), np.asanyarray(source.dataobj))


def test_a_prediction_layer_overlays_its_image(
    make_napari_viewer: Callable[..., Any], shared_data: Path, tmp_path: Path
) -> None:
    path = shared_data / "spinal-gm" / "sub-9604" / "image.nii.gz"
    viewer = make_napari_viewer()
    [image] = viewer.open(path, plugin=PLUGIN)
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    mask = np.zeros(image.data.shape, np.uint8)
    mask[2, 50:60, 70:90] = 1
    bundle = SimpleNamespace(quant=SimpleNamespace(label="FP"), info={})
    segment._add_layer(image, bundle, mask, 0.1)  # what a finished segmentation adds
    prediction = viewer.layers[-1]
    assert isinstance(prediction, napari.layers.Labels)
    assert np.array_equal(prediction.affine.affine_matrix, image.affine.affine_matrix)
    assert np.array_equal(prediction.scale, image.scale)
    written = _saved(prediction, tmp_path / "prediction.nii.gz")
    _assert_same_affine(written, nib.load(path))
    assert np.array_equal(np.asanyarray(written.dataobj), np.moveaxis(mask, 0, 2))
