"""The chain as users run it, each stage its own `accresnet` process:
train -> export -> serve -> classify over gRPC and REST; graceful SIGTERM; the demo."""

import ctypes
import json
import pathlib
import re
import signal
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from helpers import accresnet, free_ports, run_accresnet
from pipeline.data.synthetic import CLASS_NAMES
from serving.client import Classifier
from serving.deployment import local_deployed_server

pytestmark = pytest.mark.slow  # every test here trains or starts processes


def _pngs(pixels, folder):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / f"{i}.png") for i in range(len(pixels))]
    for path, image in zip(paths, pixels):
        Image.fromarray(image).save(path)
    return paths


def wait_for_server(process, port, timeout=120):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"localhost:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read()
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise AssertionError("the server did not become ready")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("roundtrip")
    code, output = run_accresnet("train", "--depth", "8", "--dataset", "synthetic:400", "--epochs", "1",
                                 "--batch-size", "32", "--model-dir", root / "run", "--export-base",
                                 root / "models" / "accresnet", "--no-progress")
    assert code == 0, output
    assert output.strip().splitlines()[-1] == str(root / "models" / "accresnet" / "1")
    return root


@pytest.mark.slow
def test_train_export_serve_classify_over_grpc_and_rest(exported, tmp_path):
    """`accresnet serve` started exactly as the Kubernetes Deployment starts TF Serving."""
    grpc_port, rest_port = free_ports(2)
    local = local_deployed_server(exported / "models", tmp_path, grpc_port, rest_port)
    assert "--enable_batching=true" in local.flags
    server = accresnet("serve", *local.flags)
    try:
        wait_for_server(server, grpc_port, timeout=180)
        pixels = np.random.default_rng(3).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
        with Classifier(f"localhost:{grpc_port}") as classifier:
            over_grpc = classifier.predict(pixels)
            named = [p.class_name for p in classifier.classify_files(_pngs(pixels, tmp_path / "pictures"))]
        assert named == [CLASS_NAMES[i] for i in over_grpc.argmax(1)]
        body = json.dumps({"instances": pixels.tolist()}).encode()
        with urllib.request.urlopen(f"http://localhost:{rest_port}/v1/models/accresnet:predict", body) as reply:
            over_rest = np.array([p["probabilities"] for p in json.loads(reply.read())["predictions"]])
        np.testing.assert_allclose(over_rest, over_grpc, rtol=1e-5)
        loaded = tf.saved_model.load(str(exported / "models" / "accresnet" / "1"))
        direct = loaded.signatures["serving_default"](images=tf.constant(pixels))["probabilities"].numpy()
        np.testing.assert_allclose(over_grpc, direct, rtol=1e-5)
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)
    assert server.returncode == 0


@pytest.mark.slow
def test_sigterm_lets_requests_in_flight_finish(exported, tmp_path):
    # A 3-second batching window holds a request in the server while SIGTERM arrives.
    parameters = tmp_path / "batching.config"
    parameters.write_text("max_batch_size { value: 64 }\nbatch_timeout_micros { value: 3000000 }\n")
    grpc_port, = free_ports(1)
    server = accresnet("serve", f"--port={grpc_port}", "--model_name=accresnet",
                       f"--model_base_path={exported / 'models' / 'accresnet'}", "--enable_batching",
                       f"--batching_parameters_file={parameters}", "--enable_model_warmup=false")
    outcome = {}
    try:
        wait_for_server(server, grpc_port)

        def request():
            with grpc.insecure_channel(f"localhost:{grpc_port}") as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                message = predict_pb2.PredictRequest()
                message.model_spec.name = "accresnet"
                message.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 32, 32, 3), np.uint8)))
                try:
                    outcome["response"] = stub.Predict(message, timeout=30)
                except grpc.RpcError as error:
                    outcome["error"] = error

        thread = threading.Thread(target=request)
        thread.start()
        time.sleep(1.0)
        server.send_signal(signal.SIGTERM)
        thread.join(timeout=30)
        output, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["response"].model_spec.version.value == 1
    assert server.returncode == 0
    assert "finishing requests in flight" in output and "server stopped" in output


def _signal_thread(pid: int, tid: int, number: int) -> None:
    """tgkill(2): a signal to one thread of another process (glibc 2.30 and later)."""
    if ctypes.CDLL(None, use_errno=True).tgkill(pid, tid, number) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill {pid} {tid}")


def _threads_taking(pid: int, number: int) -> list[int]:
    """The threads of `pid` other than its main one that do not block signal `number`."""
    threads = []
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
        if int(task.name) != pid and not int(status["SigBlk"].strip(), 16) & (1 << (number - 1)):
            threads.append(int(task.name))
    return threads


@pytest.mark.slow
@pytest.mark.skipif(not pathlib.Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_sigterm_that_lands_on_another_thread_stops_the_server(exported):
    # The kernel may hand a process's SIGTERM to any thread that does not block it: one of gRPC's or
    # TensorFlow's. Python runs its handler in the main thread, which must then still wake up.
    grpc_port, = free_ports(1)
    server = accresnet("serve", f"--port={grpc_port}", "--model_name=accresnet",
                       f"--model_base_path={exported / 'models' / 'accresnet'}", "--enable_model_warmup=false")
    try:
        wait_for_server(server, grpc_port)
        _signal_thread(server.pid, _threads_taking(server.pid, signal.SIGTERM)[0], signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode == 0 and "server stopped" in output


@pytest.mark.slow
def test_demo_runs_the_whole_chain(tmp_path):
    code, output = run_accresnet("demo", "--depth", "8", "--dataset", "synthetic:2000", "--epochs", "2",
                                 "--held-out", "40", "--output-dir", tmp_path / "demo", timeout=600)
    assert code == 0, output
    match = re.search(r"held-out accuracy through the server: (\d+)/40 = ([0-9.]+)", output)
    assert match, output
    assert float(match.group(2)) > 0.1  # above chance for ten classes
    assert (tmp_path / "demo" / "models" / "accresnet" / "1" / "saved_model.pb").is_file()
    assert "server stopped" in (tmp_path / "demo" / "server.log").read_text()
    # The server ran as deployed: every deployed flag, with only paths and ports mapped (and printed).
    command = re.search(r"serve as deployed: (.*)", output).group(1).split()
    for flag in ("--enable_batching=true", "--file_system_poll_wait_seconds=30"):
        assert flag in command
    assert "mapped --batching_parameters_file: /config/batching.config ->" in output
    assert "mapped model accresnet base_path: /models/accresnet ->" in output
