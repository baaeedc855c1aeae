"""The model server as it is deployed, and the same server on one machine.

`DEPLOYED_FLAGS` are the flags the Kubernetes serving Deployment
(k8s/base/serving-deployment.yaml), the serving image's CMD (Dockerfile) and
the README start `tensorflow_model_server` with: the shipped batching and
monitoring files under /config, the model volume under /models with the
model config beside the versions (/models/models.config), where `accresnet
push`, `promote` and `rollback` move the version labels and the servers
re-read them. Where no release wrote that file yet, it starts as the shipped
template (serving/config/models.config).
Tests render every kustomization and fail when a manifest drifts from them.

`make demo`, the end-to-end tests and the local-overlay harness start
`accresnet serve` with these same flags, mapped onto one machine by
`map_to_local`: only what one machine forces changes (the image's and the
volume's paths become local folders, fixed ports become free ones), and every
change is returned as a `Mapping` for the caller to print.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping as MappingType, Sequence

from serving.atomic import write_atomically
from serving.availability import Servers, wait_until_available
from serving.contract import MODEL_NAME, version_number

# serving/config/ is what the serving image copies to /config.
SHIPPED_CONFIG_DIR = pathlib.Path(__file__).parent / "config"
# The model config a model volume starts with: the release Job's push writes it there.
MODEL_CONFIG_TEMPLATE = SHIPPED_CONFIG_DIR / "models.config"
CONFIG_DIR = "/config"
MODELS_DIR = "/models"
DEPLOYED_FLAGS = (
    "--port=8500",
    "--rest_api_port=8501",
    f"--model_config_file={MODELS_DIR}/models.config",
    "--file_system_poll_wait_seconds=30",
    # Labels (serving/labels.py): the model config is re-read, and a canary may be labelled while it loads.
    "--model_config_file_poll_wait_seconds=30",
    "--allow_version_labels_for_unavailable_models=true",
    "--enable_batching=true",
    f"--batching_parameters_file={CONFIG_DIR}/batching.config",
    f"--monitoring_config_file={CONFIG_DIR}/monitoring.config",
    # TF Serving answers RESOURCE_EXHAUSTED to a call that finds every gRPC thread busy (server.cc's
    # ResourceQuota), and its default is 4 per CPU: 8 on the pod's 2. As many threads as a batch
    # has rows (max_batch_size 64) lets single-image clients fill a batch, not half of one.
    "--grpc_max_threads=64",
)
PORT_FLAGS = ("--port", "--rest_api_port")
MODEL_CONFIG_FLAG = "--model_config_file"


@dataclasses.dataclass(frozen=True)
class Mapping:
    """One thing changed to run a deployed setting on this machine."""

    what: str
    deployed: str
    local: str

    def __str__(self) -> str:
        return f"{self.what}: {self.deployed} -> {self.local}"


@dataclasses.dataclass(frozen=True)
class LocalServer:
    flags: list[str]
    mappings: list[Mapping]
    grpc_port: int
    rest_port: int | None


def _split_flag(flag: str) -> tuple[str, str | None]:
    name, separator, value = flag.partition("=")
    return name, value if separator else None


def map_path(path: str, paths: MappingType[str, pathlib.Path]) -> pathlib.Path | None:
    """`path` under one of the deployed folders `paths` maps, as the local path; None if none does."""
    for deployed, local in sorted(paths.items(), key=lambda item: -len(item[0])):
        prefix = deployed.rstrip("/")
        if path == prefix or path.startswith(prefix + "/"):
            return pathlib.Path(local) / path[len(prefix):].lstrip("/")
    return None


def _map_model_config(source: pathlib.Path, target: pathlib.Path, paths: MappingType[str, pathlib.Path]
                      ) -> list[Mapping]:
    """Copy a ModelServerConfig file with every base_path mapped."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = text_format.Parse(source.read_text(), model_server_config_pb2.ModelServerConfig())
    mappings = []
    for model in config.model_config_list.config:
        # A base path already on this machine's side (push, run mapped, wrote a mapped path) stays.
        if any(map_path(model.base_path, {str(local): local}) for local in paths.values()):
            continue
        local = map_path(model.base_path, paths)
        if local is not None:
            mappings.append(Mapping(f"model {model.name} base_path", model.base_path, str(local)))
            model.base_path = str(local)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text_format.MessageToString(config))
    return mappings


def map_to_local(flags: Sequence[str], paths: MappingType[str, pathlib.Path], scratch: pathlib.Path,
                 grpc_port: int, rest_port: int | None) -> LocalServer:
    """Deployed server flags -> the same flags on this machine.

    `paths` maps deployed folders (the image's /config, volume mounts) to local
    ones; `scratch` receives a model config file whose base paths were mapped.
    Ports are replaced by the given free ones. Nothing else changes.
    """
    local_flags, mappings = [], []
    ports = {"--port": grpc_port, "--rest_api_port": rest_port}
    serves_rest = False
    for flag in flags:
        name, value = _split_flag(flag)
        if name in PORT_FLAGS and value is not None and value != "0":
            port = ports[name]
            if port is None:
                raise ValueError(f"{flag}: no local port given for it")
            mappings.append(Mapping(f"{name} (port)", value, f"127.0.0.1:{port}"))
            local_flags.append(f"{name}={port}")
            serves_rest = serves_rest or name == "--rest_api_port"
            continue
        local = map_path(value, paths) if value and value.startswith("/") else None
        if local is None:
            local_flags.append(flag)
            continue
        if name == MODEL_CONFIG_FLAG:
            mapped = scratch / local.name
            mappings.extend(_map_model_config(local, mapped, paths))
            local = mapped
        mappings.append(Mapping(name, value, str(local)))
        local_flags.append(f"{name}={local}")
    return LocalServer(local_flags, mappings, grpc_port, rest_port if serves_rest else None)


def ensure_model_config(path: str | os.PathLike) -> bool:
    """Write the shipped template to `path` unless a model config is there; whether it was written."""
    path = pathlib.Path(path)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, MODEL_CONFIG_TEMPLATE.read_text())  # a server may poll the file already
    return True


def local_deployed_server(models_dir: pathlib.Path, scratch: pathlib.Path, grpc_port: int, rest_port: int
                          ) -> LocalServer:
    """DEPLOYED_FLAGS with the shipped config files and `models_dir` as the model volume (its
    model config started from the template when no release wrote one)."""
    seeded = ensure_model_config(pathlib.Path(models_dir) / "models.config")
    local = map_to_local(DEPLOYED_FLAGS, {CONFIG_DIR: SHIPPED_CONFIG_DIR, MODELS_DIR: models_dir}, scratch,
                         grpc_port, rest_port)
    if seeded:
        local.mappings.insert(0, Mapping("model config on the volume (no release wrote one)",
                                         f"{MODELS_DIR}/models.config", f"copied from {MODEL_CONFIG_TEMPLATE}"))
    return local


def server_command(flags: Sequence[str]) -> tuple[list[str], Mapping | None]:
    """TF Serving's binary when it is on PATH, else `accresnet serve`, with `flags`;
    and the mapping made when the stand-in is used."""
    binary = shutil.which("tensorflow_model_server")
    if binary:
        return [binary, *flags], None
    return ([sys.executable, "-m", "serving.server", *flags],
            Mapping("model server", "tensorflow_model_server", "accresnet serve (no tensorflow_model_server on PATH)"))


# --- the deployed server as a local process ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunningLocally:
    server: LocalServer
    command: list[str]
    mappings: list[Mapping]  # everything changed from the deployed flags, for the caller to print
    process: subprocess.Popen

    @property
    def grpc_address(self) -> str:
        return f"localhost:{self.server.grpc_port}"


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all bound at once, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def latest_version(base_path: pathlib.Path) -> int:
    """The highest version in a model's base path: the one the shipped policy (latest 1) serves."""
    versions = [number for path in base_path.iterdir() if (number := version_number(path.name)) is not None]
    if not versions:
        raise FileNotFoundError(f"{base_path} holds no numbered version to serve")
    return max(versions)


@contextlib.contextmanager
def serving_locally(models_dir: pathlib.Path, scratch: pathlib.Path, log_path: pathlib.Path,
                    timeout: float = 180) -> Iterator[RunningLocally]:
    """The deployed server (DEPLOYED_FLAGS, shipped configs, `models_dir` as the model
    volume) started as a process on free ports, once the latest version of MODEL_NAME is
    AVAILABLE (asked over REST, as a release asks); stopped with SIGTERM on leaving."""
    local = local_deployed_server(models_dir.resolve(), scratch.resolve(), *free_ports(2))
    command, stand_in = server_command(local.flags)
    repository = str(pathlib.Path(__file__).resolve().parents[1])
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repository,
                                                                             os.environ.get("PYTHONPATH")]))}
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=environment)
        try:
            running = RunningLocally(local, command, [*local.mappings, *filter(None, [stand_in])], process)
            # The model folder is complete before the server starts: a version whose load failed
            # fails the wait at once, as does a server that exits.
            wait_until_available(Servers((f"127.0.0.1:{local.rest_port}",), timeout, confirmations=1,
                                         interval_seconds=0.5),
                                 MODEL_NAME, [latest_version(models_dir / MODEL_NAME)], lambda line: None, process)
            yield running
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
