"""`accresnet prepare-data`: put on disk what the other stages read.

Downloads and prepares a TensorFlow Datasets source into --data-dir once (so
that several training workers never download at the same time), and writes
held-out test images as PNG files, one folder per class, for the client to
classify. On Kubernetes a one-shot Job runs it against the shared volume, so
nothing on the volume is made by hand.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import shutil

from PIL import Image

from pipeline.data import datasets
from pipeline.data.specs import DataConfig
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    data: DataConfig
    # Write this many held-out images here (None: no images).
    images_dir: str | None = None
    images: int = 100

    def __post_init__(self):
        if self.images < 1:
            raise ConfigError(f"--images must be positive; got {self.images}")


def write_held_out(data, folder: pathlib.Path, count: int) -> list[tuple[str, str]]:
    """PNG files of the first `count` test (or validation) images, one folder per
    class; returns (path, class name) pairs. The folder is replaced whole."""
    split = data.test if data.test is not None else data.validation
    if split is None:
        raise ConfigError(f"{data.spec} has no test or validation images to hold out")
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    files = []
    for index in range(min(count, len(split))):
        name = data.class_names[int(split.labels[index])]
        path = staging / name / f"{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(split.images[index]).save(path)
        files.append((str(folder / name / path.name), name))
    # A reader (the client Job) sees the old images or the new ones, never half.
    shutil.rmtree(folder, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(folder)
    return files


def prepare(config: PrepareConfig) -> str:
    """Prepare the dataset (and the images); returns a one-line report."""
    data = datasets.load(config.data)
    report = data.describe()
    if config.images_dir:
        files = write_held_out(data, pathlib.Path(config.images_dir), config.images)
        report += f"; wrote {len(files)} held-out images to {config.images_dir}"
    return report
