"""Training throughput of the trainer against a Keras `model.fit` baseline.

Everything is measured in this one run, on this machine, and reported as
ratios against the baseline measured here too:

- baseline: stock Keras, `model.fit` on in-memory float arrays with the
  augmentation as Keras preprocessing layers (ZeroPadding2D + RandomCrop +
  RandomFlip) in front of the same network built with Keras' own
  BatchNormalization layer;
- the trainer (`pipeline.train.train`), float32 and with --mixed-precision
  (and --jit, for information), steady-state images/s from its summary.json;
- the input pipeline alone, augmentation on, in images/s;
- the accumulated net's step time over the plain net's.

Each configuration runs `--rounds` times, interleaved, and the best round
counts: the machine is shared, and the best round is the least disturbed.

    python benchmarks/train_throughput.py [--depth 32] [--steps 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from pipeline import datasets, flags, input_pipeline  # noqa: E402
from pipeline.architecture import ModelConfig  # noqa: E402
from pipeline.config import DataConfig, TrainConfig  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.train import train  # noqa: E402

BATCH = 128
WARMUP_STEPS = 3


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


def baseline_fit(split: datasets.Split, arch: str, depth: int, steps: int) -> float:
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


def input_pipeline_rate(split: datasets.Split, batches: int = 200) -> float:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per measurement (plus 3 warm-up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--accuracy-epochs", type=int, default=3,
                        help="epochs of synthetic:10000 for the float32 vs bfloat16 accuracy check (0: skip)")
    args = parser.parse_args()

    spec = "synthetic:10000"
    split = datasets.load(DataConfig(spec, val_split=0.0)).train
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU cores; "
          f"ResNet-{args.depth}, batch {BATCH}, {args.steps} timed steps, best of {args.rounds} round(s)\n")

    steps = args.steps + WARMUP_STEPS
    measurements = {
        "baseline: keras model.fit + augmentation layers": lambda: baseline_fit(split, "accumulated", args.depth,
                                                                                args.steps),
        "trainer float32": lambda: trainer_run(spec, "accumulated", args.depth, steps).train_images_per_sec,
        "trainer --mixed-precision": lambda: trainer_run(spec, "accumulated", args.depth, steps,
                                                         mixed_precision=True).train_images_per_sec,
        "trainer --jit": lambda: trainer_run(spec, "accumulated", args.depth, steps, jit=True).train_images_per_sec,
        "trainer float32, plain ResNet": lambda: trainer_run(spec, "resnet", args.depth, steps).train_images_per_sec,
        "input pipeline alone (augmentation on)": lambda: input_pipeline_rate(split),
    }
    best = {name: 0.0 for name in measurements}
    for round_number in range(args.rounds):
        for name, measure in measurements.items():
            rate = measure()
            best[name] = max(best[name], rate)
            print(f"  round {round_number + 1}: {name}: {rate:.0f} images/s", flush=True)

    baseline = best["baseline: keras model.fit + augmentation layers"]
    trainer = best["trainer float32"]
    print("\n| measurement | images/s | ratio |")
    print("|---|---:|---:|")
    for name, rate in best.items():
        reference = trainer if name.startswith("input pipeline") else baseline
        against = "trainer" if reference is trainer else "baseline"
        print(f"| {name} | {rate:.0f} | {rate / reference:.2f}x {against} |")
    step_ratio = best["trainer float32, plain ResNet"] / trainer
    print(f"\naccumulated / plain step time: {step_ratio:.3f}")

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
    print("\n" + json.dumps({"best_images_per_sec": best, "accumulated_over_plain_step_time": step_ratio}))


if __name__ == "__main__":
    main()
