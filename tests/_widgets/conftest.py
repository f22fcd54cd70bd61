"""Widget tests: settings isolated from the user's, notifications captured."""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_unetquant._widgets import _common, _session


@pytest.fixture(autouse=True)
def settings_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Widget settings go to a fresh folder, never the user's."""
    folder = tmp_path / "settings"
    monkeypatch.setenv(_common.SETTINGS_DIR, str(folder))
    return folder


@pytest.fixture(autouse=True)
def _fresh_session(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_session, "_models", {})
    monkeypatch.setattr(_session, "_listeners", [])


@pytest.fixture
def errors(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Messages the widgets showed as error notifications."""
    shown: list[str] = []
    monkeypatch.setattr(_common, "show_error", shown.append)
    return shown
