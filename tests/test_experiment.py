"""`accresnet experiment`: runs, resumption, and numbers that agree with the runs' own histories."""

import csv
import json
import statistics

import pytest
from PIL import Image
from scipy import stats

from pipeline import flags
from pipeline.config import ConfigError
from pipeline.experiment import ExperimentConfig, parse_seeds, run_experiment
from pipeline.report import FIGURES, paired_difference


def tiny(out, **overrides):
    settings = dict(out=str(out), arches=("resnet", "accumulated"), depth=8, seeds=(0, 1), recipe="quick",
                    dataset="synthetic:400", epochs=2, batch_size=32)
    settings.update(overrides)
    return flags.build(ExperimentConfig, settings)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    lines = []
    results = run_experiment(tiny(out), announce=lines.append)
    return out, results, lines


def history(out, arch, seed):
    with open(out / "runs" / f"{arch}-seed{seed}" / "history.csv", newline="") as file:
        return list(csv.DictReader(file))


def test_writes_results_table_and_four_figures(experiment):
    out, results, lines = experiment
    assert sum("training in" in line for line in lines) == 4
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    for filename, _, _ in FIGURES:
        with Image.open(out / filename) as figure:
            assert figure.format == "PNG" and figure.size[0] > 300 and figure.size[1] > 200
    table = (out / "table.md").read_text()
    assert "| ResNet (2 runs) |" in table and "| Accumulated (2 runs) |" in table
    assert "| Accumulated − ResNet (paired) |" in table and "13.92" in table and "12.65" in table
    assert "not CIFAR-10" in table


def test_numbers_agree_with_the_runs_histories(experiment):
    out, results, _ = experiment
    for arch in ("resnet", "accumulated"):
        mins, means = [], []
        for seed in (0, 1):
            errors = [100 * (1 - float(row["val_accuracy"])) for row in history(out, arch, seed)]
            (run,) = [r for r in results["runs"] if r["arch"] == arch and r["seed"] == seed]
            assert run["min_val_error"] == pytest.approx(min(errors))
            assert run["mean_val_error"] == pytest.approx(statistics.fmean(errors))
            assert run["final_val_error"] == pytest.approx(errors[-1])
            summary = json.loads((out / "runs" / f"{arch}-seed{seed}" / "summary.json").read_text())
            assert run["final_test_error"] == pytest.approx(100 * (1 - summary["final"]["test_accuracy"]))
            mins.append(min(errors))
            means.append(statistics.fmean(errors))
        per_arch = results["per_arch"][arch]
        assert per_arch["min_val_error"]["mean"] == pytest.approx(statistics.fmean(mins))
        assert per_arch["min_val_error"]["std"] == pytest.approx(statistics.stdev(mins))
        assert per_arch["mean_val_error"]["mean"] == pytest.approx(statistics.fmean(means))
        table = (out / "table.md").read_text()
        assert f"{statistics.fmean(mins):.2f} ± {statistics.stdev(mins):.2f}" in table
    paired = results["paired"]["accumulated - resnet"]["min_val_error"]
    differences = [r["min_val_error"] for r in results["runs"] if r["arch"] == "accumulated"]
    differences = [a - r["min_val_error"] for a, r in zip(differences, [r for r in results["runs"]
                                                                        if r["arch"] == "resnet"])]
    assert paired["values"] == pytest.approx(differences)


def test_a_second_run_keeps_finished_runs_and_finishes_the_rest(experiment):
    out, results, _ = experiment
    kept = out / "runs" / "resnet-seed0" / "summary.json"
    stamp = kept.stat().st_mtime_ns
    (out / "runs" / "accumulated-seed1" / "summary.json").unlink()  # as if killed before its end
    lines = []
    again = run_experiment(tiny(out), announce=lines.append)
    assert sum("finished earlier, kept" in line for line in lines) == 3
    assert [line for line in lines if "training in" in line] == [
        f"[4/4] accumulated seed 1: training in {out / 'runs' / 'accumulated-seed1'}"]
    assert kept.stat().st_mtime_ns == stamp
    resumed = json.loads((out / "runs" / "accumulated-seed1" / "summary.json").read_text())
    assert resumed["initial_epoch"] == 2  # resumed from its checkpoint: nothing retrained
    assert again["per_arch"]["resnet"]["min_val_error"] == results["per_arch"]["resnet"]["min_val_error"]


def test_other_settings_need_another_folder(experiment):
    out, _, _ = experiment
    with pytest.raises(ConfigError, match="other settings .*epochs"):
        run_experiment(tiny(out, epochs=3), announce=lambda line: None)


def test_paired_difference_matches_scipys_paired_t_test():
    accumulated, plain = [12.1, 13.0, 12.4, 12.9], [13.0, 13.4, 13.1, 13.2]
    result = paired_difference([a - p for a, p in zip(accumulated, plain)])
    reference = stats.ttest_rel(accumulated, plain)
    assert result["t"] == pytest.approx(reference.statistic)
    assert result["p_value"] == pytest.approx(reference.pvalue)
    low, high = result["ci95"]
    assert low < result["mean"] < high and high < 0  # accumulated lower on every seed here
    assert paired_difference([1.5])["ci95"] is None


def test_seeds_flag():
    assert parse_seeds("3") == (0, 1, 2) and parse_seeds("4,7") == (4, 7)
    with pytest.raises(ConfigError):
        parse_seeds("three")


def test_shortcut_goes_to_every_run_and_is_a_fixed_setting(tmp_path):
    from pipeline.experiment import FIXED_SETTINGS

    config = tiny(tmp_path, shortcut="padding")
    assert {config.train_config(arch, 0).net.shortcut for arch in config.arches} == {"padding"}
    assert tiny(tmp_path).train_config("resnet", 0).net.shortcut is None  # the recipe's
    assert "shortcut" in FIXED_SETTINGS and "zero_init_residual" in FIXED_SETTINGS
    config = tiny(tmp_path, zero_init_residual=True, recipe="he2016-subset")
    assert {config.train_config(arch, 0).net.zero_init_residual for arch in config.arches} == {True}
