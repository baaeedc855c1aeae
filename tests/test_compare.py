"""`accresnet compare`: an arch of one experiment against another's, paired by seed, from committed records."""

import dataclasses
import json
import pathlib

import pytest
from scipy import stats

from pipeline import cli
from pipeline.research.compare import MAY_DIFFER, MUST_AGREE, NOT_COMPARED, compare
from pipeline.research.configs import CompareConfig
from pipeline.errors import ConfigError
from pipeline.research.configs import parse_seeds
from pipeline.research.records import RecordError
from pipeline.train.rundir import RunSettings

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "cifar10-subset"
POWERED, ZERO_INIT = DOCS / "powered" / "records", DOCS / "zero-init" / "records"


def final_test_error_of(folder, arch, seed):
    record = json.loads((folder / f"{arch}-seed{seed}.json").read_text())
    return 100 * (1 - record["summary"]["final"]["test_accuracy"])


def copy_records(tmp_path, *names, edit=None, folder="records"):
    """Some of zero-init's records in a folder of their own, `edit` applied to each record's JSON."""
    folder = tmp_path / folder
    folder.mkdir(exist_ok=True)
    for name in names:
        record = json.loads((ZERO_INIT / f"{name}.json").read_text())
        if edit:
            edit(record)
        (folder / f"{name}.json").write_text(json.dumps(record))
    return folder


def test_paired_difference_is_scipys_paired_t_test_on_the_records_test_errors():
    result = compare(CompareConfig(str(POWERED), str(ZERO_INIT), seeds=(0, 1, 2)))
    accumulated = [final_test_error_of(POWERED, "accumulated", s) for s in (0, 1, 2)]
    plain = [final_test_error_of(ZERO_INIT, "resnet", s) for s in (0, 1, 2)]
    difference = result["differences"]["final_test_error"]
    assert difference["values"] == pytest.approx([a - b for a, b in zip(accumulated, plain)])
    assert difference["p_value"] == pytest.approx(stats.ttest_rel(accumulated, plain).pvalue)
    # The two sides differ in the net and in the initialisation, and in nothing else.
    assert result["differing"] == {"arch": ["accumulated", "resnet"], "zero_init_residual": [False, True]}


def test_runs_are_paired_by_seed_not_by_position(tmp_path):
    baseline = copy_records(tmp_path, "resnet-seed1", "resnet-seed2")
    result = compare(CompareConfig(str(POWERED), str(baseline)))
    assert result["seeds"] == [1, 2]
    assert result["differences"]["final_test_error"]["values"] == pytest.approx(
        [final_test_error_of(POWERED, "accumulated", s) - final_test_error_of(ZERO_INIT, "resnet", s) for s in (1, 2)])


@pytest.mark.parametrize("name, value", [("epochs", 5), ("dataset", "folder:elsewhere"), ("recipe", "keras-subset"),
                                         ("depth", 20), ("class_names", ["a"] * 10)])
def test_sides_that_differ_in_what_makes_errors_comparable_are_refused(tmp_path, name, value):
    def edit(record):
        record["summary"][name] = value
    baseline = copy_records(tmp_path, "resnet-seed0", "resnet-seed1", "resnet-seed2", edit=edit)
    with pytest.raises(RecordError, match=f"seed 0: the two sides differ in {name}"):
        compare(CompareConfig(str(POWERED), str(baseline)))


def test_a_recipe_field_that_differs_is_refused_whatever_the_name(tmp_path):
    baseline = copy_records(tmp_path, "resnet-seed0", edit=lambda r: r["recipe"].update(momentum=0.5))
    with pytest.raises(RecordError, match="recipes differ in momentum"):
        compare(CompareConfig(str(POWERED), str(baseline)))


def test_data_digests_are_compared_where_both_records_have_one(tmp_path):
    def digest(value):
        return lambda record: record["summary"].update(data_digest=value)
    unknown = copy_records(tmp_path, "resnet-seed0", edit=digest(None), folder="unknown")
    assert compare(CompareConfig(str(POWERED), str(unknown)))["seeds"] == [0]
    side = copy_records(tmp_path, "accumulated-seed0", edit=digest("1" * 64), folder="side")
    same = copy_records(tmp_path, "resnet-seed0", edit=digest("1" * 64), folder="same")
    other = copy_records(tmp_path, "resnet-seed0", edit=digest("2" * 64), folder="other")
    assert compare(CompareConfig(str(side), str(same)))["seeds"] == [0]
    with pytest.raises(RecordError, match="differ in data_digest"):
        compare(CompareConfig(str(side), str(other)))


def test_pairs_that_differ_in_different_settings_are_refused(tmp_path):
    def edit(record):
        if record["seed"] == 1:
            record["summary"]["mixed_precision"] = True
    baseline = copy_records(tmp_path, "resnet-seed0", "resnet-seed1", edit=edit)
    with pytest.raises(RecordError, match="the pairs differ in different settings"):
        compare(CompareConfig(str(POWERED), str(baseline)))


def test_seeds_not_on_both_sides_and_bad_seed_lists_are_named(tmp_path):
    baseline = copy_records(tmp_path, "resnet-seed1")
    with pytest.raises(RecordError, match=r"seed\(s\) 0 are not recorded on both sides \(both have 1\)"):
        compare(CompareConfig(str(POWERED), str(baseline), seeds=(0, 1)))
    with pytest.raises(RecordError, match="no record of accumulated"):
        compare(CompareConfig(str(baseline), str(POWERED)))
    for text in ("0,0,1", "", ",", "0-2", "-1,2"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(text)
    assert cli.main(["compare", "--records", str(POWERED), "--baseline-records", str(ZERO_INIT),
                     "--seeds", "0,0,1"]) == 2


def test_every_run_setting_is_either_compared_allowed_to_differ_or_named_as_not_compared():
    fields = {field.name for field in dataclasses.fields(RunSettings)}
    assert set(MUST_AGREE) | set(MAY_DIFFER) | set(NOT_COMPARED) == fields
    assert not set(MUST_AGREE) & set(MAY_DIFFER)


def test_the_command_prints_the_primary_metric_first_and_writes_json(tmp_path, capsys):
    out = tmp_path / "comparison.json"
    status = cli.main(["compare", "--records", str(POWERED), "--baseline-records", str(ZERO_INIT),
                       "--seeds", "3", "--out", str(out)])  # a count, as experiment takes it: seeds 0, 1, 2
    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert "zero_init_residual False vs True" in lines[1]
    # The powered accumulated runs of seeds 0 and 2 began above chance; the zero-init plain ones did not.
    assert lines[2].startswith("start-up gate: fails for accumulated seed 0, accumulated seed 2: ")
    assert lines[3].startswith("final_test_error (primary): -2.42 [")
    assert json.loads(out.read_text())["differences"]["final_test_error"]["n"] == 3


def test_the_plans_primary_metric_is_the_one_stated_and_listed_first(capsys):
    assert cli.main(["compare", "--records", str(POWERED), "--baseline-records", str(ZERO_INIT),
                     "--seeds", "3", "--primary-metric", "min_val_error"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].startswith("min_val_error (primary): ")
    assert not any(line.startswith("final_test_error (primary)") for line in lines)
