"""`accresnet compare`: an arch of one experiment against another's, paired by seed, from committed records."""

import json
import pathlib
import shutil

import pytest
from scipy import stats

from pipeline import cli
from pipeline.compare import CompareConfig, compare
from pipeline.records import RecordError

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "cifar10-subset"
POWERED, ZERO_INIT = DOCS / "powered" / "records", DOCS / "zero-init" / "records"


def test_paired_difference_is_scipys_paired_t_test_on_the_records_test_errors():
    result = compare(CompareConfig(str(POWERED), str(ZERO_INIT), seeds="0,1,2"))
    errors = {}
    for folder, arch in ((POWERED, "accumulated"), (ZERO_INIT, "resnet")):
        errors[arch] = [100 * (1 - json.loads((folder / f"{arch}-seed{s}.json").read_text())
                               ["summary"]["final"]["test_accuracy"]) for s in (0, 1, 2)]
    difference = result["differences"]["final_test_error"]
    expected = stats.ttest_rel(errors["accumulated"], errors["resnet"])
    assert difference["values"] == pytest.approx([a - b for a, b in zip(errors["accumulated"], errors["resnet"])])
    assert difference["p_value"] == pytest.approx(expected.pvalue)
    assert result["seeds"] == [0, 1, 2]
    # The two sides differ in the net and in the initialisation, and in nothing else.
    assert result["differing"] == {"arch": ["accumulated", "resnet"], "zero_init_residual": [False, True]}


def test_sides_that_differ_in_what_makes_errors_comparable_are_refused(tmp_path):
    other = tmp_path / "records"
    other.mkdir()
    record = json.loads((ZERO_INIT / "resnet-seed0.json").read_text())
    record["summary"]["epochs"] = 5
    (other / "resnet-seed0.json").write_text(json.dumps(record))
    with pytest.raises(RecordError, match="differ in epochs"):
        compare(CompareConfig(str(POWERED), str(other)))


def test_seeds_not_on_both_sides_are_named(tmp_path):
    other = tmp_path / "records"
    other.mkdir()
    shutil.copy(ZERO_INIT / "resnet-seed1.json", other)
    with pytest.raises(RecordError, match="seed.s. 0 are not recorded on both sides .both have 1"):
        compare(CompareConfig(str(POWERED), str(other), seeds="0,1"))
    with pytest.raises(RecordError, match="no record of accumulated"):
        compare(CompareConfig(str(other), str(POWERED)))


def test_the_command_prints_the_primary_metric_first_and_writes_json(tmp_path, capsys):
    out = tmp_path / "comparison.json"
    status = cli.main(["compare", "--records", str(POWERED), "--baseline-records", str(ZERO_INIT),
                       "--seeds", "0,1,2", "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert "zero_init_residual False vs True" in lines[1]
    assert lines[2].startswith("final_test_error (primary): -2.42 [")
    assert json.loads(out.read_text())["differences"]["final_test_error"]["n"] == 3
