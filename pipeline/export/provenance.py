"""What made a file: the project's version and commit and TensorFlow's version, for the
records a version carries (its model card, its blessing).

The commit is the checkout's HEAD, marked dirty when files differ from it;
null where the code runs outside a git checkout (an installed wheel, the images).
"""

from __future__ import annotations

import functools
import pathlib
import subprocess
from importlib import metadata

import tensorflow as tf

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]


@functools.cache
def project() -> dict:
    """{"version": "0.1.0", "commit": "abc...", "dirty": false}; commit and dirty null outside git."""
    try:
        version = metadata.version("accresnet")
    except metadata.PackageNotFoundError:
        version = None
    commit = dirty = None
    if (REPOSITORY / ".git").exists():
        try:
            commit = _git("rev-parse", "HEAD")
            dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
        except (OSError, subprocess.CalledProcessError):
            commit = dirty = None
    return {"version": version, "commit": commit, "dirty": dirty}


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPOSITORY), *args], capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()


def tensorflow_version() -> str:
    return tf.__version__
