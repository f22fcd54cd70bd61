"""The README's Python example runs as written."""

from __future__ import annotations

import csv
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", _section("Python API"), flags=re.S)
    assert blocks, "README.md has a Python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert "total" in capsys.readouterr().out


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}")
    return text[start : text.index("\n## ", start + 1)]


@pytest.fixture
def scans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, w4a6_model_file: Path) -> Path:
    """What the large-data examples expect in the current folder: a model file, ``scans/``
    with two volumes and ``labels/`` with their labels under the same names."""
    import tifffile

    from napari_unetquant.data import em_phantom_stack

    assert w4a6_model_file == tmp_path / "w4a6.safetensors"  # the name the examples use
    for folder in ("scans", "labels"):
        (tmp_path / folder).mkdir()
    for n in (2, 3):
        image, truth = em_phantom_stack(n, 40, 40, seed=n)
        grey = {"photometric": "minisblack"}
        tifffile.imwrite(tmp_path / "scans" / f"ct{n}.tif", (image * 255).astype("uint8"), **grey)
        tifffile.imwrite(tmp_path / "labels" / f"ct{n}.tif", truth, **grey)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_large_data_batch_command_runs_as_written(scans: Path) -> None:
    from napari_unetquant.cli import main

    lines = re.findall(
        r"^unetquant segment [^\n\\]*--labels-dir[^\n]*$",
        _section("Large data and clusters"),
        flags=re.M,
    )
    assert lines, "the README shows a batch command with labels"
    assert main(shlex.split(lines[0])[1:]) == 0
    rows = list(csv.DictReader((scans / "masks" / "segment.csv").open()))
    assert [Path(r["image"]).name for r in rows] == ["ct2.tif", "ct3.tif"]
    assert all(0 <= float(r["dice_volume"]) <= 1 for r in rows)


def test_large_data_python_example_runs_on_a_local_cluster(scans: Path) -> None:
    distributed = pytest.importorskip("distributed")
    blocks = re.findall(r"```python\n(.*?)```", _section("Large data and clusters"), flags=re.S)
    assert len(blocks) == 1 and 'Client("tcp://head:8786")' in blocks[0]
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        code = blocks[0].replace('"tcp://head:8786"', repr(cluster.scheduler_address))
        exec(compile(code, "README.md", "exec"), {})
    rows = list(csv.DictReader((scans / "masks" / "segment.csv").open()))
    assert len(rows) == 2 and all(r["dice_volume"] and not r["error"] for r in rows)
