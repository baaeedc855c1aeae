"""`accresnet experiment` and `accresnet report`: runs, their records, resumption on this machine or
another, and numbers that agree with the runs' own histories."""

import csv
import json
import pathlib
import shutil
import statistics

import pytest
from PIL import Image
from scipy import stats

from pipeline import cli, flags
from pipeline.errors import ConfigError
from pipeline.research.experiment import run_experiment
from pipeline.research.configs import ExperimentConfig, parse_seeds
from pipeline.research.records import RecordError, cpu_description, portable, read_records
from pipeline.research.report import FIGURES, paired_difference, pooled_difference, report
from pipeline.research.configs import ReportConfig


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


def test_writes_a_record_per_run_then_results_table_and_four_figures(experiment):
    out, results, lines = experiment
    assert sum("training in" in line for line in lines) == 4
    # Each record announces whether its run started, as the report's gate reads it.
    gates = [line.split("start-up gate ")[1] for line in lines if "recorded in" in line]
    by_run = {(m["arch"], m["seed"]): m["start_health"]["passed"] for m in results["runs"]}
    assert len(gates) == 4 and [gate == "passes" for gate in gates] == [
        by_run[(arch, seed)] for seed in (0, 1) for arch in ("resnet", "accumulated")]
    assert sorted(p.name for p in (out / "records").iterdir()) == [
        "accumulated-seed0.json", "accumulated-seed1.json", "resnet-seed0.json", "resnet-seed1.json"]
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    for filename, _, _ in FIGURES:
        with Image.open(out / filename) as figure:
            assert figure.format == "PNG" and figure.size[0] > 300 and figure.size[1] > 200
    table = (out / "table.md").read_text()
    assert "| ResNet (2 runs) |" in table and "| Accumulated (2 runs) |" in table
    assert "| Accumulated − ResNet (paired) |" in table and "13.92" in table and "12.65" in table
    assert "not CIFAR-10" in table
    assert results["primary_metric"]["name"] == "final_test_error"
    assert "Primary metric: the final test error" in table and "fixed before the runs" in table
    assert "recipe `quick`" in table and "zero-init off" in table and "L2 0.0001" in table
    assert "not speed results" in table and "not speed results" in results["timing"]


def test_a_record_holds_the_settings_history_and_final_metrics_of_its_run(experiment):
    out, _, _ = experiment
    record = json.loads((out / "records" / "resnet-seed1.json").read_text())
    assert (record["arch"], record["seed"]) == ("resnet", 1)
    # The run's summary, without this machine's path of the run folder.
    assert record["summary"] == {**json.loads((out / "runs" / "resnet-seed1" / "summary.json").read_text()),
                                 "model_dir": "resnet-seed1"}
    rows = history(out, "resnet", 1)
    assert [row["epoch"] for row in record["history"]] == [int(row["epoch"]) for row in rows] == [1, 2]
    assert [row["val_accuracy"] for row in record["history"]] == [float(row["val_accuracy"]) for row in rows]
    assert "test_accuracy" in record["summary"]["final"] and record["summary"]["wall_time_sec"] > 0
    assert record["cpu"] == cpu_description() != "" and record["cpus"] >= 1
    assert record["experiment"]["recipe"] == "quick" and record["experiment"]["depth"] == 8
    assert record["recipe"]["name"] == "quick" and "demos and tests" in record["recipe"]["description"]

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
            assert [row["loss"] for row in run["history"]] == [float(row["loss"]) for row in history(out, arch, seed)]
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


def test_a_second_run_keeps_recorded_runs_and_finishes_the_rest(experiment):
    out, results, _ = experiment
    kept = out / "records" / "resnet-seed0.json"
    stamp = kept.stat().st_mtime_ns
    # As if killed before its end: no record, no summary, the checkpoints of both epochs.
    (out / "records" / "accumulated-seed1.json").unlink()
    (out / "runs" / "accumulated-seed1" / "summary.json").unlink()
    lines = []
    again = run_experiment(tiny(out), announce=lines.append)
    assert sum("recorded earlier" in line for line in lines) == 3
    assert [line for line in lines if "training in" in line] == [
        f"[4/4] accumulated seed 1: training in {out / 'runs' / 'accumulated-seed1'}"]
    assert (out / "records" / "accumulated-seed1.json").exists()
    assert kept.stat().st_mtime_ns == stamp
    resumed = json.loads((out / "runs" / "accumulated-seed1" / "summary.json").read_text())
    assert resumed["initial_epoch"] == 2  # resumed from its checkpoint: nothing retrained
    assert again["per_arch"]["resnet"]["min_val_error"] == results["per_arch"]["resnet"]["min_val_error"]


def test_a_finished_run_without_a_record_is_recorded_not_trained_again(experiment):
    out, _, _ = experiment
    (out / "records" / "resnet-seed1.json").unlink()
    lines = []
    run_experiment(tiny(out), announce=lambda line: lines.append(line))
    assert not [line for line in lines if "training in" in line]
    assert f"[3/4] resnet seed 1: finished earlier in {out / 'runs' / 'resnet-seed1'}" in lines
    assert (out / "records" / "resnet-seed1.json").exists()


def test_a_fresh_clone_with_the_records_goes_on_without_checkpoints(experiment, tmp_path):
    out, results, _ = experiment
    clone = tmp_path / "docs" / "experiment"
    shutil.copytree(out / "records", clone / "records")
    lines = []
    again = run_experiment(tiny(tmp_path / "elsewhere", records=str(clone / "records")), announce=lines.append)
    assert not [line for line in lines if "training in" in line]
    assert sum("recorded earlier" in line for line in lines) == 4
    assert not (tmp_path / "elsewhere" / "runs").exists()
    # The report goes beside the records folder.
    assert json.loads((clone / "results.json").read_text())["runs"] == json.loads(json.dumps(again))["runs"]
    for filename, _, _ in FIGURES:
        assert (clone / filename).exists()


def test_report_rebuilds_results_table_and_figures_from_the_records_alone(experiment, tmp_path, capsys):
    out, _, _ = experiment
    shutil.copytree(out / "records", tmp_path / "records")
    assert cli.main(["report", "--records", str(tmp_path / "records"), "--out", str(tmp_path / "report")]) == 0
    assert "| Accumulated − ResNet (paired) |" in capsys.readouterr().out
    rebuilt = json.loads((tmp_path / "report" / "results.json").read_text())
    assert rebuilt == json.loads((out / "results.json").read_text())
    assert (tmp_path / "report" / "table.md").read_text() == (out / "table.md").read_text()
    for filename, _, _ in FIGURES:
        with Image.open(tmp_path / "report" / filename) as figure:
            assert figure.format == "PNG"
    assert ReportConfig(str(tmp_path / "records")).report_dir == tmp_path  # by default, beside the records
    assert [row["epoch"] for row in rebuilt["runs"][0]["history"]] == [1, 2]


def test_a_report_takes_the_records_of_one_experiment_only(experiment, tmp_path):
    out, _, _ = experiment
    records = tmp_path / "records"
    shutil.copytree(out / "records", records)
    path = records / "resnet-seed0.json"
    record = json.loads(path.read_text())
    record["summary"]["epochs"] = 3
    path.write_text(json.dumps(record))
    with pytest.raises(RecordError, match="resnet seed 0 differ in epochs"):
        report(ReportConfig(str(records)))
    with pytest.raises(RecordError, match="holds no run records"):
        read_records(tmp_path / "empty")


def test_other_settings_need_another_folder(experiment, tmp_path):
    out, _, _ = experiment
    with pytest.raises(ConfigError, match="other settings .*epochs"):
        run_experiment(tiny(out, epochs=3), announce=lambda line: None)
    with pytest.raises(ConfigError, match="accumulated-seed0.json records a run with other settings .*epochs"):
        run_experiment(tiny(tmp_path, records=str(out / "records"), epochs=3), announce=lambda line: None)


def test_paired_difference_matches_scipys_paired_t_test():
    accumulated, plain = [12.1, 13.0, 12.4, 12.9], [13.0, 13.4, 13.1, 13.2]
    result = paired_difference([a - p for a, p in zip(accumulated, plain)])
    reference = stats.ttest_rel(accumulated, plain)
    assert result["t"] == pytest.approx(reference.statistic)
    assert result["p_value"] == pytest.approx(reference.pvalue)
    low, high = result["ci95"]
    assert low < result["mean"] < high and high < 0  # accumulated lower on every seed here
    assert paired_difference([1.5])["ci95"] is None
    signs = result["signs"]
    assert (signs["higher"], signs["lower"], signs["equal"]) == (0, 4, 0)
    assert signs["p_value"] == pytest.approx(2 * 0.5 ** 4)  # two-sided sign test: all 4 on one side
    assert paired_difference([1.0, -1.0, 0.0])["signs"] == {"higher": 1, "lower": 1, "equal": 1, "p_value": 1.0}


def test_seeds_flag():
    assert parse_seeds("3") == (0, 1, 2) and parse_seeds("4,7") == (4, 7)
    with pytest.raises(ConfigError):
        parse_seeds("three")


def test_shortcut_and_zero_init_go_to_every_run_and_are_fixed_settings(tmp_path):
    from pipeline.research.configs import FIXED_SETTINGS

    config = tiny(tmp_path, zero_init_residual=True, recipe="he2016-subset")
    assert {config.train_config(arch, 0).net.zero_init_residual for arch in config.arches} == {True}
    assert "zero_init_residual" in FIXED_SETTINGS and config.fixed_settings()["zero_init_residual"] is True

    config = tiny(tmp_path, shortcut="padding")
    assert {config.train_config(arch, 0).net.shortcut for arch in config.arches} == {"padding"}
    assert tiny(tmp_path).train_config("resnet", 0).net.shortcut is None  # the recipe's
    assert "shortcut" in FIXED_SETTINGS


def test_the_pooled_comparison_is_welchs_t_test():
    values, baseline = [35.1, 36.0, 34.2], [68.8, 39.4, 43.8, 41.0]
    pooled = pooled_difference(values, baseline)
    welch = stats.ttest_ind(values, baseline, equal_var=False)
    assert pooled["mean"] == pytest.approx(statistics.fmean(values) - statistics.fmean(baseline))
    assert pooled["p_value"] == pytest.approx(welch.pvalue) and pooled["df"] == pytest.approx(welch.df)
    interval = welch.confidence_interval(0.95)
    assert pooled["ci95"] == pytest.approx([interval.low, interval.high])
    assert pooled_difference([1.0], baseline) is None


def test_portable_settings_drop_this_machines_paths():
    assert portable("dataset", "folder:/data/x/cifar10-full") == "folder:cifar10-full"
    assert portable("dataset", "cifar-bin:../downloads/cifar-10-binary.tar.gz") == "cifar-bin:cifar-10-binary.tar.gz"
    assert portable("dataset", "synthetic:400") == "synthetic:400" and portable("dataset", "cifar10") == "cifar10"
    assert portable("data_dir", "/home/me/tensorflow_datasets") == "tensorflow_datasets"
    assert portable("model_dir", "/runs/paper50/runs/resnet-seed0") == "resnet-seed0"
    assert portable("depth", 32) == 32 and portable("data_dir", None) is None


def test_records_keep_no_paths_and_carry_over_to_the_same_data_elsewhere(tmp_path):
    here = tmp_path / "here" / "my-photos"
    for index, name in enumerate(("cats", "dogs")):
        (here / name).mkdir(parents=True)
        for number in range(24):
            Image.new("RGB", (8, 8), (200 * index, 50, 20 * number % 255)).save(here / name / f"{number}.png")
    settings = dict(arches=("resnet",), seeds=(0,), epochs=1, batch_size=8)
    run_experiment(tiny(tmp_path / "out", dataset=f"folder:{here}", **settings), announce=lambda line: None)
    record = json.loads((tmp_path / "out" / "records" / "resnet-seed0.json").read_text())
    assert str(tmp_path) not in json.dumps(record)
    assert record["experiment"]["dataset"] == record["summary"]["dataset"] == "folder:my-photos"
    assert record["summary"]["model_dir"] == "resnet-seed0" and record["summary"]["data_digest"]
    # The same folder on another machine, at another path: the record is kept, nothing trains.
    there = shutil.copytree(here, tmp_path / "there" / "my-photos")
    lines = []
    run_experiment(tiny(tmp_path / "out-there", dataset=f"folder:{there}",
                        records=str(tmp_path / "out" / "records"), **settings), announce=lines.append)
    assert any("recorded earlier" in line for line in lines) and not any("training in" in line for line in lines)


def test_a_report_states_the_plans_primary_metric_and_knows_cifar10_as_jpeg_files(tmp_path):
    # paper50's plan decides on the minimum validation error, the paper's headline; its data is all of
    # CIFAR-10 re-encoded as JPEG files.
    records = pathlib.Path(__file__).resolve().parents[1] / "docs" / "cifar10" / "paper50" / "records"
    results = report(ReportConfig(str(records), out_dir=str(tmp_path), primary_metric="min_val_error"))
    assert results["primary_metric"]["name"] == "min_val_error"
    table = (tmp_path / "table.md").read_text()
    assert "Primary metric: the minimum validation error" in table
    assert "minimum validation error per seed:" in table and "final test error per seed" not in table
    assert "all 60,000 CIFAR-10 images as JPEG files" in table and "not for comparison" not in table
    args = cli.build_parser().parse_args(["experiment", "--out", str(tmp_path), "--primary-metric", "min_val_error"])
    assert flags.from_args(ExperimentConfig, args).primary_metric == "min_val_error"


def test_an_output_folder_from_before_a_setting_existed_goes_on(experiment, tmp_path):
    # experiment.json written before --set and --learning-rate: read with the values every run had then.
    out, _, _ = experiment
    marker = json.loads((out / "experiment.json").read_text())
    older = tmp_path / "older"
    older.mkdir()
    (older / "experiment.json").write_text(json.dumps({k: v for k, v in marker.items()
                                                       if k not in ("set", "learning_rate")}))
    lines = []
    run_experiment(tiny(older, records=str(out / "records")), announce=lines.append)
    assert sum("recorded earlier" in line for line in lines) == 4
    assert json.loads((older / "experiment.json").read_text()) == {**marker, "out": str(older),
                                                                   "records": str(out / "records")}
    (older / "experiment.json").write_text(json.dumps({**marker, "set": "epochs=3"}))
    with pytest.raises(ConfigError, match="other settings \\(set\\)"):
        run_experiment(tiny(older, records=str(out / "records")), announce=lines.append)


def test_a_he2016_report_stands_beside_he_et_als_test_error_not_the_50_epoch_table(experiment, tmp_path):
    # He et al.'s full schedule is read against their Table 6 (ResNet-32: 7.51 % test error);
    # Saraiya's 50-epoch rows belong to the other recipes.
    out, _, _ = experiment
    records = tmp_path / "records"
    records.mkdir()
    record = json.loads((out / "records" / "resnet-seed0.json").read_text())
    record["summary"]["recipe"] = record["experiment"]["recipe"] = record["recipe"]["name"] = "he2016"
    (records / "resnet-seed0.json").write_text(json.dumps(record))
    results = report(ReportConfig(str(records), out_dir=str(tmp_path)))
    assert results["he2016_table6"] == {"resnet": {"final_test_error": 7.51}} and "paper_table1" not in results
    table = (tmp_path / "table.md").read_text()
    assert "| He et al. 2016, Table 6: ResNet (CIFAR-10, ResNet-32, 64k iterations) | – | – | 7.51 |" in table
    assert "13.92" not in table and "He et al.'s row is one run" in table
