"""Errors that mean "this input cannot run": the CLI prints them as one line and exits 2."""
from __future__ import annotations

import reprlib


class ConfigError(ValueError):
    """A config (or other user input) that cannot run. The message names the field and what is allowed."""


_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict, _short.maxlevel = 60, 60, 6, 6, 2


def shown(value) -> str:
    """A value as an error message shows it: its repr, cut short (a hostile list must not fill the terminal)."""
    return _short.repr(value)
