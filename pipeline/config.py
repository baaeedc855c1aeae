"""Configuration dataclasses and the training recipes.

Nothing here imports TensorFlow, so the command line can parse and validate
flags (and answer `--help`) without paying for the TensorFlow import.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from pipeline.flags import setting

ARCHES = ("resnet", "accumulated", "wrn", "accumulated-wrn", "resnext", "accumulated-resnext")
# Depth as a function of n, the blocks per stage, in each family.
_DEPTH_RULES = {
    "resnet": (6, 2, "8, 20, 32, 44, 56, 110"),   # He et al.: 3 stages of n two-conv blocks, stem, classifier
    "wrn": (6, 4, "10, 16, 22, 28, 40"),          # Zagoruyko & Komodakis: WRN-d-k, d = 6n+4
    "resnext": (9, 2, "11, 20, 29, 38"),          # Xie et al.: three-conv bottleneck blocks, d = 9n+2
}


def arch_family(arch: str) -> str:
    """"resnet", "wrn" or "resnext", for the plain and the accumulated variant alike."""
    return "resnet" if arch in ("resnet", "accumulated") else arch.removeprefix("accumulated-")


def is_accumulated(arch: str) -> bool:
    return arch.startswith("accumulated")


def plain_counterpart(arch: str) -> str:
    """The plain architecture an accumulated one is compared with."""
    return {"accumulated": "resnet"}.get(arch, arch.removeprefix("accumulated-"))


class UserError(Exception):
    """An error whose message tells the user what was wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """Flags or settings that do not make sense together."""


def blocks_per_stage(depth: int, family: str = "resnet") -> int:
    """Residual blocks per stage, n, for a network of the family at this depth."""
    per_block, extra, examples = _DEPTH_RULES[family]
    if depth < per_block + extra or (depth - extra) % per_block:
        raise ConfigError(
            f"depth must be {per_block}n+{extra} with n >= 1 ({examples}, ...) for {family}; got {depth}"
        )
    return (depth - extra) // per_block


# Where a block changes shape: "projection", a 1x1 conv (option B as the Keras
# example builds it, no BN); "projection-bn", the conv and a BN (option B of He
# et al.'s ImageNet nets); "padding", the subsampled identity with zero
# channels appended (He et al.'s option A for CIFAR, no parameters).
SHORTCUTS = ("projection", "projection-bn", "padding")


def check_shortcut(shortcut: str | None) -> None:
    if shortcut is not None and shortcut not in SHORTCUTS:
        raise ConfigError(f"unknown shortcut {shortcut!r}; choose one of {', '.join(SHORTCUTS)}")


DEFAULT_WIDTH = {"resnet": 1, "wrn": 4, "resnext": 4}
DEFAULT_CARDINALITY = 8
# BN settings of He et al.'s Torch/Caffe models; Keras' default momentum of
# 0.99 leaves the moving statistics behind in runs of a few hundred steps.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
# Keras' own, which its cifar10_resnet example keeps.
KERAS_BN_MOMENTUM = 0.99
KERAS_BN_EPSILON = 1e-3
# Keras' L2(l) adds l * sum(w^2) to the loss: a gradient of 2 * l * w. So SGD's
# weight decay d (He et al.'s 1e-4) is L2(d / 2).
HE2016_L2 = 1e-4 / 2
KERAS_L2 = 1e-4


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str = "accumulated"
    depth: int = 32
    num_classes: int = 10
    # The L2 factor of the convolution kernels (Keras' L2: l * sum(w^2)).
    weight_decay: float = KERAS_L2
    # TensorFlow's fused BN kernel; False gives Keras' own layer (a baseline).
    fused_batch_norm: bool = True
    # WRN: the widening factor k. ResNeXt: the width d of each group. None: the family's default.
    width: int | None = None
    # ResNeXt: the number of groups C. None: the default.
    cardinality: int | None = None
    # The shortcut where a block changes shape (SHORTCUTS).
    shortcut: str = "projection"
    # Start the last BN of every residual branch at gamma 0 (Goyal et al. 2017),
    # so that each block starts as its shortcut; see docs/collapse.md.
    zero_init_residual: bool = False
    batch_norm_momentum: float = BN_MOMENTUM
    batch_norm_epsilon: float = BN_EPSILON

    def __post_init__(self):
        check_architecture(self.arch, self.depth, self.width, self.cardinality)
        check_shortcut(self.shortcut)
        if self.num_classes < 2:
            raise ConfigError(f"num_classes must be at least 2; got {self.num_classes}")

    @property
    def family(self) -> str:
        return arch_family(self.arch)

    @property
    def resolved_width(self) -> int:
        return self.width or DEFAULT_WIDTH[self.family]

    @property
    def resolved_cardinality(self) -> int:
        return self.cardinality or DEFAULT_CARDINALITY


def check_architecture(arch: str, depth: int, width: int | None = None, cardinality: int | None = None) -> None:
    if arch not in ARCHES:
        raise ConfigError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHES)}")
    family = arch_family(arch)
    blocks_per_stage(depth, family)
    if width is not None and (width < 1 or family == "resnet" and width != 1):
        raise ConfigError(f"--width is the WRN widening factor or the ResNeXt group width (>= 1); "
                          f"the {arch} net has none")
    if cardinality is not None and (cardinality < 1 or family != "resnext"):
        raise ConfigError("--cardinality (>= 1) is the number of groups of a ResNeXt block")


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

    def __post_init__(self):
        if self.val_split is not None and not 0.0 <= self.val_split < 1.0:
            raise ConfigError(f"--val-split must be in [0, 1); got {self.val_split}")
        if self.train_images is not None and self.train_images < 1:
            raise ConfigError(f"--train-images must be positive; got {self.train_images}")


ScheduleKind = Literal["piecewise", "cosine"]
# Training-image augmentation: "pad-crop", He et al.'s 4-pixel zero pad, random
# 32x32 crop and horizontal flip; "shift", the Keras example's random shift of
# up to 10% each way with the nearest pixels filling in, and horizontal flip.
AUGMENTATIONS = ("pad-crop", "shift")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A training protocol as its source sets it: the optimizer, its
    learning-rate schedule and run length, and the model and data settings the
    source fixes (shortcut, weight decay, BN, initialisation, augmentation).

    The learning rate is given for `batch_size` images per step and follows
    the linear scaling rule: the trainer multiplies it by
    global_batch / batch_size (Goyal et al. 2017).
    """

    name: str
    optimizer: Literal["sgd", "adam"]
    learning_rate: float
    batch_size: int
    momentum: float = 0.0
    schedule: ScheduleKind = "piecewise"
    # Piecewise schedule: boundaries as fractions of the whole run and the
    # factor applied to the learning rate after each boundary.
    boundaries: tuple[float, ...] = ()
    factors: tuple[float, ...] = ()
    # Or boundaries in iterations that do not move with the run's length.
    step_boundaries: tuple[int, ...] = ()
    # Cosine schedule: linear warm-up over this fraction of the run.
    warmup: float = 0.0
    # Train on N images of the training split only, as many of each class (a subset protocol).
    train_images: int | None = None
    # Default length: iterations (steps) or epochs, exactly one set.
    steps: int | None = None
    epochs: int | None = None
    # Where the recipe comes from and where it departs from its source.
    description: str = ""
    # The shortcut where a block changes shape (SHORTCUTS), as the source builds it.
    shortcut: str = "projection"
    # ModelConfig.zero_init_residual for the runs of this recipe (--zero-init-residual overrides it).
    zero_init_residual: bool = False
    # Keras' L2 factor of the convolution kernels: half an SGD weight decay (HE2016_L2).
    weight_decay: float = KERAS_L2
    batch_norm_momentum: float = BN_MOMENTUM
    batch_norm_epsilon: float = BN_EPSILON
    augmentation: str = "pad-crop"

    def __post_init__(self):
        check_shortcut(self.shortcut)
        if self.augmentation not in AUGMENTATIONS:
            raise ConfigError(f"unknown augmentation {self.augmentation!r}; choose one of {', '.join(AUGMENTATIONS)}")


# The subset recipes' length: 15 epochs of the 9,000 training images of the
# CIFAR-10 folder subset, 1,050 steps at batch 128, about 5 minutes per
# ResNet-32 run on a free 2-core AVX-512 machine.
SUBSET_EPOCHS = 15

HE2016 = Recipe(
    name="he2016",
    optimizer="sgd",
    learning_rate=0.1,
    momentum=0.9,
    batch_size=128,
    boundaries=(32_000 / 64_000, 48_000 / 64_000),
    factors=(0.1, 0.01),
    steps=64_000,
    shortcut="padding",
    weight_decay=HE2016_L2,
    description="He et al. 2016 Sec. 4.2: option A shortcuts, SGD momentum 0.9, batch 128, weight decay 1e-4 "
    "(Keras L2 5e-5), lr 0.1 divided by 10 at 32k and 48k of 64k iterations, 4-pixel zero pad, random crop and "
    "flip; BN momentum 0.9, epsilon 1e-5 (Torch's). Not said by He et al.: decay on the convolution kernels "
    "only, not on BN or the classifier",
)

KERAS = Recipe(
    name="keras",
    optimizer="adam",
    learning_rate=1e-3,
    batch_size=32,
    # The example's lr_schedule counts epochs from 0 and lowers the rate when
    # epoch > 80: after 81 whole epochs.
    boundaries=(81 / 200, 121 / 200, 161 / 200, 181 / 200),
    factors=(1e-1, 1e-2, 1e-3, 0.5e-3),
    epochs=200,
    weight_decay=KERAS_L2,
    batch_norm_momentum=KERAS_BN_MOMENTUM,
    batch_norm_epsilon=KERAS_BN_EPSILON,
    augmentation="shift",
    description="the Keras cifar10_resnet example (ResNet v1): projection shortcuts, L2 1e-4 (weight decay "
    "2e-4), Adam 1e-3, batch 32, lr x0.1 after epoch 81, x0.01 after 121, x0.001 after 161, x0.0005 after 181 "
    "of 200; BN momentum 0.99, epsilon 1e-3; random shifts of up to 10% each way, nearest fill, bilinear, and "
    "flip. Deviations: a 45k/5k train/validation split (the example trains on 50k and validates on the test "
    "set); shifts of the raw pixels before the per-pixel mean is subtracted (the example's: after); no "
    "ReduceLROnPlateau (the example's scheduler undoes it at every epoch's start)",
)

# Halving at 50% and 75% of the run (He et al.'s 32k and 48k of 64k) for the short runs of both sources.
SHORT_BOUNDARIES = (0.5, 0.75)
SHORT_FACTORS = (0.1, 0.01)


RECIPES: dict[str, Recipe] = {
    "he2016": HE2016,
    "he2016-subset": dataclasses.replace(
        HE2016,
        name="he2016-subset",
        steps=None,
        epochs=SUBSET_EPOCHS,
        description=f"he2016 shortened for a CIFAR-10 subset on a CPU: the same settings for {SUBSET_EPOCHS} "
        f"epochs, lr 0.1 divided by 10 at 50% and 75% of them (He et al.: of 64k iterations, 182 epochs of 45k "
        "images)",
    ),
    # The first subset runs' settings, under a name of their own so that their records stay true.
    "he2016-subset-v0": dataclasses.replace(
        HE2016,
        name="he2016-subset-v0",
        steps=None,
        epochs=5,
        weight_decay=1e-4,
        zero_init_residual=True,
        description="he2016-subset as the first runs used it (docs/cifar10-subset/he2016-subset), kept to rerun "
        "them: 5 epochs, L2 1e-4 (weight decay 2e-4, twice He et al.'s), and the last BN of every residual "
        "branch starting at gamma 0 (Goyal et al. 2017, not He et al.'s)",
    ),
    "paper50": dataclasses.replace(
        HE2016,
        name="paper50",
        # He et al.'s drops at 32k and 48k iterations lie beyond 50 epochs of
        # 45k images at batch 128 (17.6k iterations): the paper's runs kept 0.1.
        boundaries=(),
        step_boundaries=(32_000, 48_000),
        steps=None,
        epochs=50,
        description="Saraiya 2018's runs: he2016 for 50 epochs (lr 0.1 throughout: the drops at 32k and 48k "
        "iterations come later)",
    ),
    "cpu-small": Recipe(
        name="cpu-small",
        optimizer="sgd",
        learning_rate=0.1,
        momentum=0.9,
        batch_size=128,
        boundaries=SHORT_BOUNDARIES,
        factors=SHORT_FACTORS,
        epochs=15,
        train_images=10_000,
        description="a reduced protocol for 2 CPU cores, not He et al.'s: at most 10k training images, 15 epochs, "
        "SGD momentum 0.9, batch 128, lr 0.1 divided by 10 at 50% and 75%, L2 1e-4 (weight decay 2e-4), "
        "projection shortcuts, pad-crop-flip",
    ),
    "keras": KERAS,
    "keras-subset": dataclasses.replace(
        KERAS,
        name="keras-subset",
        boundaries=SHORT_BOUNDARIES,
        factors=SHORT_FACTORS,
        epochs=SUBSET_EPOCHS,
        description=f"keras shortened for a CIFAR-10 subset on a CPU: the same model, optimizer, BN and "
        f"augmentation for {SUBSET_EPOCHS} epochs, lr x0.1 at 50% and x0.01 at 75% of them (the example's steps "
        "at 40%, 60%, 80% and 90% would leave the last 40% of a short run at lr 1e-5 or less)",
    ),
    "keras-subset-v0": dataclasses.replace(
        KERAS,
        name="keras-subset-v0",
        boundaries=(80 / 200, 120 / 200, 160 / 200, 180 / 200),
        epochs=5,
        batch_norm_momentum=BN_MOMENTUM,
        batch_norm_epsilon=BN_EPSILON,
        augmentation="pad-crop",
        description="keras-subset as the first runs used it (docs/cifar10-subset/keras-subset), kept to rerun "
        "them: 5 epochs with the example's lr steps at 40%, 60%, 80% and 90% (lr 1e-5 from epoch 4 on), He et "
        "al.'s pad-crop-flip instead of the example's shifts, BN momentum 0.9 and epsilon 1e-5 instead of Keras' "
        "0.99 and 1e-3",
    ),
    "quick": Recipe(
        name="quick",
        optimizer="sgd",
        learning_rate=0.1,
        momentum=0.9,
        batch_size=128,
        schedule="cosine",
        warmup=0.1,
        epochs=3,
        description="a short run for demos and tests, after no source: SGD momentum 0.9, lr 0.1 with "
        "10% linear warm-up and cosine decay, 3 epochs, L2 1e-4, projection shortcuts, pad-crop-flip",
    ),
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None


def _recipes_help() -> str:
    return "; ".join(f"{r.name}: {r.description}" for r in RECIPES.values())


def _recipes_with(predicate) -> str:
    return ", ".join(r.name for r in RECIPES.values() if predicate(r))


@dataclasses.dataclass(frozen=True)
class NetConfig:
    """The network as chosen on the command line; ModelConfig adds what the data
    (the class count) and the recipe (shortcut, decay, BN and initialisation) decide."""

    arch: str = setting("accumulated", choices=ARCHES,
                        help="plain ResNet v1 or the accumulated ResNet; beyond the paper: wide (WRN) and "
                             "aggregated (ResNeXt) nets, plain or accumulated")
    depth: int = setting(32, help="resnet/accumulated: 6n+2 (20, 32, 44, 56, 110); wrn: 6n+4 (16, 28, 40); "
                                  "resnext: 9n+2 (11, 29)")
    width: int | None = setting(None, help="wrn: the widening factor k; resnext: the width d of a group",
                                unset="4")
    cardinality: int | None = setting(None, help="resnext: the number of groups C", unset="8")
    shortcut: str | None = setting(
        None, choices=SHORTCUTS,
        help="where a block changes shape: projection (1x1 conv, no BN: option B as the Keras example builds "
             "it), projection-bn (1x1 conv and BN), padding (He et al.'s option A for CIFAR: subsampled "
             "identity with zero channels, no parameters)",
        unset=f"the recipe's: padding for {_recipes_with(lambda r: r.shortcut == 'padding')}, else projection")
    # No "%" in this help: argparse formats it.
    zero_init_residual: bool | None = setting(
        None, help="start the last BN of every residual branch at gamma 0 (Goyal et al. 2017), so that every "
                   "block starts as its shortcut; not He et al.'s, and not neutral between the plain and the "
                   "accumulated net (docs/collapse.md). Default: the recipe's; on in "
                   f"{_recipes_with(lambda r: r.zero_init_residual)} only",
        negative=("--no-zero-init-residual", "every BN starts at gamma 1, whatever the recipe"))

    def __post_init__(self):
        check_architecture(self.arch, self.depth, self.width, self.cardinality)
        check_shortcut(self.shortcut)

    def model_config(self, num_classes: int, recipe: Recipe) -> ModelConfig:
        zero_init = recipe.zero_init_residual if self.zero_init_residual is None else self.zero_init_residual
        return ModelConfig(self.arch, self.depth, num_classes, weight_decay=recipe.weight_decay, width=self.width,
                           cardinality=self.cardinality, shortcut=self.shortcut or recipe.shortcut,
                           zero_init_residual=zero_init, batch_norm_momentum=recipe.batch_norm_momentum,
                           batch_norm_epsilon=recipe.batch_norm_epsilon)


def _recipe_name(recipe: Recipe) -> str:
    return recipe.name


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run: where it goes, the network, the data, the recipe and the devices.

    Every field with a flag is a setting of `accresnet train` (pipeline/flags.py
    derives the flags); experiment and demo nest a TrainConfig as their runs'
    template.
    """

    model_dir: str | None = setting(
        None, help="checkpoints, logs, history.csv and summary.json; a run started again with the same flags "
                   "resumes from its last checkpoint")
    net: NetConfig = dataclasses.field(default_factory=NetConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    # A recipe's name is enough where one is given (TrainConfig(recipe="he2016")).
    recipe: Recipe = setting(RECIPES["quick"], choices=tuple(RECIPES), help=_recipes_help(), parse=get_recipe,
                             show=_recipe_name)
    # Run length; at most one is set, else the recipe's applies.
    epochs: int | None = setting(None, exclusive="length",
                                 help="train this many epochs (the schedule is stretched to fit)", unset="the recipe's")
    steps: int | None = setting(None, exclusive="length",
                                help="train this many steps (the schedule is stretched to fit)")
    batch_size: int | None = setting(
        None, help="images per replica per step. The global batch is this times the number of replicas, and the "
                   "learning rate follows it linearly: recipe rate x global batch / recipe batch",
        unset="the recipe's")
    seed: int = setting(0, help="weights, data order and augmentation")
    devices: int | None = setting(None, help="replicas on this machine: N GPUs, or the CPU split into N "
                                             "logical devices", unset="all GPUs, else one CPU")
    mixed_precision: bool = setting(False, help="bfloat16 compute on CPU, float16 with loss scaling on GPU. On a "
                                               "CPU without AVX512-BF16 or AMX bfloat16 is emulated and training "
                                               "is several times slower than float32")
    jit: bool = setting(False, help="compile the forward and backward pass with XLA")
    deterministic: bool = setting(False, help="deterministic kernels for bit-identical reruns (slower)")
    checkpoint_every_steps: int | None = setting(
        None, help="also save a checkpoint every N steps (the last 3 checkpoints are kept), for clusters that kill "
                   "without a grace period; SIGTERM always saves at the next step",
        unset="after every epoch only")
    progress: bool | None = setting(None, help="a progress bar even when not on a terminal",
                                    negative=("--no-progress", "plain log lines even on a terminal"))
    # Steps left out of the images/s measurement (tracing, warm caches); not
    # Recipe.warmup, the learning rate's warm-up. No flag.
    untimed_steps: int = 3

    def __post_init__(self):
        if isinstance(self.recipe, str):
            object.__setattr__(self, "recipe", get_recipe(self.recipe))
        if self.epochs is not None and self.steps is not None:
            raise ConfigError("give --epochs or --steps, not both")
        for flag, value in (("--epochs", self.epochs), ("--steps", self.steps),
                            ("--batch-size", self.batch_size), ("--devices", self.devices),
                            ("--checkpoint-every-steps", self.checkpoint_every_steps)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be a positive integer; got {value}")

    @property
    def per_replica_batch(self) -> int:
        return self.batch_size or self.recipe.batch_size

    @property
    def augmentation(self) -> str | None:
        """The recipe's augmentation (AUGMENTATIONS), or None under --no-augment."""
        return self.recipe.augmentation if self.data.augment else None

    @property
    def resolved_data(self) -> DataConfig:
        """The data as the recipe completes it (a subset recipe's image count)."""
        if self.data.train_images is None and self.recipe.train_images is not None:
            return dataclasses.replace(self.data, train_images=self.recipe.train_images)
        return self.data


@dataclasses.dataclass(frozen=True)
class RunLength:
    """How long a run is, in steps, and how the steps fall into epochs."""

    steps_per_epoch: int
    total_steps: int

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def steps_in_epoch(self, epoch: int) -> int:
        """Steps of the 0-based `epoch`; the last one may be cut short by --steps."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)


def run_length(recipe: Recipe, num_train: int, global_batch: int,
               epochs: int | None = None, steps: int | None = None) -> RunLength:
    """Resolve the run's length from the flags, falling back on the recipe's."""
    steps_per_epoch = num_train // global_batch
    if steps_per_epoch < 1:
        raise ConfigError(
            f"the training split has {num_train} images, fewer than one global batch "
            f"of {global_batch}; lower --batch-size or use more data"
        )
    if steps is None and epochs is None:
        steps, epochs = recipe.steps, recipe.epochs
    total = steps if steps is not None else epochs * steps_per_epoch
    return RunLength(steps_per_epoch=steps_per_epoch, total_steps=total)


def scaled_learning_rate(recipe: Recipe, global_batch: int) -> float:
    """The linear scaling rule: the recipe's rate times global_batch / recipe batch."""
    return recipe.learning_rate * global_batch / recipe.batch_size
