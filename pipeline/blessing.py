"""blessing.json: validate's verdict, bound to the content it judged.

validate writes the record into the candidate's folder: the verdict and its
reasons, the checks it ran, the thresholds, the evaluation data, the graph's
op types, the project's version, and a SHA-256 of every file of the candidate
(blessing.json itself excepted, confusion.png and model_card.json included)
with one digest over them all. push reads it again and publishes the
candidate only if the record is whole, says blessed, and names exactly the
files the candidate holds, with those contents; the check runs on the copy
push is about to publish, so what is served is what was judged.

It is a record, not a signature: whoever may write the candidate's folder
may also write a record that matches it (docs/serving.md).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import TYPE_CHECKING, Any

from pipeline.errors import UserError
from pipeline.provenance import combined_digest, folder_digests
from serving.atomic import write_atomically

if TYPE_CHECKING:
    import numpy as np

BLESSING_FILE = "blessing.json"
FORMAT = 1
# The exit status of validate and push for a refused candidate: a verdict, which no retry changes
# (a Kubernetes podFailurePolicy fails the release Job on it at once).
REFUSED = 3
VERDICTS = ("blessed", "refused")


class BlessingError(UserError, RuntimeError):
    """A blessing record that is missing, malformed, forged or stale: push refuses the candidate."""

    exit_status = REFUSED


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
        import numpy as np

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
    """What a record blesses: every file's SHA-256 by name, and one digest over them all."""

    files: dict[str, str]
    digest: str

    @classmethod
    def of(cls, folder: pathlib.Path) -> Content:
        files = folder_digests(folder, exclude=(BLESSING_FILE,))
        return cls(files, combined_digest(files))

    def differences(self, other: Content) -> str | None:
        """How `other` differs from the blessed files, None if it does not."""
        changed = sorted(name for name in set(other.files) & set(self.files) if other.files[name] != self.files[name])
        added, missing = sorted(set(other.files) - set(self.files)), sorted(set(self.files) - set(other.files))
        return "; ".join(f"{kind} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
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
                       content=Content(dict(named["files"]), named["digest"]), format=record.get("format", FORMAT))
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
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError
        raise BlessingError(f"{path} cannot be read as a blessing record: {' '.join(str(error).split())}") from None
    return Blessing.from_json(record, path)


def verify(candidate: pathlib.Path, folder: pathlib.Path | None = None) -> Blessing:
    """The candidate's record if it blesses exactly the files of `folder` (the candidate
    itself, or the copy about to be published); BlessingError saying why not."""
    folder = folder or candidate
    path = candidate / BLESSING_FILE
    blessing = read(candidate)
    if blessing is None:
        raise BlessingError(f"{candidate} has no blessing record: run `accresnet validate` on it first "
                            "(or push --force)")
    if not blessing.blessed:
        raise BlessingError(f"{candidate} was refused by validate: {'; '.join(blessing.reasons) or 'no reason given'}")
    if combined_digest(blessing.content.files) != blessing.content.digest:
        raise BlessingError(f"{path} is forged: its digest is not that of the files it lists")
    differences = blessing.content.differences(Content.of(folder))
    if differences:
        raise BlessingError(f"{candidate} is not what validate blessed (stale blessing): {differences}")
    return blessing
