"""The model server's cost over calling the same SavedModel in-process.

Measured in one run, on this machine, against baselines measured here too:

- raw: the SavedModel's serving_default called in-process at batch 16 (a
  session callable, as TF Serving runs it), images/s;
- served, batching on: `accresnet serve` started with the deployed flags and
  configs (serving/deployment.py), 16 concurrent clients each sending batch-1
  gRPC Predict requests, images/s; the ratio served/raw;
- unbatched overhead: `accresnet serve` without batching, one client sending
  batch-1 requests one after another; its p50 latency minus the in-process
  batch-1 p50.

    python benchmarks/serving_throughput.py [--depth 32] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import ModelConfig  # noqa: E402
from pipeline.export import export_saved_model  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from serving.deployment import free_ports, local_deployed_server  # noqa: E402
from serving.server.servable import Servable  # noqa: E402

MODEL = "accresnet"


def export_model(depth: int, root: pathlib.Path) -> pathlib.Path:
    model = build_model(ModelConfig("accumulated", depth, 10))
    return pathlib.Path(export_saved_model(model, [f"class{i}" for i in range(10)], root / "models" / MODEL))


def in_process(version: pathlib.Path, batch: int, seconds: float) -> tuple[float, list[float]]:
    """images/s and per-call latencies (s) of serving_default called in-process."""
    servable = Servable(MODEL, 1, str(version))
    signature = servable.signature("serving_default")
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    outputs = ["probabilities", "top_k_class_names", "top_k_probabilities"]
    for _ in range(3):
        servable.run(signature, {"images": images}, outputs)
    latencies, started = [], time.perf_counter()
    while time.perf_counter() - started < seconds:
        call = time.perf_counter()
        servable.run(signature, {"images": images}, outputs)
        latencies.append(time.perf_counter() - call)
    return batch * len(latencies) / sum(latencies), latencies


def start_server(flags: list[str], grpc_port: int) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "serving.server", *flags], env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    channel = grpc.insecure_channel(f"localhost:{grpc_port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            stub.Predict(request(1), timeout=10)
            return process
        except grpc.RpcError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not come up")


def request(batch: int) -> predict_pb2.PredictRequest:
    message = predict_pb2.PredictRequest()
    message.model_spec.name = MODEL
    images = np.random.default_rng(batch).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    message.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    message.output_filter.extend(["probabilities", "top_k_class_names", "top_k_probabilities"])
    return message


def load(grpc_port: int, clients: int, seconds: float) -> tuple[float, list[float], int]:
    """images/s, latencies and errors of `clients` threads sending batch-1 requests."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client():
        with grpc.insecure_channel(f"localhost:{grpc_port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            message = request(1)
            mine = []
            while time.perf_counter() < stop:
                call = time.perf_counter()
                try:
                    stub.Predict(message, timeout=30)
                    mine.append(time.perf_counter() - call)
                except grpc.RpcError:
                    with lock:
                        errors[0] += 1
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(latencies) / (time.perf_counter() - started), latencies, errors[0]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--batching-parameters", help="a BatchingParameters file in place of the deployed one "
                                                       "(for tuning it; the figures to report use the deployed one)")
    parser.add_argument("--skip-unbatched", action="store_true")
    args = parser.parse_args()

    root = pathlib.Path(tempfile.mkdtemp(prefix="serving-bench-"))
    version = export_model(args.depth, root)
    raw, _ = in_process(version, args.clients, args.seconds)
    _, single = in_process(version, 1, args.seconds)
    print(f"in-process, batch {args.clients}: {raw:.0f} images/s; batch 1 p50 {1e3 * statistics.median(single):.2f} ms",
          flush=True)

    grpc_port, rest_port = free_ports(2)
    deployed = local_deployed_server(root / "models", root / "config", grpc_port, rest_port)
    flags = [f"--batching_parameters_file={args.batching_parameters}"
             if args.batching_parameters and flag.startswith("--batching_parameters_file=") else flag
             for flag in deployed.flags]
    server = start_server(flags, grpc_port)
    try:
        load(grpc_port, args.clients, 3)  # warm up
        served, batched_latencies, errors = load(grpc_port, args.clients, args.seconds)
    finally:
        server.terminate()
        server.wait(60)
    print(f"served, batching on, {args.clients} clients: {served:.0f} images/s ({served / raw:.2f}x raw), "
          f"p50 {1e3 * percentile(batched_latencies, 50):.1f} ms, p99 {1e3 * percentile(batched_latencies, 99):.1f} ms, "
          f"{errors} errors", flush=True)

    if args.skip_unbatched:
        return
    grpc_port, = free_ports(1)
    server = start_server([f"--port={grpc_port}", f"--model_name={MODEL}", f"--model_base_path={version.parent}",
                           "--file_system_poll_wait_seconds=0"], grpc_port)
    try:
        load(grpc_port, 1, 2)
        _, unbatched, errors = load(grpc_port, 1, args.seconds)
    finally:
        server.terminate()
        server.wait(60)
    overhead = statistics.median(unbatched) - statistics.median(single)
    print(f"unbatched batch 1: p50 {1e3 * statistics.median(unbatched):.2f} ms, overhead over in-process "
          f"{1e3 * overhead:.2f} ms, {errors} errors", flush=True)
    print(json.dumps({"raw_images_per_sec": raw, "served_images_per_sec": served, "served_over_raw": served / raw,
                      "batched_p50_ms": 1e3 * percentile(batched_latencies, 50),
                      "batched_p99_ms": 1e3 * percentile(batched_latencies, 99),
                      "unbatched_p50_ms": 1e3 * statistics.median(unbatched),
                      "in_process_batch1_p50_ms": 1e3 * statistics.median(single),
                      "unbatched_overhead_ms": 1e3 * overhead}))


if __name__ == "__main__":
    main()
