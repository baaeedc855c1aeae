"""Files replaced whole: a reader (a model server polling its config, a
resumed run reading its history) sees the old content or the new, never half.
And a lock for read-modify-write: writers that change a file in turn (push,
promote and rollback on one model config) each see the others' writes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import uuid
from collections.abc import Iterator


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a scratch file beside `path`, then rename it over `path`."""
    path = pathlib.Path(path)
    # A name of its own per write: concurrent writers never share (or remove) a scratch file.
    scratch = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        # O_EXCL: never someone else's file; mode 0o666 less the umask, as a plain write gives.
        descriptor = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())  # the content is on disk before the name points at it
        os.replace(scratch, path)  # atomic within one file system
    finally:
        scratch.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock for changing `path` (an flock on `.<name>.lock` beside it, which
    stays): other processes that lock the same file wait until it is released."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
