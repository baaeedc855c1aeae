"""`accresnet prepare-data`: the dataset checked (or prepared) and held-out images written."""

import numpy as np
import pytest
from PIL import Image

from helpers import run_accresnet
from pipeline.data import datasets
from pipeline.data.specs import DataConfig
from pipeline.data.prepare import write_held_out

pytestmark = pytest.mark.slow  # every test here trains or starts processes


def test_held_out_images_are_the_test_split_one_folder_per_class(tmp_path):
    data = datasets.load(DataConfig("synthetic:300"))
    files = write_held_out(data, tmp_path / "images", 25)
    assert len(files) == 25
    for index, (path, name) in enumerate(files):
        assert path.startswith(str(tmp_path / "images" / name))
        np.testing.assert_array_equal(np.asarray(Image.open(path)), data.test.images[index])
        assert name == data.class_names[data.test.labels[index]]
    # Written again, the folder is replaced whole and no staging folder is left behind.
    assert len(write_held_out(data, tmp_path / "images", 5)) == 5
    assert sum(1 for p in (tmp_path / "images").rglob("*.png")) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["images"]


def test_the_verb(tmp_path):
    code, output = run_accresnet("prepare-data", "--dataset", "synthetic:200", "--images-dir", tmp_path / "img",
                                 "--images", "12")
    assert code == 0, output
    assert "wrote 12 held-out images" in output.splitlines()[-1]
    assert sum(1 for _ in (tmp_path / "img").rglob("*.png")) == 12
    code, output = run_accresnet("prepare-data", "--dataset", "synthetic:200", "--images", "0")
    assert code == 2 and "--images must be positive" in output
