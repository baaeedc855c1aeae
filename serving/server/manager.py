"""Which versions of which models are served: polling base paths, loading, swapping.

Each model's base path holds numbered version folders. A poll picks the
versions the model's version policy wants (the latest by default), loads and
warms up the new ones, and only then makes them available and unloads the
ones no longer wanted, so requests never see a gap. A version that fails to
load is logged and marked END with its error; the versions already serving
keep serving. As TF Serving's --max_num_load_retries and
--load_retry_interval_micros say, a failed load is tried again a few times
after an interval; and whenever any file of its folder changes (a copy that
was still under way has finished, say) it is tried again at once.

Version labels follow TF Serving's rule (ServerCore::UpdateModelVersionLabelMap,
model_servers/server_core.cc): a config whose labels name a version that is
not AVAILABLE is refused whole, models and labels alike, unless
--allow_version_labels_for_unavailable_models lets a label that does not
exist yet (or stays where it is) name it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import grpc
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving.contract import version_number
from serving.server.errors import failed_precondition, invalid, not_found
from serving.server.flags import ServerFlags
from serving.server.servable import SERVE_TAG, Servable

log = logging.getLogger(__name__)

State = get_model_status_pb2.ModelVersionStatus.State


@dataclasses.dataclass
class VersionRecord:
    version: int
    state: int = State.START
    servable: Servable | None = None
    error_code: grpc.StatusCode = grpc.StatusCode.OK
    error_message: str = ""
    fingerprint: tuple | None = None  # the folder as it was when loaded or when it failed
    failed_loads: int = 0  # in a row, on this fingerprint
    retry_after: float = 0.0  # monotonic time of the next try after a failure


@dataclasses.dataclass(frozen=True)
class LoadRetries:
    """--max_num_load_retries more tries after a failed load, --load_retry_interval_micros apart."""

    max_retries: int
    interval_seconds: float

    @classmethod
    def from_flags(cls, flags: ServerFlags) -> LoadRetries:
        return cls(flags.max_num_load_retries, flags.load_retry_interval_seconds)


@dataclasses.dataclass
class ModelState:
    config: model_server_config_pb2.ModelConfig
    versions: dict[int, VersionRecord] = dataclasses.field(default_factory=dict)


def _fingerprint(path: str) -> tuple:
    """Changes when any file under the version folder appears, goes or changes."""
    parts = []
    try:
        for folder, _, files in tf.io.gfile.walk(path):
            for name in sorted(files):
                stat = tf.io.gfile.stat(tf.io.gfile.join(folder, name))
                parts.append((folder, name, stat.mtime_nsec, stat.length))
    except tf.errors.OpError:  # vanished while walking: it changes again
        parts.append(None)
    return tuple(sorted(parts, key=repr))


_skipped_names: set[tuple[str, str]] = set()  # (base path, name) already warned about


def list_versions(base_path: str) -> dict[int, str]:
    """Numbered version folders under a base path (local, gs://, ...), version -> path.
    Other names are skipped, with one warning each (serving/contract.py says which)."""
    try:
        names = tf.io.gfile.listdir(base_path)
    except tf.errors.NotFoundError:
        return {}
    versions: dict[int, str] = {}
    for name in sorted(name.rstrip("/") for name in names):
        number = version_number(name)
        if number is None:
            if not name.startswith(".") and (base_path, name) not in _skipped_names:
                _skipped_names.add((base_path, name))
                log.warning("ignoring %s under %s: a version folder is named by an integer of at most 19 "
                            "ASCII digits, below 2**63", name, base_path)
            continue
        path = tf.io.gfile.join(base_path, name)
        if not tf.io.gfile.isdir(path):
            continue
        if number in versions:
            # 007 and 7: the canonical name wins, whatever the listing order.
            kept = name if name == str(number) else versions[number].rsplit("/", 1)[-1]
            log.warning("version %d of %s has two folders; serving %s", number, base_path, kept)
            path = tf.io.gfile.join(base_path, kept)
        versions[number] = path
    return versions


def wanted_versions(config: model_server_config_pb2.ModelConfig, present: list[int]) -> set[int]:
    """The versions a model's version policy asks for, among those present."""
    policy = config.model_version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return set(present)
    if kind == "specific":
        return set(policy.specific.versions) & set(present)
    count = policy.latest.num_versions if kind == "latest" and policy.latest.num_versions > 0 else 1
    return set(sorted(present)[-count:])


class ModelManager:
    """The served models' versions; thread-safe, polled in the background."""

    def __init__(self, configs: list[model_server_config_pb2.ModelConfig],
                 warm_up: Callable[[Servable], None] | None = None, poll_seconds: float | None = None,
                 retries: LoadRetries | None = None, session_config: config_pb2.ConfigProto | None = None,
                 allow_version_labels_for_unavailable_models: bool = False,
                 saved_model_tags: tuple[str, ...] = (SERVE_TAG,)):
        """What is not given is as the server's flags default it (ServerFlags)."""
        self._warm_up = warm_up
        self._allow_unavailable_labels = allow_version_labels_for_unavailable_models
        self._session_config = session_config
        self._tags = saved_model_tags
        self._retries = retries or LoadRetries.from_flags(ServerFlags())
        self._poll_seconds = ServerFlags().file_system_poll_wait_seconds if poll_seconds is None else poll_seconds
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()  # one poll at a time: the timer's or a reload's
        self._models: dict[str, ModelState] = {}
        self._labels: dict[str, dict[str, int]] = {}  # model -> label -> version, as last applied
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.set_config(configs, poll=False)

    # --- configuration -----------------------------------------------------------------

    def set_config(self, configs: list[model_server_config_pb2.ModelConfig], poll: bool = True) -> None:
        """Serve exactly these models: new ones are loaded (when `poll`), dropped ones unloaded.
        A config whose labels TF Serving would refuse changes nothing (FAILED_PRECONDITION)."""
        names = [c.name for c in configs]
        if len(set(names)) != len(names) or not all(names):
            raise invalid(f"model names must be unique and non-empty; got {names}")
        with self._lock:
            self._labels = self._label_map(configs)
            for name in set(self._models) - set(names):
                for record in self._models.pop(name).versions.values():
                    record.servable, record.state = None, State.END
                log.info("model %s removed from the configuration and unloaded", name)
            for config in configs:
                if config.name in self._models:
                    self._models[config.name].config = config
                else:
                    self._models[config.name] = ModelState(config)
        if poll:
            self.poll()

    def _label_map(self, configs: list[model_server_config_pb2.ModelConfig]) -> dict[str, dict[str, int]]:
        """The labels of `configs`, checked as ServerCore::UpdateModelVersionLabelMap checks them.
        TF Serving runs it in ReloadConfig before AddModelsViaModelConfigList, so a refusal leaves
        the old labels in force and the config's new versions not even added; ReloadConfig runs
        again at every poll of the file, and so does this."""
        labels: dict[str, dict[str, int]] = {}
        for config in configs:
            state = self._models.get(config.name)
            for label, version in config.version_labels.items():
                existing = self._labels.get(config.name, {}).get(label)
                allowed = self._allow_unavailable_labels and existing in (None, version)
                record = state.versions.get(version) if state is not None else None
                if not allowed and (record is None or record.state != State.AVAILABLE):
                    raise failed_precondition(f"Request to assign label to version {version} of model "
                                              f"{config.name}, which is not currently available for inference")
                labels.setdefault(config.name, {})[label] = version
        return labels

    def knows(self, name: str) -> bool:
        """Whether `name` is a configured model (whatever its versions' state)."""
        with self._lock:
            return name in self._models

    def start(self) -> None:
        """Poll now, then every `poll_seconds` in the background (0: only now)."""
        self.poll()
        if self._poll_seconds > 0:
            self._thread = threading.Thread(target=self._poll_loop, name="version-poller", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _poll_loop(self) -> None:
        while not self._stopped.wait(self._poll_seconds):
            try:
                self.poll()
            except Exception:  # a poll must never end the poller
                log.exception("polling for model versions failed")

    def poll(self) -> None:
        with self._poll_lock:
            with self._lock:
                configs = [state.config for state in self._models.values()]
            for config in configs:
                self._poll_model(config)

    def _poll_model(self, config: model_server_config_pb2.ModelConfig) -> None:
        present = list_versions(config.base_path)
        if not present:
            log.warning("no versions of model %s found under %s", config.name, config.base_path)
        wanted = wanted_versions(config, list(present))
        for version in sorted(wanted, reverse=True):
            self._maybe_load(config.name, version, present[version])
        with self._lock:
            state = self._models.get(config.name)
            if state is None:
                return
            available = {v for v, r in state.versions.items() if r.state == State.AVAILABLE}
            # Unload only what is no longer wanted, and never the last
            # available version while nothing wanted has loaded.
            if not available & wanted:
                return
            for version in available - wanted:
                record = state.versions[version]
                # Requests in flight hold their own reference and finish.
                record.servable, record.state = None, State.END
                log.info("unloaded %s version %d", config.name, version)

    def _maybe_load(self, name: str, version: int, path: str) -> None:
        with self._lock:
            state = self._models.get(name)
            if state is None:
                return
            record = state.versions.get(version)
            if record is not None and record.state in (State.LOADING, State.AVAILABLE):
                return
        fingerprint = _fingerprint(path)
        with self._lock:
            if record is not None and record.error_code != grpc.StatusCode.OK and record.fingerprint == fingerprint:
                if record.failed_loads > self._retries.max_retries or time.monotonic() < record.retry_after:
                    return  # failed on exactly this folder: no more tries, or not yet
                failed_loads = record.failed_loads
            else:
                failed_loads = 0  # a new folder, or its files changed: a fresh start
            record = state.versions[version] = VersionRecord(version, State.LOADING, fingerprint=fingerprint,
                                                             failed_loads=failed_loads)
        try:
            servable = Servable(name, version, path, self._session_config, self._tags)
            if self._warm_up is not None:
                self._warm_up(servable)
        except Exception as error:  # any broken folder: log it and keep serving the others
            message = f"{type(error).__name__}: {error}"
            with self._lock:
                record.failed_loads += 1
                record.retry_after = time.monotonic() + self._retries.interval_seconds
                record.state, record.error_code, record.error_message = State.END, grpc.StatusCode.UNKNOWN, message
                retries_left = self._retries.max_retries + 1 - record.failed_loads
            log.error("could not load %s version %d from %s (%s); %s", name, version, path, message,
                      f"{retries_left} more tries, or when its files change" if retries_left > 0
                      else "tried again only when its files change")
            return
        with self._lock:
            record.servable, record.state = servable, State.AVAILABLE
        log.info("%s version %d is available (signatures: %s)", name, version, ", ".join(sorted(servable.signatures)))

    # --- lookups -----------------------------------------------------------------------------

    def _resolve_label(self, name: str, label: str) -> int:
        """ServerCore::GetModelVersionForLabel: the labels last applied, whatever the model's state."""
        labels = self._labels.get(name, {})
        if label not in labels:
            raise invalid(f"Unrecognized servable version label: {label}")
        return labels[label]

    def servable(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """The servable for a request: a version, a labelled one, or the latest available."""
        with self._lock:
            state = self._models.get(name)
            if label:
                version = self._resolve_label(name, label)
            available = {} if state is None else {
                v: r.servable for v, r in state.versions.items() if r.state == State.AVAILABLE}
        if version is not None:
            if version not in available:
                raise not_found(f"Servable not found for request: Specific({name}, {version})")
            return available[version]
        if not available:
            raise not_found(f"Servable not found for request: Latest({name})")
        return available[max(available)]

    def status(self, name: str, version: int | None = None, label: str | None = None) -> list[VersionRecord]:
        with self._lock:
            state = self._models.get(name)
            if state is None or not state.versions:
                raise not_found(f"Could not find any versions of model {name}")
            if label:
                version = self._resolve_label(name, label)
            if version is not None:
                if version not in state.versions:
                    raise not_found(f"Could not find version {version} of model {name}")
                return [dataclasses.replace(state.versions[version])]
            return [dataclasses.replace(r) for _, r in sorted(state.versions.items(), reverse=True)]

    def any_available(self) -> bool:
        with self._lock:
            return any(r.state == State.AVAILABLE for s in self._models.values() for r in s.versions.values())

