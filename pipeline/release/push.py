"""`accresnet push`, `promote` and `rollback`: publish a blessed candidate, move its labels.

push copies a candidate that `accresnet validate` blessed to the served base
path as the next version (whole, as exports appear), blessing record and
confusion matrix included, so every served version carries why it was let
in. With --model-config-file it then labels the new version `canary` there
in two phases that TF Serving can follow (serving/labels.py): first the
config that adds the version and moves no label; then, once the servers
(--rest-servers) report it AVAILABLE, the config that moves canary. promote
and rollback move `stable` only to a version the servers have AVAILABLE.

A missing, malformed, forged or stale blessing (pipeline/release/blessing.py), or a
candidate holding anything but regular files and folders (a symbolic link, a
FIFO, a device, a name that is not UTF-8; refused with --force too), ends
push with exit status 3 before anything is written; every other error (flags,
a model config that cannot be used or written, a lock on it that another
process holds past --lock-timeout, servers that do not load the version in
time or answer something that is not a model status) with a one-line message
and exit status 2. A version published whose model config could not take it
(a full disk, the lock) is taken back out of the served base path, so what
is left is what was there before; where even that fails, the message says
what is left and how to finish.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable, Iterator

from pipeline.errors import UserError
from pipeline.export.saved_model import existing_versions, is_remote, publish_as_next_version
from pipeline.release import blessing
from pipeline.release.configs import LabelConfig, PushConfig
from pipeline.release.validate import candidate_folder
from serving import labels
from serving.atomic import LockTimeout, LockWait
from serving.availability import NotAvailable, Servers, parse_addresses, wait_until_available
from serving.deployment import MODEL_CONFIG_TEMPLATE


class ReleaseError(UserError, ValueError):
    """A model config, or servers, that the release cannot use as asked (exit status 2)."""


@dataclasses.dataclass(frozen=True)
class Pushed:
    path: str
    labels: dict[str, int] | None  # the model's labels afterwards; None without a model config file


def served_base_path(path: str) -> str:
    """The base path as the model config must name it: absolute (servers start anywhere)."""
    return path if is_remote(path) else os.path.abspath(path)


def push(config: PushConfig, announce: Callable[[str], None] = print) -> Pushed:
    candidate = candidate_folder(config.candidate)
    blessing.entries(candidate)  # regular files and folders only, blessed or forced
    if not config.force:
        blessing.verify(candidate)  # before anything is written; again on the copy below
    base = served_base_path(config.export_base)
    wait = _lock_wait(config.labels(), announce)
    if config.model_config_file is not None:
        with _release_errors(config.model_config_file, config.lock_timeout):
            labels.prepare(config.model_config_file, config.model, base, MODEL_CONFIG_TEMPLATE, wait)
            _check_canary_can_move(config.labels())
    served = existing_versions(base)
    # What appears is what validate blessed: the copy itself is checked against the record.
    # The copy follows no link and opens nothing but regular files, whatever appears meanwhile.
    try:
        path = publish_as_next_version(candidate, base, None if config.force else (
            lambda copy: blessing.verify(candidate, copy)), copy=blessing.copy_candidate)
    except OSError as error:  # a full disk, a read-only volume: the staging copy is gone again
        raise ReleaseError(f"cannot publish {candidate} under {base}: {_reason(error)}; nothing was published") \
            from None
    if config.model_config_file is None:
        return Pushed(path, None)
    version = int(pathlib.PurePath(path).name)
    try:
        with _release_errors(config.model_config_file, config.lock_timeout):
            labels.add_version(config.model_config_file, config.model, version, served, wait)
    except ReleaseError as error:
        raise ReleaseError(_withdraw(path, version, config.model_config_file, str(error))) from None
    announce(f"{config.model_config_file}: version {version} added to the version policy, no label moved")
    with _release_errors(config.model_config_file, config.lock_timeout,
                         f"version {version} is published and in the version policy; canary did not move to it: "):
        return Pushed(path, labels.label_canary(config.model_config_file, config.model, version,
                                                served[-1] if served else None, _available(config.labels(), announce),
                                                wait))


def promote(config: LabelConfig, announce: Callable[[str], None] = print) -> dict[str, int]:
    with _release_errors(config.model_config_file, config.lock_timeout):
        return labels.promote(config.model_config_file, config.model, _available(config, announce),
                              _lock_wait(config, announce))


def rollback(config: LabelConfig, announce: Callable[[str], None] = print) -> dict[str, int]:
    with _release_errors(config.model_config_file, config.lock_timeout):
        return labels.rollback(config.model_config_file, config.model, _available(config, announce),
                               _lock_wait(config, announce))


# --- helpers -----------------------------------------------------------------------------------


def _check_canary_can_move(config: LabelConfig) -> None:
    """Before anything is copied: a canary that exists moves only with servers to ask."""
    current = labels.labels(config.model_config_file, config.model)
    if labels.CANARY in current and not config.rest_servers:
        raise ReleaseError(f"canary of {config.model} is on version {current[labels.CANARY]}, and TF Serving moves a label "
                           "only to a version it has AVAILABLE: name the servers with --rest-servers HOST:PORT so "
                           "push can wait for the new one")


def _available(config: LabelConfig, announce: Callable[[str], None]):
    """What labels.py calls before a label that exists moves: wait for the servers."""
    addresses = parse_addresses(config.rest_servers)

    def available(versions: set[int]) -> None:
        if not addresses:
            raise ReleaseError(f"moving a label of {config.model} to version(s) {', '.join(map(str, sorted(versions)))} "
                               "needs the servers to have them AVAILABLE first (TF Serving refuses the whole config "
                               "otherwise): name them with --rest-servers HOST:PORT")
        wait_until_available(Servers(addresses, config.available_timeout), config.model, versions, announce)

    return available


def _lock_wait(config: LabelConfig, announce: Callable[[str], None]) -> LockWait:
    if not config.lock_timeout >= 0:
        raise ReleaseError(f"--lock-timeout must be a number of seconds, 0 or more, not {config.lock_timeout}")
    return LockWait(config.lock_timeout, announce)


def _reason(error: OSError) -> str:
    if isinstance(error, shutil.Error) and error.args and isinstance(error.args[0], list) and error.args[0]:
        failures = error.args[0]  # copytree's (source, destination, why) of each file it could not copy
        source, _, why = failures[0]
        return f"{why} ({source}{f' and {len(failures) - 1} more' if len(failures) > 1 else ''})"
    return f"{error.strerror} ({error.filename})" if error.strerror and error.filename else \
        (error.strerror or str(error) or type(error).__name__)


def _withdraw(path: str, version: int, model_config_file: str, reason: str) -> str:
    """Take a version that its model config could not take back out of the served base path
    (renamed away at once, then removed): what it says happened, for the error's one line."""
    published = pathlib.Path(path)
    hidden = published.with_name(f".withdrawn-{published.name}-{uuid.uuid4().hex}")
    try:
        os.rename(published, hidden)
    except OSError as error:
        return (f"{reason}. Version {version} is left published at {path} but is not in the version policy of "
                f"{model_config_file} ({_reason(error)} when taking it back): remove that folder, or add {version} "
                f"to the model's model_version_policy {{ specific {{ versions }} }} there by hand")
    shutil.rmtree(hidden, ignore_errors=True)
    left = f" ({hidden} is left to remove)" if os.path.lexists(hidden) else ""
    return (f"{reason}. Version {version} was taken back out of {published.parent}{left}: nothing is published "
            "and the model config is as it was; run push again once that is fixed")


@contextlib.contextmanager
def _release_errors(model_config_file: str | None = None, lock_timeout: float | None = None,
                    state: str = "") -> Iterator[None]:
    """Model config, lock, disk and server errors as ReleaseError: one line, exit status 2;
    `state` says first what is done by then."""
    try:
        yield
    except (labels.LabelError, NotAvailable) as error:
        raise ReleaseError(state + str(error)) from None
    except LockTimeout as error:
        raise ReleaseError(f"{state}{error} (a push, promote or rollback that is still running, or hangs): "
                           f"{model_config_file} not changed; run it again once that one ends, or wait longer with "
                           f"--lock-timeout (now {lock_timeout:g} s)") from None
    except OSError as error:  # a full disk, a read-only volume: write_atomically left the old file in place
        raise ReleaseError(f"{state}cannot write the model config {model_config_file}: {_reason(error)}; "
                           "it is as it was") from None
