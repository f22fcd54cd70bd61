"""Readers and writers on real files in real formats."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import tifffile

from napari_unetquant.data import Volume, read_volume, write_mask


def test_isbi_multipage_tiff(shared_data: Path) -> None:
    volume = read_volume(shared_data / "isbi2012" / "train-volume.tif")
    labels = read_volume(shared_data / "isbi2012" / "train-labels.tif")
    assert volume.array.shape == labels.array.shape == (24, 512, 512)
    assert volume.array.dtype == np.uint8 and volume.spacing is None
    assert set(np.unique(labels.array)) == {0, 255}


def test_nifti_keeps_spacing_affine_and_slices_along_the_third_axis(shared_data: Path) -> None:
    path = shared_data / "spinal-gm" / "sub-9584" / "image.nii.gz"
    volume = read_volume(path)
    reference = nib.load(path)
    data = np.asanyarray(reference.dataobj)
    assert volume.array.shape == (17, 384, 210)
    assert np.array_equal(volume.array[5], data[:, :, 5])
    assert volume.spacing == pytest.approx((0.4167, 0.4167), abs=1e-3)
    assert np.array_equal(volume.affine, reference.affine)


def test_nifti_mask_round_trip_keeps_the_source_grid(shared_data: Path, tmp_path: Path) -> None:
    source = read_volume(shared_data / "spinal-gm-tiny" / "t2s.nii.gz")
    mask = (source.array > np.median(source.array)).astype(np.uint8)
    out = tmp_path / "mask.nii.gz"
    write_mask(out, mask, like=source)
    written = nib.load(out)
    assert np.array_equal(written.affine, source.affine)
    assert written.shape == (49, 54, 9)
    again = read_volume(out)
    assert np.array_equal(again.array, mask) and again.spacing == source.spacing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"], "no temporary left"


def test_tiff_mask_round_trip(tmp_path: Path) -> None:
    mask = (np.arange(2 * 5 * 7).reshape(2, 5, 7) % 3 == 0).astype(np.uint8)
    write_mask(tmp_path / "m.tif", mask)
    assert np.array_equal(tifffile.imread(tmp_path / "m.tif"), mask)


def test_png_file_and_folder_of_slices(tmp_path: Path) -> None:
    slices = np.random.default_rng(0).integers(0, 255, (3, 12, 10), dtype=np.uint8)
    for index, image in enumerate(slices):  # names that sort wrongly as text: 2, 10, 11
        iio.imwrite(tmp_path / f"slice{[2, 10, 11][index]}.png", image)
    assert np.array_equal(read_volume(tmp_path / "slice2.png").array, slices[:1])
    assert np.array_equal(read_volume(tmp_path).array, slices)


def test_grey_alpha_png_is_one_grey_slice(tmp_path: Path) -> None:
    grey = np.random.default_rng(2).integers(0, 255, (20, 30), dtype=np.uint8)
    iio.imwrite(tmp_path / "la.png", np.stack([grey, np.full_like(grey, 255)], axis=-1))
    assert np.array_equal(read_volume(tmp_path / "la.png").array, grey[None])


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    import os

    write_mask(tmp_path / "m.tif", np.zeros((1, 2, 2), np.uint8))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.tif").stat().st_mode & 0o777 == 0o666 & ~umask


def test_grey_rgb_png_becomes_one_channel(tmp_path: Path) -> None:
    grey = np.random.default_rng(1).integers(0, 255, (9, 8), dtype=np.uint8)
    iio.imwrite(tmp_path / "rgb.png", np.repeat(grey[..., None], 3, axis=2))
    assert np.array_equal(read_volume(tmp_path / "rgb.png").array[0], grey)


@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
def test_arrays_on_disk_read_into_writable_memory(tmp_path: Path, suffix: str) -> None:
    stack = np.random.default_rng(3).integers(0, 255, (4, 6, 5), dtype=np.uint8)
    path = tmp_path / f"stack{suffix}"
    if suffix == ".npy":
        np.save(path, stack)
    else:
        import zarr

        zarr.save_array(str(path), stack)
    volume = read_volume(path)
    assert np.array_equal(volume.array, stack) and volume.source == str(path)
    assert volume.array.flags.writeable and not isinstance(volume.array, np.memmap)


def test_a_folder_of_stacks_is_the_stacks_in_name_order(tmp_path: Path) -> None:
    stacks = np.random.default_rng(4).integers(0, 255, (2, 3, 8, 7), dtype=np.uint8)
    for index, stack in enumerate(stacks):
        tifffile.imwrite(tmp_path / f"part{index}.tif", stack, photometric="minisblack")
    assert np.array_equal(read_volume(tmp_path).array, stacks.reshape(6, 8, 7))


def test_a_damaged_slice_in_a_folder_is_named(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        iio.imwrite(tmp_path / name, np.zeros((16, 16), np.uint8))
    (tmp_path / "b.png").write_bytes((tmp_path / "b.png").read_bytes()[:40])
    with pytest.raises(ValueError, match=r"b\.png: could not be read as \.png"):
        read_volume(tmp_path)


def test_dicom_series_in_hounsfield_units_sorted_by_position(
    tmp_path: Path, ct_series: Callable[..., None]
) -> None:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1000, (4, 6, 5)).astype(np.int16)
    ct_series(tmp_path / "scan", hu)
    volume = read_volume(tmp_path / "scan")
    # sorted by position (files were written top-down), in NIfTI voxel order (i = DICOM column)
    assert np.array_equal(volume.array, np.transpose(hu[::-1], (0, 2, 1)).astype(np.float32))
    assert volume.spacing == pytest.approx((0.8, 0.7))
    assert volume.affine is not None
    # voxel (i, j, s) = (column, row, slice) -> RAS mm: LPS axes flipped in x and y
    assert np.allclose(volume.affine[:3, :3], np.diag([-0.8, -0.7, 2.5]))
    assert np.allclose(volume.affine[:3, 3], [0, 0, 2.5])


def test_dicom_series_stream_reads_pixels_only_of_the_slices_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ct_series: Callable[..., None]
) -> None:
    import pydicom

    from napari_unetquant.data import open_volume

    hu = np.random.default_rng(1).integers(-1000, 1000, (6, 6, 5)).astype(np.int16)
    ct_series(tmp_path / "scan", hu)
    eager = read_volume(tmp_path / "scan")
    pixels_read: list[str] = []
    original = pydicom.dcmread

    def counting(file: object, *args: object, **kwargs: object) -> object:
        if not kwargs.get("stop_before_pixels"):
            pixels_read.append(Path(str(file)).name)
        return original(file, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    with open_volume(tmp_path / "scan") as source:
        assert pixels_read == [] and source.shape == eager.shape
        assert np.array_equal(source.slices(2, 4), eager.array[2:4])
        assert len(pixels_read) == 2  # two files' pixels, not the series'
        assert source.spacing == eager.spacing
        assert source.affine is not None and np.array_equal(source.affine, eager.affine)


def test_labels_in_another_orientation_are_brought_onto_the_image(
    shared_data: Path, tmp_path: Path
) -> None:
    from napari_unetquant.train import read_pairs

    folder = shared_data / "spinal-gm-tiny"
    source = nib.load(folder / "t2s_gmseg_manual.nii.gz")
    data = np.asanyarray(source.dataobj)
    flip = np.array([[-1.0, 0, 0, data.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    swap = np.array([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    flipped = nib.Nifti1Image(data[::-1].copy(), source.affine @ flip)
    swapped = nib.Nifti1Image(np.swapaxes(data, 0, 1).copy(), source.affine @ swap)
    nib.save(flipped, tmp_path / "flipped.nii.gz")
    nib.save(swapped, tmp_path / "swapped.nii.gz")
    expected = read_pairs([folder / "t2s.nii.gz"], [folder / "t2s_gmseg_manual.nii.gz"])
    for name in ("flipped", "swapped"):
        pair = read_pairs([folder / "t2s.nii.gz"], [tmp_path / f"{name}.nii.gz"])[0]
        assert np.array_equal(pair.mask, expected[0].mask)
    shifted = nib.Nifti1Image(data, source.affine + np.array([[0, 0, 0, 5.0]] + [[0] * 4] * 3))
    nib.save(shifted, tmp_path / "shifted.nii.gz")
    with pytest.raises(ValueError, match="does not lie on the grid"):
        read_pairs([folder / "t2s.nii.gz"], [tmp_path / "shifted.nii.gz"])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.tif", "no such file or folder"),
        (lambda d: _write(d / "notes.docx", b"x"), r"unsupported file type '\.docx'.*\.npy"),
        (lambda d: _truncated_tiff(d), "could not be read as .tif"),
        (lambda d: _colour_png(d), "colour \\(RGB\\) image"),
        (lambda d: _nifti_4d(d), "give one 3D volume"),
        (lambda d: _empty_folder(d), "no images found"),
        (lambda d: _mixed_folder(d), "slices have different sizes"),
    ],
    ids=["missing", "suffix", "truncated", "rgb", "4d", "empty-folder", "mixed-sizes"],
)
def test_bad_files_give_clear_errors(tmp_path: Path, make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_volume(make(tmp_path))  # type: ignore[operator]


def test_a_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        Path(str(args[0])).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", crash)
    with pytest.raises(OSError, match="disk full"):
        write_mask(tmp_path / "out.tif", np.zeros((1, 4, 4), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_mask_extension_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"use \.tif, \.tiff, \.nii or \.nii\.gz"):
        write_mask(tmp_path / "mask.png", np.zeros((1, 2, 2), np.uint8))


def test_volume_must_be_a_stack() -> None:
    with pytest.raises(ValueError, match=r"\(S, H, W\)"):
        Volume(np.zeros((4, 4)))


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _truncated_tiff(folder: Path) -> Path:
    full = folder / "full.tif"
    tifffile.imwrite(
        full,
        np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8),
        photometric="minisblack",
    )
    return _write(folder / "cut.tif", full.read_bytes()[:3000])


def _colour_png(folder: Path) -> Path:
    colour = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    iio.imwrite(folder / "colour.png", colour)
    return folder / "colour.png"


def _nifti_4d(folder: Path) -> Path:
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.float32), np.eye(4)), folder / "t.nii.gz")
    return folder / "t.nii.gz"


def _empty_folder(folder: Path) -> Path:
    (folder / "empty").mkdir()
    return folder / "empty"


def _mixed_folder(folder: Path) -> Path:
    (folder / "mixed").mkdir()
    iio.imwrite(folder / "mixed" / "a.png", np.zeros((4, 4), np.uint8))
    iio.imwrite(folder / "mixed" / "b.png", np.zeros((5, 4), np.uint8))
    return folder / "mixed"
