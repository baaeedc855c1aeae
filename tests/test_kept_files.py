"""What earlier code wrote still reads back: the committed run records, a run directory and an
export written before pipeline/ became packages by stage (tests/data/accresnet_run and
tests/data/accresnet_export, both of one run:

    accresnet train --arch accumulated --depth 8 --dataset synthetic:40 --val-split 0 --steps 1 \
        --batch-size 8 --model-dir RUN --export-base EXPORTS

with the code of commit 5cfa01f)."""

import pathlib
import shutil

import pytest

from pipeline import flags
from pipeline.research.records import read_records
from pipeline.research.report import context_of
from pipeline.settings.config import TrainConfig
from pipeline.train.rundir import ResumeMismatch, RunDir

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
DATA = pathlib.Path(__file__).resolve().parent / "data"
EARLIER_RUN = DATA / "accresnet_run"
EARLIER_EXPORT = DATA / "accresnet_export" / "1"
# The flags of that run, as a resume must give them again.
EARLIER_FLAGS = dict(arch="accumulated", depth=8, dataset="synthetic:40", val_split=0.0, steps=1, batch_size=8,
                     progress=False)


def records_folders() -> list[pathlib.Path]:
    return sorted({path.parent for path in DOCS.rglob("records/*.json")})


def test_there_are_committed_records_to_read():
    assert len(records_folders()) >= 5


@pytest.mark.parametrize("folder", records_folders(), ids=lambda folder: str(folder.relative_to(DOCS)))
def test_every_committed_record_reads_back(folder):
    records = read_records(folder)
    assert records and all(record.history and record.summary.is_finished for record in records)


@pytest.mark.parametrize("folder", records_folders(), ids=lambda folder: str(folder.relative_to(DOCS)))
def test_each_records_folder_is_one_experiment_to_report(folder):
    # Records written before a setting existed (paper50's resnet seed 0 has no "set") and after it
    # still make one experiment.
    context = context_of(read_records(folder))
    assert context["arches"] and context["seeds"]


def test_an_earlier_run_directory_reads_back():
    run = RunDir(EARLIER_RUN)
    settings, summary = run.read_settings(), run.read_summary()
    assert (settings.arch, settings.depth, settings.total_steps, settings.dataset) == ("accumulated", 8, 1,
                                                                                         "synthetic:40")
    assert summary.is_finished and summary.settings == settings
    assert [row.epoch for row in run.read_history()] == [1]


@pytest.mark.slow
def test_an_earlier_run_resumes_with_its_flags_and_refuses_others(tmp_path):
    from pipeline.train.loop import train

    copy = shutil.copytree(EARLIER_RUN, tmp_path / "run")
    # Its settings pass the resume check and its checkpoint restores into today's model and optimizer.
    summary = train(flags.build(TrainConfig, {**EARLIER_FLAGS, "model_dir": str(copy)}))
    assert (summary.initial_step, summary.steps_completed, summary.epochs_completed) == (1, 1, 1)
    with pytest.raises(ResumeMismatch, match="seed 0 -> 1"):
        train(flags.build(TrainConfig, {**EARLIER_FLAGS, "model_dir": str(copy), "seed": 1}))


def test_an_earlier_export_passes_the_gate_and_keeps_its_model_card():
    from pipeline.export import model_card
    from pipeline.release.op_gate import graph_ops, refusal

    assert refusal(graph_ops(EARLIER_EXPORT)) is None
    card = model_card.read(EARLIER_EXPORT)
    assert (card.model.architecture, card.model.depth, card.note) == ("accumulated", 8, None)


@pytest.mark.slow
def test_an_earlier_export_loads_and_answers():
    import tensorflow as tf

    model = tf.saved_model.load(str(EARLIER_EXPORT))
    answer = model.signatures["serving_default"](images=tf.zeros((2, 32, 32, 3), tf.uint8))
    assert answer["probabilities"].shape == (2, 10)
    assert abs(float(tf.reduce_sum(answer["probabilities"][0])) - 1.0) < 1e-4
