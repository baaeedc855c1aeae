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

import json
import pathlib

from pipeline.errors import UserError
from pipeline.provenance import combined_digest, folder_digests
from serving.atomic import write_atomically

BLESSING_FILE = "blessing.json"
FORMAT = 1
# The exit status of validate and push for a refused candidate: a verdict, which no retry changes
# (a Kubernetes podFailurePolicy fails the release Job on it at once).
REFUSED = 3
VERDICTS = ("blessed", "refused")


class BlessingError(UserError, RuntimeError):
    """A blessing record that is missing, malformed, forged or stale: push refuses the candidate."""

    exit_status = REFUSED


def content(candidate: pathlib.Path) -> dict:
    """The record's "content": every file's digest and their combined digest."""
    files = folder_digests(candidate, exclude=(BLESSING_FILE,))
    return {"files": files, "digest": combined_digest(files)}


def write(candidate: pathlib.Path, record: dict) -> dict:
    """Bind `record` to the candidate's files as they are now, and write it beside them."""
    record = {"format": FORMAT, **record, "content": content(candidate)}
    write_atomically(candidate / BLESSING_FILE, json.dumps(record, indent=2) + "\n")
    return record


def read(candidate: pathlib.Path) -> dict | None:
    """The record as written, None if there is none; BlessingError if it is not JSON."""
    path = candidate / BLESSING_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError
        raise BlessingError(f"{path} cannot be read as a blessing record: {' '.join(str(error).split())}") from None


def verify(candidate: pathlib.Path, folder: pathlib.Path | None = None) -> dict:
    """The candidate's record if it blesses exactly the files of `folder` (the candidate
    itself, or the copy about to be published); BlessingError saying why not."""
    folder = folder or candidate
    record = read(candidate)
    path = candidate / BLESSING_FILE
    if record is None:
        raise BlessingError(f"{candidate} has no blessing record: run `accresnet validate` on it first "
                            "(or push --force)")
    if not isinstance(record, dict) or record.get("verdict") not in VERDICTS:
        raise BlessingError(f"{path} is not a blessing record validate writes (no verdict)")
    if record["verdict"] != "blessed":
        reasons = record.get("reasons") if isinstance(record.get("reasons"), list) else []
        raise BlessingError(f"{candidate} was refused by validate: {'; '.join(map(str, reasons)) or 'no reason given'}")
    named = record.get("content")
    if not (isinstance(named, dict) and isinstance(named.get("files"), dict) and named["files"]
            and all(isinstance(k, str) and isinstance(v, str) for k, v in named["files"].items())
            and isinstance(named.get("digest"), str)):
        raise BlessingError(f"{path} names no content (no file digests): it is forged or from an older validate; "
                            "run `accresnet validate` on the candidate again")
    if combined_digest(named["files"]) != named["digest"]:
        raise BlessingError(f"{path} is forged: its digest is not that of the files it lists")
    actual = folder_digests(folder, exclude=(BLESSING_FILE,))
    changed = sorted(name for name in set(actual) & set(named["files"]) if actual[name] != named["files"][name])
    added, missing = sorted(set(actual) - set(named["files"])), sorted(set(named["files"]) - set(actual))
    if changed or added or missing:
        what = "; ".join(f"{kind} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                         for kind, names in (("changed:", changed), ("added:", added), ("missing:", missing)) if names)
        raise BlessingError(f"{candidate} is not what validate blessed (stale blessing): {what}")
    return record
