"""SHA-256 digests of files, of folders and of a set of files: what a dataset, a candidate
and its blessing are identified by."""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Iterable

CHUNK = 1 << 20


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
