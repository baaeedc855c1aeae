"""The model server's cost over calling the same SavedModel in-process.

Measured in one run, on this machine, against baselines measured here too:

- raw: the SavedModel's serving_default called in-process at batch 16 (a
  session callable, as TF Serving runs it), images/s, measured before and
  after the served run; the higher of the two is the baseline, since this
  machine's rate moves from minute to minute;
- served, batching on: `accresnet serve` started with the deployed flags and
  configs (serving/deployment.py), 16 concurrent clients each sending batch-1
  gRPC Predict requests, images/s; the ratio served/raw;
- unbatched overhead: `accresnet serve` without batching, one client sending
  batch-1 requests one after another; its p50 latency minus the in-process
  batch-1 p50 (calls back to back);
- the same, paired: in-process and served batch-1 calls taken in turn, so
  that both see the same state of the machine and the same idle gap before
  each call; the median of the differences.

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

from pipeline.architecture import ModelConfig  # noqa: E402
from pipeline.export import export_saved_model  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from serving.contract import IMAGES_INPUT, MODEL_NAME, SERVING_DEFAULT  # noqa: E402
from serving.deployment import free_ports, local_deployed_server  # noqa: E402
from serving.server.servable import Servable  # noqa: E402

MODEL = MODEL_NAME


def export_model(depth: int, root: pathlib.Path) -> pathlib.Path:
    model = build_model(ModelConfig("accumulated", depth, 10))
    return pathlib.Path(export_saved_model(model, [f"class{i}" for i in range(10)], root / "models" / MODEL))


OUTPUTS = ["probabilities", "top_k_class_names", "top_k_probabilities"]


def in_process_call(servable: Servable, batch: int):
    """A function calling serving_default in-process on `batch` images; returns its latency (s)."""
    signature = servable.signature(SERVING_DEFAULT)
    images = np.random.default_rng(batch).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)

    def call() -> float:
        started = time.perf_counter()
        servable.run(signature, {IMAGES_INPUT: images}, OUTPUTS)
        return time.perf_counter() - started
    return call


def in_process(servable: Servable, batch: int, seconds: float) -> tuple[float, list[float]]:
    """images/s and per-call latencies (s) of serving_default called in-process, back to back."""
    call = in_process_call(servable, batch)
    for _ in range(3):
        call()
    latencies, started = [], time.perf_counter()
    while time.perf_counter() - started < seconds:
        latencies.append(call())
    return batch * len(latencies) / sum(latencies), latencies


def paired(servable: Servable, grpc_port: int, seconds: float) -> tuple[list[float], list[float]]:
    """Latencies (s) of batch-1 calls in-process and served, taken in turn."""
    local = in_process_call(servable, 1)
    message = request(1)
    local_latencies, served_latencies = [], []
    with grpc.insecure_channel(f"localhost:{grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            local_latencies.append(local())
            started = time.perf_counter()
            stub.Predict(message, timeout=30)
            served_latencies.append(time.perf_counter() - started)
    return local_latencies, served_latencies


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
    message.inputs[IMAGES_INPUT].CopyFrom(tf.make_tensor_proto(images))
    message.output_filter.extend(OUTPUTS)
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
    servable = Servable(MODEL, 1, str(version))
    raw_before, _ = in_process(servable, args.clients, args.seconds)
    _, single = in_process(servable, 1, args.seconds)
    print(f"in-process, batch {args.clients}: {raw_before:.0f} images/s; "
          f"batch 1 p50 {1e3 * statistics.median(single):.2f} ms", flush=True)

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
    raw_after, _ = in_process(servable, args.clients, args.seconds)
    raw = max(raw_before, raw_after)
    print(f"in-process again, batch {args.clients}: {raw_after:.0f} images/s", flush=True)
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
        local, served_in_turn = paired(servable, grpc_port, args.seconds)
    finally:
        server.terminate()
        server.wait(60)
    overhead = statistics.median(unbatched) - statistics.median(single)
    paired_overhead = statistics.median(s - i for s, i in zip(served_in_turn, local))
    print(f"unbatched batch 1: p50 {1e3 * statistics.median(unbatched):.2f} ms, overhead over in-process "
          f"{1e3 * overhead:.2f} ms, {errors} errors", flush=True)
    print(f"taken in turn: in-process p50 {1e3 * statistics.median(local):.2f} ms, served p50 "
          f"{1e3 * statistics.median(served_in_turn):.2f} ms, overhead (median of the differences) "
          f"{1e3 * paired_overhead:.2f} ms", flush=True)
    print(json.dumps({"raw_images_per_sec": raw, "raw_before": raw_before, "raw_after": raw_after,
                      "served_images_per_sec": served, "served_over_raw": served / raw,
                      "batched_p50_ms": 1e3 * percentile(batched_latencies, 50),
                      "batched_p99_ms": 1e3 * percentile(batched_latencies, 99),
                      "unbatched_p50_ms": 1e3 * statistics.median(unbatched),
                      "in_process_batch1_p50_ms": 1e3 * statistics.median(single),
                      "unbatched_overhead_ms": 1e3 * overhead,
                      "paired_in_process_p50_ms": 1e3 * statistics.median(local),
                      "paired_served_p50_ms": 1e3 * statistics.median(served_in_turn),
                      "paired_overhead_ms": 1e3 * paired_overhead}))


if __name__ == "__main__":
    main()
