"""What made a file: the project's version and commit, TensorFlow's version, and
digests of files, for the records a version carries (its model card, its blessing).

The commit is the checkout's HEAD, marked dirty when files differ from it;
null where the code runs outside a git checkout (an installed wheel, the images).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import subprocess
from collections.abc import Iterable

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
CHUNK = 1 << 20


@functools.cache
def project() -> dict:
    """{"version": "0.1.0", "commit": "abc...", "dirty": false}; commit and dirty null outside git."""
    from importlib import metadata

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
    import tensorflow as tf

    return tf.__version__


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digests(folder: str | os.PathLike, exclude: Iterable[str] = ()) -> dict[str, str]:
    """SHA-256 of every file under `folder` by its relative path ("variables/variables.index"),
    but the relative paths in `exclude`. Symbolic links count as the files they name."""
    folder = pathlib.Path(folder)
    excluded = set(exclude)
    return {path.relative_to(folder).as_posix(): file_sha256(path)
            for path in sorted(folder.rglob("*")) if path.is_file()
            and path.relative_to(folder).as_posix() not in excluded}


def combined_digest(digests: dict[str, str]) -> str:
    """One SHA-256 for a set of files: of their sorted "digest  path" lines (sha256sum's format).

    A path is hashed as the bytes of its name on disk: a name that is not UTF-8 (a Latin-1
    b"caf\\xe9.png" from an old archive) reaches Python with its bytes escaped as surrogates
    (os.fsdecode), and "surrogateescape" turns them back into those bytes. A folder dataset
    with such a file is read like any other (its digest is what sha256sum's lines would give);
    the names that are UTF-8 hash exactly as before."""
    lines = "".join(f"{digest}  {path}\n" for path, digest in sorted(digests.items()))
    return hashlib.sha256(lines.encode("utf-8", "surrogateescape")).hexdigest()
