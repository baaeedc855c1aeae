"""The run spec: what `accresnet train` (and the verbs that nest a training run) are told.

NetConfig and TrainConfig (with DataConfig, pipeline/data/specs.py) are the
settings users type, with the flags derived from them (pipeline/flags.py);
DemoConfig nests a TrainConfig for `accresnet demo`. The network's own rules
are in pipeline/model/architecture.py, the recipes in recipes.py. Nothing here
imports TensorFlow, so the command line can parse and validate flags (and
answer `--help`) without paying for the TensorFlow import.
"""

from __future__ import annotations

import dataclasses
import math

from pipeline.data.specs import DataConfig
from pipeline.model.architecture import (ARCHES, SHORTCUTS, ModelConfig, check_architecture, check_shortcut,
                                         network_settings)
from pipeline.errors import ConfigError
from pipeline.flags import nested, setting
from pipeline.settings.recipes import (OPTIMIZERS, OVERRIDABLE, RECIPES, Recipe, get_recipe, parse_overrides,
                              recipes_help, recipes_with, with_overrides)
from serving.contract import IMAGE_SIZE


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
        unset=f"the recipe's: padding for {recipes_with(lambda r: r.shortcut == 'padding')}, else projection")
    # No "%" in this help: argparse formats it.
    zero_init_residual: bool | None = setting(
        None, help="start the last BN of every residual branch at gamma 0 (Goyal et al. 2017), so that every "
                   "block starts as its shortcut; not He et al.'s, and not neutral between the plain and the "
                   "accumulated net (docs/collapse.md). Default: the recipe's; on in "
                   f"{recipes_with(lambda r: r.zero_init_residual)} only",
        negative=("--no-zero-init-residual", "every BN starts at gamma 1, whatever the recipe"))

    def __post_init__(self):
        check_architecture(self.arch, self.depth, self.width, self.cardinality)
        check_shortcut(self.shortcut)

    def model_config(self, num_classes: int, recipe: Recipe, image_size: int = IMAGE_SIZE) -> ModelConfig:
        zero_init = recipe.zero_init_residual if self.zero_init_residual is None else self.zero_init_residual
        # The recipe's network settings, of which the flags override the shortcut and zero-init.
        settings = {**network_settings(recipe), "shortcut": self.shortcut or recipe.shortcut,
                    "zero_init_residual": zero_init}
        return ModelConfig(self.arch, self.depth, num_classes, width=self.width, cardinality=self.cardinality,
                           image_size=image_size, **settings)


def _recipe_name(recipe: Recipe) -> str:
    return recipe.name


def _show_overrides(overrides: tuple[tuple[str, object], ...]) -> str:
    return ",".join(f"{name}={list(value) if isinstance(value, tuple) else value}" for name, value in overrides)


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
    recipe: Recipe = setting(RECIPES["quick"], choices=tuple(RECIPES), help=recipes_help(), parse=get_recipe,
                             show=_recipe_name)
    # The recipe's fields a run changes: four by their own flags, any by --set.
    learning_rate: float | None = setting(
        None, help="the learning rate for one replica's batch (--batch-size, else the recipe's); more replicas "
                   "scale it linearly", unset="the recipe's")
    momentum: float | None = setting(None, help="SGD's momentum, in [0, 1)", unset="the recipe's")
    weight_decay: float | None = setting(
        None, help="the weight decay of the convolution kernels as SGD applies it (gradient += WD x weight: He et "
                   "al.'s 1e-4); kept as Keras' L2 factor WD/2 in the recipe and run.json",
        unset="the recipe's")
    optimizer: str | None = setting(None, choices=OPTIMIZERS, help="the optimizer", unset="the recipe's")
    overrides: tuple[tuple[str, object], ...] = setting(
        (), flag="--set", metavar="FIELD=VALUE,...", parse=parse_overrides, show=_show_overrides,
        help=f"change any of the recipe's fields, as in --set \"schedule=cosine,warmup=0.05,epochs=30\" or "
             f"--set \"boundaries=[0.5,0.75],factors=[0.1,0.01]\"; the run records them. Fields: "
             f"{', '.join(OVERRIDABLE)}", unset="none")
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
    project_bfloat16_kernels: bool = setting(
        False, help="under --mixed-precision on an AVX-512 CPU, run bfloat16 additions and ReLU with the "
                    "project's own C++ kernels (compiled at first use: g++ and TensorFlow's headers; the same "
                    "results, a few percent faster a step; docs/training.md)")
    jit: bool = setting(False, help="compile the forward and backward pass with XLA")
    deterministic: bool = setting(False, help="deterministic kernels for bit-identical reruns (slower)")
    checkpoint_every_steps: int | None = setting(
        None, help="also save a checkpoint every N steps (the last 3 checkpoints are kept), for clusters that kill "
                   "without a grace period; SIGTERM always saves at the next step",
        unset="after every epoch only")
    log_every_steps: int = setting(
        100, metavar="N", help="also write the step's loss, learning rate and images/s to TensorBoard every N "
                               "steps (0: once an epoch only)")
    export_best: bool = setting(
        False, help="keep the checkpoint of the epoch with the best validation accuracy (checkpoints/best/) and "
                    "export that epoch instead of the last; needs a validation split")
    early_stopping: int | None = setting(
        None, metavar="PATIENCE", help="end the run once validation accuracy has not improved for PATIENCE "
                                       "epochs; needs a validation split", unset="off: every epoch runs")
    progress: bool | None = setting(None, help="a progress bar even when not on a terminal",
                                    negative=("--no-progress", "plain log lines even on a terminal"))
    # Steps left out of the images/s measurement (tracing, warm caches); not
    # Recipe.warmup, the learning rate's warm-up. No flag.
    untimed_steps: int = 3

    def __post_init__(self):
        if isinstance(self.recipe, str):
            object.__setattr__(self, "recipe", get_recipe(self.recipe))
        if isinstance(self.overrides, str):
            object.__setattr__(self, "overrides", parse_overrides(self.overrides))
        try:
            object.__setattr__(self, "recipe", with_overrides(self.recipe, self.recipe_overrides))
        except ConfigError as error:
            changes = _show_overrides(tuple(self.recipe_overrides.items()))
            raise ConfigError(f"the {self.recipe.name} recipe with {changes}: {error}") from None
        if self.epochs is not None and self.steps is not None:
            raise ConfigError("give --epochs or --steps, not both")
        for flag, value in (("--epochs", self.epochs), ("--steps", self.steps),
                            ("--batch-size", self.batch_size), ("--devices", self.devices),
                            ("--checkpoint-every-steps", self.checkpoint_every_steps),
                            ("--early-stopping", self.early_stopping)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be a positive integer; got {value}")
        if self.log_every_steps < 0:
            raise ConfigError(f"--log-every-steps must be 0 or more; got {self.log_every_steps}")
        if (self.export_best or self.early_stopping) and self.data.val_split == 0.0:
            raise ConfigError("--export-best and --early-stopping read the validation accuracy: they need a "
                              "validation split (--val-split above 0)")

    @property
    def recipe_overrides(self) -> dict[str, object]:
        """What the flags change of the named recipe, by recipe field. A learning rate given is
        for the per-replica batch the run uses, so that batch becomes the recipe's."""
        given = {"learning_rate": self.learning_rate, "momentum": self.momentum, "optimizer": self.optimizer,
                 "weight_decay": None if self.weight_decay is None else self.weight_decay / 2}
        given = {name: value for name, value in given.items() if value is not None}
        twice = sorted(set(given) & set(dict(self.overrides)))
        if twice:
            raise ConfigError(f"--set gives {', '.join(twice)}, which a flag of its own gives too; give it once")
        overrides = {**given, **dict(self.overrides)}
        if "learning_rate" in overrides and "batch_size" not in overrides:
            overrides["batch_size"] = self.batch_size or self.recipe.batch_size
        return overrides

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


# `accresnet demo`'s settings of its training run, taken as flags.
DEMO_RUN_FLAGS = ("dataset", "data_dir", "arch", "depth", "width", "cardinality", "epochs", "batch_size", "devices")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """`accresnet demo`: train, export, serve and classify on embedded defaults."""

    output_dir: str = setting("demo-output", help="where everything goes")
    # Sized for a 2-core CPU: 3000 built-in images, 3 epochs of batch 64 with
    # the quick recipe, about two minutes of training.
    run: TrainConfig = nested(TrainConfig, dataset="synthetic:3000", batch_size=64, recipe="quick")
    held_out: int = setting(200, help="test images to classify")
    examples: int = 8
