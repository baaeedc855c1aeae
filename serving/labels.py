"""Version labels in a TF Serving model config file: canary, stable, rollback.

`tensorflow_model_server --model_config_file=F --model_config_file_poll_wait_seconds=N`
(and `accresnet serve`) re-read F every N seconds; clients ask for a label
(`ModelSpec.version_label`, REST `/v1/models/NAME/labels/LABEL`) and get the
version it names. The model's version policy keeps the labelled versions
loaded, so moving a label between them is instant:

    push      phase 1 (`add_version`): the new version joins the version policy,
              no label moves; phase 2 (`label_canary`), once the servers have
              it AVAILABLE: it becomes `canary`; `stable` stays where it is
              (or, the first time, goes to the version served until then)
    promote   `stable` moves to the canary, `rollback` keeps the old stable
    rollback  `stable` moves back to `rollback`'s version; the demoted one is dropped

TF Serving's rule (ServerCore::UpdateModelVersionLabelMap in
model_servers/server_core.cc): with --allow_version_labels_for_unavailable_models,
as deployed, a label that does not exist yet may name a version that is not
loaded, but an existing label may move only to a version that is AVAILABLE;
otherwise the whole new config is refused (and TF Serving does not even add
its new versions, so a config that adds a version and moves a label to it in
one write stalls forever). So every change here asks the caller's `available`
to confirm the versions existing labels move to, before it writes.

Files are replaced whole and changed under a lock (serving/atomic.py):
concurrent pushes, promotes and rollbacks each see the others' writes, and a
change whose labels moved meanwhile is refused rather than applied blindly.
Each change waits for the lock as its `wait` says (serving/atomic.LockWait):
a writer that hangs holding it ends the wait with LockTimeout, nothing written.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Mapping

from serving.atomic import LockWait, locked, write_atomically

CANARY, STABLE, ROLLBACK = "canary", "stable", "rollback"

# Waits until the servers have these versions AVAILABLE, or raises (serving/availability.py).
Available = Callable[[set[int]], None]


class LabelError(ValueError):
    """A label move the model config cannot make, or a model config that cannot be read."""


def read(path: str | os.PathLike):
    """The ModelServerConfig in `path`."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise LabelError(f"cannot read the model config {path}: {error.strerror or error}") from None
    try:
        return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    except text_format.ParseError as error:
        reason = " ".join(str(error).split())
        raise LabelError(f"{path} is not a model config TF Serving can parse: {reason}") from None


def _write(path: pathlib.Path, config) -> None:
    from google.protobuf import text_format

    write_atomically(path, text_format.MessageToString(config))


def _model(config, name: str, path: str | os.PathLike):
    for model in config.model_config_list.config:
        if model.name == name:
            return model
    raise LabelError(f"the model config {path} has no model {name!r}")


def labels(path: str | os.PathLike, name: str) -> dict[str, int]:
    return dict(_model(read(path), name, path).version_labels)


def prepare(path: str | os.PathLike, name: str, base_path: str, template: pathlib.Path,
            wait: LockWait = LockWait()) -> bool:
    """A model config at `path` whose model `name` is served from `base_path`: written from
    `template` with that base path if there is none (whether it was), refused if its base path
    is another (the servers would never find what push publishes)."""
    path = pathlib.Path(path)
    with locked(path, wait):
        if path.exists():
            configured = _model(read(path), name, path).base_path
            if configured != base_path:
                raise LabelError(f"the model config {path} serves model {name} from {configured}, "
                                 f"not from {base_path} where the version is published")
            return False
        config = read(template)
        _model(config, name, template).base_path = base_path
        _write(path, config)  # a server may poll the file already
        return True


def _moved_to(old: Mapping[str, int], new: Mapping[str, int]) -> set[int]:
    """The versions existing labels move to: what TF Serving wants AVAILABLE first."""
    return {version for label, version in new.items() if label in old and old[label] != version}


def _change(path: str | os.PathLike, name: str, new_labels: Callable[[dict[str, int]], dict[str, int]],
            available: Available, wait: LockWait) -> dict[str, int]:
    """Apply `new_labels(current labels)`: wait (unlocked) until the versions labels move to
    are AVAILABLE, then write under the lock if the move is still the one confirmed."""
    path = pathlib.Path(path)
    confirmed = _moved_to(current := labels(path, name), new_labels(current))
    if confirmed:
        available(confirmed)
    with locked(path, wait):
        config = read(path)
        model = _model(config, name, path)
        current = dict(model.version_labels)
        new = new_labels(current)
        unconfirmed = _moved_to(current, new) - confirmed
        if unconfirmed:
            raise LabelError(f"the labels of {name} changed meanwhile (now {_text(current)}); nothing written, "
                             "run it again")
        _set(model, current, new)
        _write(path, config)
    return new


def _set(model, old: dict[str, int], new: dict[str, int]) -> None:
    """The labels, and a version policy of the labelled versions. A version newer than every
    old label was added by a push still waiting to label it (phase 1 done): it stays too."""
    newest_labelled = max(old.values(), default=-1)
    policy = model.model_version_policy
    kept = {v for v in policy.specific.versions if v > newest_labelled} if policy.HasField("specific") else set()
    model.version_labels.clear()
    model.version_labels.update(new)
    policy.Clear()
    policy.specific.versions.extend(sorted(set(new.values()) | kept))


def _text(labels_: Mapping[str, int]) -> str:
    return ", ".join(f"{label} -> {version}" for label, version in sorted(labels_.items())) or "none"


def add_version(path: str | os.PathLike, name: str, version: int, served: list[int],
                wait: LockWait = LockWait()) -> dict[str, int]:
    """Push's phase 1: `version` joins the version policy and no label moves, so every server can
    apply the config and load it. `served`: the versions served until now, kept too when the
    policy named none yet (the shipped `latest`)."""
    path = pathlib.Path(path)
    with locked(path, wait):
        config = read(path)
        model = _model(config, name, path)
        policy = model.model_version_policy
        versions = set(policy.specific.versions) if policy.HasField("specific") else set(served)
        versions |= {version} | set(model.version_labels.values())
        policy.Clear()
        policy.specific.versions.extend(sorted(versions))
        _write(path, config)
        return dict(model.version_labels)


def label_canary(path: str | os.PathLike, name: str, version: int, served: int | None,
                 available: Available, wait: LockWait = LockWait()) -> dict[str, int]:
    """Push's phase 2: `version` becomes the canary; stable stays, or starts on `served`."""

    def new_labels(current: dict[str, int]) -> dict[str, int]:
        if current.get(CANARY, version) > version:
            raise LabelError(f"canary of {name} is already on version {current[CANARY]}, newer than {version}: "
                             "left there")
        stable = current.get(STABLE, served if served is not None else version)
        return {**{k: v for k, v in current.items() if k != CANARY}, STABLE: stable, CANARY: version}

    return _change(path, name, new_labels, available, wait)


def promote(path: str | os.PathLike, name: str, available: Available, wait: LockWait = LockWait()) -> dict[str, int]:
    def new_labels(current: dict[str, int]) -> dict[str, int]:
        if CANARY not in current:
            raise LabelError(f"model {name} has no canary to promote (labels: {_text(current)})")
        new = {STABLE: current[CANARY]}
        if STABLE in current and current[STABLE] != current[CANARY]:
            new[ROLLBACK] = current[STABLE]
        return new

    return _change(path, name, new_labels, available, wait)


def rollback(path: str | os.PathLike, name: str, available: Available, wait: LockWait = LockWait()) -> dict[str, int]:
    def new_labels(current: dict[str, int]) -> dict[str, int]:
        if ROLLBACK not in current:
            raise LabelError(f"model {name} has no rollback version (labels: {_text(current)}); "
                             "only a promotion leaves one")
        return {STABLE: current[ROLLBACK]}

    return _change(path, name, new_labels, available, wait)
