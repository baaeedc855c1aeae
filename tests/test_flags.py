"""Flags derived from the config dataclasses, and the run directory's typed records."""

import argparse
import dataclasses
import pathlib

import pytest

from pipeline import flags
from pipeline.settings.config import NetConfig, TrainConfig
from pipeline.data.specs import DATASET_SPECS, DataConfig
from pipeline.errors import ConfigError
from pipeline.settings.recipes import get_recipe
from pipeline.research.configs import ExperimentConfig
from pipeline.train.rundir import HistoryRow, ResumeMismatch, RunDir, RunSettings, RunSummary


def parse(config_class, argv, **options):
    parser = argparse.ArgumentParser()
    flags.add_flags(parser, config_class, **options)
    return flags.build(config_class, vars(parser.parse_args(argv)))


def test_flags_parse_into_the_nested_config_tree():
    config = parse(TrainConfig, ["--model-dir", "m", "--arch", "resnet", "--depth", "20", "--dataset", "cifar10",
                                 "--no-augment", "--recipe", "he2016", "--steps", "7", "--no-progress"])
    assert config.net == NetConfig("resnet", 20)
    assert config.data == DataConfig("cifar10", augment=False)
    assert config.recipe is get_recipe("he2016") and config.steps == 7 and config.progress is False


def test_zero_init_residual_flags_override_the_recipe_either_way():
    assert parse(TrainConfig, []).net.zero_init_residual is None  # the recipe's
    assert parse(TrainConfig, ["--zero-init-residual"]).net.zero_init_residual is True
    assert parse(TrainConfig, ["--no-zero-init-residual"]).net.zero_init_residual is False
    with pytest.raises(SystemExit):
        parse(TrainConfig, ["--zero-init-residual", "--no-zero-init-residual"])
    experiment = parse(ExperimentConfig, ["--out", "o", "--zero-init-residual", "--recipe", "he2016-subset"])
    assert experiment.train_config("accumulated", 1).net.zero_init_residual is True


def test_a_config_built_from_no_flags_is_the_dataclass_default():
    assert parse(TrainConfig, []) == TrainConfig()
    assert flags.build(TrainConfig, {}) == TrainConfig()


def test_values_and_build_round_trip():
    config = TrainConfig(model_dir="m", net=NetConfig("wrn", 16, width=2), data=DataConfig("synthetic:10"),
                         recipe="keras", epochs=2, seed=5)
    assert flags.build(TrainConfig, flags.values(config)) == config
    assert flags.values(config)["recipe"] == "keras"


def test_exclusive_and_required_flags_are_enforced_by_argparse():
    with pytest.raises(SystemExit):
        parse(TrainConfig, ["--epochs", "1", "--steps", "1"])
    with pytest.raises(SystemExit):
        parse(TrainConfig, [], required=("model_dir",))
    with pytest.raises(SystemExit):
        parse(TrainConfig, ["--recipe", "fast"])


def test_a_nested_template_has_its_own_defaults_and_a_verb_may_show_a_subset():
    config = parse(ExperimentConfig, ["--out", "o", "--seeds", "0,4"], names=("out", "seeds", "recipe", "depth"))
    assert config.seeds == (0, 4) and config.run.recipe.name == "paper50" and config.run.data.spec == "cifar10"
    assert config.train_config("resnet", 4) == dataclasses.replace(
        config.run, model_dir="o/runs/resnet-seed4", net=NetConfig("resnet", 32), seed=4)


def test_a_setting_named_twice_in_one_tree_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Twice:
        depth: int = flags.setting(1, help="again")
        net: NetConfig = dataclasses.field(default_factory=NetConfig)

    with pytest.raises(TypeError, match="settings named twice: depth"):
        flags.settings(Twice)


def test_bad_settings_raise_config_errors_whichever_way_they_come():
    with pytest.raises(ConfigError, match="depth must be 6n"):
        flags.build(TrainConfig, {"depth": 30})
    with pytest.raises(ConfigError, match="unknown recipe 'fast'"):
        TrainConfig(recipe="fast")


def test_every_dataset_spec_is_documented_in_the_training_guide():
    guide = (pathlib.Path(__file__).parents[1] / "docs" / "training.md").read_text()
    missing = [spec for spec, _ in DATASET_SPECS if f"`{spec}" not in guide]
    assert not missing, missing


# --- the run directory ---


def settings(**overrides):
    values = dict(arch="resnet", depth=8, width=None, cardinality=None, dataset="synthetic:10", num_classes=10,
                  class_names=tuple("abcdefghij"), seed=0, recipe="quick", replicas=1, workers=1,
                  per_replica_batch=8, global_batch=8, learning_rate=0.1, total_steps=6, steps_per_epoch=2,
                  epochs=3, mixed_precision=False, jit=False)
    return RunSettings(**{**values, **overrides})


def test_run_records_round_trip_through_their_files(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_settings() is None and run.read_summary() is None and run.read_history() == []
    run.write_settings(settings())
    assert run.read_settings() == settings()
    rows = [HistoryRow(epoch=1, loss=2.0, accuracy=0.1, lr=0.1),
            HistoryRow(epoch=2, loss=1.5, accuracy=0.3, val_loss=1.6, val_accuracy=0.25, lr=0.05)]
    run.write_history(rows)
    assert run.read_history() == rows
    summary = RunSummary(settings=settings(), initial_epoch=0, epochs_completed=2, steps_completed=4,
                         final=rows[-1].metrics(), wall_time_sec=1.0, train_images_per_sec=None, timed_steps=0,
                         parameters=10, model_dir=str(tmp_path), is_chief=True)
    run.write_summary(summary)
    assert run.read_summary() == summary and not run.is_finished()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.csv", "run.json", "summary.json"]


def test_a_run_recorded_before_a_setting_existed_reads_with_its_old_meaning(tmp_path):
    import json

    record = settings().to_json()
    del record["shortcut"], record["zero_init_residual"], record["weight_decay"], record["augmentation"]
    del record["batch_norm_momentum"], record["batch_norm_epsilon"]
    (tmp_path / "run.json").write_text(json.dumps({**record, "a_setting_from_the_future": 1}))
    assert RunDir(tmp_path).read_settings() == settings()


def test_a_run_with_other_settings_is_not_resumed(tmp_path):
    run = RunDir(tmp_path)
    run.write_settings(settings())
    run.check_resumable(settings(jit=True, replicas=2, per_replica_batch=4))  # how, not what: the same global batch
    with pytest.raises(ResumeMismatch, match="global_batch 8 -> 16, learning_rate 0.1 -> 0.2"):
        run.check_resumable(settings(per_replica_batch=16, global_batch=16, learning_rate=0.2))
    with pytest.raises(ResumeMismatch, match="mixed_precision False -> True"):
        run.check_resumable(settings(mixed_precision=True))
    with pytest.raises(ResumeMismatch, match="arch 'resnet' -> 'accumulated'"):
        run.check_resumable(settings(arch="accumulated"))
    with pytest.raises(ResumeMismatch, match="weight_decay 0.0001 -> 5e-05"):
        run.check_resumable(settings(weight_decay=5e-5))
    with pytest.raises(ResumeMismatch, match="zero_init_residual False -> True"):
        run.check_resumable(settings(zero_init_residual=True))


def test_a_changed_recipe_field_is_named_on_resume_and_older_runs_resume_without_one(tmp_path):
    run = RunDir(tmp_path)
    run.write_settings(settings())  # recorded before recipe_settings existed
    run.check_resumable(settings(recipe_settings={"momentum": 0.9}))
    RunDir(tmp_path).write_settings(settings(recipe_settings={"momentum": 0.9, "optimizer": "sgd"}))
    with pytest.raises(ResumeMismatch, match=r"\(momentum 0.9 -> 0.5\);"):
        run.check_resumable(settings(recipe_settings={"momentum": 0.5, "optimizer": "sgd"}))
