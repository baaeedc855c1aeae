"""The project's folder in the user's cache: extracted archives, compiled kernels."""

from __future__ import annotations

import os
import pathlib


def project_cache() -> pathlib.Path:
    """$XDG_CACHE_HOME/accresnet, ~/.cache/accresnet by default; not created here."""
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "accresnet"
