"""`accresnet demo`: the whole chain on embedded defaults.

Train the accumulated ResNet-32 (quick recipe) on the built-in synthetic data
(or --dataset), export it as version 1 of model "accresnet", write held-out
test images as PNG files, start a model server (TF Serving's
`tensorflow_model_server` when it is on PATH, else `accresnet serve`),
classify the files through the gRPC client, print the accuracy and a few
examples, and stop the server.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

log = logging.getLogger(__name__)

MODEL_NAME = "accresnet"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    output_dir: str = "demo-output"
    dataset: str = "synthetic"
    data_dir: str | None = None
    arch: str = "accumulated"
    depth: int = 32
    width: int | None = None
    cardinality: int | None = None
    epochs: int | None = None
    devices: int | None = None
    held_out: int = 200
    examples: int = 8


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _write_held_out(data, folder: pathlib.Path, count: int) -> list[tuple[str, str]]:
    """PNG files of the first `count` test (or validation) images, one folder per class."""
    from PIL import Image

    split = data.test if data.test is not None else data.validation
    if split is None:
        raise RuntimeError(f"{data.spec} has no test or validation images to hold out")
    shutil.rmtree(folder, ignore_errors=True)
    files = []
    for index in range(min(count, len(split))):
        name = data.class_names[int(split.labels[index])]
        path = folder / name / f"{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(split.images[index]).save(path)
        files.append((str(path), name))
    return files


def server_command(grpc_port: int, rest_port: int, base_path: pathlib.Path) -> list[str]:
    """TF Serving's binary when installed, else the project's compatible server; same flags."""
    flags = [f"--port={grpc_port}", f"--rest_api_port={rest_port}", f"--model_name={MODEL_NAME}",
             f"--model_base_path={base_path.resolve()}"]
    binary = shutil.which("tensorflow_model_server")
    if binary:
        return [binary, *flags]
    return [sys.executable, "-m", "serving.server", *flags]


def wait_until_available(address: str, timeout: float, process: subprocess.Popen) -> None:
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = MODEL_NAME
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the model server exited with status {process.returncode}")
            try:
                statuses = stub.GetModelStatus(request, timeout=2).model_version_status
                if any(s.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE for s in statuses):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"model {MODEL_NAME} did not become available at {address} within {timeout:.0f}s")


def run_demo(config: DemoConfig) -> int:
    from pipeline import datasets, export, train
    from pipeline.config import DataConfig, TrainConfig
    from serving.client import Classifier

    started = time.monotonic()
    out = pathlib.Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, base_path = out / "run", out / "models" / MODEL_NAME
    data_config = DataConfig(config.dataset, data_dir=config.data_dir)

    print(f"== 1/4 train {config.arch} ResNet-{config.depth} on {config.dataset} (quick recipe) -> {model_dir}")
    summary = train.train(TrainConfig(model_dir=str(model_dir), arch=config.arch, depth=config.depth,
                                      width=config.width, cardinality=config.cardinality, data=data_config,
                                      recipe="quick", epochs=config.epochs, devices=config.devices))
    final = summary["final"]
    print(f"   {summary['epochs_completed']} epochs, val accuracy {final.get('val_accuracy', float('nan')):.4f}, "
          f"{summary['train_images_per_sec'] or 0:.0f} images/s")

    print(f"== 2/4 export -> {base_path}")
    version = export.export_run(model_dir, base_path)
    print(f"   {version}")

    data = datasets.load(data_config)
    held_out = _write_held_out(data, out / "held-out", config.held_out)
    grpc_port, rest_port = _free_port(), _free_port()
    command = server_command(grpc_port, rest_port, base_path)
    print(f"== 3/4 serve: {' '.join(command)}")
    log_file = open(out / "server.log", "w")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(pathlib.Path(__file__).parents[1]),
                                                                             os.environ.get("PYTHONPATH")]))}
    server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=environment)
    try:
        wait_until_available(f"localhost:{grpc_port}", 180, server)
        print(f"== 4/4 classify {len(held_out)} held-out images through gRPC at localhost:{grpc_port}")
        truth = dict(held_out)
        classify_started = time.monotonic()
        with Classifier(f"localhost:{grpc_port}", MODEL_NAME) as classifier:
            predictions = list(classifier.classify_files([path for path, _ in held_out], top_k=3))
        seconds = time.monotonic() - classify_started
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log_file.close()
    correct = sum(p.class_name == truth[p.path] for p in predictions)
    accuracy = correct / len(predictions)
    print(f"\n{'image':<44} {'true class':<20} {'predicted':<20} {'prob':>6}")
    for prediction in predictions[:config.examples]:
        print(f"{prediction.path:<44} {truth[prediction.path]:<20} {prediction.class_name:<20} "
              f"{prediction.probability:>6.3f}")
    print(f"\nheld-out accuracy through the server: {correct}/{len(predictions)} = {accuracy:.4f} "
          f"({len(predictions) / seconds:.0f} images/s over gRPC)")
    print(f"server stopped; total {time.monotonic() - started:.0f}s. Try it yourself:\n"
          f"  accresnet serve --port=8500 --rest_api_port=8501 --model_name={MODEL_NAME} "
          f"--model_base_path={base_path.resolve()}\n"
          f"  accresnet classify --server localhost:8500 {out / 'held-out'}")
    chance = 1 / data.num_classes
    return 0 if accuracy > chance else 1

