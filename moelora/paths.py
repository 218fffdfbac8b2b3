"""Checks on the paths users hand over: where a model comes from and where outputs go.

Both fail before any work with an error naming the setting and the path, instead of what the
layer below says (the hub client calls a missing local directory a malformed repo id; ``mkdir``
says only "File exists" when the output path is a file).
"""

from __future__ import annotations

import os
from pathlib import Path

_LOCAL_PREFIXES = ("/", "./", "../", "~")


def check_model_location(location: str, setting: str, also: str = "") -> None:
    """Raise ``FileNotFoundError`` naming ``setting`` when ``location`` (a hub name or a local
    directory) is written as a local path (``/``, ``./``, ``../``, ``~``) or names an existing
    file, and is no directory; ``also`` ends the message (other accepted values)."""
    path = Path(location).expanduser()
    if (location.startswith(_LOCAL_PREFIXES) or path.is_file()) and not path.is_dir():
        raise FileNotFoundError(f"{setting}={location!r} is no directory; give a local model directory "
                                f"(config.json and weights) or a hub model name{also}.")


def check_output_dir(path: str | os.PathLike, setting: str) -> Path:
    """``Path(path)``, after checking it can be a directory: ``NotADirectoryError`` naming
    ``setting`` when ``path`` or one of its parents exists as something else (a file)."""
    out = Path(path)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == out else f"lies inside {str(p)!r}, which is a file"
                raise NotADirectoryError(f"{setting} {str(out)!r} {where}; it must be a directory. "
                                         "Pick another path.")
            break
    return out


def make_output_dir(path: str | os.PathLike, setting: str) -> Path:
    """Create directory ``path`` with its parents (see :func:`check_output_dir`); returns it."""
    out = check_output_dir(path, setting)
    out.mkdir(parents=True, exist_ok=True)
    return out
