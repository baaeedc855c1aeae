"""What happens around the training steps: small hooks the epoch loop calls at its seams.

Step timing, the NaN stop, progress, history, checkpoints, TensorBoard and the
epoch's log line are each a Hook that can be made and tested alone; the loop
(pipeline/train/loop.py) only steps and calls them in order.
"""

from __future__ import annotations

import logging
import math
import pathlib
import shutil
import sys
from collections.abc import Callable

import keras
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from pipeline.data.splits import Split
from pipeline.errors import UserError
from pipeline.train.rundir import HistoryRow, RunDir, best_row
from pipeline.train.trainer import Trainer

log = logging.getLogger(__name__)


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Hook:
    """Called by the loop at its seams; a method not overridden does nothing.
    Epochs and steps count from 1. A hook that sets `stop_training` ends the run
    after the epoch (the loop checks before each epoch, so a resumed run that
    had ended trains nothing)."""

    stop_training = False

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


class KeepBest(Hook):
    """--export-best: the checkpoint of the best validation epoch so far, in its own folder
    (numbered by the epoch), saved after the epoch's own checkpoint. `rows` is the run's
    history (the History hook appends to it first)."""

    def __init__(self, manager: tf.train.CheckpointManager, rows: list[HistoryRow], scratch: pathlib.Path | None):
        self.manager, self.rows, self.scratch = manager, rows, scratch

    def save(self, epoch: int) -> None:
        self.manager.save(checkpoint_number=epoch)
        if self.scratch is not None:  # a non-chief worker's copy (saving is collective)
            shutil.rmtree(self.scratch, ignore_errors=True)

    def saved_epoch(self) -> int | None:
        latest = self.manager.latest_checkpoint
        return int(latest.rsplit("-", 1)[1]) if latest else None

    def on_epoch_end(self, row: HistoryRow) -> None:
        if best_row(self.rows) is row:
            self.save(row.epoch)

    def catch_up(self, epoch: int) -> None:
        """After a restore at the end of `epoch`: a run stopped between that epoch's checkpoint
        and its best one saves the best one now (the restored state is that epoch's)."""
        best = best_row(self.rows)
        if best is not None and best.epoch == epoch and self.saved_epoch() != epoch:
            self.save(epoch)


class EarlyStopping(Hook):
    """--early-stopping: ends the run once `patience` epochs have passed without a better
    validation accuracy than the best epoch's, read from the history (which a resume cuts
    back to its checkpoint, so the decision survives preemption)."""

    def __init__(self, patience: int, rows: list[HistoryRow]):
        self.patience, self.rows = patience, rows
        self._decide()

    def _decide(self) -> None:
        best = best_row(self.rows)
        self.stop_training = best is not None and self.rows[-1].epoch - best.epoch >= self.patience

    def on_epoch_end(self, row: HistoryRow) -> None:
        self._decide()
        if self.stop_training:
            best = best_row(self.rows)
            log.info("early stopping: no better validation accuracy than epoch %d's %.4f for %d epochs",
                     best.epoch, best.val_accuracy, self.patience)


class TensorBoard(Hook):
    """Per-epoch scalars under logs/train and logs/validation, and every `every_steps` global
    steps the step's loss, learning rate and images/s under logs/train (tags step/...);
    None writes nothing (a non-chief worker)."""

    def __init__(self, logs: pathlib.Path | None, timer: StepTimer, trainer: Trainer | None = None,
                 every_steps: int = 0):
        self.timer, self.trainer, self.every_steps = timer, trainer, every_steps
        self.writers = {name: tf.summary.create_file_writer(str(logs / name)) if logs else
                        tf.summary.create_noop_writer() for name in ("train", "validation")}

    def on_step(self, epoch: int, step: int, loss: float, seconds: float) -> None:
        if not self.every_steps or self.trainer is None:
            return
        global_step = int(self.trainer.optimizer.iterations.numpy())
        if global_step % self.every_steps:
            return
        with self.writers["train"].as_default(step=global_step):
            tf.summary.scalar("step/loss", loss)
            tf.summary.scalar("step/lr", self.trainer.learning_rate())
            if seconds > 0:
                tf.summary.scalar("step/images_per_sec", self.trainer.global_batch / seconds)

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


def write_run_overview(logs: pathlib.Path, hparams: dict, trial: str, images) -> None:
    """Once a run: its settings in TensorBoard's hparams plugin (logs/), and a few augmented
    training images as the model sees them (logs/train, step 0)."""
    flat = {}
    for key, value in hparams.items():
        for name, item in (value.items() if isinstance(value, dict) else [(None, value)]):
            if isinstance(item, (list, tuple)):
                item = str(list(item))
            if isinstance(item, (bool, int, float, str)) and key != "class_names":
                flat[f"{key}.{name}" if name else key] = item
    with tf.summary.create_file_writer(str(logs)).as_default():
        hp.hparams(flat, trial_id=trial)
    with tf.summary.create_file_writer(str(logs / "train")).as_default(step=0):
        tf.summary.image("augmented training images", images, max_outputs=len(images))


class EpochLog(Hook):
    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_epoch_end(self, row: HistoryRow) -> None:
        log.info("epoch %d/%d: %s", row.epoch, self.epochs, " ".join(f"{k} {v:.4g}" for k, v in row.metrics().items()))


def validation(trainer: Trainer, split: Split | None) -> Callable[[], dict[str, float]]:
    """The validation metrics of an epoch's end; none without a validation split."""
    if split is None:
        return dict
    return lambda: {f"val_{k}": v for k, v in trainer.evaluate(split).items()}
