"""Expected GPU wall time of the paper's protocol, scaled from a step time measured on this machine.

An estimate, not a measurement: no GPU is at hand here. How it scales:

1. FLOPs of one training image, counted from the network's layers:
   2 x multiply-adds of every convolution and of the classifier in the
   forward pass, times 3 for forward + backward (gradients with respect to
   the inputs and to the weights each cost about one forward pass). BN,
   ReLU and additions are left out (they move memory, they hardly compute).
2. The images/s the trainer measured on this machine's CPU (summary.json of
   real runs) give the FLOP rate achieved here, and with the CPU's peak
   (cores x GHz x FLOPs per cycle) the fraction of peak achieved.
3. For each GPU, its fp32 peak from the vendor's data sheet times the
   fraction of peak measured here on the CPU (the central estimate: the GPU
   is assumed to run this small network as well, relative to its peak, as
   the CPU does), and times 10% and 30% for a range (convolutions with 16-64
   channels on 8-32 pixel maps stay far below a GPU's peak).
4. Wall time = images of the protocol / images per second, plus a floor of
   `--step-overhead-ms` per step (kernel launches of a ~100-layer net's
   forward, backward and update: about a thousand small kernels).

    python benchmarks/gpu_estimate.py --results docs/cifar10-subset/he2016-subset/results.json [--depth 32]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flops  # noqa: E402
from pipeline.model.architecture import ModelConfig  # noqa: E402

# fp32 peak (non-tensor-core) TFLOPS from NVIDIA's data sheets.
GPUS = {"T4": 8.1, "V100 (SXM2)": 15.7, "A100 (40/80 GB)": 19.5, "L4": 30.3, "A10": 31.2, "H100 (SXM)": 67.0}
# The protocols: images trained per run and steps per run.
PROTOCOLS = {
    "paper50 (50 epochs of 45k, batch 128)": (50 * 45_000, 50 * (45_000 // 128)),
    "he2016 (64k iterations of 128)": (64_000 * 128, 64_000),
}


def training_flops_per_image(arch: str, depth: int) -> float:
    """One training image's FLOPs (benchmarks/flops.py), with He et al.'s parameter-free shortcuts."""
    return flops.training_flops_per_image(ModelConfig(arch, depth, shortcut="padding"))


def measured_images_per_sec(paths: list[str], arch: str) -> list[float]:
    values = []
    for path in paths:
        results = json.loads(pathlib.Path(path).read_text())
        values += [run["train_images_per_sec"] for run in results["runs"]
                   if run["arch"] == arch and run.get("train_images_per_sec")]
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", nargs="+", required=True,
                        help="results.json of experiments run here (their runs' measured images/s)")
    parser.add_argument("--arch", default="resnet")
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128, help="the measured runs' global batch")
    parser.add_argument("--cpu-cores", type=float, default=1, help="cores the measured runs used")
    parser.add_argument("--cpu-ghz", type=float, default=2.45)
    parser.add_argument("--cpu-flops-per-cycle", type=float, default=32,
                        help="per core: 2 FMA units x 8 fp32 lanes (AVX2) x 2")
    parser.add_argument("--utilization", type=float, nargs=2, default=(0.10, 0.30), metavar=("LOW", "HIGH"))
    parser.add_argument("--step-overhead-ms", type=float, default=5.0)
    args = parser.parse_args(argv)

    image_flops = training_flops_per_image(args.arch, args.depth)
    rates = measured_images_per_sec(args.results, args.arch)
    if not rates:
        parser.error(f"no {args.arch} runs with a measured images/s in {args.results}")
    cpu_rate = statistics.median(rates)
    cpu_flops = cpu_rate * image_flops
    cpu_peak = args.cpu_cores * args.cpu_ghz * 1e9 * args.cpu_flops_per_cycle
    print(f"{args.arch}-{args.depth}: {image_flops / 1e9:.3f} GFLOP per training image "
          f"({image_flops * args.batch / 1e9:.1f} GFLOP per step of {args.batch})")
    print(f"measured here: median {cpu_rate:.1f} images/s over {len(rates)} runs "
          f"(step {args.batch / cpu_rate:.2f} s), {cpu_flops / 1e9:.1f} GFLOP/s = "
          f"{100 * cpu_flops / cpu_peak:.0f}% of this CPU's {cpu_peak / 1e9:.0f} GFLOP/s peak on "
          f"{args.cpu_cores:g} core(s)")
    print()
    low, high = args.utilization
    measured = cpu_flops / cpu_peak
    names = list(PROTOCOLS)
    print(f"| GPU | fp32 peak TFLOPS | images/s at {100 * measured:.0f}% of peak ({100 * low:.0f}-{100 * high:.0f}%) | "
          + " | ".join(names) + " |")
    print("|---|---:|---:|" + "---:|" * len(names))
    for gpu, peak in GPUS.items():
        rates_gpu = [peak * 1e12 * u / image_flops for u in (measured, low, high)]
        cells = []
        for images, steps in PROTOCOLS.values():
            central, slow, fast = [(images / r + steps * args.step_overhead_ms / 1e3) / 60 for r in rates_gpu]
            cells.append(f"{central:.0f} min ({fast:.0f}-{slow:.0f})")
        print(f"| {gpu} | {peak:g} | {rates_gpu[0]:,.0f} ({rates_gpu[1]:,.0f}-{rates_gpu[2]:,.0f}) | "
              + " | ".join(cells) + " |")
    print()
    print(f"Estimates, one run on one GPU: the fraction of peak measured here ({100 * measured:.0f}%), in brackets "
          f"{100 * low:.0f}-{100 * high:.0f}%, plus {args.step_overhead_ms:g} ms of launch overhead per step; "
          "evaluation (5k validation images an epoch at a third of a training image's cost) adds about 4%.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
