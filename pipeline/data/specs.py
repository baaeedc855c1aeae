"""Dataset specs and DataConfig: where the images come from and how they are split and fed.

The one list of the specs (for --help, the errors and the docs) and the data's
settings. Nothing here imports TensorFlow: the command line checks the flags
without it.
"""

from __future__ import annotations

import dataclasses

from pipeline.errors import ConfigError
from pipeline.flags import setting
from serving.contract import IMAGE_SIZE, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE


# Every dataset spec and what it reads: the one list, for --help, the errors and the docs.
DATASET_SPECS = (
    ("synthetic[:N]", "built in and offline; N training images (default 10000)"),
    ("synthetic-hard[:N]", "the same classes under heavy noise, clutter and occlusion"),
    ("cifar10", "CIFAR-10 from TensorFlow Datasets (--data-dir)"),
    ("cifar100", "CIFAR-100 from TensorFlow Datasets (--data-dir)"),
    ("tfds:NAME", "any TensorFlow Datasets image classification set"),
    ("folder:PATH", "one subfolder per class, or PATH/train and PATH/test of those"),
    ("cifar-bin:PATH", "the CIFAR-10/100 binary release, folder or .tar.gz"),
)
DATASET_SPECS_LIST = ", ".join(spec for spec, _ in DATASET_SPECS)


def _datasets_help() -> str:
    return "; ".join(f"{spec}: {meaning}" for spec, meaning in DATASET_SPECS)


def check_image_size(size: int) -> None:
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"--image-size must be within {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE}; got {size}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split and fed."""

    spec: str = setting("synthetic", flag="--dataset", metavar="SPEC", help=_datasets_help())
    data_dir: str | None = setting(None, help="TensorFlow Datasets data directory for cifar10, cifar100 and tfds:")
    # None takes the source's own split (He et al.'s 5k of 50k for CIFAR, 10% otherwise).
    val_split: float | None = setting(
        None, help="fraction of the training split held out for validation",
        unset="the source's validation split, else 0.1: 45k/5k on CIFAR")
    augment: bool = setting(True, flag="--no-augment",
                            help="turn off the recipe's augmentation of the training images (He et al.'s "
                                 "pad-crop-flip, or the Keras example's shift-flip)")
    skip_bad_images: bool = setting(
        False, help="skip unreadable files of a folder: dataset (counted in the log) instead of failing")
    train_images: int | None = setting(
        None, help="train on N images of the training split only, a fixed choice with as many of each class "
                   "as it holds", unset="the recipe's, else all")
    image_size: int = setting(
        IMAGE_SIZE, metavar="S", help="the side of the square images the model trains on and serves: images of "
                                      "another size are resized to S x S (the log says how many), and the "
                                      "export declares [batch, S, S, 3]")

    def __post_init__(self):
        check_image_size(self.image_size)
        if self.val_split is not None and not 0.0 <= self.val_split < 1.0:
            raise ConfigError(f"--val-split must be in [0, 1); got {self.val_split}")
        if self.train_images is not None and self.train_images < 1:
            raise ConfigError(f"--train-images must be positive; got {self.train_images}")
