"""Why a plain ResNet-32 died at lr 0.1: one short run per candidate cause and seed.

Each variant changes one thing against the baseline, the plain ResNet-32 as
the Keras cifar10_resnet example builds it (1x1 projection shortcut without
BN, he_normal classifier, no L2 on BN) with the fused BN layer, trained with
SGD momentum 0.9 at lr 0.1 and batch 128 (the cpu-small recipe: lr / 10 at 50%
and 75% of the run). The table gives, per variant and seed, the mean training
loss of the first epoch (chance is ln 10 = 2.30), the validation loss and
accuracy after it, and the final validation accuracy.

    python benchmarks/collapse_ablation.py --dataset folder:PATH [--variants baseline,padding]
        [--seeds 0,1,2] [--epochs 4] [--train-images 4000] --out DIR [--table FILE.md] [--trace STEPS]

Runs go to DIR/runs/<variant>-seed<seed>; finished runs are kept, so the
script can be started again to add variants or seeds. Every number in the
table is read back from the runs' history.csv and summary.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pipeline.settings import config as cfg  # noqa: E402
from pipeline.model import architecture  # noqa: E402
from pipeline.settings import recipes  # noqa: E402
from pipeline.train.rundir import RunDir  # noqa: E402

BASE_RECIPE = "cpu-small"


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    description: str
    arch: str = "resnet"
    recipe: tuple[tuple[str, object], ...] = ()  # changes to the base recipe (its model settings included)

    def recipe_for_run(self) -> recipes.Recipe:
        """The base recipe with the variant's changes, under a name of its own (the run records it)."""
        base = recipes.get_recipe(BASE_RECIPE)
        if not self.recipe:
            return base
        return dataclasses.replace(base, name=f"{BASE_RECIPE}-{self.name}", **dict(self.recipe))

    def model_config(self, depth: int, num_classes: int) -> architecture.ModelConfig:
        """The network as the variant's run builds it."""
        return cfg.NetConfig(self.arch, depth).model_config(num_classes, self.recipe_for_run())


VARIANTS = {variant.name: variant for variant in (
    Variant("baseline", "as before: 1x1 projection without BN, fused BN, he_normal classifier, no L2 on BN"),
    Variant("keras-bn", "Keras' own BatchNormalization instead of the fused layer",
            recipe=(("fused_batch_norm", False),)),
    Variant("padding", "option A shortcut: subsampled identity with zero channels (He et al., CIFAR)",
            recipe=(("shortcut", "padding"),)),
    Variant("projection-bn", "1x1 projection followed by BN (as the accumulated net's N_i(P_i(x)))",
            recipe=(("shortcut", "projection-bn"),)),
    Variant("classifier-init", "classifier initialised as Torch's nn.Linear, U(+-1/sqrt(fan_in)), not he_normal",
            recipe=(("classifier_initializer", "torch-linear"),)),
    Variant("projection-init", "projection initialised with fan-out He init (fb.resnet.torch): half the variance",
            recipe=(("projection_initializer", "torch-conv"),)),
    Variant("bn-l2", "L2 1e-4 on BN's gamma and beta too", recipe=(("batch_norm_weight_decay", 1e-4),)),
    Variant("lr-0.05", "lr 0.05 instead of 0.1 (same batch 128)", recipe=(("learning_rate", 0.05),)),
    # He et al.'s remedy for ResNet-110: lr 0.01 until training starts converging, then 0.1. Here the
    # first quarter of the run (one epoch of four): 0.01, then 0.1, 0.01, 0.001 at 25%, 50%, 75%.
    Variant("warmup", "lr 0.01 for the first 25% of the run, then 0.1 (He et al.'s ResNet-110 warm-up)",
            recipe=(("learning_rate", 0.01), ("boundaries", (0.25, 0.5, 0.75)), ("factors", (10.0, 1.0, 0.1)))),
    Variant("zero-gamma", "last BN of every residual branch starts at gamma 0 (Goyal et al. 2017)",
            recipe=(("zero_init_residual", True),)),
    Variant("padding-zero-gamma", "option A and gamma 0 in the last BN of every branch together",
            recipe=(("shortcut", "padding"), ("zero_init_residual", True))),
    Variant("padding-classifier-init", "option A and the Torch classifier init together (He et al.'s CIFAR net)",
            recipe=(("shortcut", "padding"), ("classifier_initializer", "torch-linear"))),
    Variant("accumulated", "the accumulated net, everything else as the baseline", arch="accumulated"),
    Variant("accumulated-padding", "the accumulated net with option A shortcuts", arch="accumulated",
            recipe=(("shortcut", "padding"),)),
)}


@functools.lru_cache(maxsize=1)
def _training_data(spec: str, train_images: int):
    from pipeline.data import datasets

    return datasets.load(cfg.DataConfig(spec, train_images=train_images))


def initial_state(name: str, seed: int, args: argparse.Namespace, images: int = 512) -> dict:
    """The freshly initialised net (as the run starts it: same seed, same build) on the first
    training images, with batch statistics as in the first step: its loss and its logits' spread."""
    import keras
    import numpy as np

    from pipeline.model.network import set_pixel_mean

    from pipeline.model.network import build_model

    data = _training_data(args.dataset, args.train_images)
    keras.utils.set_random_seed(seed)
    model = build_model(VARIANTS[name].model_config(args.depth, data.num_classes))  # as the run builds it
    set_pixel_mean(model, data.pixel_mean())
    # A fixed random sample: the split keeps the class-by-class order of a folder.
    pick = np.random.default_rng(0).choice(len(data.train), images, replace=False)
    x, y = data.train.images[pick], data.train.labels[pick]
    features = np.asarray(keras.Model(model.input, model.get_layer("pool").output)(x, training=True))
    classifier = model.get_layer("probabilities")
    logits = features @ np.asarray(classifier.kernel) + np.asarray(classifier.bias)
    loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    return {"initial_loss": float(np.mean(loss)), "initial_logit_std": float(logits.std()),
            "initial_feature_rms": float(np.sqrt(np.mean(features**2)))}


def trace(name: str, seed: int, steps: int, args: argparse.Namespace, images: int = 512) -> list[dict]:
    """The first `steps` training steps of a variant, as its run takes them (same seed, data order and
    optimizer), and after each: the loss on a fixed sample of training images in training mode, the
    pooled features' size and share of zeros, the spread of the logits, how many classes the sample is
    predicted as, and the smallest gamma and beta of any BN."""
    import keras
    import numpy as np
    import tensorflow as tf

    from pipeline.data import input_pipeline
    from pipeline.train.distribute import Cluster, make_strategy
    from pipeline.model.network import build_model, set_pixel_mean
    from pipeline.train.optimizers import learning_rate_schedule, make_optimizer
    from pipeline.train.trainer import Trainer

    variant = VARIANTS[name]
    data = _training_data(args.dataset, args.train_images)
    strategy = make_strategy(Cluster(), None)
    recipe = variant.recipe_for_run()
    with strategy.scope():
        keras.utils.set_random_seed(seed)
        model = build_model(variant.model_config(args.depth, data.num_classes))
        set_pixel_mean(model, data.pixel_mean())
        steps_per_epoch = len(data.train) // recipe.batch_size
        schedule = learning_rate_schedule(recipe, recipe.learning_rate, steps_per_epoch * args.epochs)
        optimizer = make_optimizer(recipe, schedule)
    trainer = Trainer(strategy, model, optimizer, recipe.batch_size)
    batches = iter(strategy.distribute_datasets_from_function(lambda context: input_pipeline.train_dataset(
        data.train, batch_size=recipe.batch_size, seed=seed, start_epoch=0, steps_per_epoch=steps_per_epoch,
        input_context=context)))
    pick = np.random.default_rng(0).choice(len(data.train), images, replace=False)
    x, y = data.train.images[pick], data.train.labels[pick]
    pooled = keras.Model(model.input, model.get_layer("pool").output)
    classifier = model.get_layer("probabilities")
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    rows = []
    for step in range(steps + 1):
        features = np.asarray(pooled(x, training=True))
        logits = features @ np.asarray(classifier.kernel) + np.asarray(classifier.bias)
        loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        row = {"step": step, "sample_loss": round(float(np.mean(loss)), 3),
               "feature_rms": round(float(np.sqrt(np.mean(features**2))), 3),
               "dead_features": round(float(np.mean(features == 0)), 3),
               "logit_range": round(float(np.ptp(logits, axis=1).mean()), 2),
               "predicted_classes": int(len(np.unique(logits.argmax(axis=1)))),
               "min_gamma": round(float(min(np.min(n.gamma) for n in norms)), 3),
               "min_beta": round(float(min(np.min(n.beta) for n in norms)), 3)}
        if step < steps:
            row["batch_loss"] = round(float(trainer.train_step(batches, tf.constant(0.0))[0]), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def run_variant(name: str, seed: int, args: argparse.Namespace) -> pathlib.Path:
    from pipeline.train.loop import train

    variant = VARIANTS[name]
    run_dir = pathlib.Path(args.out) / "runs" / f"{name}-seed{seed}"
    if RunDir(run_dir).is_finished():
        print(f"{name} seed {seed}: finished earlier, kept", flush=True)
        return run_dir
    print(f"{name} seed {seed}: training in {run_dir}", flush=True)
    train(cfg.TrainConfig(
        model_dir=str(run_dir), net=cfg.NetConfig(variant.arch, args.depth),
        data=cfg.DataConfig(args.dataset, train_images=args.train_images), recipe=variant.recipe_for_run(),
        epochs=args.epochs, seed=seed, progress=False))
    return run_dir


def read_run(run_dir: pathlib.Path) -> dict:
    run = RunDir(run_dir)
    history, summary = run.read_history(), run.read_summary()
    first, last = history[0], history[-1]
    return {"first_epoch_loss": first.loss, "first_epoch_accuracy": first.accuracy, "epoch1_val_loss": first.val_loss,
            "epoch1_val_accuracy": first.val_accuracy, "final_val_accuracy": last.val_accuracy,
            "final_test_accuracy": summary.final.get("test_accuracy"), "epochs": len(history),
            "learning_rate": summary.settings.learning_rate, "shortcut": summary.settings.shortcut,
            "images_per_sec": summary.train_images_per_sec, "wall_time_sec": summary.wall_time_sec}


def _values(rows: list[dict], key: str, digits: int) -> str:
    values = [row[key] for row in rows]
    shown = " / ".join(f"{v:.{digits}f}" for v in values)
    return f"{shown} (mean {statistics.fmean(values):.{digits}f})" if len(values) > 1 else shown


def table(results: dict[str, dict[int, dict]]) -> str:
    lines = ["| variant | change against the baseline | seeds | pooled-feature RMS at initialisation "
             "| loss at initialisation | first-epoch train loss | first-epoch train accuracy "
             "| val loss after epoch 1 | final val accuracy |", "|---|---|---|---|---|---|---|---|---|"]
    for name, by_seed in results.items():
        rows = [by_seed[s] for s in sorted(by_seed)]
        lines.append(f"| `{name}` | {VARIANTS[name].description} | {', '.join(map(str, sorted(by_seed)))} | "
                     f"{_values(rows, 'initial_feature_rms', 2)} | {_values(rows, 'initial_loss', 2)} | "
                     f"{_values(rows, 'first_epoch_loss', 2)} | {_values(rows, 'first_epoch_accuracy', 3)} | "
                     f"{_values(rows, 'epoch1_val_loss', 1)} | "
                     f"{_values(rows, 'final_val_accuracy', 3)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, metavar="SPEC")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--out", required=True, help="runs go to OUT/runs; results.json to OUT")
    parser.add_argument("--table", help="also write the markdown table here")
    parser.add_argument("--report-only", action="store_true", help="train nothing; tabulate the finished runs")
    parser.add_argument("--trace", type=int, metavar="STEPS",
                        help="instead: the first STEPS steps of each variant and seed, one JSON line per step, "
                             "also written to OUT/traces/<variant>-seed<seed>.jsonl")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.trace:
        folder = pathlib.Path(args.out) / "traces"
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            for seed in seeds:
                rows = trace(name, seed, args.trace, args)
                (folder / f"{name}-seed{seed}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return 0
    results: dict[str, dict[int, dict]] = {}
    for name in names:
        for seed in seeds:
            run_dir = pathlib.Path(args.out) / "runs" / f"{name}-seed{seed}"
            if not args.report_only:
                run_variant(name, seed, args)
            if RunDir(run_dir).read_summary() is not None:
                start_file = run_dir / "initial_state.json"
                if not start_file.exists():
                    start_file.write_text(json.dumps(initial_state(name, seed, args), indent=2) + "\n")
                results.setdefault(name, {})[seed] = {**read_run(run_dir), **json.loads(start_file.read_text())}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"dataset": args.dataset, "depth": args.depth, "epochs": args.epochs,
                "train_images": args.train_images, "recipe": BASE_RECIPE}
    (out / "results.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    markdown = table(results)
    if args.table:
        pathlib.Path(args.table).write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
