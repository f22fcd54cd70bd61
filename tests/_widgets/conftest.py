"""Widget tests: settings isolated from the user's, notifications captured."""

from __future__ import annotations

from pathlib import Path

import pytest
from qtpy.QtCore import QSettings

from napari_unetquant._widgets import _common, _session


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path: Path) -> None:
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path))


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
