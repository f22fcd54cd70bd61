"""Fuzzing the readers and the model loader with mutated real files.

Shared by ``tests/test_fuzz.py`` (a bounded hypothesis run) and ``benchmarks/fuzz.py`` (a long
run with counts). A *seed* is a small real file: pages of the ISBI 2012 TIFF, the spinal cord
NIfTI (``.nii`` and ``.nii.gz``), a PNG and a JPEG of real EM pixels, a DICOM series of real CT
pixels, and model files written by ``save_model`` (plain and packed). A *case* is a seed after a
few random mutations (bit flips, truncation, insertion, deletion, duplicated runs, header fields
set to extreme values, edits of the safetensors JSON header). Each target calls the code on the
case and the outcome is one of:

- ``success``: it returned well-formed data (a ``(S, H, W)`` array with every axis >= 1, every
  slice read; a model in evaluation mode);
- ``clean error``: a ``ValueError`` (``InputError`` included) whose message is one line and
  names the file;
- ``other``: anything else (another exception type, an error caused by running out of memory,
  a message without the file name, a case over its time limit): each one is a bug.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import pickle
import random
import re
import resource
import shutil
import signal
import struct
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

OUTCOMES = ("success", "clean error", "other")
INTERESTING = (0, 1, 2, 3, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 2**62, 2**63 - 1, 2**64 - 1)  # fmt: skip
MEMORY_HEADROOM = 3 << 30  # bytes a case may allocate beyond the process's size at its start


class CaseTimeout(BaseException):
    """A case ran past its time limit (a BaseException, so no ``except Exception`` eats it)."""


class Unpickled(BaseException):
    """The model loader reached for pickle."""


@dataclass(frozen=True)
class Seed:
    """A real file to mutate: ``data`` is written as ``file_name`` (inside a folder holding
    ``siblings``, for a DICOM series); ``fields`` are byte offsets of header fields worth
    setting to extreme values; ``inner`` is the decompressed content of a gzip file."""

    name: str
    file_name: str
    data: bytes
    fields: tuple[int, ...] = ()
    siblings: dict[str, bytes] = field(default_factory=dict)
    inner: Seed | None = None
    json_header: bool = False


@dataclass(frozen=True)
class Target:
    """One function under test on one seed's mutations."""

    name: str
    seed: Seed
    call: Callable[[Path], None]


@dataclass(frozen=True)
class Outcome:
    kind: str
    detail: str = ""


# --- seeds from the real data ------------------------------------------------------------------


def build_seeds(shared_data: Path, workdir: Path) -> dict[str, Seed]:
    """The seeds, written from ``shared_data`` (real files cut small) into ``workdir``."""
    import imageio.v3 as iio
    import tifffile

    workdir.mkdir(parents=True, exist_ok=True)
    em = tifffile.imread(shared_data / "isbi2012" / "train-volume.tif", key=range(3))
    em = np.ascontiguousarray(em[:, 100:164, 200:264])
    seeds = {}
    for name, compression in (("tiff-deflate", "zlib"), ("tiff-raw", None)):
        path = workdir / f"{name}.tif"
        tifffile.imwrite(path, em, photometric="minisblack", compression=compression)
        seeds[name] = Seed(name, "image.tif", path.read_bytes(), _tiff_fields(path))
    tiny = shared_data / "spinal-gm-tiny" / "t2s.nii.gz"
    nii = gzip.decompress(tiny.read_bytes())
    seeds["nii"] = Seed("nii", "image.nii", nii, NIFTI_FIELDS)
    seeds["nii.gz"] = Seed(
        "nii.gz", "image.nii.gz", tiny.read_bytes(), inner=Seed("nii", "", nii, NIFTI_FIELDS)
    )
    for name, extension in (("png", ".png"), ("jpeg", ".jpg")):
        path = workdir / f"picture{extension}"
        iio.imwrite(path, em[0])
        seeds[name] = Seed(name, f"image{extension}", path.read_bytes(), _marker_fields(path))
    seeds["dicom"] = _dicom_seed(shared_data, workdir)
    seeds.update(_model_seeds(workdir))
    return seeds


NIFTI_FIELDS = (0, 40, 42, 44, 46, 48, 56, 70, 72, 76, 80, 84, 88, 108, 112, 116, 120, 123, 252,
                254, 256, 280, 344)  # fmt: skip


def _tiff_fields(path: Path) -> tuple[int, ...]:
    """The first-IFD pointer and each IFD entry's type, count and value fields."""
    import tifffile

    offsets = [4]
    with tifffile.TiffFile(path) as tiff:
        for page in tiff.pages:
            assert isinstance(page, tifffile.TiffPage)
            offsets.append(page.offset)
            for tag in page.tags.values():
                offsets += [tag.offset + 2, tag.offset + 4, tag.valueoffset]
    return tuple(offsets)


def _marker_fields(path: Path) -> tuple[int, ...]:
    """PNG chunk lengths and IHDR fields; JPEG segment lengths and frame sizes."""
    data = path.read_bytes()
    offsets = []
    if data.startswith(b"\x89PNG"):
        position = 8
        while position + 8 <= len(data):
            offsets += [position, position + 8, position + 12, position + 16, position + 17]
            position += 12 + struct.unpack(">I", data[position : position + 4])[0]
    else:
        offsets = [m.start() + 2 for m in re.finditer(rb"\xff[\xc0-\xfe]", data)]
        offsets += [m.start() + 5 for m in re.finditer(rb"\xff[\xc0-\xc3]", data)]
    return tuple(offsets)


def _dicom_seed(shared_data: Path, workdir: Path) -> Seed:
    """Three CT slices (real HU, cut to 24 x 20) as a DICOM series; the middle file mutates."""
    import nibabel as nib
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ct = np.asanyarray(nib.load(shared_data / "ct-spleen" / "image.nii.gz").dataobj)
    slices = np.round(ct[60:84, 70:90, 10:13]).astype(np.int16).transpose(2, 0, 1)
    folder = workdir / "dicom"
    folder.mkdir(exist_ok=True)
    files = {}
    for index, pixels in enumerate(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = f"1.2.3.4.{index}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice{index}.dcm"
        dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        dataset.Modality = "CT"
        dataset.Rows, dataset.Columns = pixels.shape
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
        dataset.PixelRepresentation = 1
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.RescaleSlope, dataset.RescaleIntercept = 1, 0
        dataset.PixelSpacing = [0.8, 0.8]
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        dataset.ImagePositionPatient = [0, 0, 5.0 * index]
        dataset.SeriesInstanceUID = "1.2.3"
        dataset.PixelData = pixels.tobytes()
        dataset.save_as(path, enforce_file_format=True)
        files[path.name] = path.read_bytes()
    middle = files.pop("slice1.dcm")
    # tag (group, element) little endian: the VR, the length and the value follow
    tags = [(0x0028, 0x0010), (0x0028, 0x0011), (0x0028, 0x0100), (0x0028, 0x0103),
            (0x0028, 0x0002), (0x0028, 0x0008), (0x7FE0, 0x0010), (0x0002, 0x0010),
            (0x0020, 0x0032), (0x0028, 0x1053)]  # fmt: skip
    offsets = []
    for group, element in tags:
        position = middle.find(struct.pack("<HH", group, element))
        if position >= 0:
            offsets += [position + 4, position + 6, position + 8, position + 12]
    return Seed("dicom", "slice1.dcm", middle, tuple(offsets), siblings=files)


def _model_seeds(workdir: Path) -> dict[str, Seed]:
    from napari_unetquant.config import PreprocessConfig, QuantConfig, UNetConfig
    from napari_unetquant.model import build_unet
    from napari_unetquant.modelio import SegmentationModel, save_model

    unet, quant = UNetConfig(base_width=2, depth=1), QuantConfig.from_bits(4, 6)
    bundle = SegmentationModel(build_unet(unet, quant).eval(), unet, quant, PreprocessConfig())
    seeds = {}
    for name, packed in (("model", False), ("model-packed", True)):
        path = workdir / f"{name}.safetensors"
        save_model(path, bundle, packed=packed)
        data = path.read_bytes()
        tensors_start = 8 + struct.unpack("<Q", data[:8])[0]  # most bytes are the JSON header
        fields = (0, *range(tensors_start, len(data), 4))
        seeds[name] = Seed(name, "model.safetensors", data, fields, json_header=True)
    return seeds


# --- mutations ---------------------------------------------------------------------------------


def mutate(seed: Seed, rng: random.Random) -> bytes:
    """``seed.data`` after one to three random mutations (of the decompressed content, then
    compressed again, in half the cases of a gzip seed)."""
    if seed.inner is not None and rng.random() < 0.5:
        return gzip.compress(mutate(seed.inner, rng), mtime=0)
    data = bytearray(seed.data)
    for _ in range(rng.randint(1, 3)):
        if seed.json_header and rng.random() < 0.5:
            data = bytearray(_edit_json_header(bytes(data), rng))
        else:
            rng.choice(_OPERATIONS)(data, seed, rng)
    return bytes(data)


def _position(data: bytearray, seed: Seed, rng: random.Random) -> int:
    """A byte offset: a header field, somewhere in the first KiB, or anywhere."""
    choice = rng.random()
    if seed.fields and choice < 0.4:
        position = rng.choice(seed.fields) + rng.choice((0, 0, 0, 1, 2, 3))
    elif choice < 0.7:
        position = rng.randrange(min(len(data), 1024) or 1)
    else:
        position = rng.randrange(len(data) or 1)
    return min(position, max(len(data) - 1, 0))


def _flip(data: bytearray, seed: Seed, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 8)):
        if data:
            data[_position(data, seed, rng)] ^= 1 << rng.randrange(8)


def _set_field(data: bytearray, seed: Seed, rng: random.Random) -> None:
    width = rng.choice((1, 2, 4, 8))
    value = rng.choice(INTERESTING) % (1 << (8 * width))
    if rng.random() < 0.3:
        value = (value + rng.choice((-1, 1))) % (1 << (8 * width))
    raw = value.to_bytes(width, rng.choice(("little", "big")))
    position = _position(data, seed, rng)
    data[position : position + width] = raw[: max(len(data) - position, 0)]


def _truncate(data: bytearray, seed: Seed, rng: random.Random) -> None:
    del data[rng.randrange(len(data) + 1) :]


def _insert(data: bytearray, seed: Seed, rng: random.Random) -> None:
    position = _position(data, seed, rng)
    data[position:position] = rng.randbytes(rng.choice((1, 2, 4, 16, 300)))


def _delete(data: bytearray, seed: Seed, rng: random.Random) -> None:
    position = _position(data, seed, rng)
    del data[position : position + rng.choice((1, 2, 4, 16, 300))]


def _duplicate(data: bytearray, seed: Seed, rng: random.Random) -> None:
    start = rng.randrange(len(data) + 1)
    run = data[start : start + rng.choice((4, 64, 1024))]
    position = _position(data, seed, rng)
    data[position:position] = run


_OPERATIONS = (_flip, _flip, _set_field, _set_field, _set_field, _truncate, _insert, _delete,
               _duplicate)  # fmt: skip


def _edit_json_header(data: bytes, rng: random.Random) -> bytes:
    """A safetensors file with one value of its JSON header (tensor dtypes, shapes, offsets, or
    the model configuration in the metadata) replaced, and the length prefix kept right."""
    try:
        length = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + length])
    except (struct.error, ValueError):
        return data
    paths = list(_leaves(header, ()))
    if not paths:
        return data
    path = rng.choice(paths)
    _replace(header, path, _odd_value(rng))
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def _leaves(value: Any, path: tuple[Any, ...]) -> Iterator[tuple[Any, ...]]:
    """Paths to every leaf; the metadata's JSON strings (``config``) are entered as JSON."""
    if isinstance(value, str) and value.startswith("{"):
        with contextlib.suppress(ValueError):
            yield from _leaves(json.loads(value), (*path, "<json>"))
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))
    if path:
        yield path


def _replace(container: Any, path: tuple[Any, ...], new: Any) -> Any:
    """``container`` with the leaf at ``path`` set to ``new`` (removed, for ``_DROP``)."""
    if not path:
        return None if new is _DROP else new
    key, rest = path[0], path[1:]
    if key == "<json>":
        return json.dumps(_replace(json.loads(container), rest, new))
    if not rest and new is _DROP and isinstance(container, dict):
        del container[key]
    else:
        container[key] = _replace(container[key], rest, new)
    return container


_DROP = object()


def _odd_value(rng: random.Random) -> Any:
    return rng.choice(
        (
            _DROP,
            None,
            0,
            -1,
            1,
            2,
            3,
            5,
            17,
            2**31,
            2**40,
            2**63,
            -(2**63),
            1e308,
            0.5,
            True,
            "",
            "x",
            "F16",
            "I64",
            "U8",
            "BOOL",
            "float",
            "binary",
            "packed",
            [],
            {},
            [0],
            [1, 2],
            [2**40, 2**40],
            {"a": 1},
        )
    )


# --- running a case ----------------------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`CaseTimeout` in the main thread after ``seconds``."""

    def expire(signum: int, frame: Any) -> None:
        raise CaseTimeout(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def memory_limit(headroom: int = MEMORY_HEADROOM) -> Iterator[None]:
    """Cap the address space at its current size plus ``headroom``, so a case that would
    allocate an absurd amount fails with ``MemoryError`` rather than taking the machine down."""
    size = int(re.findall(r"VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text())[0]) << 10
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + headroom, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def no_unpickling() -> Iterator[None]:
    """Make every pickle load (and ``torch.load``) raise :class:`Unpickled`."""
    import torch

    def refuse(*args: object, **kwargs: object) -> None:
        raise Unpickled("the model loader tried to unpickle")

    saved = pickle.load, pickle.loads, torch.load
    pickle.load = pickle.loads = torch.load = refuse  # type: ignore[assignment]
    try:
        yield
    finally:
        pickle.load, pickle.loads, torch.load = saved  # type: ignore[assignment]


def write_case(seed: Seed, data: bytes, folder: Path) -> Path:
    """The case on disk (a fresh ``folder``): the path to hand to the code under test."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, sibling in seed.siblings.items():
        (folder / name).write_bytes(sibling)
    (folder / seed.file_name).write_bytes(data)
    return folder if seed.siblings else folder / seed.file_name


def run_case(target: Target, path: Path, seconds: float = 10.0) -> Outcome:
    """``target.call(path)`` under a time and a memory limit, classified."""
    logging.disable(logging.CRITICAL)  # damaged files make the libraries warn and log a lot
    try:
        with time_limit(seconds), memory_limit(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            target.call(path)
    except ValueError as error:
        return _classify_value_error(error, path)
    except (Exception, CaseTimeout, Unpickled) as error:
        return Outcome("other", _describe(error))
    finally:
        logging.disable(logging.NOTSET)
    return Outcome("success")


def _classify_value_error(error: ValueError, path: Path) -> Outcome:
    message = str(error)
    causes = [error.__cause__, error.__context__]
    if any(isinstance(cause, MemoryError) for cause in causes) and "memory" not in message:
        return Outcome("other", f"out of memory: {_describe(error)}")
    if "\n" in message.strip() or str(path) not in message:
        return Outcome("other", f"unclear message: {_describe(error)}")
    return Outcome("clean error", message)


def _describe(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{type(error).__name__}: {str(error)[:300]}{where}"


# --- the targets -------------------------------------------------------------------------------


def check_read_volume(path: Path) -> None:
    from napari_unetquant.data import read_volume

    volume = read_volume(path)
    _check_slices(volume.array, volume.shape)


def check_open_volume(path: Path) -> None:
    from napari_unetquant.data import open_volume

    with open_volume(path) as source:
        assert len(source.shape) == 3 and min(source.shape) >= 1, source.shape
        count = 0
        for run in source.chunks(2):
            _check_slices(run, (len(run), *source.shape[1:]))
            count += len(run)
        assert count == source.shape[0]


def _check_slices(array: np.ndarray, shape: tuple[int, ...]) -> None:
    assert isinstance(array, np.ndarray) and array.ndim == 3, type(array)
    assert array.shape == tuple(shape) and min(array.shape) >= 1, (array.shape, shape)


def check_load_model(path: Path) -> None:
    from torch import nn

    from napari_unetquant.modelio import load_model

    with no_unpickling():
        bundle = load_model(path)
    assert isinstance(bundle.model, nn.Module) and not bundle.model.training


READERS = {"read_volume": check_read_volume, "open_volume": check_open_volume}
IMAGE_SEEDS = ("tiff-deflate", "tiff-raw", "nii", "nii.gz", "png", "jpeg", "dicom")
MODEL_SEEDS = ("model", "model-packed")


def build_targets(seeds: dict[str, Seed]) -> list[Target]:
    """Every reader on every image seed, and the model loader on both model layouts."""
    targets = [
        Target(f"{reader}/{name}", seeds[name], call)
        for name in IMAGE_SEEDS
        for reader, call in READERS.items()
    ]
    targets += [Target(f"load_model/{name}", seeds[name], check_load_model) for name in MODEL_SEEDS]
    return targets
