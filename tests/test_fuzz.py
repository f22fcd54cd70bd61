"""Fuzzing: mutated real files either read (well-formed) or fail with one clean line naming
the file; never another exception type, a hang, or an unpickle (see ``fuzz_targets.py``; the
long run is ``benchmarks/fuzz.py``). Below: one regression test per bug the fuzzing found."""

from __future__ import annotations

import importlib.util
import json
import random
import struct
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_unetquant.data import open_volume, read_volume
from napari_unetquant.modelio import load_model


def _load_harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "fuzz_targets", Path(__file__).with_name("fuzz_targets.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_targets"] = module
    spec.loader.exec_module(module)
    return module


fz = _load_harness()
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# a few seconds per seed in the "ci" profile
EXAMPLES = settings.default.max_examples * 8


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Any]]:
    """The targets grouped by seed (both readers share an image seed's mutations)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the fuzz tests mutate its real files")
    seeds = fz.build_seeds(SHARED_DATA, tmp_path_factory.mktemp("seeds"))
    grouped: dict[str, list[Any]] = {}
    for target in fz.build_targets(seeds):
        grouped.setdefault(target.seed.name, []).append(target)
    return grouped


@pytest.mark.slow
@pytest.mark.parametrize("seed_name", [*fz.IMAGE_SEEDS, *fz.MODEL_SEEDS])
@settings(max_examples=EXAMPLES)
@given(rng=st.randoms(use_true_random=False))
def test_mutated_files_read_or_fail_cleanly(
    targets: dict[str, list[Any]], seed_name: str, rng: random.Random, tmp_path: Path
) -> None:
    seed = targets[seed_name][0].seed
    data = fz.mutate(seed, rng)
    for target in targets[seed_name]:
        path = fz.write_case(seed, data, tmp_path / "case")
        outcome = fz.run_case(target, path, seconds=10.0)
        assert outcome.kind != "other", f"{target.name}: {outcome.detail}"


# --- regressions ---------------------------------------------------------------------------------


def test_library_errors_that_span_lines_are_reported_on_one(tmp_path: Path) -> None:
    nii = tmp_path / "short.nii"
    nii.write_bytes(
        fz.gzip.decompress((SHARED_DATA / "spinal-gm-tiny" / "t2s.nii.gz").read_bytes())[:5000]
    )
    with pytest.raises(ValueError, match=r"short\.nii: could not be read") as error:
        read_volume(nii)
    assert "\n" not in str(error.value)  # nibabel's own message has a line break


def _patched_tiff(tmp_path: Path, tags: dict[int, int]) -> Path:
    """A small uncompressed TIFF of real pixels with some LONG/SHORT tag values replaced."""
    path = tmp_path / "huge.tif"
    pixels = tifffile.imread(SHARED_DATA / "isbi2012" / "train-volume.tif", key=0)[:32, :32]
    tifffile.imwrite(path, pixels, photometric="minisblack")
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tiff:
        for code, value in tags.items():
            tag = tiff.pages[0].tags[code]
            kind = "<I" if tag.dtype == 4 else "<H"
            struct.pack_into(kind, data, tag.valueoffset, value)
    path.write_bytes(bytes(data))
    return path


def test_a_tiff_declaring_a_huge_image_says_it_does_not_fit_in_memory(tmp_path: Path) -> None:
    path = _patched_tiff(tmp_path, {256: 0xFFFF, 257: 0xFFFF})  # ImageWidth, ImageLength
    expected = r"huge\.tif: the image does not fit in memory"
    with pytest.raises(ValueError, match=expected) as error, fz.memory_limit(1 << 30):
        read_volume(path)
    assert "segment it streamed" in str(error.value)


def test_a_dicom_slice_with_a_damaged_position_is_refused_naming_it(tmp_path: Path) -> None:
    seed = fz._dicom_seed(SHARED_DATA, tmp_path)
    data = seed.data.replace(b"0.0\\0.0\\5.0", b"0.0\\0.0\\p.0")
    assert data != seed.data
    folder = fz.write_case(seed, data, tmp_path / "series")
    for reader in (read_volume, open_volume):
        with pytest.raises(ValueError, match=r"slice1\.dcm: damaged DICOM header \(ValueError"):
            reader(folder)


def test_dicom_pixels_too_large_for_memory_say_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = fz._dicom_seed(SHARED_DATA, tmp_path)
    folder = fz.write_case(seed, seed.data, tmp_path / "series")
    import pydicom

    class Huge:
        @property
        def pixel_array(self) -> np.ndarray:
            raise MemoryError("Unable to allocate 8.0 GiB")

    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda f, **k: real(f, **k) if k else Huge())
    with pytest.raises(ValueError, match="does not fit in memory"):
        read_volume(folder)


def _edited_model(path: Path, key: str, value: object, section: str = "unet") -> Path:
    """``path`` with ``config[section][key]`` set to ``value`` in its metadata."""
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    config = json.loads(header["__metadata__"]["config"])
    config[section][key] = value
    header["__metadata__"]["config"] = json.dumps(config)
    text = json.dumps(header).encode()
    edited = path.with_name(f"edited-{key}.safetensors")
    edited.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])
    return edited


@pytest.mark.parametrize("width", [100_000, 2**40])
def test_metadata_declaring_a_huge_network_is_refused_before_building_it(
    w4a6_model_file: Path, width: int
) -> None:
    edited = _edited_model(w4a6_model_file, "base_width", width)
    expected = "do not match the configured network: it has"
    with pytest.raises(ValueError, match=expected), fz.memory_limit(1 << 30):  # not terabytes
        load_model(edited)


def test_state_dict_mismatches_are_reported_on_one_line(w4a6_model_file: Path) -> None:
    edited = _edited_model(w4a6_model_file, "depth", 1)  # fewer layers than the tensors hold
    with pytest.raises(ValueError, match="do not match the configured network") as error:
        load_model(edited)
    assert "\n" not in str(error.value) and "edited-depth.safetensors" in str(error.value)


def test_metadata_naming_no_layer_is_refused_naming_the_file(w4a6_model_file: Path) -> None:
    edited = _edited_model(w4a6_model_file, "edge_layers", ["p"], section="quant")
    with pytest.raises(ValueError, match=r"edited-edge_layers\.safetensors: edge_layers pattern"):
        load_model(edited)


@pytest.mark.parametrize("preprocess", ["x", [], None, {"spacing": []}, {"ct_window": "w"}])
def test_preprocess_metadata_of_any_shape_is_refused_naming_the_file(
    w4a6_model_file: Path, preprocess: object
) -> None:
    data = w4a6_model_file.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    config = json.loads(header["__metadata__"]["config"])
    config["preprocess"] = preprocess
    header["__metadata__"]["config"] = json.dumps(config)
    text = json.dumps(header).encode()
    w4a6_model_file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])
    with pytest.raises(
        ValueError, match=r"w4a6\.safetensors: the model's configuration is invalid"
    ):
        load_model(w4a6_model_file)


@pytest.mark.parametrize("shift", [2000, -2000])
def test_a_packed_shift_beyond_float32_is_refused(w4a6_model_file: Path, shift: int) -> None:
    from napari_unetquant.modelio import save_model

    packed = w4a6_model_file.with_name("packed.safetensors")
    save_model(packed, load_model(w4a6_model_file), packed=True)
    data = packed.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    config = json.loads(header["__metadata__"]["config"])
    layer = next(iter(config["layers"]))
    config["layers"][layer]["frac_bits"] = shift  # 2.0 ** -shift: 0, or OverflowError
    header["__metadata__"]["config"] = json.dumps(config)
    text = json.dumps(header).encode()
    packed.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])
    with pytest.raises(ValueError, match=rf"packed\.safetensors: .*fixed-point shift {shift}"):
        load_model(packed)


def test_a_tiff_whose_pages_loop_ends_in_a_clean_error_not_a_hang(
    targets: dict[str, list[Any]], tmp_path: Path
) -> None:
    """Case 13774 of ``read_volume/tiff-raw``: IFDs that point back at each other, on which
    tifffile's series parsing iterated for ever."""
    readers = targets["tiff-raw"]
    data = fz.mutate(readers[0].seed, random.Random("read_volume/tiff-raw/0/13774"))
    path = fz.write_case(readers[0].seed, data, tmp_path / "case")
    for target in readers:  # read_volume and open_volume
        outcome = fz.run_case(target, path, 20.0)
        assert outcome.kind == "clean error", outcome.detail
