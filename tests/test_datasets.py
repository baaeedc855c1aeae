import pathlib
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from pipeline.data import datasets, synthetic
from pipeline.data.specs import DataConfig
from pipeline.data.splits import DatasetError

# Real CIFAR-10 photographs as JPEG folders, where the machine has them (never needed).
SUBSET = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-subset"


def load(spec, **kwargs):
    return datasets.load(DataConfig(spec, **kwargs))


# --- synthetic -------------------------------------------------------------------


def test_synthetic_is_deterministic_and_balanced():
    images, labels = synthetic.generate(500, seed=7)
    again, again_labels = synthetic.generate(500, seed=7)
    assert images.dtype == np.uint8 and images.shape == (500, 32, 32, 3)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, again_labels)
    assert set(labels) == set(range(10))
    assert not np.array_equal(images, synthetic.generate(500, seed=8)[0])


def test_synthetic_spec_sizes_and_splits():
    data = load("synthetic:1000")
    assert data.class_names == synthetic.CLASS_NAMES
    assert (len(data.train), len(data.validation), len(data.test)) == (900, 100, 200)
    # The validation split is fixed, whatever the training seed.
    np.testing.assert_array_equal(data.validation.images, load("synthetic:1000").validation.images)


def test_val_split_flag():
    data = load("synthetic:1000", val_split=0.25)
    assert (len(data.train), len(data.validation)) == (750, 250)
    assert load("synthetic:1000", val_split=0.0).validation is None


def test_pixel_mean_is_the_training_mean():
    data = load("synthetic:200")
    mean = data.pixel_mean()
    assert mean.shape == (32, 32, 3) and mean.dtype == np.float32
    np.testing.assert_allclose(mean, data.train.images.astype(np.float64).mean(0) / 255, rtol=1e-5)


@pytest.mark.parametrize("spec, message", [
    ("imagenet", "unknown dataset 'imagenet'"),
    ("synthetic:abc", "integer N"),
    ("folder:", "needs a PATH"),
    ("folder:/no/such/dir", "no such directory"),
    ("cifar-bin:/no/such/file.tar.gz", "no such file"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(DatasetError, match=message):
        load(spec)


# --- folder: ---------------------------------------------------------------------


def _save(path, image, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)


def _class_tree(root, rng):
    """Two classes of images in four formats, odd sizes and every common mode."""
    for name, colour in (("cats", (250, 10, 10)), ("dogs", (10, 10, 250))):
        base = Image.new("RGB", (45, 37), colour)
        _save(root / name / "a.png", base, "PNG")
        _save(root / name / "b.jpg", base.resize((64, 64)), "JPEG")
        _save(root / name / "c.gif", base.convert("P"), "GIF")
        _save(root / name / "d.bmp", base.resize((20, 50)), "BMP")
        _save(root / name / "e.png", base.convert("L"), "PNG")
        _save(root / name / "f.png", base.convert("RGBA"), "PNG")
        _save(root / name / "sub" / "g.png", base.resize((32, 32)), "PNG")
        (root / name / "notes.txt").write_text("not an image")


def test_folder_reads_any_format_size_and_mode(tmp_path):
    _class_tree(tmp_path, np.random.default_rng(0))
    data = load(f"folder:{tmp_path}", val_split=0.0)
    assert data.class_names == ("cats", "dogs")
    assert data.train.images.shape == (14, 32, 32, 3)
    labels = data.train.labels
    assert list(np.bincount(labels)) == [7, 7]
    # Colour survives every format and mode but greyscale (red-ish vs blue-ish).
    colour_images = [i for i in range(14) if i % 7 != 4]
    red = data.train.images[colour_images, 16, 16, 0].astype(int)
    blue = data.train.images[colour_images, 16, 16, 2].astype(int)
    assert np.all((red > blue) == (labels[colour_images] == 0))


def test_folder_with_train_and_test_subfolders(tmp_path):
    _class_tree(tmp_path / "train", None)
    _class_tree(tmp_path / "test", None)
    data = load(f"folder:{tmp_path}")
    assert len(data.test) == 14
    assert len(data.train) + len(data.validation) == 14


def test_folder_unreadable_images_are_named_or_skipped(tmp_path):
    _class_tree(tmp_path, None)
    (tmp_path / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "dogs" / "empty.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"cannot read 2 image.*broken\.png.*--skip-bad-images"):
        load(f"folder:{tmp_path}")
    data = load(f"folder:{tmp_path}", skip_bad_images=True, val_split=0.0)
    assert len(data.train) == 14


def test_folder_needs_two_classes(tmp_path):
    _save(tmp_path / "only" / "a.png", Image.new("RGB", (8, 8)), "PNG")
    with pytest.raises(DatasetError, match="at least two"):
        load(f"folder:{tmp_path}")


def test_train_images_takes_every_class_not_the_first_folders(tmp_path):
    # Folders are read class by class: the first 9 of 30 would be class "a" only.
    for name in ("a", "b", "c"):
        for i in range(10):
            _save(tmp_path / name / f"{i}.png", Image.new("RGB", (8, 8), (i, 0, 0)), "PNG")
    data = load(f"folder:{tmp_path}", val_split=0.0, train_images=9)
    assert list(np.bincount(data.train.labels, minlength=3)) == [3, 3, 3]
    again = load(f"folder:{tmp_path}", val_split=0.0, train_images=9)
    np.testing.assert_array_equal(data.train.images, again.train.images)
    assert len(load(f"folder:{tmp_path}", val_split=0.0, train_images=10).train) == 10


@pytest.mark.slow
@pytest.mark.skipif(not SUBSET.is_dir(), reason="the CIFAR-10 folder subset is not on this machine")
def test_train_images_of_the_cifar10_folder_subset_are_balanced():
    data = load(f"folder:{SUBSET}", train_images=4000)
    assert list(np.bincount(data.train.labels, minlength=10)) == [400] * 10


# --- cifar-bin: -----------------------------------------------------------------------


def _cifar_batch(count, label_bytes, seed):
    """Records in the release's layout: label byte(s), then 1024 R, 1024 G, 1024 B bytes."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, count).astype(np.uint8)
    records = []
    for image, label in zip(images, labels):
        head = bytes([label]) if label_bytes == 1 else bytes([label // 2, label])
        records.append(head + image.transpose(2, 0, 1).tobytes())
    return b"".join(records), images, labels


def _write_cifar10(folder):
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for i in range(1, 6):
        raw, images, labels = _cifar_batch(4, 1, seed=i)
        (folder / f"data_batch_{i}.bin").write_bytes(raw)
        expected[f"train{i}"] = (images, labels)
    raw, images, labels = _cifar_batch(5, 1, seed=99)
    (folder / "test_batch.bin").write_bytes(raw)
    expected["test"] = (images, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    return expected


def test_cifar_bin_folder_in_the_real_byte_layout(tmp_path):
    expected = _write_cifar10(tmp_path / "cifar-10-batches-bin")
    data = load(f"cifar-bin:{tmp_path}", val_split=0.0)
    assert data.class_names[:2] == ("airplane", "automobile") and data.num_classes == 10
    train_images = np.concatenate([expected[f"train{i}"][0] for i in range(1, 6)])
    train_labels = np.concatenate([expected[f"train{i}"][1] for i in range(1, 6)])
    np.testing.assert_array_equal(data.train.images, train_images)
    np.testing.assert_array_equal(data.train.labels, train_labels)
    np.testing.assert_array_equal(data.test.images, expected["test"][0])


def test_cifar_bin_tar_gz(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    expected = _write_cifar10(tmp_path / "src" / "cifar-10-batches-bin")
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    data = load(f"cifar-bin:{archive}", val_split=0.0)
    np.testing.assert_array_equal(data.test.labels, expected["test"][1])
    assert len(data.train) == 20
    # The second read uses the unpacked cache.
    assert len(load(f"cifar-bin:{archive}", val_split=0.0).train) == 20


def test_cifar100_bin_uses_the_fine_label(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    raw, images, labels = _cifar_batch(6, 2, seed=3)
    (folder / "train.bin").write_bytes(raw)
    data = load(f"cifar-bin:{tmp_path}", val_split=0.0)
    np.testing.assert_array_equal(data.train.labels, labels)
    np.testing.assert_array_equal(data.train.images, images)


def test_cifar_bin_truncated_file(tmp_path):
    _write_cifar10(tmp_path)
    with open(tmp_path / "data_batch_3.bin", "ab") as file:
        file.write(b"\0" * 100)
    with pytest.raises(DatasetError, match="data_batch_3.bin.*not a multiple of the 3073-byte record"):
        load(f"cifar-bin:{tmp_path}")


def test_cifar_bin_not_an_archive(tmp_path):
    bogus = tmp_path / "cifar.tar.gz"
    bogus.write_bytes(b"hello")
    with pytest.raises(DatasetError, match="not a readable tar archive"):
        load(f"cifar-bin:{bogus}")


# --- TensorFlow Datasets ------------------------------------------------------------------


@pytest.mark.parametrize("spec, classes", [("cifar10", 10), ("cifar100", 100), ("tfds:mnist", 10)])
def test_tfds_sources(spec, classes, monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "_online", lambda: True)
    with tfds.testing.mock_data(num_examples=30):
        data = load(spec, data_dir=str(tmp_path))
    assert data.num_classes == classes
    assert data.train.images.dtype == np.uint8 and data.train.images.shape == (27, 32, 32, 3)
    assert len(data.validation) == 3 and len(data.test) == 30
    assert data.train.labels.max() < classes


def test_tfds_offline_and_not_prepared_says_how_to_get_the_data(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "_online", lambda: False)
    with pytest.raises(DatasetError, match=r"cifar10 is not prepared in .* cannot reach the internet.*tfds build"):
        load("cifar10", data_dir=str(tmp_path))


def test_photographs_are_turned_upright_by_their_exif_orientation(tmp_path):
    from serving.images import read_pixels

    photo = Image.new("RGB", (400, 200), (10, 10, 240))
    photo.paste((240, 10, 10), (0, 0, 200, 200))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    photo.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    pixels = read_pixels(str(tmp_path / "photo.jpg")).astype(int)
    assert pixels.shape == (32, 32, 3)
    assert pixels[4, 16, 0] > 200 and pixels[4, 16, 2] < 50  # the red half is now on top
    assert pixels[28, 16, 2] > 200 and pixels[28, 16, 0] < 50


def test_folder_reads_a_file_whose_name_is_not_utf8_and_refuses_such_a_class_folder(tmp_path):
    """A Latin-1 file name (b"caf\xe9.png") is read like any other and hashed by its bytes; a class
    folder so named is refused in one line naming it, as class names are served as UTF-8."""
    import hashlib
    import os

    from pipeline.digests import file_sha256

    _class_tree(tmp_path, None)
    odd = pathlib.Path(os.fsdecode(bytes(tmp_path / "cats") + b"/caf\xe9.png"))
    _save(odd, Image.new("RGB", (32, 32), (250, 10, 10)), "PNG")
    data = load(f"folder:{tmp_path}", val_split=0.0)
    assert list(np.bincount(data.train.labels)) == [8, 7]
    digest = datasets.files_digest(DataConfig(f"folder:{tmp_path}"))
    names = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    lines = b"".join(f"{file_sha256(tmp_path / name)}  ".encode() + os.fsencode(name) + b"\n" for name in names)
    assert digest == hashlib.sha256(lines).hexdigest()  # sha256sum's lines of the names' bytes

    os.rename(bytes(tmp_path / "dogs"), bytes(tmp_path) + b"/d\xf6gs")
    with pytest.raises(DatasetError, match=r"class folder name\(s\) 'd\\udcf6gs' are not UTF-8"):
        load(f"folder:{tmp_path}")
