"""Files replaced whole: a reader (a model server polling its config, a
resumed run reading its history) sees the old content or the new, never half.
And a lock for read-modify-write: writers that change a file in turn (push,
promote and rollback on one model config) each see the others' writes."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import pathlib
import time
import uuid
from collections.abc import Callable, Iterator


class LockTimeout(TimeoutError):
    """The lock was still held by another process when the wait for it ended."""


@dataclasses.dataclass(frozen=True)
class LockWait:
    """How long to wait for a lock another process holds (None: as long as it takes), and
    where to say that it is waited for (once, when the lock is not free at the first try)."""

    timeout_seconds: float | None = None
    announce: Callable[[str], None] | None = None
    interval_seconds: float = 0.1


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
def locked(path: str | os.PathLike, wait: LockWait = LockWait()) -> Iterator[None]:
    """Hold an exclusive lock for changing `path` (an flock on `.<name>.lock` beside it, which
    stays): other processes that lock the same file wait until it is released, for at most
    `wait.timeout_seconds` (then LockTimeout, nothing done)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(f".{path.name}.lock")
    with open(lock_path, "a") as lock:
        if wait.timeout_seconds is None and wait.announce is None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        else:
            _acquire(lock, lock_path, wait)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _acquire(lock, lock_path: pathlib.Path, wait: LockWait) -> None:
    deadline = None if wait.timeout_seconds is None else time.monotonic() + wait.timeout_seconds
    announced = False
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if not announced and wait.announce is not None:
            bound = f"for at most {wait.timeout_seconds:g} s" if wait.timeout_seconds is not None else "until it is free"
            wait.announce(f"waiting for {lock_path}, held by another process, {bound}")
            announced = True
        if deadline is not None and time.monotonic() >= deadline:
            raise LockTimeout(f"{lock_path} is still held by another process after {wait.timeout_seconds:g} s")
        time.sleep(wait.interval_seconds if deadline is None
                   else max(0.0, min(wait.interval_seconds, deadline - time.monotonic())))
