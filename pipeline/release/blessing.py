"""blessing.json: validate's verdict, bound to the content it judged.

validate writes the record into the candidate's folder: the verdict and its
reasons, the checks it ran, the thresholds, the evaluation data, the graph's
op types, the project's version, and every entry of the candidate with its
type (blessing.json itself excepted, confusion.png and model_card.json
included): each folder, and each regular file with its SHA-256, with one
digest over them all. push reads it again and publishes the candidate only if
the record is whole, says blessed, and names exactly the entries the candidate
holds, of those types and with those contents; the check runs on the copy
push is about to publish, so what is served is what was judged.

A candidate holds regular files and folders, nothing else: a symbolic link
(to /dev/zero, to a file outside), a FIFO, a socket or a device, and a name
that is not UTF-8, are refused wherever the release chain reads a candidate
(`entries`), and its copies (`copy_regular`) never follow a link or open
anything but a regular file. Format 2 records folders and types; a format 1
record (files only) is refused, naming the format, so validate runs again.

It is a record, not a signature: whoever may write the candidate's folder
may also write a record that matches it (docs/serving.md).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import pathlib
import shutil
import stat
from typing import Any

import numpy as np

from pipeline.digests import CHUNK, combined_digest
from pipeline.errors import UserError
from serving.atomic import write_atomically

BLESSING_FILE = "blessing.json"
FORMAT = 2  # 1: files only; 2: folders too, and every entry's type checked
FOLDER = "folder"  # what a folder's line carries in the combined digest, where a file's SHA-256 stands
MAX_RECORD_BYTES = 64 << 20  # a record of 1,000 classes' confusion matrices is a few MB
# The exit status of validate and push for a refused candidate: a verdict, which no retry changes
# (a Kubernetes podFailurePolicy fails the release Job on it at once).
REFUSED = 3
VERDICTS = ("blessed", "refused")


class BlessingError(UserError, RuntimeError):
    """A blessing record that is missing, malformed, forged or stale: push refuses the candidate."""

    exit_status = REFUSED


class EntryError(BlessingError):
    """An entry of a candidate that is not a regular file or a folder, or whose name is not UTF-8."""


def shown(name: str) -> str:
    """A name as one printable line: itself, or its repr (newlines, escapes and the surrogates
    that stand for bytes that are not UTF-8 all escaped)."""
    return name if name.isprintable() else repr(name)


def _kind(mode: int) -> str | None:
    """What a non-regular entry is, None for a regular file or a folder."""
    for test, kind in ((stat.S_ISREG, None), (stat.S_ISDIR, None), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file or folder"


def entries(folder: str | os.PathLike) -> dict[str, str]:
    """Every entry under `folder` by its relative path: FOLDER, or "file" for a regular file;
    EntryError naming the first entry that is neither, or whose name is not UTF-8. Links are
    never followed (lstat), so nothing outside the folder is read."""
    folder = pathlib.Path(folder)
    found: dict[str, str] = {}
    pending = [""]  # relative paths of folders to list; a stack, so any depth is fine
    while pending:
        relative = pending.pop()
        try:
            with os.scandir(folder / relative if relative else folder) as listing:
                children = sorted(listing, key=lambda entry: entry.name)
        except OSError as error:
            raise EntryError(f"{shown(str(folder))}: cannot list {shown(relative or '.')}: "
                             f"{error.strerror or error}") from None
        for child in children:
            name = f"{relative}/{child.name}" if relative else child.name
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:  # bytes that os.fsdecode escaped as surrogates
                raise EntryError(f"{shown(str(folder))}: the name {name!r} is not UTF-8: a candidate holds "
                                 "UTF-8 names only") from None
            try:
                mode = child.stat(follow_symlinks=False).st_mode
                kind = _kind(mode)
                target = f" (-> {shown(os.readlink(child.path))})" if stat.S_ISLNK(mode) else ""
            except OSError as error:  # gone, or changed, while listed
                raise EntryError(f"{shown(str(folder))}: cannot read {shown(name)}: {error.strerror or error}") \
                    from None
            if kind:
                raise EntryError(f"{shown(str(folder))}: {shown(name)} is {kind}{target}; a candidate holds regular "
                                 "files and folders only")
            found[name] = FOLDER if stat.S_ISDIR(mode) else "file"
            if stat.S_ISDIR(mode):
                pending.append(name)
    return found


def open_regular(path: str | os.PathLike):
    """A regular file opened for reading, and its stat; EntryError for anything else (a link, a
    FIFO, a device, a folder put there after a check), found without following the link or
    waiting for a FIFO's writer."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise EntryError(f"{shown(os.fspath(path))} is a symbolic link; a candidate holds regular files and "
                             "folders only") from None
        raise
    file = os.fdopen(descriptor, "rb")
    status = os.fstat(descriptor)
    if kind := _kind(status.st_mode) or (stat.S_ISDIR(status.st_mode) and "a folder"):
        file.close()
        raise EntryError(f"{shown(os.fspath(path))} is {kind}; a candidate holds regular files and folders only")
    return file, status


def regular_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a candidate's regular file (open_regular: no link followed, no FIFO waited on)."""
    file, _ = open_regular(path)
    digest = hashlib.sha256()
    with file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def copy_regular(source: str, destination: str) -> str:
    """shutil.copytree's copy_function for a candidate: copies a regular file, bytes, mode and
    times; EntryError for anything else (open_regular)."""
    reader, status = open_regular(source)
    with reader, open(destination, "xb") as writer:
        shutil.copyfileobj(reader, writer, CHUNK)
    os.chmod(destination, stat.S_IMODE(status.st_mode))
    os.utime(destination, ns=(status.st_atime_ns, status.st_mtime_ns))
    return destination


def copy_candidate(source: str | os.PathLike, destination: str | os.PathLike, ignore=None) -> None:
    """Copy a candidate folder: regular files and folders only, no link followed (a link made
    after the check is copied as a link, and refused by the check of the copy)."""
    shutil.copytree(source, destination, symlinks=True, ignore=ignore, copy_function=copy_regular)
    entries(destination)


@dataclasses.dataclass(frozen=True)
class Metrics:
    """A model's answers on the evaluation images, as validate measures them."""

    images: int
    accuracy: float
    loss: float
    per_class_accuracy: list[float]
    confusion: list[list[int]]  # rows: true class, columns: predicted class

    @classmethod
    def of(cls, probabilities: np.ndarray, labels: np.ndarray) -> Metrics:
        classes = probabilities.shape[1]
        predicted = probabilities.argmax(axis=1)
        confusion = np.zeros((classes, classes), np.int64)
        np.add.at(confusion, (labels, predicted), 1)
        per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
        true_probability = probabilities[np.arange(len(labels)), labels]
        return cls(len(labels), float(np.mean(predicted == labels)),
                   float(np.mean(-np.log(np.maximum(true_probability, 1e-12)))),
                   [round(float(a), 4) for a in per_class], confusion.tolist())


@dataclasses.dataclass(frozen=True)
class Content:
    """What a record blesses: every regular file's SHA-256 and every folder, by relative path,
    and one digest over them all (sha256sum's lines, a folder's as "folder  NAME/")."""

    files: dict[str, str]
    digest: str
    folders: tuple[str, ...] = ()

    @classmethod
    def of(cls, folder: pathlib.Path) -> Content:
        found = entries(folder)
        found.pop(BLESSING_FILE, None)
        files = {name: regular_sha256(folder / name) for name, kind in found.items() if kind != FOLDER}
        folders = tuple(sorted(name for name, kind in found.items() if kind == FOLDER))
        return cls(files, cls.digest_of(files, folders), folders)

    @staticmethod
    def digest_of(files: dict[str, str], folders: tuple[str, ...]) -> str:
        return combined_digest({**files, **{f"{name}/": FOLDER for name in folders}})

    def _entries(self) -> dict[str, str]:
        return {**self.files, **dict.fromkeys(self.folders, FOLDER)}

    def differences(self, other: Content) -> str | None:
        """How `other` differs from the blessed entries, None if it does not."""
        mine, theirs = self._entries(), other._entries()
        changed = sorted(name for name in set(theirs) & set(mine) if theirs[name] != mine[name])
        added, missing = sorted(set(theirs) - set(mine)), sorted(set(mine) - set(theirs))
        return "; ".join(f"{kind} {', '.join(map(shown, names[:3]))}{' ...' if len(names) > 3 else ''}"
                         for kind, names in (("changed:", changed), ("added:", added), ("missing:", missing))
                         if names) or None


@dataclasses.dataclass(frozen=True)
class Served:
    """The version served under a label that the candidate was compared with."""

    server: str | None
    label: str | None
    metrics: Metrics | None


@dataclasses.dataclass(frozen=True)
class Blessing:
    """validate's verdict on one candidate, the record blessing.json holds."""

    candidate: str  # the folder judged
    verdict: str  # one of VERDICTS
    reasons: tuple[str, ...]  # why it was refused; none when blessed
    checks: dict[str, str]  # every check by name: "passed" or why it failed
    time: str
    dataset: str
    class_names: tuple[str, ...]
    data: dict[str, Any]  # the evaluation data: spec, data_dir, images, digest
    thresholds: dict[str, Any]
    ops: tuple[str, ...]  # the graph's op types
    infra: dict[str, Any]  # serving checks: latency, gRPC and REST agreement, or the server's error
    candidate_metrics: Metrics | None  # None when it was not evaluated
    current: Served
    project: dict[str, Any]
    tensorflow: str
    content: Content | None = None  # bound by `write`
    format: int = FORMAT

    @property
    def blessed(self) -> bool:
        return self.verdict == "blessed"

    def to_json(self) -> dict:
        record = dataclasses.asdict(self)
        return {"format": record.pop("format"), **record}

    @classmethod
    def from_json(cls, record: Any, path: pathlib.Path) -> Blessing:
        """The record read back; BlessingError naming what is missing or malformed."""
        if not isinstance(record, dict) or record.get("verdict") not in VERDICTS:
            raise BlessingError(f"{path} is not a blessing record validate writes (no verdict)")
        named = record.get("content")
        if not (isinstance(named, dict) and isinstance(named.get("files"), dict) and named["files"]
                and all(isinstance(k, str) and isinstance(v, str) for k, v in named["files"].items())
                and isinstance(named.get("digest"), str)):
            raise BlessingError(f"{path} names no content (no file digests): it is forged or from an older "
                                "validate; run `accresnet validate` on the candidate again")
        written = record.get("format", 1)
        if written != FORMAT:
            raise BlessingError(f"{path} is a blessing record of format {shown(str(written))}, and this push reads "
                                f"format {FORMAT} (which records every folder and entry type): run "
                                "`accresnet validate` on the candidate again")
        if not (isinstance(named.get("folders"), list) and all(isinstance(name, str) for name in named["folders"])):
            raise BlessingError(f"{path} names no folders (content.folders): it is forged; run `accresnet validate` "
                                "on the candidate again")
        try:
            metrics, current = record["candidate_metrics"], record["current"]
            return cls(candidate=str(record["candidate"]), verdict=record["verdict"],
                       reasons=tuple(str(r) for r in record["reasons"]), checks=dict(record["checks"]),
                       time=str(record["time"]), dataset=str(record["dataset"]),
                       class_names=tuple(record["class_names"]), data=dict(record["data"]),
                       thresholds=dict(record["thresholds"]), ops=tuple(record["ops"]), infra=dict(record["infra"]),
                       candidate_metrics=Metrics(**metrics) if metrics is not None else None,
                       current=Served(current["server"], current["label"],
                                      Metrics(**current["metrics"]) if current["metrics"] is not None else None),
                       project=dict(record["project"]), tensorflow=str(record["tensorflow"]),
                       content=Content(dict(named["files"]), named["digest"], tuple(named["folders"])),
                       format=written)
        except (KeyError, TypeError, ValueError) as error:
            raise BlessingError(f"{path} is not a whole blessing record ({type(error).__name__}: {error}); "
                                "run `accresnet validate` on the candidate again") from None


def write(candidate: pathlib.Path, blessing: Blessing) -> Blessing:
    """Bind the verdict to the candidate's files as they are now, and write it beside them."""
    blessing = dataclasses.replace(blessing, content=Content.of(candidate))
    write_atomically(candidate / BLESSING_FILE, json.dumps(blessing.to_json(), indent=2) + "\n")
    return blessing


def read(candidate: pathlib.Path) -> Blessing | None:
    """The record as written, None if there is none; BlessingError if it is not a whole record."""
    path = candidate / BLESSING_FILE
    if not os.path.lexists(path):
        return None
    try:
        record = json.loads(_read_record(path))
    except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError
        raise BlessingError(f"{path} cannot be read as a blessing record: {' '.join(str(error).split())}") from None
    except RecursionError:  # arrays or objects nested thousands deep: no record validate writes
        raise BlessingError(f"{path} cannot be read as a blessing record: it is nested too deep") from None
    return Blessing.from_json(record, path)


def _read_record(path: pathlib.Path) -> bytes:
    """blessing.json's bytes: a regular file (never a link followed or a FIFO waited on) of at
    most MAX_RECORD_BYTES."""
    file, _ = open_regular(path)
    with file:
        data = file.read(MAX_RECORD_BYTES + 1)
    if len(data) > MAX_RECORD_BYTES:
        raise BlessingError(f"{path} is larger than {MAX_RECORD_BYTES >> 20} MiB: no record validate writes")
    return data


def verify(candidate: pathlib.Path, folder: pathlib.Path | None = None) -> Blessing:
    """The candidate's record if it blesses exactly the files of `folder` (the candidate
    itself, or the copy about to be published); BlessingError saying why not."""
    folder = folder or candidate
    path = candidate / BLESSING_FILE
    entries(candidate)  # before anything is read: no link followed, no FIFO waited on
    blessing = read(candidate)
    if blessing is None:
        raise BlessingError(f"{candidate} has no blessing record: run `accresnet validate` on it first "
                            "(or push --force)")
    if not blessing.blessed:
        raise BlessingError(f"{candidate} was refused by validate: {'; '.join(blessing.reasons) or 'no reason given'}")
    if Content.digest_of(blessing.content.files, blessing.content.folders) != blessing.content.digest:
        raise BlessingError(f"{path} is forged: its digest is not that of the entries it lists")
    differences = blessing.content.differences(Content.of(folder))
    if differences:
        raise BlessingError(f"{candidate} is not what validate blessed (stale blessing): {differences}")
    return blessing
