"""Models trained in this napari session, shared between the widgets."""

from __future__ import annotations

from collections.abc import Callable

from ..modelio import SegmentationModel

_models: dict[str, SegmentationModel] = {}
_listeners: list[Callable[[], None]] = []


def add_model(name: str, bundle: SegmentationModel) -> str:
    """Keep ``bundle`` under ``name`` (made unique); returns the name used."""
    unique, count = name, 2
    while unique in _models:
        unique, count = f"{name} ({count})", count + 1
    _models[unique] = bundle
    for listener in list(_listeners):
        listener()
    return unique


def models() -> dict[str, SegmentationModel]:
    return dict(_models)


def on_change(listener: Callable[[], None]) -> None:
    _listeners.append(listener)


def forget(listener: Callable[[], None]) -> None:
    if listener in _listeners:
        _listeners.remove(listener)
