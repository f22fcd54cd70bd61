"""Closing the viewer while the Train dock trains: Python survives, training stops after the
step it is in, and the best model so far is kept in a recovery file whose path is printed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from napari_unetquant._widgets._common import SETTINGS_DIR
from napari_unetquant.modelio import load_model

SCRIPT = Path(__file__).with_name("_close_mid_training.py")


@pytest.mark.slow
def test_closing_the_viewer_mid_training_keeps_python_and_the_model(tmp_path: Path) -> None:
    env = {**os.environ, SETTINGS_DIR: str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    [recovered] = (tmp_path / "recovered").glob("*.safetensors")
    assert f"the best model so far is in {recovered}" in result.stderr
    bundle = load_model(recovered)
    assert bundle.quant.is_float and bundle.info["steps"] >= 3
