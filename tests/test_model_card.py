"""Every exported version says where it came from (model_card.json)."""

import json

import numpy as np
from PIL import Image

from pipeline.data import datasets
from pipeline.data.specs import DataConfig
from pipeline.export.model_card import CARD_FILE, add_validation, read


def test_an_export_carries_its_model_card(exported_model, trained_run):
    from pipeline.train.rundir import RunDir

    card = json.loads((exported_model / CARD_FILE).read_text())
    settings = RunDir(trained_run).read_settings()
    # conftest's trained_run: accumulated ResNet-8, synthetic:400, the quick recipe, 2 epochs.
    assert card["model"]["architecture"] == "accumulated" and card["model"]["depth"] == 8
    assert card["model"]["classes"] == list(settings.class_names)
    training = card["training"]
    assert (training["recipe"], training["seed"], training["epochs"], training["epochs_completed"]) == (
        "quick", settings.seed, 2, 2), training
    assert training["wall_time_sec"] > 0
    assert card["data"] == {"spec": "synthetic:400", "digest": None}  # generated: no files to digest
    assert {"loss", "accuracy", "test_loss", "test_accuracy"} <= set(card["metrics"])
    made = card["made"]
    assert made["project"]["version"] == "0.1.0" and made["tensorflow"].startswith("2.")
    assert made["project"]["commit"] is None or len(made["project"]["commit"]) == 40


def test_validate_extends_the_card_and_keeps_what_export_wrote(exported_model, tmp_path):
    import shutil

    folder = tmp_path / "1"
    shutil.copytree(exported_model, folder)
    card = add_validation(folder, {"verdict": "blessed", "accuracy": 0.5})
    assert card.validation["verdict"] == "blessed" and card.validation["time"].endswith("Z")
    written = json.loads((folder / CARD_FILE).read_text())
    assert written["model"] == json.loads((exported_model / CARD_FILE).read_text())["model"]
    assert written == json.loads(json.dumps(card.to_json())) and read(folder) == card  # reads back as written


def test_a_card_that_cannot_be_read_is_replaced_by_one_that_says_so(tmp_path):
    (tmp_path / CARD_FILE).write_text('{"model": {"architecture": "accumulated"}}')  # a section cut short
    card = add_validation(tmp_path, {"verdict": "refused"})
    assert card.model is None and card.note == f"the {CARD_FILE} found here could not be read"
    assert json.loads((tmp_path / CARD_FILE).read_text())["validation"]["verdict"] == "refused"


def test_the_data_digest_covers_the_files_a_spec_reads(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "pictures" / name).mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(tmp_path / "pictures" / name / "a.png")
    spec = DataConfig(f"folder:{tmp_path / 'pictures'}")
    first = datasets.files_digest(spec)
    assert len(first) == 64 and datasets.files_digest(spec) == first
    Image.fromarray(np.full((32, 32, 3), 8, np.uint8)).save(tmp_path / "pictures" / "dog" / "a.png")
    assert datasets.files_digest(spec) != first
    assert datasets.files_digest(DataConfig("synthetic:400")) is None
