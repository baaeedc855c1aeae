"""Files replaced whole: a reader (a model server polling its config, a
resumed run reading its history) sees the old content or the new, never half."""

from __future__ import annotations

import os
import pathlib


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a scratch file beside `path`, then rename it over `path`."""
    path = pathlib.Path(path)
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(text)
    os.replace(scratch, path)  # atomic within one file system
