import csv
import json
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.export import saved_model, model_card
from pipeline import flags
from pipeline.train import hooks, optimizers, preemption, loop as training
from pipeline.model.architecture import ModelConfig
from pipeline.settings.config import RunLength, TrainConfig
from pipeline.train.distribute import Cluster, make_strategy
from pipeline.errors import ConfigError
from pipeline.model.network import build_model
from pipeline.train.rundir import HISTORY_FIELDS, HistoryRow, ResumeMismatch, RunDir, RunSettings
from pipeline.train.trainer import Trainer

pytestmark = pytest.mark.slow  # every test here trains or starts processes


def tiny_config(model_dir, **overrides):
    settings = dict(model_dir=str(model_dir), arch="accumulated", depth=8, dataset="synthetic:400", recipe="quick",
                    epochs=3, batch_size=32, devices=2, progress=False, untimed_steps=1)
    settings.update(overrides)
    return flags.build(TrainConfig, settings)


def history_rows(model_dir):
    with open(model_dir / "history.csv", newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("run")
    return model_dir, training.train(tiny_config(model_dir))


def test_two_replicas_train_and_write_their_records(finished_run):
    model_dir, summary = finished_run
    assert summary.settings.replicas == 2 and summary.settings.workers == 1
    assert summary.settings.global_batch == 64 and summary.settings.learning_rate == pytest.approx(0.05)
    assert summary.initial_epoch == 0 and summary.epochs_completed == 3
    assert summary.steps_completed == 3 * (360 // 64)
    assert np.isfinite(summary.final["loss"]) and 0 <= summary.final["val_accuracy"] <= 1
    assert "test_accuracy" in summary.final
    assert summary.train_images_per_sec > 0 and summary.timed_steps == summary.steps_completed - 1
    assert RunDir(model_dir).read_summary() == summary
    written = json.loads((model_dir / "summary.json").read_text())  # one flat object, as scripts read it
    assert written["replicas"] == 2 and written["final"] == summary.final
    rows = history_rows(model_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert list(rows[0]) == list(HISTORY_FIELDS)
    assert float(rows[-1]["lr"]) < float(rows[0]["lr"])  # cosine decay
    assert tf.train.latest_checkpoint(model_dir / "checkpoints").endswith(f"ckpt-{summary.steps_completed}")
    assert list((model_dir / "logs" / "train").iterdir())


def test_a_finished_run_started_again_trains_nothing(finished_run):
    model_dir, summary = finished_run
    again = training.train(tiny_config(model_dir))
    assert again.initial_epoch == again.epochs_completed == 3
    assert again.steps_completed == summary.steps_completed
    assert again.final["loss"] == summary.final["loss"] and "test_accuracy" in again.final
    assert len(history_rows(model_dir)) == 3


class Interrupt(Exception):
    pass


def _interrupt_after(monkeypatch, steps):
    original = Trainer.train_step
    calls = {"n": 0}

    def step(self, iterator, stop_vote):
        calls["n"] += 1
        if calls["n"] > steps:
            raise Interrupt()
        return original(self, iterator, stop_vote)

    monkeypatch.setattr(Trainer, "train_step", step)


def test_an_interrupted_run_resumes_where_it_stopped(finished_run, tmp_path, monkeypatch):
    reference_dir, reference = finished_run
    steps_per_epoch = reference.settings.steps_per_epoch
    with monkeypatch.context() as patch:
        _interrupt_after(patch, steps_per_epoch + 2)  # dies inside epoch 2
        with pytest.raises(Interrupt):
            training.train(tiny_config(tmp_path))
    assert [int(r["epoch"]) for r in history_rows(tmp_path)] == [1]
    resumed = training.train(tiny_config(tmp_path))
    assert resumed.initial_epoch == 1 and resumed.epochs_completed == 3
    rows, expected = history_rows(tmp_path), history_rows(reference_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    # Same data order, same optimizer state: the resumed run retraces the uninterrupted one.
    for row, reference_row in zip(rows, expected):
        for key in ("loss", "accuracy", "lr"):
            assert float(row[key]) == pytest.approx(float(reference_row[key]), rel=2e-3, abs=2e-3), key


def test_nan_loss_stops_the_run_and_keeps_the_checkpoints(tmp_path, monkeypatch):
    original = Trainer.train_step
    calls = {"n": 0}

    def step(self, iterator, stop_vote):
        calls["n"] += 1
        loss_and_votes = original(self, iterator, stop_vote)
        return loss_and_votes if calls["n"] <= 5 else loss_and_votes * float("nan")  # 5 steps per epoch

    monkeypatch.setattr(Trainer, "train_step", step)
    with pytest.raises(hooks.TrainingDiverged, match=r"loss became nan at epoch 2, step 1.*up to epoch 1 are kept"):
        training.train(tiny_config(tmp_path))
    assert tf.train.latest_checkpoint(tmp_path / "checkpoints").endswith("ckpt-5")  # numbered by step
    assert len(history_rows(tmp_path)) == 1


def test_resuming_with_other_settings_is_refused(finished_run):
    model_dir, _ = finished_run
    summary = (model_dir / "summary.json").read_bytes()
    with pytest.raises(ResumeMismatch, match=r"arch 'accumulated' -> 'resnet'"):
        training.train(tiny_config(model_dir, arch="resnet"))
    with pytest.raises(ResumeMismatch, match=r"global_batch 64 -> 32, learning_rate"):
        training.train(tiny_config(model_dir, batch_size=16))
    with pytest.raises(ResumeMismatch, match=r"\(momentum 0.9 -> 0.5\)"):
        training.train(tiny_config(model_dir, momentum=0.5))
    assert (model_dir / "summary.json").read_bytes() == summary  # nothing rewritten


def test_the_recipe_changed_by_flags_is_what_trains_and_what_is_recorded(tmp_path):
    summary = training.train(tiny_config(tmp_path, epochs=1, learning_rate=0.05, weight_decay=1e-4,
                                         set="schedule=piecewise,boundaries=[0.5],factors=[0.1]"))
    settings = summary.settings
    # 0.05 for each replica's 32 images, 2 replicas: 0.1; then x0.1 after half the run.
    assert settings.learning_rate == pytest.approx(0.1) and settings.weight_decay == 5e-5
    assert settings.overrides == {"learning_rate": 0.05, "weight_decay": 5e-5, "schedule": "piecewise",
                                  "boundaries": [0.5], "factors": [0.1], "batch_size": 32}
    assert settings.recipe_settings["boundaries"] == [0.5] and settings.recipe == "quick"
    assert float(history_rows(tmp_path)[-1]["lr"]) == pytest.approx(0.01)
    assert model_card.from_run(RunDir(tmp_path)).training.overrides == settings.overrides


def two_replica_trainer(arch, global_batch):
    strategy = make_strategy(Cluster(), devices=2)
    with strategy.scope():
        model = build_model(ModelConfig(arch, 8))
        optimizer = keras.optimizers.SGD(0.1)
    return Trainer(strategy, model, optimizer, global_batch=global_batch)


def test_distributed_evaluation_counts_every_image_once(split_factory):
    trainer = two_replica_trainer("resnet", global_batch=16)
    model = trainer.model
    split = split_factory(37)
    metrics = trainer.evaluate(split)
    probabilities = np.asarray(model.predict(split.images, verbose=0))
    expected_accuracy = np.mean(probabilities.argmax(1) == split.labels)
    expected_loss = -np.mean(np.log(np.clip(probabilities[np.arange(37), split.labels], 1e-7, 1)))
    assert metrics["accuracy"] == pytest.approx(expected_accuracy)
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-4)


def test_schedules_follow_the_recipes():
    from pipeline.settings.recipes import get_recipe

    he = optimizers.learning_rate_schedule(get_recipe("he2016"), 0.1, total_steps=1000)
    assert [round(float(he(s)), 6) for s in (0, 499, 501, 749, 751, 999)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    keras_recipe = optimizers.learning_rate_schedule(get_recipe("keras"), 1e-3, total_steps=200)
    # The example's 0-based epochs 0-80 at 1e-3, then lower; a schedule's step k is taken after k steps.
    assert [float(keras_recipe(s)) for s in (80, 82, 122, 162, 182)] == pytest.approx([1e-3, 1e-4, 1e-5, 1e-6, 5e-7])
    quick = optimizers.learning_rate_schedule(get_recipe("quick"), 0.1, total_steps=100)
    assert float(quick(0)) == 0 and float(quick(10)) == pytest.approx(0.1) and float(quick(100)) < 1e-3


def test_batch_norm_statistics_agree_across_replicas_after_a_sync(split_factory):
    from pipeline.data import input_pipeline

    trainer = two_replica_trainer("accumulated", global_batch=32)
    model = trainer.model
    split = split_factory(128)
    dataset = trainer.distribute(lambda context: input_pipeline.train_dataset(
        split, batch_size=16, seed=0, start_epoch=0, steps_per_epoch=4, global_batch=32, input_context=context))
    iterator = iter(dataset)
    for _ in range(3):
        trainer.train_step(iterator, tf.constant(0.0))
    copies = [c.numpy() for c in model.get_layer("stem_bn").moving_mean.value.values]
    assert not np.array_equal(*copies)  # each replica saw other images
    trainer.sync_batch_norm_statistics()
    synced = [c.numpy() for c in model.get_layer("stem_bn").moving_mean.value.values]
    np.testing.assert_array_equal(synced[0], synced[1])
    np.testing.assert_allclose(synced[0], (copies[0] + copies[1]) / 2, rtol=1e-6)


def test_the_recipes_shortcut_is_trained_recorded_and_exported(tmp_path):
    from pipeline.export.saved_model import restore_trained_model
    from pipeline.model.network import PaddingShortcut

    model_dir = tmp_path / "run"
    summary = training.train(tiny_config(model_dir, arch="resnet", recipe="he2016-subset", epochs=1, devices=1,
                                         dataset="synthetic:200"))
    assert summary.settings.shortcut == "padding" and summary.settings.zero_init_residual is False
    assert summary.settings.weight_decay == 5e-5 and summary.settings.augmentation == "pad-crop"
    assert json.loads((model_dir / "run.json").read_text())["shortcut"] == "padding"
    model, _ = restore_trained_model(model_dir)
    assert isinstance(model.get_layer("stage2_block1").padding, PaddingShortcut)
    with pytest.raises(ResumeMismatch, match=r"shortcut 'padding' -> 'projection'"):
        training.train(tiny_config(model_dir, arch="resnet", recipe="he2016-subset", epochs=1, devices=1,
                                   dataset="synthetic:200", shortcut="projection"))


def test_runs_recorded_before_the_shortcut_setting_resume_as_projection(finished_run, tmp_path):
    model_dir, _ = finished_run
    recorded = json.loads((model_dir / "run.json").read_text())
    assert recorded.pop("shortcut") == "projection"
    (tmp_path / "run.json").write_text(json.dumps(recorded))  # as written before the setting existed
    run = RunDir(tmp_path)
    assert run.read_settings().shortcut == "projection"
    run.check_resumable(RunSettings.from_json({**recorded, "shortcut": "projection"}))
    with pytest.raises(ResumeMismatch, match="shortcut"):
        run.check_resumable(RunSettings.from_json({**recorded, "shortcut": "padding"}))


# --- the loop and its hooks, each alone ------------------------------------------------------


class FakeTrainer:
    """The loop's view of a Trainer: steps that return a loss, metrics, a BN sync."""

    def __init__(self, losses, stop_after=None):
        self.losses, self.events, self.stop_after, self.steps = iter(losses), [], stop_after, 0

    def reset_train_metrics(self):
        self.events.append("reset")

    def train_step(self, batches, stop_vote):
        self.steps += 1
        votes = float(stop_vote) + (self.steps == self.stop_after)  # another worker's vote
        return tf.constant([next(self.losses), votes])

    def sync_batch_norm_statistics(self):
        self.events.append("sync")

    def train_metrics(self):
        return {"loss": 1.0, "accuracy": 0.5}

    def learning_rate(self):
        return 0.1


class Recorder(hooks.Hook):
    def __init__(self, events):
        self.events = events

    def on_epoch_begin(self, epoch, steps):
        self.events.append(("begin", epoch, steps))

    def on_step(self, epoch, step, loss, seconds):
        self.events.append(("step", epoch, step, loss))

    def on_epoch_end(self, row):
        self.events.append(("end", row))

    def on_stop(self, epoch, step):
        self.events.append(("stop", epoch, step))


class NoStop:
    def vote(self):
        return tf.constant(0.0)


def test_the_loop_steps_and_calls_its_hooks_at_the_seams():
    trainer = FakeTrainer([2.0, 1.5, 1.0])
    events = trainer.events
    last = training.run_epochs(trainer, None, RunLength(steps_per_epoch=2, total_steps=3), start=0,
                               evaluate=lambda: {"val_loss": 3.0, "val_accuracy": 0.25}, hooks=[Recorder(events)],
                               stop=NoStop())
    row = lambda epoch: HistoryRow(epoch=epoch, loss=1.0, accuracy=0.5, val_loss=3.0, val_accuracy=0.25, lr=0.1)
    assert events == ["reset", ("begin", 1, 2), ("step", 1, 1, 2.0), ("step", 1, 2, 1.5), "sync", ("end", row(1)),
                      "reset", ("begin", 2, 1), ("step", 2, 1, 1.0), "sync", ("end", row(2))]
    assert last == row(2)


def test_a_resumed_loop_starts_after_the_checkpoint_and_a_finished_one_trains_nothing():
    trainer = FakeTrainer([1.0] * 3)
    length = RunLength(steps_per_epoch=1, total_steps=3)
    assert training.run_epochs(trainer, None, length, 2, dict, [Recorder(trainer.events)], NoStop()).epoch == 3
    assert training.run_epochs(trainer, None, length, 3, dict, [], NoStop()) is None


def test_a_loop_resumed_mid_epoch_keeps_the_epochs_running_metrics():
    trainer = FakeTrainer([1.0] * 4)
    events = trainer.events
    training.run_epochs(trainer, None, RunLength(steps_per_epoch=3, total_steps=6), 2, dict, [Recorder(events)],
                        NoStop())
    assert events[:4] == [("begin", 1, 3), ("step", 1, 3, 1.0), "sync", ("end", HistoryRow(
        epoch=1, loss=1.0, accuracy=0.5, lr=0.1))]  # no reset: steps 1 and 2 are in the restored metrics
    assert events[4:6] == ["reset", ("begin", 2, 3)]


def test_a_vote_to_stop_saves_at_that_step_and_raises_preempted():
    trainer = FakeTrainer([1.0] * 6, stop_after=2)  # another worker got SIGTERM during step 2
    events = trainer.events
    with pytest.raises(preemption.Preempted, match="after step 2 of epoch 1"):
        training.run_epochs(trainer, None, RunLength(steps_per_epoch=3, total_steps=6), 0, dict, [Recorder(events)],
                            NoStop())
    assert events == ["reset", ("begin", 1, 3), ("step", 1, 1, 1.0), ("step", 1, 2, 1.0), ("stop", 1, 2)]
    # At an epoch's last step the epoch ends as usual (evaluation, history, checkpoint) before the stop.
    trainer = FakeTrainer([1.0] * 6, stop_after=3)
    with pytest.raises(preemption.Preempted, match="end of epoch 1"):
        training.run_epochs(trainer, None, RunLength(steps_per_epoch=3, total_steps=6), 0, dict,
                            [Recorder(trainer.events)], NoStop())
    assert trainer.events[-2:] == ["sync", ("end", HistoryRow(epoch=1, loss=1.0, accuracy=0.5, lr=0.1))]


def test_sigterm_turns_into_a_vote_and_the_previous_handler_comes_back():
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with preemption.StopRequest() as stop:
        assert float(stop.vote()) == 0.0
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and float(stop.vote()) == 1.0
    assert signal.getsignal(signal.SIGTERM) == before


def test_the_step_timer_leaves_out_the_untimed_steps():
    timer = hooks.StepTimer(untimed=2, global_batch=64)
    for step, seconds in enumerate([9.0, 9.0, 0.5, 0.5], start=1):
        timer.on_step(1, step, 1.0, seconds)
    assert timer.timed_steps == 2 and timer.images_per_sec() == pytest.approx(128)
    assert hooks.StepTimer(untimed=3, global_batch=64).images_per_sec() is None


def test_a_nan_loss_names_the_step_and_what_is_kept(tmp_path):
    stop = hooks.StopOnDivergence(tmp_path / "checkpoints")
    stop.on_step(2, 3, 0.7, 0.1)
    with pytest.raises(hooks.TrainingDiverged, match=r"nan at epoch 2, step 3.*up to epoch 1 are kept in"):
        stop.on_step(2, 3, float("nan"), 0.1)
    with pytest.raises(hooks.TrainingDiverged, match="no checkpoint"):
        stop.on_step(1, 1, float("inf"), 0.1)


def test_the_history_hook_rewrites_history_csv_after_each_epoch(tmp_path):
    run = RunDir(tmp_path)
    kept = [HistoryRow(epoch=1, loss=2.0, accuracy=0.1, lr=0.1)]  # no validation split: empty cells
    history = hooks.History(run, list(kept), write=True)
    history.on_epoch_end(HistoryRow(epoch=2, loss=1.0, accuracy=0.2, val_loss=1.5, val_accuracy=0.3, lr=0.05))
    assert run.read_history() == [*kept, HistoryRow(epoch=2, loss=1.0, accuracy=0.2, val_loss=1.5, val_accuracy=0.3,
                                                    lr=0.05)]
    assert history_rows(tmp_path)[0]["val_loss"] == ""
    hooks.History(RunDir(tmp_path / "other"), [], write=False).on_epoch_end(kept[0])  # not the chief
    assert not (tmp_path / "other").exists()


def test_step_checkpoints_come_every_n_steps_besides_the_epochs(tmp_path):
    training.train(tiny_config(tmp_path, epochs=1, devices=1, checkpoint_every_steps=2))
    state = tf.train.get_checkpoint_state(str(tmp_path / "checkpoints"))
    # 11 steps of 32 of 360 images: saves at 2, 4, ..., 10 and the epoch's end; the last 3 are kept.
    assert [path.rsplit("-", 1)[1] for path in state.all_model_checkpoint_paths] == ["8", "10", "11"]


# --- watching a run and keeping its best epoch ---------------------------------------------------


class ScriptedValidation:
    def __init__(self, accuracies):
        self.accuracies = iter(accuracies)

    def __call__(self):
        return {"val_loss": 1.0, "val_accuracy": next(self.accuracies)}


class AppendRows(hooks.Hook):
    """The History hook's part the others read: the rows, appended first."""

    def __init__(self, rows):
        self.rows = rows

    def on_epoch_end(self, row):
        self.rows.append(row)


def test_early_stopping_ends_the_loop_after_its_patience_and_a_resumed_loop_trains_nothing():
    rows = []
    trainer = FakeTrainer([1.0] * 10)
    length = RunLength(steps_per_epoch=1, total_steps=10)
    stopper = hooks.EarlyStopping(2, rows)
    last = training.run_epochs(trainer, None, length, 0, ScriptedValidation([0.3, 0.5, 0.5, 0.4, 0.9]),
                               [AppendRows(rows), stopper], NoStop())
    # Epoch 2 is the best (a tie later is no improvement); epochs 3 and 4 exhaust the patience.
    assert last.epoch == 4 and stopper.stop_training and trainer.steps == 4
    again = hooks.EarlyStopping(2, list(rows))  # a resume reads the same history
    assert again.stop_training
    assert training.run_epochs(FakeTrainer([]), None, length, 4, dict, [again], NoStop()) is None


def test_keep_best_saves_each_new_best_epoch_and_catches_up_after_a_stop_between_checkpoints(tmp_path):
    value = tf.Variable(0.0)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(value=value), tmp_path / "best", max_to_keep=1)
    rows = []
    keep = hooks.KeepBest(manager, rows, scratch=None)
    for epoch, accuracy in enumerate([0.2, 0.6, 0.5], start=1):
        value.assign(epoch)
        rows.append(HistoryRow(epoch=epoch, loss=1.0, accuracy=0.5, val_accuracy=accuracy, lr=0.1))
        keep.on_epoch_end(rows[-1])
    assert keep.saved_epoch() == 2 and tf.train.latest_checkpoint(tmp_path / "best").endswith("ckpt-2")
    # Epoch 4 is best, its own checkpoint was saved, the run stopped before the best one was.
    rows.append(HistoryRow(epoch=4, loss=1.0, accuracy=0.5, val_accuracy=0.7, lr=0.1))
    value.assign(4)
    keep.catch_up(3)  # restored at epoch 3's end (not the best): nothing to do
    assert keep.saved_epoch() == 2
    keep.catch_up(4)
    assert keep.saved_epoch() == 4
    tf.train.Checkpoint(value=value).restore(manager.latest_checkpoint)
    assert float(value.numpy()) == 4.0


def event_tags(folder):
    """(tag, plugin, step) of every summary written under `folder`."""
    found = set()
    for path in folder.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                found.add((value.tag, value.metadata.plugin_data.plugin_name, event.step))
    return found


def test_a_watched_run_keeps_and_exports_its_best_epoch_across_a_resume(tmp_path, monkeypatch):
    config = dict(epochs=4, devices=1, export_best=True, early_stopping=3, log_every_steps=2,
                  dataset="synthetic:200")
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2 * 5 + 1)  # 180 training images, 5 steps an epoch: dies inside epoch 3
        with pytest.raises(Interrupt):
            training.train(tiny_config(tmp_path, **config))
    summary = training.train(tiny_config(tmp_path, **config))
    rows = RunDir(tmp_path).read_history()
    best = max(rows, key=lambda row: row.val_accuracy)
    assert summary.initial_epoch == 2 and summary.is_finished
    assert (summary.best_epoch, summary.best_val_accuracy) == (best.epoch, best.val_accuracy)
    assert summary.settings.export_best and summary.settings.early_stopping == 3
    assert tf.train.latest_checkpoint(tmp_path / "checkpoints" / "best").endswith(f"ckpt-{best.epoch}")
    # The export takes the best epoch's weights and says so.
    base = saved_model.export_run(tmp_path, tmp_path / "export")
    card = json.loads((pathlib.Path(base) / "model_card.json").read_text())["training"]
    assert card["exported_epoch"] == best.epoch and card["export_best"] is True
    assert card["exported_epoch_metrics"]["val_accuracy"] == best.val_accuracy
    exported, _ = saved_model.restore_trained_model(tmp_path)
    reference = build_model(RunDir(tmp_path).read_settings().model_config())
    tf.train.Checkpoint(model=reference).restore(
        tf.train.latest_checkpoint(tmp_path / "checkpoints" / "best")).expect_partial()
    for mine, theirs in zip(exported.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(mine, theirs)
    # TensorBoard: per-step curves every 2 steps, the settings as hparams, the augmented images once.
    train_tags = event_tags(tmp_path / "logs" / "train")
    assert {("step/loss", "scalars", 2), ("step/lr", "scalars", 4), ("step/images_per_sec", "scalars", 8)} <= {
        (tag, plugin or "scalars", step) for tag, plugin, step in train_tags}
    assert [(tag, plugin) for tag, plugin, _ in train_tags if plugin == "images"] == [
        ("augmented training images", "images")]
    assert {plugin for _, plugin, _ in event_tags(tmp_path / "logs")} == {"hparams"}


def test_export_best_and_early_stopping_need_a_validation_split(tmp_path):
    with pytest.raises(ConfigError, match="need a validation split"):
        tiny_config(tmp_path, export_best=True, val_split=0.0)
