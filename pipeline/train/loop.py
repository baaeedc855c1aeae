"""`accresnet train`: one custom loop for every distribution strategy.

The run is built and restored by run.py's build_run (settings, precision,
model, optimizer, checkpoint); then the epoch loop steps and calls its hooks
(hooks.py) at its seams, stopping cleanly on SIGTERM or a lost peer
(preemption.py). What a run writes, and where, is rundir.py's.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from pipeline.data import input_pipeline
from pipeline.data.splits import Split
from pipeline.settings.config import RunLength, TrainConfig
from pipeline.train.distribute import Cluster, make_strategy
from pipeline.train.hooks import (Checkpoints, EarlyStopping, EpochLog, History, Hook, KeepBest, Progress, StepTimer,
                                  StopOnDivergence, TensorBoard, validation, write_run_overview)
from pipeline.train.preemption import PEER_ERRORS, PeerLost, Preempted, StopRequest, peer_error_summary
from pipeline.train.run import build_run
from pipeline.train.rundir import HistoryRow, RunDir, RunSummary, WorkerRecord, best_row
from pipeline.train.trainer import Trainer

log = logging.getLogger(__name__)


# --- the loop ----------------------------------------------------------------------------------


def run_epochs(trainer: Trainer, batches, length: RunLength, start: int, evaluate: Callable[[], dict[str, float]],
               hooks: list[Hook], stop: StopRequest) -> HistoryRow | None:
    """Train from global step `start` (mid-epoch, too) to the run's end; the hooks run in
    their order. Returns the last epoch's row; raises Preempted once every worker has
    agreed to stop and the hooks have saved."""
    row, stopping = None, False
    for epoch in range(start // length.steps_per_epoch + 1, length.epochs + 1 if start < length.total_steps else 0):
        if any(hook.stop_training for hook in hooks):
            break
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


def _train(config: TrainConfig, cluster: Cluster, strategy: tf.distribute.Strategy, stop: StopRequest,
           started: float) -> RunSummary:
    built = build_run(config, cluster, strategy)
    run, data, settings, length = built.directory, built.data, built.settings, built.length
    trainer, checkpoint, epoch, history = built.trainer, built.checkpoint, built.epoch, built.history
    with built.precision.scope():
        start, initial_epoch = built.global_step, int(epoch.numpy())
        timer = StepTimer(config.untimed_steps, settings.global_batch)
        manager = tf.train.CheckpointManager(checkpoint, run.checkpoints_of(cluster.is_chief, cluster.task_id),
                                             max_to_keep=3)
        scratch = None if cluster.is_chief else run.scratch(cluster.task_id)
        hooks = [timer, StopOnDivergence(run.checkpoints), Progress(config.progress, trainer, length.epochs),
                 History(run, history, write=cluster.is_chief),
                 Checkpoints(manager, trainer, epoch, scratch, config.checkpoint_every_steps)]
        if config.export_best:
            best = tf.train.CheckpointManager(checkpoint, run.best_checkpoints if cluster.is_chief else
                                              scratch / "best", max_to_keep=1)
            hooks.append(KeepBest(best, history, scratch))
            if start % length.steps_per_epoch == 0:  # restored at an epoch's end: that epoch's state
                hooks[-1].catch_up(initial_epoch)
        early_stopping = EarlyStopping(config.early_stopping, history) if config.early_stopping else None
        hooks += [early_stopping or Hook(),
                  TensorBoard(run.logs if cluster.is_chief else None, timer, trainer, config.log_every_steps),
                  EpochLog(length.epochs)]
        if cluster.is_chief and start == 0:
            write_run_overview(run.logs, settings.to_json(), run.path.name,
                               sample_images(data.train, config, length))
        batches = built.batches()
        last = run_epochs(trainer, batches, length, start, validation(trainer, data.validation), hooks, stop)
        best_so_far = best_row(history)
        summary = RunSummary(
            settings=settings, initial_epoch=initial_epoch, initial_step=start,
            epochs_completed=int(epoch.numpy()),
            steps_completed=int(trainer.optimizer.iterations.numpy()),
            final=final_metrics(trainer, data.test, last or (history[-1] if history else None)),
            wall_time_sec=round(time.monotonic() - started, 2),
            train_images_per_sec=round(timer.images_per_sec(), 1) if timer.images_per_sec() else None,
            timed_steps=timer.timed_steps, parameters=trainer.model.count_params(), model_dir=str(run.path),
            is_chief=cluster.is_chief, stopped_early=bool(early_stopping and early_stopping.stop_training),
            best_epoch=best_so_far.epoch if best_so_far else None,
            best_val_accuracy=best_so_far.val_accuracy if best_so_far else None)
    record(run, summary, trainer.model, cluster)
    return summary


def sample_images(split: Split, config: TrainConfig, length: RunLength, count: int = 8) -> np.ndarray:
    """The first training images of the run as the model gets them, augmentation applied."""
    count = min(count, len(split))
    dataset = input_pipeline.train_dataset(split, batch_size=count, seed=config.seed, start_epoch=0,
                                           steps_per_epoch=max(len(split) // count, 1), end_epoch=1,
                                           augmentation=config.augmentation)
    images, _ = next(iter(dataset))
    return images.numpy()


def final_metrics(trainer: Trainer, test: Split | None, last: HistoryRow | None) -> dict[str, float]:
    """The last epoch's metrics, and the test split's."""
    if last is None:
        return {}
    final = last.metrics()
    if test is not None:
        final.update({f"test_{k}": v for k, v in trainer.evaluate(test).items()})
    return final


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
