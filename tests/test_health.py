"""The baseline-health gate: did a run start? Read from its record, stated by report and compare."""

import json
import pathlib
import shutil

import pytest

from pipeline.research.compare import compare, summary_lines
from pipeline.research.configs import CompareConfig, ReportConfig
from pipeline.research.health import chance_accuracy_bound, chance_loss, start_health
from pipeline.research.records import RecordError
from pipeline.research.report import report
from pipeline.train.rundir import HistoryRow

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def rows(*epochs):
    """(loss, val_accuracy) per epoch, from epoch 1."""
    return [HistoryRow(epoch=n, loss=loss, accuracy=0.5, val_loss=1.0, val_accuracy=val, lr=0.1)
            for n, (loss, val) in enumerate(epochs, start=1)]


def test_chance_for_ten_classes_is_the_plans_2_30_and_0_11():
    assert chance_loss(10) == 2.30 and chance_accuracy_bound(10) == 0.11
    assert chance_loss(2) == 0.69 and chance_accuracy_bound(2) == 0.51


def test_a_healthy_start_passes():
    health = start_health(rows((1.9, 0.3), (1.5, 0.45), (1.2, 0.55)), 10)
    assert health.passed and health.reasons() == [] and health.epochs_at_chance == ()


def test_a_first_epoch_at_chance_fails_even_when_the_net_recovers():
    health = start_health(rows((2.31, 0.10), (2.1, 0.2), (1.5, 0.4)), 10)
    assert not health.passed and health.reasons() == ["first-epoch training loss 2.310 is not below 2.30"]


def test_chance_in_the_first_two_epochs_is_allowed_after_them_it_fails():
    # Epoch 2 at chance is within the grace; epoch 3 at chance by loss, epoch 4 by validation accuracy.
    health = start_health(rows((2.2, 0.2), (2.30, 0.10), (2.30, 0.3), (1.8, 0.11), (1.5, 0.4)), 10)
    assert health.epochs_at_chance == (3, 4) and not health.passed
    assert health.reasons() == ["at chance in epoch(s) 3, 4"]


def test_a_history_without_epochs_is_refused():
    with pytest.raises(ValueError, match="no start to judge"):
        start_health([], 10)


def test_the_report_names_each_run_that_did_not_start(tmp_path):
    # The subset protocol of He et al.'s recipe: the plain net's first epoch above chance in 7 of 8 seeds.
    results = report(ReportConfig(str(DOCS / "cifar10-subset" / "powered" / "records"), out_dir=str(tmp_path)))
    failing = {tuple(run) for run in results["start_gate"]["failing"]}
    assert {("resnet", seed) for seed in range(8)} - failing == set()
    by_run = {(m["arch"], m["seed"]): m["start_health"] for m in results["runs"]}
    assert by_run[("resnet", 0)]["first_epoch_loss"] > 2.30 and 3 in by_run[("resnet", 0)]["epochs_at_chance"]
    table = (tmp_path / "table.md").read_text()
    assert f"Start-up gate: {len(failing)} of 16 runs fail" in table
    assert "- ResNet seed 0: first-epoch training loss 2.928 is not below 2.30; at chance in epoch(s) 3" in table


def test_the_report_and_compare_say_when_every_run_started(tmp_path):
    records = str(DOCS / "cifar10" / "paper50" / "records")
    results = report(ReportConfig(records, out_dir=str(tmp_path), primary_metric="min_val_error"))
    assert results["start_gate"]["failing"] == []
    assert "Start-up gate: every run passes." in (tmp_path / "table.md").read_text()
    lines = summary_lines(compare(CompareConfig(records, records, primary_metric="min_val_error")))
    assert "start-up gate: every run passes" in lines
    # Records written before the run kept its recipe's fields are not "differing" in them.
    assert lines[1] == "differing settings: arch 'accumulated' vs 'resnet'"


def test_compare_names_the_runs_that_fail_the_gate():
    records = str(DOCS / "cifar10-subset" / "powered" / "records")
    result = compare(CompareConfig(records, records, seeds=(6, 7)))
    assert result["start_gate"]["failing"] == [["baseline", 6], ["baseline", 7]]
    assert "start-up gate: fails for resnet seed 6, resnet seed 7: the pairs with them measure a net that did " \
           "not start" in summary_lines(result)


def test_a_report_refuses_records_of_other_files_under_one_folder_name(tmp_path):
    records = shutil.copytree(DOCS / "cifar10" / "paper50" / "records", tmp_path / "records")
    path = records / "resnet-seed0.json"
    record = json.loads(path.read_text())
    record["summary"]["data_digest"] = "0" * 64
    path.write_text(json.dumps(record))
    with pytest.raises(RecordError, match="differ in data_digest"):
        report(ReportConfig(str(records), out_dir=str(tmp_path)))
