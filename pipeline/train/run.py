"""One seam that builds a training run: build_run(config) -> Run.

`accresnet train` (loop.py), the benchmarks and the tests build a run alike: the
data read, the run's settings resolved and checked against what its directory
holds, its precision chosen (precision.py), the model, optimizer and checkpoint
built, seeded and restored. A Run then steps: `Run.step` returns the step's loss,
so a caller that wants the losses, or the time of a step, steps the run itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import keras
import numpy as np
import tensorflow as tf

from pipeline.data import datasets, input_pipeline
from pipeline.data.splits import ImageData, Split
from pipeline.errors import ConfigError
from pipeline.model.network import build_model, set_pixel_mean
from pipeline.settings.config import RunLength, TrainConfig, run_length, scaled_learning_rate
from pipeline.settings.recipes import recipe_settings
from pipeline.train.distribute import Cluster, make_strategy
from pipeline.train.optimizers import learning_rate_schedule, make_optimizer
from pipeline.train.precision import Precision, choose as choose_precision
from pipeline.train.rundir import HistoryRow, RunDir, RunSettings
from pipeline.train.trainer import Trainer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """A training run built and restored, ready to step from its checkpoint's step."""

    config: TrainConfig
    cluster: Cluster
    directory: RunDir
    data: ImageData
    settings: RunSettings
    length: RunLength
    precision: Precision
    trainer: Trainer
    checkpoint: tf.train.Checkpoint
    epoch: tf.Variable
    history: list[HistoryRow]  # the finished epochs up to the checkpoint restored
    no_stop: tf.Tensor  # the stop vote of a step that nothing asks to stop

    @property
    def global_step(self) -> int:
        return int(self.trainer.optimizer.iterations.numpy())

    def batches(self):
        """The training batches from the current step on, as the strategy's steps take them."""
        return iter(train_batches(self.trainer, self.data.train, self.config, self.length, self.global_step))

    def step(self, batches, stop_vote: tf.Tensor | None = None) -> tuple[float, float]:
        """One global step: (the batch's mean cross-entropy, the replicas that vote to stop)."""
        loss, votes = self.trainer.train_step(batches, self.no_stop if stop_vote is None else stop_vote).numpy()
        return float(loss), float(votes)


def build_run(config: TrainConfig, cluster: Cluster | None = None,
              strategy: tf.distribute.Strategy | None = None) -> Run:
    """The run `config` describes, resumed from its directory's last checkpoint if there is one;
    `cluster` and `strategy` default to the environment's (TF_CONFIG) and --devices'."""
    cluster = cluster or Cluster.from_environment()
    strategy = strategy or make_strategy(cluster, config.devices)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    if not config.model_dir:
        raise ConfigError("a training run needs a --model-dir")
    directory = RunDir(pathlib.Path(config.model_dir))
    if cluster.is_chief:
        directory.path.mkdir(parents=True, exist_ok=True)
    data = datasets.load(config.resolved_data)
    if (config.export_best or config.early_stopping) and data.validation is None:
        raise ConfigError(f"--export-best and --early-stopping read the validation accuracy, and "
                          f"{config.data.spec} gives no validation split here")
    settings, length = resolve(config, data.class_names, len(data.train), datasets.files_digest(config.data),
                               strategy.num_replicas_in_sync, cluster.num_workers)
    directory.check_resumable(settings)
    log.info("training %s-%d on %s: %d replica(s) on %d worker(s), global batch %d, lr %.4g, "
             "%d steps (%d epochs of %d)", settings.arch, settings.depth, data.describe(), settings.replicas,
             settings.workers, settings.global_batch, settings.learning_rate, length.total_steps, length.epochs,
             length.steps_per_epoch)
    precision = choose_precision(config.mixed_precision, config.project_bfloat16_kernels)
    with precision.scope():
        trainer, checkpoint, epoch = build_trainer(config, settings, length, data.pixel_mean(), strategy, cluster,
                                                   precision)
    history = restore(directory, checkpoint, epoch, settings, cluster)
    return Run(config, cluster, directory, data, settings, length, precision, trainer, checkpoint, epoch, history,
               no_stop=tf.constant(0.0))


def resolve(config: TrainConfig, class_names: tuple[str, ...], train_images: int, data_digest: str | None,
            replicas: int, workers: int) -> tuple[RunSettings, RunLength]:
    """The run's settings once the data (its classes, training images and digest) and the
    devices are known: batch, learning rate, length."""
    recipe, net = config.recipe, config.net
    global_batch = config.per_replica_batch * replicas
    length = run_length(recipe, train_images, global_batch, config.epochs, config.steps)
    model = net.model_config(len(class_names), recipe, config.data.image_size)
    settings = RunSettings(
        **RunSettings.model_settings(model), augmentation=config.augmentation,
        dataset=config.data.spec, data_digest=data_digest, class_names=tuple(class_names),
        seed=config.seed, recipe=recipe.name, replicas=replicas, workers=workers,
        per_replica_batch=config.per_replica_batch, global_batch=global_batch,
        learning_rate=scaled_learning_rate(recipe, global_batch), total_steps=length.total_steps,
        steps_per_epoch=length.steps_per_epoch, epochs=length.epochs, mixed_precision=config.mixed_precision,
        jit=config.jit, recipe_settings=recipe_settings(recipe),
        overrides=json.loads(json.dumps(config.recipe_overrides)), export_best=config.export_best,
        early_stopping=config.early_stopping)
    return settings, length


def build_trainer(config: TrainConfig, settings: RunSettings, length: RunLength, pixel_mean: np.ndarray,
                  strategy: tf.distribute.Strategy, cluster: Cluster, precision: Precision
                  ) -> tuple[Trainer, tf.train.Checkpoint, tf.Variable]:
    """The model (the training images' per-pixel mean in it), its optimizer and the epoch
    counter, seeded, and the checkpoint that holds them."""
    recipe = config.recipe
    with strategy.scope():
        keras.utils.set_random_seed(config.seed)
        model = build_model(settings.model_config())
        set_pixel_mean(model, pixel_mean)
        schedule = learning_rate_schedule(recipe, settings.learning_rate, length.total_steps)
        optimizer = precision.optimizer(make_optimizer(recipe, schedule))
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


def train_batches(trainer: Trainer, split: Split, config: TrainConfig, length: RunLength, start: int):
    """The training batches from global step `start` on, as the strategy's steps take them."""
    global_batch = trainer.global_batch
    start_epoch, start_step = divmod(start, length.steps_per_epoch)
    return trainer.distribute(
        lambda context: input_pipeline.train_dataset(
            split, batch_size=context.get_per_replica_batch_size(global_batch), seed=config.seed,
            start_epoch=start_epoch, start_step=start_step, steps_per_epoch=length.steps_per_epoch,
            end_epoch=length.epochs, augmentation=config.augmentation, global_batch=global_batch,
            input_context=context))
