"""A soak of the model server as deployed: gRPC and REST clients for minutes.

`accresnet serve` starts with the deployed flags and configs
(serving/deployment.py, batching on); 16 gRPC clients send batch-1 Predict
requests and 8 REST clients send batch-1 `:predict` requests, each in a loop,
for --minutes, all on loopback; 2 hostile clients send, in turn, the requests
of benchmarks/hostile_mix.py (wrong ranks, expanding strings and contexts,
hidden GIF frames, a gzip bomb, ...). Printed: requests, errors, p50/p99
latency per API, each hostile request's answers (any that is not a refusal of
the client's fault is an error), and the server's resident memory at the
start, at the end and its peak. The soak stops by itself.

    python benchmarks/serving_soak.py [--minutes 10] [--depth 32] [--hostile-clients 2]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from tensorflow_serving.apis import prediction_service_pb2_grpc  # noqa: E402

from hostile_mix import REFUSALS, hostile_requests  # noqa: E402
from serving_throughput import MODEL, export_model, percentile, request, start_server  # noqa: E402
from serving.deployment import free_ports, local_deployed_server  # noqa: E402


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--grpc-clients", type=int, default=16)
    parser.add_argument("--rest-clients", type=int, default=8)
    parser.add_argument("--hostile-clients", type=int, default=2)
    args = parser.parse_args()

    root = pathlib.Path(tempfile.mkdtemp(prefix="serving-soak-"))
    export_model(args.depth, root)
    grpc_port, rest_port = free_ports(2)
    deployed = local_deployed_server(root / "models", root / "config", grpc_port, rest_port)
    server = start_server(deployed.flags, grpc_port)
    stop = time.monotonic() + 60 * args.minutes
    results = {"grpc": [], "rest": []}
    errors = {"grpc": 0, "rest": 0}
    lock = threading.Lock()
    rss = {"start": rss_mib(server.pid), "peak": 0.0}

    def grpc_client():
        with grpc.insecure_channel(f"localhost:{grpc_port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            message = request(1)
            while time.monotonic() < stop:
                started = time.perf_counter()
                try:
                    stub.Predict(message, timeout=30)
                    with lock:
                        results["grpc"].append(time.perf_counter() - started)
                except grpc.RpcError:
                    with lock:
                        errors["grpc"] += 1

    pixels = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8).tolist()
    body = json.dumps({"instances": pixels}).encode()
    url = f"http://localhost:{rest_port}/v1/models/{MODEL}:predict"

    def rest_client():
        while time.monotonic() < stop:
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(urllib.request.Request(url, body), timeout=30) as reply:
                    reply.read()
                with lock:
                    results["rest"].append(time.perf_counter() - started)
            except (urllib.error.URLError, OSError):
                with lock:
                    errors["rest"] += 1

    hostile = hostile_requests(MODEL, grpc_port, rest_port)
    answers: dict[str, dict[str, int]] = {name: {} for name in hostile}

    def hostile_client(offset: int):
        names = list(hostile)
        turn = offset
        while time.monotonic() < stop:
            name = names[turn % len(names)]
            turn += 1
            try:
                status = hostile[name]()
            except OSError as error:  # the connection itself failed: the server's fault here
                status = f"connection failed: {type(error).__name__}"
            with lock:
                answers[name][status] = answers[name].get(status, 0) + 1

    def watch_memory():
        while time.monotonic() < stop:
            rss["peak"] = max(rss["peak"], rss_mib(server.pid))
            time.sleep(1)

    threads = ([threading.Thread(target=grpc_client) for _ in range(args.grpc_clients)]
               + [threading.Thread(target=rest_client) for _ in range(args.rest_clients)]
               + [threading.Thread(target=hostile_client, args=(i * 5,)) for i in range(args.hostile_clients)]
               + [threading.Thread(target=watch_memory)])
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - started
    rss["end"] = rss_mib(server.pid)
    server.terminate()
    server.wait(60)
    summary = {"minutes": round(seconds / 60, 2), "server_rss_mib": {k: round(v) for k, v in rss.items()}}
    for api in ("grpc", "rest"):
        latencies = results[api]
        summary[api] = {"requests": len(latencies), "errors": errors[api],
                        "per_second": round(len(latencies) / seconds, 1),
                        "p50_ms": round(1e3 * percentile(latencies, 50), 1),
                        "p99_ms": round(1e3 * percentile(latencies, 99), 1)}
        print(f"{api}: {len(latencies)} requests ({len(latencies) / seconds:.1f}/s), {errors[api]} errors, "
              f"p50 {1e3 * percentile(latencies, 50):.1f} ms, p99 {1e3 * percentile(latencies, 99):.1f} ms")
    unexpected = {name: {s: n for s, n in counts.items() if s not in REFUSALS} for name, counts in answers.items()}
    summary["hostile"] = {"answers": answers, "not_refusals": {k: v for k, v in unexpected.items() if v}}
    for name, counts in answers.items():
        print(f"hostile: {name}: " + ", ".join(f"{status} x{count}" for status, count in sorted(counts.items())))
    print(f"hostile requests not refused as the client's fault: {sum(sum(v.values()) for v in unexpected.values())}")
    print(f"server RSS: {rss['start']:.0f} MiB at the start, {rss['end']:.0f} MiB at the end, {rss['peak']:.0f} MiB peak")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
