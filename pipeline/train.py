"""The training loop: one custom loop for every distribution strategy.

Keras 3's `model.fit` fails under MultiWorkerMirroredStrategy
(keras-team/keras#20585), so training is a `tf.function` step that calls
`strategy.run`, with the loss averaged over the global batch by
`tf.nn.compute_average_loss` and Keras 3 layers, optimizer and metrics
inside. The same loop runs one CPU, N logical CPUs, N GPUs or N workers.

The epoch loop only steps; at its seams it calls small hooks (step timing,
the NaN stop, progress, history, checkpoints, TensorBoard, the epoch's log
line), each of which can be made and tested alone. What a run writes, and
where, is pipeline/rundir.py's.
"""

from __future__ import annotations

import hashlib
import logging
import math
import pathlib
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from pipeline import datasets, input_pipeline
from pipeline.config import ConfigError, Recipe, RunLength, TrainConfig, UserError, run_length, scaled_learning_rate
from pipeline.distribute import Cluster, make_strategy
from pipeline.model import build_model, precision_policy, set_pixel_mean
from pipeline.rundir import HistoryRow, RunDir, RunSettings, RunSummary, WorkerRecord

log = logging.getLogger(__name__)


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# Exit statuses a job controller can act on. 143 (128 + SIGTERM) is what a
# process stopped by SIGTERM reports; both are retriable for Kubeflow's
# ExitCode restart policy (128-255), and the Indexed Job ignores 143 (its
# podFailurePolicy) since a preemption is nobody's failure.
EXIT_PREEMPTED = 143
EXIT_PEER_LOST = 144


class Preempted(UserError, RuntimeError):
    """SIGTERM: a checkpoint was saved at a step all workers agreed on, and the run stopped."""

    exit_status = EXIT_PREEMPTED


class PeerLost(UserError, RuntimeError):
    """Another worker vanished or stopped answering; the last checkpoint stays."""

    exit_status = EXIT_PEER_LOST


class StopRequest:
    """SIGTERM asks the run to stop at the next step boundary.

    The request travels as a vote in the step's own all-reduce, so every
    worker learns of it after the same step, whichever worker got the signal.
    Installed after the strategy is made: TensorFlow's coordination service
    installs a SIGTERM handler of its own, which would otherwise swallow it.
    """

    def __init__(self):
        self.requested = False
        self._votes = (tf.constant(0.0), tf.constant(1.0))
        self._previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exception) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_signal(self, signal_number, frame) -> None:
        self.requested = True
        log.warning("SIGTERM: the run stops after the next step, once its checkpoint is saved")

    def vote(self) -> tf.Tensor:
        return self._votes[self.requested]


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


# --- distributed steps ----------------------------------------------------------------------


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

    def _replica_train_step(self, images, labels, stop_vote):
        gradients, per_example, probabilities = self._gradients(images, labels)
        self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
        self.train_loss.update_state(per_example)
        self.train_accuracy.update_state(labels, probabilities)
        loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch)
        return tf.stack([loss, stop_vote])

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
    def train_step(self, iterator, stop_vote: tf.Tensor) -> tf.Tensor:
        """One global step; returns [the batch's mean cross-entropy, the replicas that vote to stop].

        The vote rides on the loss's all-reduce: every worker gets the same sum.
        """
        images, labels = next(iterator)
        per_replica = self.strategy.run(self._replica_train_step, args=(images, labels, stop_vote))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def checkpointed_state(self) -> dict:
        """What a checkpoint holds besides the model and optimizer: the epoch's running
        training metrics, so that an epoch resumed mid-way reports all its steps."""
        return {"train_metrics": [variable.value for metric in (self.train_loss, self.train_accuracy)
                                  for variable in metric.variables]}

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


# --- hooks: what happens around the steps -------------------------------------------------------


class Hook:
    """Called by the loop at its seams; a method not overridden does nothing.
    Epochs and steps count from 1."""

    def on_epoch_begin(self, epoch: int, steps: int) -> None:
        pass

    def on_step(self, epoch: int, step: int, loss: float, seconds: float) -> None:
        pass

    def on_epoch_end(self, row: HistoryRow) -> None:
        """The epoch is over: BN statistics synced across replicas, its metrics measured."""

    def on_stop(self, epoch: int, step: int) -> None:
        """Every worker agreed to stop after this step (SIGTERM), mid-epoch."""


class StepTimer(Hook):
    """Training throughput, leaving out the first `untimed` steps (tracing, warm caches)."""

    def __init__(self, untimed: int, global_batch: int):
        self.untimed, self.global_batch = untimed, global_batch
        self.steps_run, self.timed_steps, self.seconds = 0, 0, 0.0

    def on_step(self, epoch: int, step: int, loss: float, seconds: float) -> None:
        self.steps_run += 1
        if self.steps_run > self.untimed:
            self.timed_steps += 1
            self.seconds += seconds

    def images_per_sec(self) -> float | None:
        return self.timed_steps * self.global_batch / self.seconds if self.seconds else None


class StopOnDivergence(Hook):
    """A NaN or infinite loss stops the run; the checkpoints of the finished epochs stay."""

    def __init__(self, checkpoints: pathlib.Path):
        self.checkpoints = checkpoints

    def on_step(self, epoch: int, step: int, loss: float, seconds: float) -> None:
        if math.isfinite(loss):
            return
        kept = (f"Checkpoints up to epoch {epoch - 1} are kept in {self.checkpoints}." if epoch > 1
                else "No epoch had finished, so there is no checkpoint.")
        raise TrainingDiverged(
            f"the loss became {loss} at epoch {epoch}, step {step}; training stopped. {kept} "
            "Lower the learning rate (a smaller --batch-size scales it down) or check the data."
        )


class Progress(Hook):
    """A Keras progress bar on a terminal, a few plain log lines per epoch otherwise."""

    def __init__(self, enabled: bool | None, trainer: Trainer, epochs: int):
        self.bar_enabled = sys.stdout.isatty() if enabled is None else enabled
        self.trainer, self.epochs, self.bar = trainer, epochs, None

    def on_epoch_begin(self, epoch: int, steps: int) -> None:
        self.steps, self.every = steps, max(1, steps // 4)
        if self.bar_enabled:
            print(f"Epoch {epoch}/{self.epochs}", flush=True)
            self.bar = keras.utils.Progbar(steps, stateful_metrics=["loss", "accuracy"])

    def on_step(self, epoch: int, step: int, loss: float, seconds: float) -> None:
        metrics = self.trainer.train_metrics()
        if self.bar is not None:
            self.bar.update(step, list(metrics.items()))
        elif step % self.every == 0 or step == self.steps:
            log.info("epoch %d step %d/%d loss %.4f accuracy %.4f",
                     epoch, step, self.steps, metrics["loss"], metrics["accuracy"])


class History(Hook):
    """history.csv, rewritten whole after every epoch (by the chief)."""

    def __init__(self, run: RunDir, rows: list[HistoryRow], write: bool):
        self.run, self.rows, self.write = run, rows, write

    def on_epoch_end(self, row: HistoryRow) -> None:
        self.rows.append(row)
        if self.write:
            self.run.write_history(self.rows)


class Checkpoints(Hook):
    """Model, optimizer (its step count is the data position), finished epochs and the
    epoch's running metrics: after every epoch, every `every_steps` steps if set, and
    when the workers agree to stop. Numbered by global step; the last 3 are kept.

    Every worker saves, since saving is collective; a non-chief worker's copy
    goes to its scratch folder, removed at once.
    """

    def __init__(self, manager: tf.train.CheckpointManager, trainer: Trainer, epoch: tf.Variable,
                 scratch: pathlib.Path | None, every_steps: int | None = None):
        self.manager, self.trainer, self.epoch, self.scratch = manager, trainer, epoch, scratch
        self.every_steps = every_steps

    def save(self) -> None:
        self.manager.save(checkpoint_number=int(self.trainer.optimizer.iterations.numpy()))
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def on_epoch_begin(self, epoch: int, steps: int) -> None:
        self.steps = steps

    def on_step(self, epoch: int, step: int, loss: float, seconds: float) -> None:
        if not self.every_steps or step == self.steps:  # no step checkpoints, or the epoch's own comes next
            return
        if int(self.trainer.optimizer.iterations.numpy()) % self.every_steps == 0:
            self.on_stop(epoch, step)

    def on_stop(self, epoch: int, step: int) -> None:
        # Checkpoints hold one copy of the BN statistics: the replicas' mean (see sync_batch_norm_statistics).
        self.trainer.sync_batch_norm_statistics()
        self.save()

    def on_epoch_end(self, row: HistoryRow) -> None:
        self.epoch.assign(row.epoch)
        self.save()


class TensorBoard(Hook):
    """Per-epoch scalars under logs/train and logs/validation; None writes nothing (a non-chief worker)."""

    def __init__(self, logs: pathlib.Path | None, timer: StepTimer):
        self.timer = timer
        self.writers = {name: tf.summary.create_file_writer(str(logs / name)) if logs else
                        tf.summary.create_noop_writer() for name in ("train", "validation")}

    def on_epoch_end(self, row: HistoryRow) -> None:
        images_per_sec = self.timer.images_per_sec()
        with self.writers["train"].as_default(step=row.epoch):
            for key in ("loss", "accuracy", "lr"):
                tf.summary.scalar(key, getattr(row, key))
            if images_per_sec:
                tf.summary.scalar("images_per_sec", images_per_sec)
        with self.writers["validation"].as_default(step=row.epoch):
            for key in ("loss", "accuracy"):
                if getattr(row, f"val_{key}") is not None:
                    tf.summary.scalar(key, getattr(row, f"val_{key}"))
        for writer in self.writers.values():
            writer.flush()


class EpochLog(Hook):
    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_epoch_end(self, row: HistoryRow) -> None:
        log.info("epoch %d/%d: %s", row.epoch, self.epochs, " ".join(f"{k} {v:.4g}" for k, v in row.metrics().items()))


def validation(trainer: Trainer, split: datasets.Split | None) -> Callable[[], dict[str, float]]:
    """The validation metrics of an epoch's end; none without a validation split."""
    if split is None:
        return dict
    return lambda: {f"val_{k}": v for k, v in trainer.evaluate(split).items()}


# --- the loop ----------------------------------------------------------------------------------


def run_epochs(trainer: Trainer, batches, length: RunLength, start: int, evaluate: Callable[[], dict[str, float]],
               hooks: list[Hook], stop: StopRequest) -> HistoryRow | None:
    """Train from global step `start` (mid-epoch, too) to the run's end; the hooks run in
    their order. Returns the last epoch's row; raises Preempted once every worker has
    agreed to stop and the hooks have saved."""
    row, stopping = None, False
    for epoch in range(start // length.steps_per_epoch + 1, length.epochs + 1 if start < length.total_steps else 0):
        steps, done = length.steps_in_epoch(epoch - 1), max(0, start - (epoch - 1) * length.steps_per_epoch)
        if not done:  # a resumed epoch keeps its running metrics (they are checkpointed)
            trainer.reset_train_metrics()
        for hook in hooks:
            hook.on_epoch_begin(epoch, steps)
        for step in range(done + 1, steps + 1):
            started = time.perf_counter()
            loss, votes = trainer.train_step(batches, stop.vote()).numpy()
            seconds = time.perf_counter() - started
            for hook in hooks:
                hook.on_step(epoch, step, float(loss), seconds)
            stopping = votes > 0
            if stopping and step < steps:
                for hook in hooks:
                    hook.on_stop(epoch, step)
                raise Preempted(f"stopped by SIGTERM after step {step} of epoch {epoch}; its checkpoint is saved: "
                                "start the run again to resume there")
        # Evaluation and checkpoints read the BN statistics: one copy for all replicas first.
        trainer.sync_batch_norm_statistics()
        row = HistoryRow(epoch=epoch, **trainer.train_metrics(), **evaluate(), lr=trainer.learning_rate())
        for hook in hooks:
            hook.on_epoch_end(row)
        if stopping:
            raise Preempted(f"stopped by SIGTERM at the end of epoch {epoch}; start the run again to resume there")
    return row


# --- train -------------------------------------------------------------------------------------


def train(config: TrainConfig) -> RunSummary:
    """Train (or resume) a run as configured; returns the summary also written to summary.json.

    SIGTERM stops it after the next step with a checkpoint there (Preempted); a lost peer
    stops it with PeerLost. Started again, it resumes at the checkpoint's step.
    """
    started = time.monotonic()
    cluster = Cluster.from_environment()
    strategy = make_strategy(cluster, config.devices)
    with StopRequest() as stop:
        try:
            return _train(config, cluster, strategy, stop, started)
        except tf.errors.OpError as error:
            if not cluster.is_multi_worker or not isinstance(error, PEER_ERRORS):
                raise
            raise PeerLost(f"lost another worker ({peer_error_summary(error)}); the last checkpoint stays: start "
                           "every worker again to resume there") from None


# What a collective op raises on the survivors when a peer dies or stops answering.
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
               tf.errors.DeadlineExceededError, tf.errors.InternalError, tf.errors.UnknownError,
               tf.errors.FailedPreconditionError)


def peer_error_summary(error: tf.errors.OpError) -> str:
    """The line of a collective's error that says what happened to the peer."""
    lines = [line.strip() for line in str(error.message).splitlines() if line.strip()]
    telling = [line for line in lines if any(clue in line.lower() for clue in PEER_CLUES)]
    return (telling or lines or [type(error).__name__])[0][:300]


PEER_CLUES = ("unhealthy", "heartbeat", "reset by peer", "socket closed", "connection refused", "failed to connect",
              "unavailable", "deadline")


def _train(config: TrainConfig, cluster: Cluster, strategy: tf.distribute.Strategy, stop: StopRequest,
           started: float) -> RunSummary:
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    if not config.model_dir:
        raise ConfigError("a training run needs a --model-dir")
    run = RunDir(pathlib.Path(config.model_dir))
    if cluster.is_chief:
        run.path.mkdir(parents=True, exist_ok=True)
    data = datasets.load(config.resolved_data)
    settings, length = resolve(config, data, strategy.num_replicas_in_sync, cluster)
    run.check_resumable(settings)
    log.info("training %s-%d on %s: %d replica(s) on %d worker(s), global batch %d, lr %.4g, "
             "%d steps (%d epochs of %d)", settings.arch, settings.depth, data.describe(), settings.replicas,
             settings.workers, settings.global_batch, settings.learning_rate, length.total_steps, length.epochs,
             length.steps_per_epoch)
    policy = mixed_precision_policy(config.mixed_precision)
    with precision_policy(policy):
        trainer, checkpoint, epoch = build_trainer(config, settings, length, data, strategy, cluster, policy)
        history = restore(run, checkpoint, epoch, settings, cluster)
        start, initial_epoch = int(trainer.optimizer.iterations.numpy()), int(epoch.numpy())
        timer = StepTimer(config.untimed_steps, settings.global_batch)
        manager = tf.train.CheckpointManager(checkpoint, run.checkpoints_of(cluster.is_chief, cluster.task_id),
                                             max_to_keep=3)
        hooks = [timer, StopOnDivergence(run.checkpoints), Progress(config.progress, trainer, length.epochs),
                 History(run, history, write=cluster.is_chief),
                 Checkpoints(manager, trainer, epoch, None if cluster.is_chief else run.scratch(cluster.task_id),
                             config.checkpoint_every_steps),
                 TensorBoard(run.logs if cluster.is_chief else None, timer), EpochLog(length.epochs)]
        batches = iter(train_batches(trainer, data.train, config, length, start))
        last = run_epochs(trainer, batches, length, start, validation(trainer, data.validation), hooks, stop)
        summary = RunSummary(
            settings=settings, initial_epoch=initial_epoch, initial_step=start,
            epochs_completed=int(epoch.numpy()),
            steps_completed=int(trainer.optimizer.iterations.numpy()),
            final=final_metrics(trainer, data.test, last or (history[-1] if history else None)),
            wall_time_sec=round(time.monotonic() - started, 2),
            train_images_per_sec=round(timer.images_per_sec(), 1) if timer.images_per_sec() else None,
            timed_steps=timer.timed_steps, parameters=trainer.model.count_params(), model_dir=str(run.path),
            is_chief=cluster.is_chief)
    record(run, summary, trainer.model, cluster)
    return summary


def resolve(config: TrainConfig, data: datasets.ImageData, replicas: int, cluster: Cluster
            ) -> tuple[RunSettings, RunLength]:
    """The run's settings once the data and the devices are known: batch, learning rate, length."""
    recipe, net = config.recipe, config.net
    global_batch = config.per_replica_batch * replicas
    length = run_length(recipe, len(data.train), global_batch, config.epochs, config.steps)
    model = net.model_config(data.num_classes, recipe)
    settings = RunSettings(
        arch=net.arch, depth=net.depth, width=net.width, cardinality=net.cardinality,
        shortcut=model.shortcut, zero_init_residual=model.zero_init_residual, weight_decay=model.weight_decay,
        batch_norm_momentum=model.batch_norm_momentum, batch_norm_epsilon=model.batch_norm_epsilon,
        augmentation=config.augmentation,
        dataset=config.data.spec, num_classes=data.num_classes, class_names=tuple(data.class_names),
        seed=config.seed, recipe=recipe.name, replicas=replicas, workers=cluster.num_workers,
        per_replica_batch=config.per_replica_batch, global_batch=global_batch,
        learning_rate=scaled_learning_rate(recipe, global_batch), total_steps=length.total_steps,
        steps_per_epoch=length.steps_per_epoch, epochs=length.epochs, mixed_precision=config.mixed_precision,
        jit=config.jit)
    return settings, length


def build_trainer(config: TrainConfig, settings: RunSettings, length: RunLength, data: datasets.ImageData,
                  strategy: tf.distribute.Strategy, cluster: Cluster, policy: str
                  ) -> tuple[Trainer, tf.train.Checkpoint, tf.Variable]:
    """The model, its optimizer and the epoch counter, seeded, and the checkpoint that holds them."""
    recipe = config.recipe
    with strategy.scope():
        keras.utils.set_random_seed(config.seed)
        model = build_model(settings.model_config())
        set_pixel_mean(model, data.pixel_mean())
        schedule = learning_rate_schedule(recipe, settings.learning_rate, length.total_steps)
        optimizer = make_optimizer(recipe, schedule, loss_scaling=policy == "mixed_float16")
    trainer = Trainer(strategy, model, optimizer, settings.global_batch, jit=config.jit, cluster=cluster)
    with strategy.scope():
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch, **trainer.checkpointed_state())
    return trainer, checkpoint, epoch


def restore(run: RunDir, checkpoint: tf.train.Checkpoint, epoch: tf.Variable, settings: RunSettings,
            cluster: Cluster) -> list[HistoryRow]:
    """Resume from the last checkpoint, if any; returns the history up to it.
    The chief records the settings and cuts the history back to the checkpoint."""
    latest = tf.train.latest_checkpoint(run.checkpoints)
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
        log.info("resuming from %s", latest)
    # Rows past the checkpoint belong to an epoch that is about to be redone.
    history = [row for row in run.read_history() if row.epoch <= int(epoch.numpy())]
    if cluster.is_chief:
        run.write_settings(settings)
        run.write_history(history)
    return history


def final_metrics(trainer: Trainer, test: datasets.Split | None, last: HistoryRow | None) -> dict[str, float]:
    """The last epoch's metrics, and the test split's."""
    if last is None:
        return {}
    final = last.metrics()
    if test is not None:
        final.update({f"test_{k}": v for k, v in trainer.evaluate(test).items()})
    return final


def train_batches(trainer: Trainer, split: datasets.Split, config: TrainConfig, length: RunLength, start: int):
    """The training batches from global step `start` on, as the strategy's steps take them."""
    global_batch = trainer.global_batch
    start_epoch, start_step = divmod(start, length.steps_per_epoch)
    return trainer.distribute(
        lambda context: input_pipeline.train_dataset(
            split, batch_size=context.get_per_replica_batch_size(global_batch), seed=config.seed,
            start_epoch=start_epoch, start_step=start_step, steps_per_epoch=length.steps_per_epoch,
            end_epoch=length.epochs, augmentation=config.augmentation, global_batch=global_batch,
            input_context=context))


def record(run: RunDir, summary: RunSummary, model: keras.Model, cluster: Cluster) -> None:
    """summary.json (the chief), and each worker's record of its final weights under several workers."""
    if cluster.is_chief:
        run.write_summary(summary)
    if cluster.is_multi_worker:
        run.write_worker_record(WorkerRecord(task_type=cluster.task_type, task_id=cluster.task_id,
                                             steps_completed=summary.steps_completed,
                                             weights_sha256=weights_sha256(model)))


def weights_sha256(model: keras.Model) -> str:
    """A digest of every weight's bytes, in the model's order."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()
