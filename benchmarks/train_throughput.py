"""Training throughput of the trainer against a Keras `model.fit` baseline.

Everything is measured in this one run, on this machine, and reported as
ratios against the baseline measured here too:

- baseline: stock Keras, `model.fit` on in-memory float arrays with the
  augmentation as Keras preprocessing layers (ZeroPadding2D + RandomCrop +
  RandomFlip) in front of the same network built with Keras' own
  BatchNormalization layer;
- the trainer (`pipeline.train.loop.train`), float32 and with --mixed-precision
  (and --jit, for information), steady-state images/s from its summary.json;
- the input pipeline alone, augmentation on, in images/s;
- the accumulated net's step time over the plain net's;
- under --mixed-precision, TensorFlow's own kernels (the default) and the
  project's opt-in bfloat16 kernels where the CPU has AVX-512
  (--project-bfloat16-kernels, pipeline/kernels/bfloat16.py);
- the machine's matmul peak, float32 and bfloat16 (GFLOP/s of large
  square matmuls), and the trainer's share of it: images/s x the training
  FLOPs of one image (benchmarks/flops.py) over the peak of its precision.

Each configuration runs `--rounds` times, interleaved, each time in a process
of its own (as a user runs it: nothing left over from the measurements
before it), and the best round counts: the machine is shared, and the best
round is the least disturbed. The targets are also shown round by round,
each from one round's measurements alone, with how many rounds met them.

    python benchmarks/train_throughput.py [--depth 32] [--steps 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from flops import training_flops_per_image  # noqa: E402
from pipeline import flags  # noqa: E402
from pipeline.cpu import CpuInfo  # noqa: E402
from pipeline.data import datasets, input_pipeline  # noqa: E402
from pipeline.data.specs import DataConfig  # noqa: E402
from pipeline.data.splits import Split  # noqa: E402
from pipeline.kernels import bfloat16  # noqa: E402
from pipeline.model.architecture import ModelConfig  # noqa: E402
from pipeline.model.network import build_model  # noqa: E402
from pipeline.settings.config import TrainConfig  # noqa: E402
from pipeline.settings.recipes import get_recipe  # noqa: E402
from pipeline.train.precision import MIXED_BFLOAT16, Machine, kernels_for  # noqa: E402
from pipeline.train.loop import train  # noqa: E402

BATCH = 128
WARMUP_STEPS = 3
# Square matmuls for the peak: big enough for oneDNN's best kernels, small enough
# to repeat; the best of the sizes counts.
PEAK_SIZES = (1024, 2048)


class _BatchTimer(keras.callbacks.Callback):
    """Wall time of the batches after the first few (tracing, warm caches)."""

    def __init__(self):
        super().__init__()
        self.seconds, self.batches, self._seen = 0.0, 0, 0

    def on_train_batch_begin(self, batch, logs=None):
        self._started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._seen += 1
        if self._seen > WARMUP_STEPS:
            self.seconds += time.perf_counter() - self._started
            self.batches += 1


def baseline_fit(split: Split, arch: str, depth: int, steps: int) -> float:
    """images/s of model.fit on float arrays with Keras augmentation layers."""
    keras.utils.set_random_seed(0)
    network = build_model(ModelConfig(arch, depth, fused_batch_norm=False))
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.ZeroPadding2D(4)(inputs)
    x = keras.layers.RandomCrop(32, 32)(x)
    x = keras.layers.RandomFlip("horizontal")(x)
    # The network's first layer takes raw pixels; the baseline feeds floats in [0, 255].
    model = keras.Model(inputs, network(x))
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    # Repeat the split if it is shorter than the steps asked for: one epoch of fit.
    count = (steps + WARMUP_STEPS) * BATCH
    images = np.resize(split.images, (count, *split.images.shape[1:])).astype(np.float32)
    labels = np.resize(split.labels, count)
    timer = _BatchTimer()
    model.fit(images, labels, batch_size=BATCH, epochs=1, shuffle=True, verbose=0, callbacks=[timer])
    return timer.batches * BATCH / timer.seconds


def trainer_run(spec: str, arch: str, depth: int, steps: int | None = None, epochs: int | None = None,
                **settings):
    with tempfile.TemporaryDirectory() as model_dir:
        config = flags.build(TrainConfig, dict(model_dir=model_dir, arch=arch, depth=depth, dataset=spec,
                                               val_split=0.0, recipe="quick", steps=steps, epochs=epochs,
                                               batch_size=BATCH, progress=False, untimed_steps=WARMUP_STEPS,
                                               **settings))
        return train(config)


def input_pipeline_rate(split: Split, batches: int = 200) -> float:
    steps_per_epoch = len(split) // BATCH
    dataset = input_pipeline.train_dataset(split, batch_size=BATCH, seed=0, start_epoch=0,
                                           steps_per_epoch=steps_per_epoch, augmentation="pad-crop")
    iterator = iter(dataset)
    for _ in range(10):
        next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        images, _ = next(iterator)
    images.numpy()
    return batches * BATCH / (time.perf_counter() - started)


def matmul_peak(dtype: tf.DType, repeats: int = 8) -> float:
    """GFLOP/s of the fastest of PEAK_SIZES' square matmuls, `repeats` per call in a
    loop inside one graph (no Python between them), best of 3 calls."""

    @tf.function(autograph=False)
    def repeated(a, b):
        def body(i, total):  # one element of each product kept: none is optimized away
            return i + 1, total + tf.cast(tf.matmul(a, b)[0, 0], tf.float32)

        return tf.while_loop(lambda i, _: i < repeats, body, (tf.constant(0), tf.constant(0.0)))[1]

    best = 0.0
    for size in PEAK_SIZES:
        a, b = (tf.cast(tf.random.normal([size, size]), dtype) for _ in range(2))
        repeated(a, b).numpy()
        for _ in range(3):
            started = time.perf_counter()
            repeated(a, b).numpy()
            best = max(best, 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9)
    return best


def cpu_name() -> str:
    info = CpuInfo.read()
    return info.describe() if info else platform.processor() or "unknown CPU"


BASELINE = "baseline: keras model.fit + augmentation layers"
FP32 = "trainer float32"
MIXED = "trainer --mixed-precision"
PLAIN_FP32 = "trainer float32, plain ResNet"
PLAIN_MIXED = "trainer --mixed-precision, plain ResNet"
MIXED_PROJECT = "trainer --mixed-precision --project-bfloat16-kernels"
INPUT = "input pipeline alone (augmentation on)"
PEAK_FP32 = "matmul peak, float32"
PEAK_BF16 = "matmul peak, bfloat16"
MIXED_PRECISION = (MIXED, PLAIN_MIXED, MIXED_PROJECT)
PROJECT_KERNELS_GAIN = "mixed precision over float32, accumulated, the project's kernels"


def shares(best: dict[str, float], depth: int) -> dict[str, float]:
    """The issue-23 figures from the best rates: each trainer's share of its precision's
    matmul peak, mixed precision over float32, and the accumulated net's step cost."""
    flops = {arch: training_flops_per_image(ModelConfig(arch, depth, shortcut=get_recipe("quick").shortcut))
             for arch in ("resnet", "accumulated")}
    figures = {}
    for name in (FP32, MIXED, PLAIN_FP32, PLAIN_MIXED, MIXED_PROJECT):
        if name not in best:
            continue
        peak = best[PEAK_BF16] if name in MIXED_PRECISION else best[PEAK_FP32]
        arch = "resnet" if "plain" in name else "accumulated"
        figures[f"{name}: share of peak"] = best[name] * flops[arch] / 1e9 / peak
    figures["mixed precision over float32, accumulated"] = best[MIXED] / best[FP32]
    figures["mixed precision over float32, plain"] = best[PLAIN_MIXED] / best[PLAIN_FP32]
    figures["accumulated step cost, float32"] = best[PLAIN_FP32] / best[FP32]
    figures["accumulated step cost, mixed precision"] = best[PLAIN_MIXED] / best[MIXED]
    if MIXED_PROJECT in best:
        figures[PROJECT_KERNELS_GAIN] = best[MIXED_PROJECT] / best[FP32]
    return figures


# Issue 23's targets: (figure of `shares`, threshold, whether the figure must stay under it, format).
TARGETS = (
    (f"{FP32}: share of peak", 0.75, False, "{:.1%}"),
    (f"{PLAIN_FP32}: share of peak", 0.75, False, "{:.1%}"),
    ("mixed precision over float32, accumulated", 1.5, False, "{:.2f}x"),
    ("mixed precision over float32, plain", 1.5, False, "{:.2f}x"),
    ("accumulated step cost, float32", 1.10, True, "{:.3f}"),
    ("accumulated step cost, mixed precision", 1.10, True, "{:.3f}"),
)


def round_by_round(rounds: list[dict[str, float]], depth: int) -> str:
    """The targets in each round on its own (each figure from one round's measurements,
    taken minutes apart), and in how many rounds each was met: a target met only by
    the best rounds is met by luck."""
    figures = [shares(rates, depth) for rates in rounds]
    lines = ["| target | " + " | ".join(f"round {n + 1}" for n in range(len(rounds))) + " | rounds meeting it |",
             "|---|" + "---:|" * (len(rounds) + 1)]
    for key, threshold, at_most, shown in TARGETS:
        values = [round_figures[key] for round_figures in figures]
        met = sum(value <= threshold if at_most else value >= threshold for value in values)
        cells = " | ".join(shown.format(value) for value in values)
        label = key.replace(": share of peak", ", share of its precision's peak")
        lines.append(f"| {label} {'≤' if at_most else '≥'} {shown.format(threshold)} | {cells} | "
                     f"{met} of {len(values)} |")
    return "\n".join(lines)


def report(best: dict[str, float], depth: int) -> str:
    """The table of the best rounds and the issue-23 figures under it."""
    figures = shares(best, depth)
    lines = ["| measurement | images/s | ratio | GFLOP/s | share of the matmul peak |", "|---|---:|---:|---:|---:|"]
    for name, rate in best.items():
        if name in (PEAK_FP32, PEAK_BF16):
            lines.append(f"| {name} | | | {rate:.0f} | |")
            continue
        reference, against = (best[FP32], "trainer") if name == INPUT else (best[BASELINE], "baseline")
        share = figures.get(f"{name}: share of peak")
        flop_cells = f"{share * best[PEAK_BF16 if name in MIXED_PRECISION else PEAK_FP32]:.0f} | {share:.0%}" \
            if share is not None else " | "
        lines.append(f"| {name} | {rate:.0f} | {rate / reference:.2f}x {against} | {flop_cells} |")
    target = {key: threshold for key, threshold, _, _ in TARGETS}
    lines += [
        "",
        f"float32 share of the float32 matmul peak: accumulated {figures[f'{FP32}: share of peak']:.0%}, "
        f"plain {figures[f'{PLAIN_FP32}: share of peak']:.0%} (target: {target[f'{FP32}: share of peak']:.0%})",
        f"mixed precision over float32: accumulated {figures['mixed precision over float32, accumulated']:.2f}x, "
        f"plain {figures['mixed precision over float32, plain']:.2f}x "
        f"(target: {target['mixed precision over float32, plain']:.1f}x)",
        f"accumulated step cost (plain images/s over accumulated): float32 "
        f"{figures['accumulated step cost, float32']:.3f}, mixed precision "
        f"{figures['accumulated step cost, mixed precision']:.3f} "
        f"(target: {target['accumulated step cost, float32']:.2f} at most)",
    ]
    project = figures.get(PROJECT_KERNELS_GAIN)
    if project is not None:
        lines.append(f"with the project's opt-in bfloat16 additions and ReLU (--project-bfloat16-kernels): mixed "
                     f"precision over float32, accumulated {project:.2f}x, {best[MIXED_PROJECT] / best[MIXED]:.3f}x "
                     "TensorFlow's kernels' rate")
    return "\n".join(lines)


def measurements(spec: str, depth: int, steps: int) -> dict:
    """Each measurement's name and the function that takes it, in a round's order. The split
    is loaded only by the two that read it (the trainer loads its own; a load takes seconds)."""

    def split():
        return datasets.load(DataConfig(spec, val_split=0.0)).train

    def trainer(arch, **settings):
        return lambda: trainer_run(spec, arch, depth, steps + WARMUP_STEPS, **settings).train_images_per_sec

    return {
        BASELINE: lambda: baseline_fit(split(), "accumulated", depth, steps),
        FP32: trainer("accumulated"),
        MIXED: trainer("accumulated", mixed_precision=True),
        MIXED_PROJECT: trainer("accumulated", mixed_precision=True, project_bfloat16_kernels=True),
        "trainer --jit": trainer("accumulated", jit=True),
        PLAIN_FP32: trainer("resnet"),
        PLAIN_MIXED: trainer("resnet", mixed_precision=True),
        INPUT: lambda: input_pipeline_rate(split()),
        PEAK_FP32: lambda: matmul_peak(tf.float32),
        PEAK_BF16: lambda: matmul_peak(tf.bfloat16),
    }


def measure_in_a_process(name: str, spec: str, depth: int, steps: int) -> tuple[float, bool]:
    """One measurement in a fresh process, so that none inherits another's threads, memory
    or loaded kernels: (its rate, whether the project's bfloat16 kernels ran in it)."""
    result = subprocess.run([sys.executable, __file__, "--measure", name, "--dataset", spec, "--depth", str(depth),
                             "--steps", str(steps)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"measuring {name!r} failed:\n{result.stderr[-3000:]}")
    reported = json.loads(result.stdout.strip().splitlines()[-1])
    return reported["rate"], reported["project_bfloat16_kernels"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per measurement (plus 3 warm-up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--accuracy-epochs", type=int, default=3,
                        help="epochs of synthetic:10000 for the float32 vs bfloat16 accuracy check (0: skip)")
    parser.add_argument("--dataset", default="synthetic:10000",
                        help="the images every row trains on or reads (e.g. folder:PATH: photographs decoded "
                             "from files, to see whether the input pipeline keeps up with the trainer on them)")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # one measurement, in this process
    args = parser.parse_args()

    spec = args.dataset
    if args.measure:
        rate = measurements(spec, args.depth, args.steps)[args.measure]()
        print(json.dumps({"rate": rate, "project_bfloat16_kernels": bool(bfloat16.kernel_calls())}))
        return
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU cores: {cpu_name()}; "
          f"ResNet-{args.depth}, batch {BATCH}, {args.steps} timed steps, best of {args.rounds} round(s), on {spec}")
    # Built (once) before anything is timed, as the first run with --project-bfloat16-kernels would.
    library = kernels_for(MIXED_BFLOAT16, Machine.read())
    kernels = f"built, {library}" if library else "not available here, TensorFlow's run in their row too"
    print(f"the project's opt-in bfloat16 kernels: {kernels}\n")

    best = {name: 0.0 for name in measurements(spec, args.depth, args.steps)}
    project_kernels, rounds = {}, []
    for round_number in range(args.rounds):
        rounds.append({})
        for name in best:
            rate, project_kernels[name] = measure_in_a_process(name, spec, args.depth, args.steps)
            best[name] = max(best[name], rate)
            rounds[-1][name] = rate
            unit = "GFLOP/s" if name in (PEAK_FP32, PEAK_BF16) else "images/s"
            print(f"  round {round_number + 1}: {name}: {rate:.0f} {unit}", flush=True)
    if not project_kernels[MIXED_PROJECT] or project_kernels[MIXED]:
        # Both rows ran the same kernels (no AVX-512 or compiler here).
        print(f"\n{MIXED_PROJECT}: dropped, it ran the same kernels as the other mixed-precision rows")
        del best[MIXED_PROJECT]
        for rates in rounds:
            del rates[MIXED_PROJECT]
    print()
    print(report(best, args.depth))
    print("\nround by round:\n" + round_by_round(rounds, args.depth))

    if args.accuracy_epochs:
        results = {}
        for label, precision in (("float32", {}), ("mixed bfloat16", {"mixed_precision": True})):
            with tempfile.TemporaryDirectory() as model_dir:
                config = flags.build(TrainConfig, dict(model_dir=model_dir, arch="accumulated", depth=args.depth,
                                                       dataset=spec, recipe="quick", epochs=args.accuracy_epochs,
                                                       batch_size=BATCH, progress=False, **precision))
                results[label] = train(config).final
        print(f"\naccuracy after {args.accuracy_epochs} epochs of {spec} (quick recipe, seed 0):")
        for label, final in results.items():
            print(f"  {label}: val_accuracy {final['val_accuracy']:.4f}, test_accuracy {final['test_accuracy']:.4f}")
    print("\n" + json.dumps({"best": best, **shares(best, args.depth), "rounds": rounds}))


if __name__ == "__main__":
    main()
