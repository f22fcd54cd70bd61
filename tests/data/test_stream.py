"""Streamed volumes: every lazy reader gives the eager reader's slices, and streamed masks are
the files the eager writer writes, complete or absent."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile

from napari_unetquant.data import (
    InputError,
    array_source,
    open_volume,
    read_volume,
    write_mask,
    write_mask_stream,
)


def _stack() -> np.ndarray:
    return np.random.default_rng(0).integers(-1000, 2000, (11, 17, 13)).astype(np.int16)


def _write(path: Path, stack: np.ndarray) -> Path:
    suffix = path.name.partition(".")[2]
    if suffix in ("tif", "tiff"):
        tifffile.imwrite(path, stack, photometric="minisblack")
    elif suffix.startswith("nii"):
        affine = np.diag([0.5, 0.7, 3.0, 1.0])
        nib.save(nib.Nifti1Image(np.moveaxis(stack, 0, 2), affine), path)
    elif suffix == "npy":
        np.save(path, stack)
    elif suffix == "zarr":
        import zarr

        zarr.save_array(str(path), stack)
    else:  # a folder of single-slice TIFFs
        path.mkdir()
        for index, one in enumerate(stack):
            tifffile.imwrite(path / f"slice{index}.tif", one, photometric="minisblack")
    return path


@pytest.mark.parametrize("name", ["v.tif", "v.nii", "v.nii.gz", "v.npy", "v.zarr", "slices"])
def test_lazy_readers_give_the_eager_slices(tmp_path: Path, name: str) -> None:
    stack = _stack()
    path = _write(tmp_path / name, stack)
    with open_volume(path) as source:
        assert source.shape == stack.shape
        runs = [source.slices(a, a + 4) for a in range(0, 11, 4)]
        assert np.array_equal(np.concatenate(runs), stack)
        assert np.array_equal(source.slices(9, 99), stack[9:])  # clipped at the end
        if name.startswith("v.nii"):
            eager = read_volume(path)
            assert source.spacing == eager.spacing == pytest.approx((0.5, 0.7))
            assert source.affine is not None and np.array_equal(source.affine, eager.affine)


def test_dask_arrays_are_computed_a_run_at_a_time() -> None:
    import dask.array as da

    stack = _stack()
    computed: list[int] = []

    def block(x: np.ndarray) -> np.ndarray:
        if x.size:  # dask also calls it on an empty array to learn the output type
            computed.append(len(x))
        return x

    lazy = da.from_array(stack, chunks=(2, 17, 13)).map_blocks(block, dtype=stack.dtype)
    source = array_source(lazy)
    assert computed == [] and source.shape == stack.shape
    assert np.array_equal(source.slices(4, 6), stack[4:6])
    assert sum(computed) == 2  # one chunk of two slices, not the whole stack


def test_damaged_and_unsuitable_files_are_refused_with_the_reason(tmp_path: Path) -> None:
    for name, keep in (("v.nii.gz", 200), ("v.nii", 352 + 17 * 13 * 2 * 5), ("v.tif", 3000)):
        path = _write(tmp_path / name, _stack())
        path.write_bytes(path.read_bytes()[:keep])  # cut short: in the header, or part-way
        with pytest.raises(InputError, match=re.escape(name)), open_volume(path) as source:
            source.slices(0, 11)
    with pytest.raises(InputError, match="no such file"):
        open_volume(tmp_path / "missing.tif")
    rgb = tmp_path / "rgb.tif"
    colour = np.arange(3 * 8 * 8 * 3, dtype=np.uint8).reshape(3, 8, 8, 3)
    tifffile.imwrite(rgb, colour, photometric="rgb")
    with pytest.raises(ValueError, match=r"colour \(RGB\)"):
        open_volume(rgb)


@pytest.mark.parametrize("name", ["m.tif", "m.nii", "m.nii.gz"])
def test_streamed_masks_are_the_files_the_eager_writer_writes(tmp_path: Path, name: str) -> None:
    mask = (np.random.default_rng(1).random((7, 9, 5)) > 0.5).astype(np.uint8)
    like = read_volume(_write(tmp_path / "image.nii", _stack()[:7, :9, :5]))
    streamed, eager = tmp_path / name, tmp_path / f"eager-{name}"
    write_mask_stream(streamed, (mask[a : a + 3] for a in range(0, 7, 3)), (7, 9, 5), like=like)
    write_mask(eager, mask, like=like)
    assert np.array_equal(read_volume(streamed).array, mask)
    if name.startswith("m.nii"):
        image = nib.load(streamed)
        assert np.array_equal(image.affine, like.affine)
        assert np.array_equal(np.asanyarray(image.dataobj), np.asanyarray(nib.load(eager).dataobj))
        assert image.get_data_dtype() == np.uint8


def test_a_stream_that_fails_part_way_leaves_the_old_file_and_no_debris(tmp_path: Path) -> None:
    out = tmp_path / "mask.nii.gz"
    write_mask(out, np.ones((2, 4, 4), np.uint8))
    before = out.read_bytes()

    def failing() -> Iterator[np.ndarray]:
        yield np.zeros((1, 4, 4), np.uint8)
        raise RuntimeError("the network ran out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        write_mask_stream(out, failing(), (2, 4, 4))
    with pytest.raises(ValueError, match="only 1 of 2"):
        write_mask_stream(out, [np.zeros((1, 4, 4), np.uint8)], (2, 4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        write_mask_stream(out, [np.zeros((1, 5, 4), np.uint8)], (2, 4, 4))
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]


def test_scaled_nifti_declares_the_type_its_slices_have(tmp_path: Path) -> None:
    image = nib.Nifti1Image(np.moveaxis(_stack(), 0, 2), np.eye(4))
    image.header.set_slope_inter(0.5, 10.0)
    nib.save(image, tmp_path / "scaled.nii")
    with open_volume(tmp_path / "scaled.nii") as source:
        run = source.slices(0, 2)
        assert source.dtype == run.dtype and source.dtype.kind == "f"
        assert np.array_equal(run, _stack()[:2] * 0.5 + 10.0)


def test_imagej_stacks_with_one_ifd_are_mapped_not_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ImageJ writes stacks over 4 GiB as one IFD followed by every slice's pixels."""
    import napari_unetquant.data.tiff as tiff_reader

    stack = _stack().astype(np.uint16)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, stack, imagej=True, truncate=True)

    def whole(series: object, path: Path) -> None:
        raise AssertionError(f"{path} was read whole")

    monkeypatch.setattr(tiff_reader, "_whole", whole)
    with open_volume(path) as source:
        assert source.shape == stack.shape
        assert np.array_equal(source.slices(3, 7), stack[3:7])


@pytest.mark.parametrize("name", ["m.nii", "m.nii.gz"])
def test_streamed_nifti_is_the_file_nibabel_writes(tmp_path: Path, name: str) -> None:
    import gzip

    mask = (np.random.default_rng(1).random((7, 9, 5)) * 3).astype(np.int16)
    affine = np.array([[0, -0.8, 0, 10], [0.7, 0, 0, -3], [0, 0, 2.5, 4], [0, 0, 0, 1]])
    like = array_source(mask, affine=affine)
    write_mask_stream(tmp_path / name, [mask[:3], mask[3:]], (7, 9, 5), np.int16, like)
    reference = nib.Nifti1Image(np.moveaxis(mask, 0, 2), affine, dtype=np.int16)
    reference.set_qform(affine, code=1)
    reference.set_sform(affine, code=1)
    nib.save(reference, tmp_path / f"nibabel-{name}")
    opener = gzip.open if name.endswith(".gz") else open
    written = [tmp_path / name, tmp_path / f"nibabel-{name}"]
    with opener(written[0], "rb") as ours, opener(written[1], "rb") as theirs:
        assert ours.read() == theirs.read()


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii", "v.tif"])
def test_leaving_the_with_block_closes_the_file(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path / name, _stack())
    with open_volume(path) as source:
        assert np.array_equal(source.slices(0, 2), _stack()[:2])
    with pytest.raises(InputError, match="could not be read"):
        source.slices(2, 4)


def test_slices_outside_the_volume_are_an_error_not_a_damaged_file(tmp_path: Path) -> None:
    with (
        open_volume(_write(tmp_path / "v.nii", _stack())) as source,
        pytest.raises(IndexError, match="it has 11 slices"),
    ):
        source.slices(11, 12)


def test_a_stack_written_page_by_page_is_every_slice_not_the_first(tmp_path: Path) -> None:
    stack = _stack()
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as tiff:  # one series per page: no ImageJ/OME metadata
        for one in stack:
            tiff.write(one, photometric="minisblack")
    assert len(tifffile.TiffFile(path).series) == len(stack)
    assert np.array_equal(read_volume(path).array, stack)
    with open_volume(path) as source:
        assert source.shape == stack.shape
        assert np.array_equal(np.concatenate(list(source.chunks(4))), stack)
