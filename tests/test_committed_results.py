"""The committed tables and results are what `accresnet report` rebuilds from the committed records."""

import json
import pathlib

import pytest

from pipeline.research.configs import ReportConfig
from pipeline.research.report import FIGURES, report

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
# Every experiment folder whose records sit beside the table made from them.
REPORTED = sorted(records.parent for records in DOCS.rglob("records")
                  if (records.parent / "results.json").exists())


def test_the_reported_folders_include_the_full_cifar10_comparison():
    assert DOCS / "cifar10" / "paper50" in REPORTED and len(REPORTED) >= 5


@pytest.mark.parametrize("folder", REPORTED, ids=lambda folder: str(folder.relative_to(DOCS)))
def test_the_committed_table_is_the_one_the_records_rebuild(folder, tmp_path):
    committed = json.loads((folder / "results.json").read_text())
    primary = committed["primary_metric"]["name"]
    report(ReportConfig(str(folder / "records"), out_dir=str(tmp_path), primary_metric=primary))
    assert json.loads((tmp_path / "results.json").read_text()) == committed
    assert (tmp_path / "table.md").read_text() == (folder / "table.md").read_text()
    for filename, _, _ in FIGURES:
        assert (folder / filename).exists(), f"{folder.name} lacks {filename}"


def test_the_documents_quote_the_paper50_primary_difference_the_records_give():
    results = json.loads((DOCS / "cifar10" / "paper50" / "results.json").read_text())
    primary = results["paired"]["accumulated - resnet"][results["primary_metric"]["name"]]
    numbers = [f"{abs(primary['mean']):.2f}", *(f"{bound:.2f}" for bound in primary["ci95"])]
    for document in ("README.md", "docs/results.md", "docs/cifar10/paper50/result.md"):
        text = (DOCS.parent / document).read_text()
        assert all(number in text for number in numbers), f"{document} does not quote {numbers}"


def test_the_documents_quote_the_he2016_test_error_the_records_give():
    results = json.loads((DOCS / "cifar10" / "he2016" / "results.json").read_text())
    measured, published = (results["per_arch"]["resnet"]["final_test_error"]["mean"],
                           results["he2016_table6"]["resnet"]["final_test_error"])
    assert published == 7.51
    plain, gap = f"{measured:.2f}", f"{measured - published:.2f}"
    for document in ("README.md", "docs/results.md", "docs/cifar10/he2016/result.md"):
        text = (DOCS.parent / document).read_text()
        assert plain in text and gap in text, f"{document} does not quote {plain} and {gap}"
