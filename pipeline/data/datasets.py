"""Dataset specs -> decoded images in memory, split into train/validation/test.

A spec names a source; specs.DATASET_SPECS lists them all, with what each reads.
Every source is decoded once into uint8 [N, S, S, 3] arrays (splits.py), which
training then reads at memory speed through tf.data (input_pipeline.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib
import socket
import tarfile
import tempfile

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from pipeline.cache import project_cache
from pipeline.data import folders, synthetic
from pipeline.data.specs import DATASET_SPECS_LIST, DataConfig
from pipeline.data.splits import DatasetError, ImageData, Source, Split, check_fits_in_memory
from pipeline.digests import combined_digest, file_sha256
from serving import images as image_files
from serving.contract import IMAGE_SIZE, image_shape

log = logging.getLogger(__name__)

DEFAULT_SYNTHETIC_SIZE = 10_000
# He et al.'s 45k/5k split of CIFAR's 50k training images; 10% elsewhere too.
DEFAULT_VAL_SPLIT = 0.1
# The validation split does not move with --seed, so runs with different
# seeds are evaluated on the same images.
SPLIT_SEED = 0


def load(config: DataConfig) -> ImageData:
    """Read the dataset named by `config.spec` and split it."""
    kind, _, argument = config.spec.partition(":")
    readers = {
        "synthetic": lambda: _read_synthetic(argument, synthetic.EASY),
        "synthetic-hard": lambda: _read_synthetic(argument, synthetic.HARD),
        "cifar10": lambda: _read_tfds("cifar10", config.data_dir, config.image_size),
        "cifar100": lambda: _read_tfds("cifar100", config.data_dir, config.image_size),
        "tfds": lambda: _read_tfds(argument, config.data_dir, config.image_size),
        "folder": lambda: folders.read_folder_tree(argument, config.skip_bad_images, config.image_size),
        "cifar-bin": lambda: _read_cifar_binary(argument),
    }
    if kind not in readers or (kind in ("cifar10", "cifar100") and argument):
        raise DatasetError(f"unknown dataset {config.spec!r}; expected one of {DATASET_SPECS_LIST}")
    if kind in ("tfds", "folder", "cifar-bin") and not argument:
        raise DatasetError(f"dataset {kind}: needs a {'NAME' if kind == 'tfds' else 'PATH'}, e.g. {kind}:...")
    source = _at_size(readers[kind](), config.image_size, config.spec)
    train, validation = _split_validation(source, config.val_split)
    if config.train_images is not None and config.train_images < len(train):
        train = _class_balanced_subset(train, config.train_images)
    if len(train) == 0:
        raise DatasetError(f"{config.spec}: no training images")
    data = ImageData(config.spec, source.class_names, train, validation, source.test)
    log.info("dataset %s", data.describe())
    return data


def files_digest(config: DataConfig) -> str | None:
    """One SHA-256 over the files the spec reads (by their paths below its folder), for the
    records a model carries; None for generated data, which has no files."""
    kind, _, argument = config.spec.partition(":")
    if kind in ("cifar10", "cifar100", "tfds"):
        root = pathlib.Path(tfds.builder(argument if kind == "tfds" else kind, data_dir=config.data_dir).data_dir)
    elif kind in ("folder", "cifar-bin"):
        root = pathlib.Path(argument).expanduser()
    else:
        return None
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return combined_digest({(p.name if p == root else p.relative_to(root).as_posix()): file_sha256(p) for p in files})


def _split_validation(source: Source, fraction: float | None) -> tuple[Split, Split | None]:
    if fraction is None and source.validation is not None:
        return source.train, source.validation
    fraction = DEFAULT_VAL_SPLIT if fraction is None else fraction
    count = int(round(len(source.train) * fraction))
    if count == 0:
        return source.train, None
    order = np.random.default_rng(SPLIT_SEED).permutation(len(source.train))
    return source.train.take(np.sort(order[count:])), source.train.take(np.sort(order[:count]))


def _class_balanced_subset(split: Split, count: int) -> Split:
    """`count` images of the split, a fixed random choice spread evenly over the classes.

    Folder and binary sources list their images class by class, so the first
    N images would be a few classes only (the first 4000 of the CIFAR-10
    folder subset are 4.4 of its 10 classes). Images are dealt out round-robin
    over the classes, each class in a fixed random order, and keep their order
    in the split.
    """
    order = np.random.default_rng(SPLIT_SEED).permutation(len(split))
    labels = split.labels[order]
    rank_in_class = np.empty(len(order), np.int64)
    for label in np.unique(labels):
        members = labels == label
        rank_in_class[members] = np.arange(members.sum())
    chosen = order[np.argsort(rank_in_class, kind="stable")[:count]]
    return split.take(np.sort(chosen))


# --- synthetic -------------------------------------------------------------


def _read_synthetic(argument: str, difficulty: synthetic.Difficulty) -> Source:
    try:
        count = int(argument) if argument else DEFAULT_SYNTHETIC_SIZE
    except ValueError:
        raise DatasetError(f"synthetic:N needs an integer N; got {argument!r}") from None
    if count < 10:
        raise DatasetError(f"synthetic:N needs at least 10 images; got {count}")
    (train_x, train_y), (test_x, test_y) = synthetic.train_and_test(count, difficulty)
    return Source(synthetic.CLASS_NAMES, Split(train_x, train_y), Split(test_x, test_y))


# --- folder ------------------------------------------------------------------


def _at_size(source: Source, size: int, spec: str) -> Source:
    """The source with every split at size x size, resized as the client resizes (Pillow,
    bilinear) where a reader gave another size, with one line saying so."""
    splits = {name: getattr(source, name) for name in ("train", "test", "validation")}
    native = {split.images.shape[1] for split in splits.values() if split is not None and len(split)} - {size}
    if not native:
        return source
    log.info("%s: images of %s resized to %dx%d (--image-size %d)", spec,
             ", ".join(f"{n}x{n}" for n in sorted(native)), size, size, size)
    resized = {name: Split(np.stack([image_files.to_pixels(Image.fromarray(image), size) for image in split.images])
                           if len(split) else np.zeros((0, *image_shape(size)), np.uint8), split.labels)
               for name, split in splits.items() if split is not None}
    return dataclasses.replace(source, **resized)


# --- CIFAR binary release -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _BinaryLayout:
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_bytes: int  # CIFAR-100 records carry a coarse and a fine label
    names_file: str


_CIFAR10_BIN = _BinaryLayout(tuple(f"data_batch_{i}.bin" for i in range(1, 6)), ("test_batch.bin",), 1,
                             "batches.meta.txt")
_CIFAR100_BIN = _BinaryLayout(("train.bin",), ("test.bin",), 2, "fine_label_names.txt")
_PIXEL_BYTES = 32 * 32 * 3


def _read_cifar_binary(location: str) -> Source:
    path = pathlib.Path(location).expanduser()
    if not path.exists():
        raise DatasetError(f"cifar-bin:{location}: no such file or directory")
    if path.is_file():
        path = _extract_archive(path)
    for layout in (_CIFAR10_BIN, _CIFAR100_BIN):
        first = next(iter(sorted(path.rglob(layout.train_files[0]))), None)
        if first is not None:
            return _read_binary_layout(first.parent, layout)
    raise DatasetError(
        f"cifar-bin:{location}: no data_batch_1.bin (CIFAR-10) or train.bin (CIFAR-100) inside; "
        "expected the binary release from https://www.cs.toronto.edu/~kriz/cifar.html"
    )


def _extract_archive(archive: pathlib.Path) -> pathlib.Path:
    """Unpack a .tar.gz once into a cache folder keyed by the archive's identity."""
    stat = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = project_cache()
    target = cache / f"{archive.name}-{key}"
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=cache, prefix=".extract-"))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DatasetError(f"cifar-bin:{archive}: not a readable tar archive ({error})") from None
    staging.rename(target)  # atomic: a half-extracted cache is never used
    return target


def _read_binary_layout(folder: pathlib.Path, layout: _BinaryLayout) -> Source:
    record_bytes = layout.label_bytes + _PIXEL_BYTES

    def read(names: tuple[str, ...]) -> Split:
        files = [folder / name for name in names]
        for file in files:
            if not file.is_file():
                raise DatasetError(f"cifar-bin:{folder}: {file.name} is missing")
            if file.stat().st_size % record_bytes:
                raise DatasetError(
                    f"cifar-bin:{file}: size {file.stat().st_size} is not a multiple of the "
                    f"{record_bytes}-byte record; the file is truncated or not a CIFAR batch"
                )

        def decode(record):
            values = tf.io.decode_raw(record, tf.uint8)
            label = tf.cast(values[layout.label_bytes - 1], tf.int64)  # the fine label is last
            image = tf.transpose(tf.reshape(values[layout.label_bytes:], [3, 32, 32]), [1, 2, 0])
            return image, label

        records = tf.data.FixedLengthRecordDataset([str(f) for f in files], record_bytes)
        return _materialize(records.map(decode, num_parallel_calls=tf.data.AUTOTUNE))

    names_file = folder / layout.names_file
    train = read(layout.train_files)
    if names_file.is_file():
        class_names = tuple(line.strip() for line in names_file.read_text().splitlines() if line.strip())
    else:
        class_names = tuple(str(i) for i in range(int(train.labels.max()) + 1))
    test = read(layout.test_files) if all((folder / n).is_file() for n in layout.test_files) else None
    return Source(class_names, train, test)


# --- TensorFlow Datasets --------------------------------------------------------


def _read_tfds(name: str, data_dir: str | None, size: int = IMAGE_SIZE) -> Source:
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as error:  # tfds raises DatasetNotFoundError and friends
        raise DatasetError(f"tfds:{name}: {error}") from None
    if not builder.is_prepared():
        where = builder.data_dir
        if not _online():
            raise DatasetError(
                f"{name} is not prepared in {where} and this machine cannot reach the internet "
                f"to download it. On a machine with internet run `tfds build {name} "
                f"--data_dir DIR` and copy DIR here (then pass --data-dir DIR), or use "
                f"cifar-bin:PATH with the binary release, or the built-in synthetic dataset."
            )
        log.info("downloading and preparing %s into %s", name, where)
        try:
            builder.download_and_prepare()
        except Exception as error:
            raise DatasetError(f"{name}: could not download and prepare it in {where}: {error}") from None
    info = builder.info
    if not info.supervised_keys:
        raise DatasetError(f"tfds:{name} has no (image, label) supervised keys; it is not an image classification set")
    image_key, label_key = info.supervised_keys[:2]
    label_feature = info.features[label_key]
    class_names = tuple(getattr(label_feature, "names", None) or
                        (str(i) for i in range(label_feature.num_classes)))

    def to_image(image, label):
        image = tf.convert_to_tensor(image)
        if image.shape.rank != 3:
            raise DatasetError(f"tfds:{name}: '{image_key}' is not an [H, W, C] image")
        channels = image.shape[-1]
        if channels == 1:
            image = tf.image.grayscale_to_rgb(image)
        elif channels == 4:
            image = image[..., :3]
        if tuple(image.shape[:2]) != (size, size):
            image = tf.image.resize(image, (size, size), antialias=True)
            image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return tf.cast(image, tf.uint8), tf.cast(label, tf.int64)

    def read(split: str) -> Split:
        if split in info.splits:
            check_fits_in_memory(info.splits[split].num_examples, f"tfds:{name}[{split}]", size)
        dataset = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
        return _materialize(dataset.map(to_image, num_parallel_calls=tf.data.AUTOTUNE), size)

    # Split metadata can be missing (generated test data); try the usual two then.
    splits = set(info.splits.keys()) or {"train", "test"}
    if "train" not in splits:
        raise DatasetError(f"tfds:{name} has no 'train' split (it has {sorted(splits)})")
    return Source(
        class_names,
        read("train"),
        test=read("test") if "test" in splits else None,
        validation=read("validation") if "validation" in splits else None,
    )


def _online(host: str = "storage.googleapis.com", timeout: float = 5.0) -> bool:
    """Whether a download could work; tfds would otherwise retry for minutes."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# --- shared ---------------------------------------------------------------------


def _materialize(dataset, size: int = IMAGE_SIZE) -> Split:
    """Drain a tf.data dataset of (image, label) into numpy arrays."""
    images, labels = [], []
    for image_batch, label_batch in dataset.batch(4096).as_numpy_iterator():
        images.append(image_batch)
        labels.append(label_batch)
    if not images:
        return Split(np.zeros((0, *image_shape(size)), np.uint8), np.zeros((0,), np.int64))
    return Split(np.concatenate(images), np.concatenate(labels).astype(np.int64))
