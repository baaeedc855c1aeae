"""The image size is the model's: a run trains at --image-size, the export declares it, the
server serves it as declared, and one client classifies for a 32x32 and a 64x64 model alike,
reading the size from the model's metadata."""

import json
import logging
import pathlib

import numpy as np
import pytest
from PIL import Image

from helpers import deployed_server
from pipeline.data import datasets
from pipeline import flags
from pipeline.settings.config import TrainConfig
from pipeline.data.specs import DataConfig
from pipeline.export.saved_model import export_run
from pipeline.train.loop import train
from pipeline.release.op_gate import read_saved_model
from pipeline.release.validate import declared_image_size
from serving.client import Classifier
from serving.rest_client import RestClassifier

pytestmark = pytest.mark.slow
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 50, 220)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A user's own classes as 64x64 PNGs: each class a colour, with noise and a stripe."""
    root = tmp_path_factory.mktemp("own-64")
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / name).mkdir()
        for number in range(40):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (64, 64, 3)), 0, 255).astype(np.uint8)
            pixels[rng.integers(0, 56):, :, :] //= 2
            Image.fromarray(pixels).save(root / name / f"{number}.png")
    return root


def trained_and_exported(folder, work, **settings):
    run = work / "run"
    summary = train(flags.build(TrainConfig, dict(model_dir=str(run), arch="resnet", depth=8,
                                                  dataset=f"folder:{folder}", recipe="quick", epochs=3,
                                                  batch_size=16, progress=False, **settings)))
    return summary, pathlib.Path(export_run(run, work / "models" / "accresnet"))


@pytest.fixture(scope="module")
def models(folder, tmp_path_factory):
    return {size: trained_and_exported(folder, tmp_path_factory.mktemp(f"size-{size}"), image_size=size)
            for size in (32, 64)}


def test_a_folder_of_another_size_is_resized_with_one_message(folder, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.data"):
        data = datasets.load(DataConfig(f"folder:{folder}"))
    assert data.image_size == 32 and data.train.images.shape[1:] == (32, 32, 3)
    lines = [r.getMessage() for r in caplog.records if "resized" in r.getMessage()]
    assert len(lines) == 1 and "120 of 120 images are not 32x32 (64x64): resized to 32x32 (--image-size 32)" \
        in lines[0], lines
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.data"):
        data = datasets.load(DataConfig(f"folder:{folder}", image_size=64))
    assert data.train.images.shape[1:] == (64, 64, 3) and "resized" not in caplog.text
    with caplog.at_level(logging.INFO, logger="pipeline.data"):
        data = datasets.load(DataConfig("synthetic:40", image_size=48))
    assert data.train.images.shape[1:] == (48, 48, 3) and "images of 32x32 resized to 48x48" in caplog.text


def test_the_run_records_and_the_export_declares_its_size(models):
    for size, (summary, exported) in models.items():
        assert summary.settings.image_size == size
        card = json.loads((exported / "model_card.json").read_text())
        assert card["model"]["image_size"] == size
        assert declared_image_size(read_saved_model(exported)) == size


def test_one_client_classifies_for_either_size(models, folder, tmp_path):
    files = [str(folder / name / "0.png") for name in COLOURS]
    for size, (_, exported) in models.items():
        server = deployed_server(exported.parent.parent, tmp_path / f"config-{size}")
        try:
            for signature in ("serving_default", "serving_bytes"):
                with Classifier(f"localhost:{server.port}", signature=signature) as classifier:
                    if signature == "serving_default":
                        assert classifier.image_size == size
                    predictions = list(classifier.classify_files(files, top_k=1))
                assert [p.path for p in predictions] == files
                assert [p.top_k[0][0] for p in predictions] == list(COLOURS), (size, signature)
            with RestClassifier(f"localhost:{server.rest_port}") as classifier:
                assert classifier.image_size == size
                assert [p.top_k[0][0] for p in classifier.classify_files(files, top_k=1)] == list(COLOURS)
        finally:
            server.stop(grace=2)
