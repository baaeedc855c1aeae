"""`accresnet classify --concurrency N` on a folder of images: images/s against N = 1.

One run, on this machine: a model exported untrained (the answers do not matter,
their cost does), `accresnet serve` started with the deployed flags and configs
(batching on, serving/deployment.py), a folder of generated PNGs, and the
client's classify_files (what the verb runs) at each concurrency, taken in
interleaved rounds so that every setting sees the machine in the same states;
the best round of each counts, and each is printed as a ratio to concurrency 1.

    python benchmarks/classify_concurrency.py [--images 1000] [--depth 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serving_throughput import export_model, start_server  # noqa: E402

from serving.client import Classifier, image_files  # noqa: E402
from serving.deployment import free_ports, local_deployed_server  # noqa: E402


def write_images(folder: pathlib.Path, count: int, seed: int = 0) -> None:
    """PNGs of a photograph's size range, so the client's decoding costs what it would."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        side = int(rng.integers(32, 97))
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")


def classify_all(grpc_port: int, files: list[str], batch_size: int, concurrency: int) -> float:
    """images/s for classifying every file once."""
    with Classifier(f"localhost:{grpc_port}") as classifier:
        classifier.signature_input()  # the metadata call is not what is measured
        started = time.perf_counter()
        count = sum(1 for _ in classifier.classify_files(files, batch_size, concurrency=concurrency))
        seconds = time.perf_counter() - started
    assert count == len(files), (count, len(files))
    return count / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64, help="classify's default")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    settings = [int(n) for n in args.concurrency.split(",")]

    root = pathlib.Path(tempfile.mkdtemp(prefix="classify-bench-"))
    export_model(args.depth, root)
    write_images(root / "images", args.images)
    files = image_files([str(root / "images")])
    grpc_port, rest_port = free_ports(2)
    deployed = local_deployed_server(root / "models", root / "config", grpc_port, rest_port)
    server = start_server(deployed.flags, grpc_port)
    best = dict.fromkeys(settings, 0.0)
    try:
        classify_all(grpc_port, files[:128], args.batch_size, 2)  # warm up both sides
        for round_ in range(args.rounds):
            for concurrency in settings:
                rate = classify_all(grpc_port, files, args.batch_size, concurrency)
                best[concurrency] = max(best[concurrency], rate)
                print(f"round {round_ + 1}: --concurrency {concurrency}: {rate:.0f} images/s", flush=True)
    finally:
        server.terminate()
        server.wait(60)
    print(f"{len(files)} images, depth {args.depth}, batch {args.batch_size}, best of {args.rounds} interleaved rounds:")
    for concurrency in settings:
        print(f"  --concurrency {concurrency}: {best[concurrency]:.0f} images/s "
              f"({best[concurrency] / best[settings[0]]:.2f}x --concurrency {settings[0]})")
    print(json.dumps({"images": len(files), "depth": args.depth, "batch_size": args.batch_size,
                      "images_per_sec": {str(c): best[c] for c in settings}}))


if __name__ == "__main__":
    main()
