"""The core speaks neither command line nor Qt: no message it can raise names a flag (the
shells word the fix for their own surface from ``SettingError.settings``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from napari_unetquant._widgets._common import CONTROLS
from napari_unetquant.cli._options import OPTIONS
from napari_unetquant.errors import SETTINGS, SettingError, settings_hint

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "napari_unetquant"
SHELLS = ("cli", "_widgets", "__main__.py")
FLAG = re.compile(r"--[a-z][a-z-]*")
# Flags of other programs the core writes, not of unetquant: the C export's own command line.
OTHER_PROGRAMS = {"infer/export_c.py": {"--memory"}, "infer/c_program.py": {"--memory"}}


def _core_modules() -> list[Path]:
    return [
        path
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.relative_to(PACKAGE).parts[0] not in SHELLS
    ]


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string nodes that are docstrings (they may quote flags for readers)."""
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                found.add(id(value))
    return found


def _strings(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    skip = _docstrings(tree)
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
    ]


def test_the_scan_sees_the_core() -> None:
    names = {path.relative_to(PACKAGE).as_posix() for path in _core_modules()}
    assert {"jobs/train_file.py", "devices.py", "infer/predict.py", "data/io.py"} <= names
    assert not any(name.startswith(("cli/", "_widgets/")) for name in names)


@pytest.mark.parametrize("path", _core_modules(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_no_core_string_names_a_command_line_flag(path: Path) -> None:
    allowed = OTHER_PROGRAMS.get(path.relative_to(PACKAGE).as_posix(), set())
    flags = [
        f"{path.name}:{line}: {text!r}"
        for line, text in _strings(path)
        if set(FLAG.findall(text)) - allowed
    ]
    assert flags == []


def test_every_setting_the_core_names_has_an_option_and_a_word_in_the_docks() -> None:
    assert set(OPTIONS) == set(SETTINGS)
    assert set(CONTROLS) == set(SETTINGS)
    with pytest.raises(TypeError, match="unknown setting"):
        SettingError("a message", "no-such-setting")


def test_each_shell_words_the_setting_for_its_own_surface() -> None:
    error = SettingError("CUDA is not available; use the CPU", "device")
    assert settings_hint(error, OPTIONS, " (option {})").endswith("use the CPU (option --device)")
    assert settings_hint(error, CONTROLS, " (see: {})").endswith("use the CPU (see: device)")
    plain = ValueError("a  message\n on two lines")
    assert settings_hint(plain, OPTIONS, " (option {})") == "a message on two lines"
