"""The training loop: one custom loop for every distribution strategy.

Keras 3's `model.fit` fails under MultiWorkerMirroredStrategy
(keras-team/keras#20585), so training is a `tf.function` step that calls
`strategy.run`, with the loss averaged over the global batch by
`tf.nn.compute_average_loss` and Keras 3 layers, optimizer and metrics
inside. The same loop runs one CPU, N logical CPUs, N GPUs or N workers.

Files written to the model directory (by the chief only, under several workers):

    checkpoints/    model, optimizer, epoch (the data position), every epoch
    logs/           TensorBoard summaries (train/, validation/)
    history.csv     epoch, loss, accuracy, val_loss, val_accuracy, lr
    summary.json    what ran, where it started, final metrics, images/s
    run.json        the settings a resume must agree with
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import pathlib
import shutil
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from pipeline import datasets, input_pipeline
from pipeline.config import (ModelConfig, Recipe, RunLength, TrainConfig, UserError, get_recipe, run_length,
                             scaled_learning_rate)
from pipeline.distribute import Cluster, make_strategy
from pipeline.model import build_model, precision_policy, set_pixel_mean

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr")
# Settings that must match for a model directory to be resumed.
RESUME_KEYS = ("arch", "depth", "width", "cardinality", "dataset", "num_classes", "seed", "recipe", "shortcut")
# What a run.json written before a key existed meant by it.
RESUME_DEFAULTS = {"shortcut": "projection"}


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class ResumeMismatch(UserError, ValueError):
    """The model directory holds a run with other settings."""


# --- recipe -> optimizer ------------------------------------------------------------


def learning_rate_schedule(recipe: Recipe, learning_rate: float, total_steps: int):
    """The recipe's schedule stretched or shrunk to `total_steps`."""
    if recipe.schedule == "cosine":
        warmup = int(recipe.warmup * total_steps)
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else learning_rate,
            decay_steps=max(total_steps - warmup, 1),
            warmup_target=learning_rate if warmup else None,
            warmup_steps=warmup,
        )
    boundaries = list(recipe.step_boundaries) or [max(int(round(f * total_steps)), 1) for f in recipe.boundaries]
    values = [learning_rate] + [learning_rate * f for f in recipe.factors]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def make_optimizer(recipe: Recipe, schedule, loss_scaling: bool) -> keras.optimizers.Optimizer:
    if recipe.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=recipe.momentum)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=schedule)
    # float16 needs loss scaling to keep small gradients; bfloat16 does not.
    return keras.optimizers.LossScaleOptimizer(optimizer) if loss_scaling else optimizer


def mixed_precision_policy(enabled: bool) -> str:
    """Mixed precision: float16 on GPUs, bfloat16 on CPUs (AVX512-BF16 / AMX)."""
    if not enabled:
        return "float32"
    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"


# --- the loop ----------------------------------------------------------------------------


class Trainer:
    """Distributed train and evaluation steps around one model and optimizer."""

    def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model,
                 optimizer: keras.optimizers.Optimizer, global_batch: int, jit: bool = False,
                 cluster: Cluster | None = None):
        self.strategy, self.model, self.optimizer = strategy, model, optimizer
        self.global_batch = global_batch
        self.cluster = cluster or Cluster()
        with strategy.scope():
            self.train_loss = keras.metrics.Mean(name="loss")
            self.train_accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
            self.eval_loss = keras.metrics.Mean(name="val_loss")
            self.eval_accuracy = keras.metrics.SparseCategoricalAccuracy(name="val_accuracy")
            # Slots made now, not inside the first traced step: variables
            # created in a tf.function under a strategy break its graph.
            optimizer.build(model.trainable_variables)
        self._moving_statistics = [
            variable for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)
            for variable in (layer.moving_mean, layer.moving_variance)
        ]
        self._gradients = tf.function(self._replica_gradients, jit_compile=True) if jit else self._replica_gradients

    def _replica_gradients(self, images, labels):
        with tf.GradientTape() as tape:
            probabilities = self.model(images, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch)
            if self.model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(self.model.losses))
            scaled = self.optimizer.scale_loss(loss)
        return tape.gradient(scaled, self.model.trainable_variables), per_example, probabilities

    def _replica_train_step(self, images, labels):
        gradients, per_example, probabilities = self._gradients(images, labels)
        self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
        self.train_loss.update_state(per_example)
        self.train_accuracy.update_state(labels, probabilities)
        return tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch)

    def distribute(self, dataset_fn):
        """`dataset_fn(input_context)` as the input of this strategy's steps.

        On GPUs: tf.data's per-device iterators, which prefetch onto each GPU.
        On CPUs each replica reads its own pipeline on the host instead: those
        per-device iterators start an autotuning thread that this project's
        pipelines turn off, and destroying one waits for that thread's next
        wake-up, up to a minute, at the end of every run and after every
        evaluation; on CPUs their prefetch buys nothing. A worker of several
        has one CPU replica, fed its own pipeline's batches as they are.
        """
        if tf.config.list_logical_devices("GPU"):
            return self.strategy.distribute_datasets_from_function(dataset_fn)
        if self.cluster.is_multi_worker:
            return dataset_fn(tf.distribute.InputContext(self.cluster.num_workers, self.cluster.worker_index,
                                                         self.strategy.num_replicas_in_sync))
        options = tf.distribute.InputOptions(
            experimental_fetch_to_device=False,
            experimental_replication_mode=tf.distribute.InputReplicationMode.PER_REPLICA)
        return self.strategy.distribute_datasets_from_function(dataset_fn, options)

    @tf.function
    def train_step(self, iterator) -> tf.Tensor:
        """One global step; returns the batch's mean cross-entropy."""
        per_replica = self.strategy.run(self._replica_train_step, args=next(iterator))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    @tf.function
    def sync_batch_norm_statistics(self) -> None:
        """Average the BN moving statistics over replicas and workers.

        Each replica updates its own copy from its own batches (Keras creates
        them with no aggregation), so the copies drift apart. A moving average
        is linear in the batch statistics, so the mean of the copies equals
        what a per-step mean would have produced: syncing once before they
        are read (evaluation, checkpoints) is exact.
        """
        statistics = self._moving_statistics

        def replica_means():
            context = tf.distribute.get_replica_context()
            return context.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(v) for v in statistics])

        means = self.strategy.run(replica_means)
        for variable, mean in zip(statistics, means):
            variable.assign(self.strategy.experimental_local_results(mean)[0])

    def _replica_eval_step(self, images, labels, weights):
        probabilities = self.model(images, training=False)
        per_example = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
        self.eval_loss.update_state(per_example, sample_weight=weights)
        self.eval_accuracy.update_state(labels, probabilities, sample_weight=weights)

    @tf.function
    def eval_step(self, iterator) -> None:
        self.strategy.run(self._replica_eval_step, args=next(iterator))

    def evaluate(self, split: datasets.Split) -> dict[str, float]:
        """Loss and accuracy over a whole split, every image counted once."""
        dataset = self.distribute(
            lambda context: input_pipeline.eval_dataset(
                split, batch_size=context.get_per_replica_batch_size(self.global_batch),
                global_batch=self.global_batch, input_context=context))
        self.eval_loss.reset_state()
        self.eval_accuracy.reset_state()
        iterator = iter(dataset)
        for _ in range(input_pipeline.eval_steps(len(split), self.global_batch)):
            self.eval_step(iterator)
        return {"loss": float(self.eval_loss.result()), "accuracy": float(self.eval_accuracy.result())}

    def reset_train_metrics(self) -> None:
        self.train_loss.reset_state()
        self.train_accuracy.reset_state()

    def train_metrics(self) -> dict[str, float]:
        return {"loss": float(self.train_loss.result()), "accuracy": float(self.train_accuracy.result())}

    def learning_rate(self) -> float:
        rate = self.optimizer.learning_rate
        return float(rate(self.optimizer.iterations) if callable(rate) else rate)


# --- files of a run ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """Where a worker writes; non-chief workers write checkpoints to a scratch
    folder (saving is collective, so every worker saves) and nothing else."""

    model_dir: pathlib.Path
    is_chief: bool
    task_id: int

    @property
    def checkpoints(self) -> pathlib.Path:
        return self.model_dir / "checkpoints"

    @property
    def write_checkpoints(self) -> pathlib.Path:
        if self.is_chief:
            return self.checkpoints
        return self.model_dir / ".workers" / f"worker-{self.task_id}" / "checkpoints"

    @property
    def history(self) -> pathlib.Path:
        return self.model_dir / "history.csv"

    @property
    def summary(self) -> pathlib.Path:
        return self.model_dir / "summary.json"

    @property
    def run(self) -> pathlib.Path:
        return self.model_dir / "run.json"

    @property
    def logs(self) -> pathlib.Path:
        return self.model_dir / "logs"


def read_history(path: pathlib.Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def write_history(path: pathlib.Path, rows: list[dict]) -> None:
    """Rewrite history.csv atomically (replace, never a half-written file)."""
    scratch = path.with_suffix(".csv.tmp")
    with scratch.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key, "") for key in HISTORY_FIELDS})
    os.replace(scratch, path)


def write_json(path: pathlib.Path, value: dict) -> None:
    scratch = path.with_suffix(".json.tmp")
    scratch.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")
    os.replace(scratch, path)


def check_resumable(files: RunFiles, settings: dict) -> None:
    """Refuse to resume a model directory that holds a run with other settings."""
    if not files.run.exists():
        return
    previous = json.loads(files.run.read_text())
    previous = {**RESUME_DEFAULTS, **previous}
    differing = {k: (previous.get(k), settings[k]) for k in RESUME_KEYS if previous.get(k) != settings[k]}
    if differing:
        detail = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in differing.items())
        raise ResumeMismatch(
            f"{files.model_dir} holds a run with other settings ({detail}); "
            "resume with the same flags or choose a new --model-dir"
        )


# --- progress ----------------------------------------------------------------------------


class Progress:
    """A Keras progress bar on a terminal, a few plain log lines per epoch otherwise."""

    def __init__(self, enabled: bool | None):
        self.bar_enabled = sys.stdout.isatty() if enabled is None else enabled
        self.bar = None

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.steps, self.epoch = steps, epoch
        self.every = max(1, steps // 4)
        if self.bar_enabled:
            print(f"Epoch {epoch}/{epochs}", flush=True)
            self.bar = keras.utils.Progbar(steps, stateful_metrics=["loss", "accuracy"])

    def step(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(step, list(metrics.items()))
        elif step % self.every == 0 or step == self.steps:
            log.info("epoch %d step %d/%d loss %.4f accuracy %.4f",
                     self.epoch, step, self.steps, metrics["loss"], metrics["accuracy"])


# --- train -------------------------------------------------------------------------------------


def train(config: TrainConfig) -> dict:
    """Train (or resume) a run as configured; returns the summary also written to summary.json."""
    started = time.monotonic()
    cluster = Cluster.from_environment()
    strategy = make_strategy(cluster, config.devices)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    files = RunFiles(pathlib.Path(config.model_dir), cluster.is_chief, cluster.task_id)
    if cluster.is_chief:
        files.model_dir.mkdir(parents=True, exist_ok=True)

    recipe = get_recipe(config.recipe)
    data_config = config.data
    if data_config.train_images is None and recipe.train_images is not None:
        data_config = dataclasses.replace(data_config, train_images=recipe.train_images)
    data = datasets.load(data_config)
    replicas = strategy.num_replicas_in_sync
    per_replica_batch = config.batch_size or recipe.batch_size
    global_batch = per_replica_batch * replicas
    length = run_length(recipe, len(data.train), global_batch, config.epochs, config.steps)
    learning_rate = scaled_learning_rate(recipe, global_batch)
    model_config = ModelConfig(config.arch, config.depth, data.num_classes, width=config.width,
                               cardinality=config.cardinality, shortcut=config.shortcut or recipe.shortcut,
                               zero_init_residual=recipe.zero_init_residual)
    settings = {
        "arch": config.arch, "depth": config.depth, "width": config.width, "cardinality": config.cardinality,
        "shortcut": model_config.shortcut, "zero_init_residual": model_config.zero_init_residual,
        "dataset": config.data.spec,
        "num_classes": data.num_classes, "class_names": list(data.class_names), "seed": config.seed,
        "recipe": recipe.name, "replicas": replicas, "workers": cluster.num_workers,
        "per_replica_batch": per_replica_batch, "global_batch": global_batch, "learning_rate": learning_rate,
        "total_steps": length.total_steps, "steps_per_epoch": length.steps_per_epoch, "epochs": length.epochs,
        "mixed_precision": config.mixed_precision, "jit": config.jit,
    }
    check_resumable(files, settings)
    log.info("training %s-%d on %s: %d replica(s) on %d worker(s), global batch %d, lr %.4g, "
             "%d steps (%d epochs of %d)", config.arch, config.depth, data.describe(), replicas,
             cluster.num_workers, global_batch, learning_rate, length.total_steps, length.epochs,
             length.steps_per_epoch)

    policy = mixed_precision_policy(config.mixed_precision)
    with precision_policy(policy):
        with strategy.scope():
            keras.utils.set_random_seed(config.seed)
            model = build_model(model_config)
            set_pixel_mean(model, data.pixel_mean())
            schedule = learning_rate_schedule(recipe, learning_rate, length.total_steps)
            optimizer = make_optimizer(recipe, schedule, loss_scaling=policy == "mixed_float16")
        trainer = Trainer(strategy, model, optimizer, global_batch, jit=config.jit, cluster=cluster)
        with strategy.scope():
            epoch_variable = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_variable)
        latest = tf.train.latest_checkpoint(files.checkpoints)
        if latest:
            checkpoint.restore(latest).assert_existing_objects_matched()
            log.info("resuming from %s", latest)
        manager = tf.train.CheckpointManager(checkpoint, files.write_checkpoints, max_to_keep=3)
        initial_epoch = int(epoch_variable.numpy())
        return _run_epochs(config, trainer, data, files, manager, epoch_variable, length,
                           initial_epoch, settings, cluster, started)


def _run_epochs(config: TrainConfig, trainer: Trainer, data: datasets.ImageData, files: RunFiles,
                manager: tf.train.CheckpointManager, epoch_variable: tf.Variable, length: RunLength,
                initial_epoch: int, settings: dict, cluster: Cluster, started: float) -> dict:
    global_batch = trainer.global_batch
    history = [row for row in read_history(files.history) if int(row["epoch"]) <= initial_epoch]
    if cluster.is_chief:
        write_json(files.run, settings)
        # Rows past the checkpoint belong to an epoch that is about to be redone.
        write_history(files.history, history)
    dataset = trainer.distribute(
        lambda context: input_pipeline.train_dataset(
            data.train, batch_size=context.get_per_replica_batch_size(global_batch), seed=config.seed,
            start_epoch=initial_epoch, steps_per_epoch=length.steps_per_epoch, end_epoch=length.epochs,
            augment=config.data.augment,
            global_batch=global_batch, input_context=context))
    iterator = iter(dataset)
    writers = _summary_writers(files, cluster.is_chief)
    progress = Progress(config.progress)
    timed_steps, timed_seconds, steps_run = 0, 0.0, 0
    final: dict[str, float] = {}
    for epoch in range(initial_epoch, length.epochs):
        steps = length.steps_in_epoch(epoch)
        trainer.reset_train_metrics()
        progress.start_epoch(epoch + 1, length.epochs, steps)
        for step in range(1, steps + 1):
            step_started = time.perf_counter()
            loss = float(trainer.train_step(iterator))
            if steps_run >= config.warmup_steps:
                timed_seconds += time.perf_counter() - step_started
                timed_steps += 1
            steps_run += 1
            if not math.isfinite(loss):
                kept = (f"Checkpoints up to epoch {epoch} are kept in {files.checkpoints}." if epoch
                        else "No epoch had finished, so there is no checkpoint.")
                raise TrainingDiverged(
                    f"the loss became {loss} at epoch {epoch + 1}, step {step}; training stopped. {kept} "
                    "Lower the learning rate (a smaller --batch-size scales it down) or check the data."
                )
            progress.step(step, trainer.train_metrics())
        metrics = trainer.train_metrics()
        trainer.sync_batch_norm_statistics()
        if data.validation is not None:
            metrics.update({f"val_{k}": v for k, v in trainer.evaluate(data.validation).items()})
        metrics["lr"] = trainer.learning_rate()
        epoch_variable.assign(epoch + 1)
        history.append({"epoch": epoch + 1, **metrics})
        if cluster.is_chief:
            write_history(files.history, history)
        manager.save(checkpoint_number=epoch + 1)
        if not cluster.is_chief:
            shutil.rmtree(files.write_checkpoints.parent, ignore_errors=True)
        images_per_sec = timed_steps * global_batch / timed_seconds if timed_seconds else None
        _write_scalars(writers, epoch + 1, metrics, images_per_sec)
        log.info("epoch %d/%d: %s", epoch + 1, length.epochs,
                 " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        final = metrics
    if data.test is not None and (final or initial_epoch == length.epochs):
        final.update({f"test_{k}": v for k, v in trainer.evaluate(data.test).items()})
    if not final and history:
        final = {k: float(v) for k, v in history[-1].items() if k != "epoch" and v != ""}
    summary = {
        **settings,
        "initial_epoch": initial_epoch,
        "epochs_completed": int(epoch_variable.numpy()),
        "steps_completed": int(trainer.optimizer.iterations.numpy()),
        "final": final,
        "wall_time_sec": round(time.monotonic() - started, 2),
        "train_images_per_sec": round(timed_steps * global_batch / timed_seconds, 1) if timed_seconds else None,
        "timed_steps": timed_steps,
        "parameters": trainer.model.count_params(),
        "model_dir": str(files.model_dir),
        "is_chief": cluster.is_chief,
    }
    if cluster.is_chief:
        write_json(files.summary, summary)
    log.info("weights checksum %.6f", weights_checksum(trainer.model))
    return summary


def weights_checksum(model: keras.Model) -> float:
    """Sum of |w| over all weights: equal on every worker of a synchronous run."""
    return float(sum(np.abs(np.asarray(w, np.float64)).sum() for w in model.get_weights()))


def _summary_writers(files: RunFiles, is_chief: bool) -> dict:
    if not is_chief:
        return {"train": tf.summary.create_noop_writer(), "validation": tf.summary.create_noop_writer()}
    return {name: tf.summary.create_file_writer(str(files.logs / name)) for name in ("train", "validation")}


def _write_scalars(writers: dict, epoch: int, metrics: dict[str, float], images_per_sec: float | None) -> None:
    with writers["train"].as_default(step=epoch):
        for key in ("loss", "accuracy", "lr"):
            tf.summary.scalar(key, metrics[key])
        if images_per_sec:
            tf.summary.scalar("images_per_sec", images_per_sec)
    with writers["validation"].as_default(step=epoch):
        for key in ("loss", "accuracy"):
            if f"val_{key}" in metrics:
                tf.summary.scalar(key, metrics[f"val_{key}"])
    for writer in writers.values():
        writer.flush()
