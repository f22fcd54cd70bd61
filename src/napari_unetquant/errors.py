"""Errors about the user's choices, worded for every shell.

The core never names a command-line flag or a dock control: a :class:`SettingError` says what
went wrong and the fix in plain words, and lists the neutral names of the settings involved
(``"device"``, ``"integer"``). The command line turns those names into its options and the napari
docks into their controls, so each surface shows a fix its user can act on.

Imports nothing: every layer of the package may raise these.
"""

from __future__ import annotations

SETTINGS = (
    "act_bits",
    "act_format",
    "batch_size",
    "classes",
    "ct_window",
    "device",
    "edge_bits",
    "elastic",
    "engine",
    "foreground_value",
    "init",
    "input_size",
    "intensity",
    "integer",
    "labels_dir",
    "network",
    "out",
    "out_dir",
    "processes",
    "resume",
    "size_budget",
    "spacing",
    "weight_bits",
    "weight_format",
)
"""The settings a :class:`SettingError` may name; each shell maps every one of them."""


class SettingError(ValueError):
    """A setting the user chose cannot work; the message says why and what to choose instead.

    ``settings`` are names from :data:`SETTINGS`, for the shell to point at its own controls.
    """

    def __init__(self, message: str, *settings: str) -> None:
        unknown = [name for name in settings if name not in SETTINGS]
        if unknown:  # a programming error: every shell must know each name
            raise TypeError(f"unknown setting name(s) {unknown}; add them to errors.SETTINGS")
        super().__init__(message)
        self.settings = settings


def settings_hint(error: BaseException, names: dict[str, str], template: str) -> str:
    """``error``'s message with ``template`` (e.g. ``" (option {})"``) naming, in the shell's
    words from ``names``, the settings it concerns; other errors' messages unchanged, on one
    line."""
    message = " ".join(str(error).split()) or type(error).__name__
    settings = getattr(error, "settings", ())
    words = [names[name] for name in settings if names.get(name)]
    return message + template.format(", ".join(words)) if words else message
