"""All five docks open at once on a 1600 x 1000 screen: the window keeps its size (each dock
scrolls in the height Qt gives it), and the tables still show eight rows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qtpy.QtWidgets import QApplication, QScrollArea

PLUGIN = "napari-unetquant"
DOCKS = ["Train quantized U-Net", "Segment", "Batch segment", "Dice readout", "Bit-width sweep"]
SCREEN = (1600, 1000)
TABLE_ROWS = 8


def _open_all(make_napari_viewer: Callable[..., Any], qtbot: Any) -> tuple[Any, dict[str, Any]]:
    """A shown viewer of the screen's size with every dock opened as users open them."""
    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(*SCREEN)
    qtbot.waitUntil(lambda: window.isVisible(), timeout=10_000)
    docks = {name: viewer.window.add_plugin_dock_widget(PLUGIN, name)[1] for name in DOCKS}
    for _ in range(5):  # docks lay out over a few event-loop turns
        QApplication.processEvents()
        qtbot.wait(20)
    return viewer, docks


def test_all_five_docks_fit_a_1600_by_1000_window(
    make_napari_viewer: Callable[..., Any], qtbot: Any
) -> None:
    viewer, _ = _open_all(make_napari_viewer, qtbot)
    frame = viewer.window._qt_window.frameGeometry()
    size = (frame.width(), frame.height())
    assert size[0] <= SCREEN[0] and size[1] <= SCREEN[1], f"the window grew to {size}"


def test_the_docks_leave_the_image_most_of_the_width(
    make_napari_viewer: Callable[..., Any], qtbot: Any
) -> None:
    viewer, docks = _open_all(make_napari_viewer, qtbot)
    width = viewer.window._qt_window.width()
    for name, dock in docks.items():
        assert dock.native.width() <= 0.3 * width, f"{name} is {dock.native.width()} px wide"


def test_past_two_stacked_docks_the_next_open_as_tabs_of_the_full_half_height(
    make_napari_viewer: Callable[..., Any], qtbot: Any
) -> None:
    viewer, docks = _open_all(make_napari_viewer, qtbot)
    window = viewer.window._qt_window
    train, *tabbed = (docks[name].native.parentWidget() for name in DOCKS)
    assert window.tabifiedDockWidgets(train) == []
    assert set(window.tabifiedDockWidgets(tabbed[0])) == set(tabbed[1:])
    for dock in (train, *tabbed):
        dock.raise_()
        QApplication.processEvents()
        assert dock.height() >= 0.4 * SCREEN[1], f"{dock.name} is {dock.height()} px tall"


def test_each_dock_scrolls_instead_of_growing(
    make_napari_viewer: Callable[..., Any], qtbot: Any
) -> None:
    _, docks = _open_all(make_napari_viewer, qtbot)
    for name, dock in docks.items():
        scroll = dock.native
        assert isinstance(scroll, QScrollArea), f"{name} is not in a scroll area"
        assert scroll.minimumSizeHint().height() < 200, name


def test_tables_show_eight_rows(make_napari_viewer: Callable[..., Any], qtbot: Any) -> None:
    _, docks = _open_all(make_napari_viewer, qtbot)
    tables = {name: dock.table.native for name, dock in docks.items() if hasattr(dock, "table")}
    assert set(tables) == {"Batch segment", "Dice readout", "Bit-width sweep"}
    for name, table in tables.items():
        rows = TABLE_ROWS * table.verticalHeader().defaultSectionSize()
        shown = table.viewport().height()
        assert shown >= rows, f"the {name} table shows {shown} px, {TABLE_ROWS} rows need {rows}"
