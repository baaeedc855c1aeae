"""Starting the project's server as deployed, and talking to it as TF Serving's clients do:
what the server tests share."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (get_model_status_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from helpers import REPO, free_ports, rss_mib, wait_until
from serving.contract import IMAGE_SHAPE, IMAGES_INPUT, MODEL_NAME
from serving.deployment import local_deployed_server
from serving.server.main import RunningServer, build_parser
from serving.server.options import options_from_args


def server_args(tmp_path, models: dict, *flags) -> list[str]:
    """The deployed flags and shipped configs (batching and metrics on) on free ports, with a
    model config for {name: base_path} and a 1-second version poll; `flags` are added last,
    so they may override."""
    config = tmp_path / "models.config"
    config.write_text("model_config_list {\n" + "".join(
        f'  config {{ name: "{name}" base_path: "{path}" model_platform: "tensorflow" }}\n'
        for name, path in models.items()) + "}\n")
    grpc_port, rest_port = free_ports(2)
    local = local_deployed_server(tmp_path, tmp_path / "deployed-config", grpc_port, rest_port)
    return [*local.flags, f"--model_config_file={config}", "--file_system_poll_wait_seconds=1", *flags]


def start_server(tmp_path, models: dict, *flags):
    """An in-process server started with server_args(tmp_path, models, *flags)."""
    return RunningServer(options_from_args(build_parser().parse_args(server_args(tmp_path, models, *flags))))


@dataclasses.dataclass
class ServerProcess:
    """The server as a process of its own, so that its memory is its own: neither a test's
    client-side buffers nor other tests' threads count in its resident set."""
    process: subprocess.Popen
    port: int
    rest_port: int
    batching: bool

    def rss_mib(self) -> float:
        return rss_mib(self.process.pid)

    def stop(self, grace: float = 2) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace + 60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server_process(tmp_path, models: dict, *flags) -> ServerProcess:
    """`python -m serving.server` with server_args(tmp_path, models, *flags), returned once
    every model in `models` has a version AVAILABLE over gRPC and REST alike (the REST
    port opens after the gRPC one)."""
    args = server_args(tmp_path, models, *flags)
    parsed = build_parser().parse_args(args)
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                   "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    with open(tmp_path / "server.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "serving.server", *args], stdout=log,
                                   stderr=subprocess.STDOUT, env=environment)
    server = ServerProcess(process, parsed.port, parsed.rest_api_port, parsed.enable_batching)
    clients = Clients(server)
    ready = wait_until(lambda: process.poll() is not None or all(
        get_model_status_pb2.ModelVersionStatus.AVAILABLE in versions(clients, name).values()
        and rest_reports_available(clients, name) for name in models), timeout=180)
    if not ready or process.poll() is not None:
        server.stop()
        raise RuntimeError(f"the server did not start: {(tmp_path / 'server.log').read_text()[-3000:]}")
    return server


class Clients:
    def __init__(self, server):
        self.server = server
        self.channel = grpc.insecure_channel(f"localhost:{server.port}")
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.rest = f"http://localhost:{server.rest_port}"

    def http(self, path, body=None, raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.rest + path, data=data, method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def json(self, path, body=None, raw=None):
        status, content = self.http(path, body, raw)
        return status, json.loads(content)


def rest_reports_available(clients, name) -> bool:
    try:
        status, content = clients.json(f"/v1/models/{name}")
    except OSError:  # not listening yet
        return False
    return status == 200 and any(entry["state"] == "AVAILABLE" for entry in content["model_version_status"])


def images(count=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, *IMAGE_SHAPE), dtype=np.uint8)


def predict_request(model=MODEL_NAME, batch=None, signature="", **spec):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    request.inputs[IMAGES_INPUT].CopyFrom(tf.make_tensor_proto(images() if batch is None else batch))
    return request


def versions(clients, name):
    """The versions of model `name` the server reports, with their states ({} when it cannot answer)."""
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    try:
        response = clients.models.GetModelStatus(request, timeout=30)
    except grpc.RpcError:
        return {}
    return {status.version: status.state for status in response.model_version_status}
