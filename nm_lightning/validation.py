"""Argument checks shared by every public constructor: one place, one wording.

Each check raises at construction with a message naming the class, the argument, the value and what is
allowed (``SRSTECallback decay must be a finite float >= 0, got inf``), instead of a raw ``TypeError`` or a
NaN long after training started. Pure Python: no torch, no Lightning.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "check_bool",
    "check_choice",
    "check_int",
    "check_int_list",
    "check_number",
    "check_path",
    "check_writable_dir",
]


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_bool(owner: str, name: str, value: Any) -> bool:
    """A real bool: ``strict='no'`` is an error, not True."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner} {name} must be True or False, got {_short(value)} ({type(value).__name__})")
    return value


def check_int(owner: str, name: str, value: Any, *, minimum: int | None = None, optional: bool = False) -> int | None:
    """An int (not a bool, not ``16.0``) ``>= minimum``; ``None`` allowed when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        what = "an int" + (f" >= {minimum}" if minimum is not None else "") + (" or None" if optional else "")
        raise TypeError(f"{owner} {name} must be {what}, got {_short(value)} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner} {name} must be an int >= {minimum}{' or None' if optional else ''}, got {value}")
    return value


def check_number(
    owner: str,
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive: bool = False,
    optional: bool = False,
) -> float | None:
    """A finite real number (int or float, not a bool or a string like ``'0.8'``) within the bounds.

    ``exclusive`` makes both bounds strict.
    """
    if value is None and optional:
        return None
    if minimum is not None and maximum is not None:
        lo, hi = ("(", ")") if exclusive else ("[", "]")
        bounds = f" in {lo}{minimum:g}, {maximum:g}{hi}"
    elif minimum is not None:
        bounds = f" {'>' if exclusive else '>='} {minimum:g}"
    elif maximum is not None:
        bounds = f" {'<' if exclusive else '<='} {maximum:g}"
    else:
        bounds = ""
    tail = " or None" if optional else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner} {name} must be a float{bounds}{tail}, got {_short(value)} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner} {name} must be a finite float{bounds}{tail}, got {value!r}")
    below = minimum is not None and (value <= minimum if exclusive else value < minimum)
    above = maximum is not None and (value >= maximum if exclusive else value > maximum)
    if below or above:
        raise ValueError(f"{owner} {name} must be a float{bounds}{tail}, got {value!r}")
    return value


def check_choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        options = [repr(c) for c in choices]
        allowed = " or ".join([", ".join(options[:-1]), options[-1]]) if len(options) > 1 else options[0]
        raise ValueError(f"{owner} {name} must be {allowed}, got {_short(value)}")
    return value


def check_int_list(
    owner: str, name: str, value: Any, *, minimum: int = 0, optional: bool = True
) -> list[int] | None:
    """A list/tuple of ints ``>= minimum`` (``None`` allowed when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{owner} {name} must be a list of ints >= {minimum}, got {_short(value)}")
    for item in value:
        check_int(owner, f"{name} entry", item, minimum=minimum)
    return list(value)


def check_path(owner: str, name: str, value: Any, *, optional: bool = True) -> Path | None:
    """A path given as ``str`` or ``os.PathLike`` (``export_dir=123`` is an error at construction)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, os.PathLike)) or str(value) == "":
        raise TypeError(f"{owner} {name} must be a path (str or os.PathLike), got {_short(value)}")
    return Path(value)


def check_writable_dir(owner: str, name: str, path: Path) -> None:
    """Fail now, not after training, when ``path`` (a folder to be created or written) cannot be written.

    Checks the folder if it exists, else its nearest existing ancestor; creates nothing.
    """
    probe = Path(path)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise NotADirectoryError(f"{owner} {name}: {probe} is a file, so {path} cannot be a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{owner} {name}: cannot write to {path} ({probe} is not writable)")
