"""The model server's cost over calling the same SavedModel in-process.

Measured in one run, on this machine, against baselines measured here too:

- raw: the SavedModel's serving_default called in-process at batch 16 (a
  session call, as TF Serving runs it), images/s, measured before and
  after each served run; the higher of the two is that run's baseline, since
  this machine's rate moves from minute to minute;
- served, batching on: `accresnet serve` started with the deployed flags and
  configs (serving/deployment.py), 16 concurrent clients each sending batch-1
  gRPC Predict requests, images/s; the ratio served/raw, and the CPU time the
  server spends per request beside the CPU time per image in-process;
- with --rounds N, N such rounds one after the other, and the best, median and
  spread of the ratio; with --baseline-tree DIR, a second server run from
  another checkout of the project (`git worktree add DIR <commit>`) is
  measured in the same rounds, alternately with this one (ABBA order), on the
  same model, so that a change is compared with what it changes on the same
  machine under the same load; --tuned-flags adds one more server of this
  checkout with flags added to the deployed ones (a setting under trial);
- unbatched overhead: `accresnet serve` without batching, one client sending
  batch-1 requests one after another; its p50 latency minus the in-process
  batch-1 p50 (calls back to back);
- the same, paired: in-process and served batch-1 calls taken in turn, so
  that both see the same state of the machine and the same idle gap before
  each call; the median of the differences.

    python benchmarks/serving_throughput.py [--depth 32] [--seconds 20]
    python benchmarks/serving_throughput.py --rounds 6 --seconds 10 --skip-unbatched \
        --baseline-tree /tmp/accresnet-before
"""

from __future__ import annotations

import argparse
import dataclasses
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

from pipeline.model.architecture import ModelConfig  # noqa: E402
from pipeline.export.saved_model import export_saved_model  # noqa: E402
from pipeline.model.network import build_model  # noqa: E402
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


def start_server(flags: list[str], grpc_port: int, tree: pathlib.Path = REPO) -> subprocess.Popen:
    """`python -m serving.server` from the checkout `tree` (this one by default), once it answers."""
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    process = subprocess.Popen([sys.executable, "-m", "serving.server", *flags], env=environment, cwd=tree,
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


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads) so far; None where /proc is missing."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def in_process_cpu(servable: Servable, batch: int, seconds: float) -> tuple[float, float]:
    """images/s in-process and this process's CPU ms per image over the same calls."""
    started = os.times()
    rate, latencies = in_process(servable, batch, seconds)
    ended = os.times()
    cpu = (ended.user + ended.system) - (started.user + started.system)
    return rate, 1e3 * cpu / (batch * (len(latencies) + 3))


@dataclasses.dataclass
class Served:
    """One server under test: its checkout, process and what each round measured."""

    name: str
    tree: pathlib.Path
    grpc_port: int
    process: subprocess.Popen | None = None
    ratios: list[float] = dataclasses.field(default_factory=list)
    rates: list[float] = dataclasses.field(default_factory=list)
    cpu_ms: list[float] = dataclasses.field(default_factory=list)
    p50_ms: list[float] = dataclasses.field(default_factory=list)
    p99_ms: list[float] = dataclasses.field(default_factory=list)
    errors: int = 0

    def summary(self) -> dict:
        return {"tree": str(self.tree), "checkout": checkout(self.tree), "served_over_raw": self.ratios, "best": max(self.ratios),
                "median": statistics.median(self.ratios), "min": min(self.ratios),
                "served_images_per_sec": self.rates, "server_cpu_ms_per_request": self.cpu_ms,
                "batched_p50_ms": self.p50_ms, "batched_p99_ms": self.p99_ms, "errors": self.errors}


def checkout(tree: pathlib.Path) -> str:
    """The commit a checkout is at, and whether its serving/ has changes on top."""
    def git(*command: str) -> str:
        result = subprocess.run(["git", "-C", str(tree), *command], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else "?"
    changed = git("status", "--porcelain", "--", "serving")
    return git("rev-parse", "--short", "HEAD") + (" with uncommitted changes in serving/" if changed else "")


def spread(values: list[float]) -> str:
    return (f"best {max(values):.2f}, median {statistics.median(values):.2f}, "
            f"range {min(values):.2f}-{max(values):.2f} over {len(values)} round(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of in-process and served runs")
    parser.add_argument("--baseline-tree", type=pathlib.Path,
                        help="another checkout of the project whose server is measured in the same rounds")
    parser.add_argument("--tuned-flags", default="",
                        help="flags added to the deployed ones for one more server of this checkout, measured in "
                             "the same rounds (for tuning; e.g. --tuned-flags=--grpc_max_threads=32)")
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

    trees = [("this", REPO, [])] + ([("baseline", args.baseline_tree.resolve(), [])] if args.baseline_tree else [])
    if args.tuned_flags:
        trees.append((f"this {args.tuned_flags}", REPO, args.tuned_flags.split()))
    servers = []
    for index, (name, tree, extra) in enumerate(trees):
        # Every server gets the deployed flags and configs, its own ports and config folder, the same model.
        grpc_port, rest_port = free_ports(2)
        deployed = local_deployed_server(root / "models", root / f"config-{index}", grpc_port, rest_port)
        flags = [f"--batching_parameters_file={args.batching_parameters}"
                 if args.batching_parameters and flag.startswith("--batching_parameters_file=") else flag
                 for flag in deployed.flags] + extra
        served = Served(name, tree, grpc_port)
        print(f"{name}: serving/ of {tree} at {checkout(tree)}", flush=True)
        served.process = start_server(flags, grpc_port, tree)
        servers.append(served)
    raws = [raw_before]
    try:
        for server in servers:
            load(server.grpc_port, args.clients, 3)  # warm up
        raw, raw_cpu = in_process_cpu(servable, args.clients, args.seconds)
        for round_ in range(args.rounds):
            # ABBA: each server goes first in every other round.
            for server in servers if round_ % 2 == 0 else servers[::-1]:
                load(server.grpc_port, args.clients, 2)  # its threads woken after the other's turn
                cpu_before = process_cpu_seconds(server.process.pid)
                rate, latencies, errors = load(server.grpc_port, args.clients, args.seconds)
                cpu_after = process_cpu_seconds(server.process.pid)
                raw_next, raw_cpu_next = in_process_cpu(servable, args.clients, args.seconds)
                baseline = max(raw, raw_next)
                cpu_ms = (1e3 * (cpu_after - cpu_before) / len(latencies)
                          if cpu_before is not None and latencies else float("nan"))
                server.ratios.append(rate / baseline)
                server.rates.append(rate)
                server.cpu_ms.append(cpu_ms)
                server.p50_ms.append(1e3 * percentile(latencies, 50))
                server.p99_ms.append(1e3 * percentile(latencies, 99))
                server.errors += errors
                print(f"round {round_ + 1}, {server.name} ({server.tree}): served {rate:.0f} images/s = "
                      f"{rate / baseline:.2f}x raw ({raw:.0f} before, {raw_next:.0f} after); server CPU "
                      f"{cpu_ms:.2f} ms/request against {min(raw_cpu, raw_cpu_next):.2f}-"
                      f"{max(raw_cpu, raw_cpu_next):.2f} ms/image in-process; p50 {server.p50_ms[-1]:.1f} ms, p99 {server.p99_ms[-1]:.1f} ms, "
                      f"{errors} errors", flush=True)
                raws.append(raw_next)
                raw, raw_cpu = raw_next, raw_cpu_next
    finally:
        for server in servers:
            server.process.terminate()
            server.process.wait(60)
    for server in servers:
        print(f"served/raw, {server.name}: {spread(server.ratios)}; server CPU per request "
              f"{min(server.cpu_ms):.2f}-{max(server.cpu_ms):.2f} ms", flush=True)
    if args.baseline_tree:
        differences = [a - b for a, b in zip(servers[0].ratios, servers[1].ratios)]
        print(f"this minus baseline, round by round: {', '.join(f'{d:+.2f}' for d in differences)}", flush=True)
    summary = {"raw_images_per_sec": raws, "servers": {server.name: server.summary() for server in servers}}

    if not args.skip_unbatched:
        summary.update(unbatched(servable, version, single, args.seconds))
    print(json.dumps(summary))


def unbatched(servable: Servable, version: pathlib.Path, single: list[float], seconds: float) -> dict:
    """One client of batch 1 against this checkout's server without batching, alone and in turn
    with in-process calls."""
    grpc_port, = free_ports(1)
    server = start_server([f"--port={grpc_port}", f"--model_name={MODEL}", f"--model_base_path={version.parent}",
                           "--file_system_poll_wait_seconds=0"], grpc_port)
    try:
        load(grpc_port, 1, 2)
        _, unbatched_latencies, errors = load(grpc_port, 1, seconds)
        local, served_in_turn = paired(servable, grpc_port, seconds)
    finally:
        server.terminate()
        server.wait(60)
    overhead = statistics.median(unbatched_latencies) - statistics.median(single)
    paired_overhead = statistics.median(s - i for s, i in zip(served_in_turn, local))
    print(f"unbatched batch 1: p50 {1e3 * statistics.median(unbatched_latencies):.2f} ms, overhead over in-process "
          f"{1e3 * overhead:.2f} ms, {errors} errors", flush=True)
    print(f"taken in turn: in-process p50 {1e3 * statistics.median(local):.2f} ms, served p50 "
          f"{1e3 * statistics.median(served_in_turn):.2f} ms, overhead (median of the differences) "
          f"{1e3 * paired_overhead:.2f} ms", flush=True)
    return {"unbatched_p50_ms": 1e3 * statistics.median(unbatched_latencies),
            "in_process_batch1_p50_ms": 1e3 * statistics.median(single),
            "unbatched_overhead_ms": 1e3 * overhead,
            "paired_in_process_p50_ms": 1e3 * statistics.median(local),
            "paired_served_p50_ms": 1e3 * statistics.median(served_in_turn),
            "paired_overhead_ms": 1e3 * paired_overhead}


if __name__ == "__main__":
    main()
