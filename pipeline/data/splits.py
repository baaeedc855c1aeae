"""The images of a dataset in memory: its splits as uint8 arrays, and the errors reading them.

A 32x32 image is 3 KiB, so even CIFAR's 60k images take 180 MiB; a source
that would not fit is refused before it is decoded.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from pipeline.errors import UserError
from serving.contract import IMAGE_SIZE, image_shape


class DatasetError(UserError, ValueError):
    """A dataset that cannot be read; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, S, S, 3]
    labels: np.ndarray  # int64 [N]

    def __post_init__(self):
        shape = self.images.shape
        if self.images.dtype != np.uint8 or len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
            raise DatasetError(f"images must be uint8 [N, S, S, 3]; got {self.images.dtype} {shape}")
        if self.labels.shape != (len(self.images),):
            raise DatasetError(f"{len(self.images)} images but labels of shape {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray) -> Split:
        return Split(self.images[indices], self.labels[indices])


@dataclasses.dataclass(frozen=True)
class ImageData:
    spec: str
    class_names: tuple[str, ...]
    train: Split
    validation: Split | None
    test: Split | None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return self.train.images.shape[1]

    def pixel_mean(self) -> np.ndarray:
        """Per-pixel mean of the training images, float32 [S, S, 3] in [0, 1]."""
        return (self.train.images.mean(axis=0, dtype=np.float64) / 255.0).astype(np.float32)

    def describe(self) -> str:
        sizes = ", ".join(
            f"{name} {len(split)}"
            for name, split in (("train", self.train), ("validation", self.validation), ("test", self.test))
            if split is not None
        )
        return f"{self.spec}: {self.num_classes} classes; {sizes} images"


@dataclasses.dataclass(frozen=True)
class Source:
    """What a reader returns before the validation split is carved out."""

    class_names: tuple[str, ...]
    train: Split
    test: Split | None = None
    validation: Split | None = None


def check_fits_in_memory(count: int, what: str, size: int = IMAGE_SIZE) -> None:
    needed = count * int(np.prod(image_shape(size)))
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if needed > 0.8 * available:
        raise DatasetError(
            f"{what}: {count} images need {needed / 2**30:.1f} GiB decoded in memory, "
            f"but only {available / 2**30:.1f} GiB are free; use a subset of the data"
        )
