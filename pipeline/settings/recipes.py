"""The training recipes: each protocol as its source sets it, with its deviations named.

A recipe is the optimizer, its learning-rate schedule and run length, and
the model and data settings its source fixes; `accresnet train --recipe`
picks one by name, and `--help` prints every recipe's description.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal

from pipeline.model.architecture import (BN_EPSILON, BN_MOMENTUM, HE2016_L2, KERAS_BN_EPSILON, KERAS_BN_MOMENTUM,
                                         KERAS_L2, NetworkSettings)
from pipeline.errors import ConfigError


ScheduleKind = Literal["piecewise", "cosine"]
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = typing.get_args(ScheduleKind)
# Training-image augmentation: "pad-crop", He et al.'s 4-pixel zero pad, random
# 32x32 crop and horizontal flip; "shift", the Keras example's random shift of
# up to 10% each way with the nearest pixels filling in, and horizontal flip.
AUGMENTATIONS = ("pad-crop", "shift")


@dataclasses.dataclass(frozen=True)
class Recipe(NetworkSettings):
    """A training protocol as its source sets it: the optimizer, its
    learning-rate schedule and run length, and the model and data settings the
    source fixes (the network settings: shortcut, zero-init, weight decay, BN and
    initialisation; --shortcut and --zero-init-residual override the first two;
    and the augmentation).

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
    augmentation: str = "pad-crop"

    def __post_init__(self):
        super().__post_init__()
        if self.augmentation not in AUGMENTATIONS:
            raise ConfigError(f"unknown augmentation {self.augmentation!r}; choose one of {', '.join(AUGMENTATIONS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        for name, low, high in (("learning_rate", 0.0, None), ("momentum", None, 1.0), ("weight_decay", None, None),
                                ("batch_norm_momentum", None, 1.0), ("batch_norm_epsilon", 0.0, None),
                                ("batch_norm_weight_decay", None, None), ("warmup", None, 1.0)):
            _check_range(name, getattr(self, name), low, high)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer; got {self.batch_size}")
        if (self.steps is None) == (self.epochs is None) or (self.steps or self.epochs or 1) < 1:
            raise ConfigError(f"a recipe's length is steps or epochs, one of them, positive; got steps "
                              f"{self.steps}, epochs {self.epochs}")
        boundaries = self.step_boundaries or self.boundaries
        if self.step_boundaries and self.boundaries:
            raise ConfigError("give boundaries (fractions of the run) or step_boundaries (steps), not both")
        if self.schedule == "piecewise" and len(self.factors) != len(boundaries):
            raise ConfigError(f"the piecewise schedule needs a factor for each boundary; got {len(boundaries)} "
                              f"boundaries and {len(self.factors)} factors")
        if list(boundaries) != sorted(boundaries) or any(not 0 < b < 1 for b in self.boundaries) \
                or any(b < 1 for b in self.step_boundaries):
            raise ConfigError(f"boundaries rise, as fractions in (0, 1) of the run or as steps from 1; got "
                              f"{list(boundaries)}")


def _check_range(name: str, value: float, low: float | None, high: float | None) -> None:
    """[0, high), or (low, inf) where `low` is given: a rate, a decay, a fraction."""
    if low is not None and not value > low:
        raise ConfigError(f"{name} must be above {low}; got {value}")
    if low is None and not value >= 0.0:
        raise ConfigError(f"{name} must be 0 or more; got {value}")
    if high is not None and not value < high:
        raise ConfigError(f"{name} must be below {high}; got {value}")


# What a run may change of its recipe (--set FIELD=VALUE): everything but its name and text.
OVERRIDABLE = tuple(f.name for f in dataclasses.fields(Recipe) if f.name not in ("name", "description"))


def parse_overrides(text: str) -> tuple[tuple[str, Any], ...]:
    """"learning_rate=0.05,boundaries=[0.5,0.75]" -> (("learning_rate", 0.05), ("boundaries", (0.5, 0.75))),
    each value parsed as its recipe field's type; "" -> ()."""
    overrides = {}
    for item in _split_top_level(text):
        name, equals, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not equals or not name:
            raise ConfigError(f"--set takes FIELD=VALUE[,FIELD=VALUE...]; got {item!r}")
        if name not in OVERRIDABLE:
            raise ConfigError(f"--set: a recipe has no field {name!r}; choose from {', '.join(OVERRIDABLE)}")
        if name in overrides:
            raise ConfigError(f"--set gives {name} twice")
        overrides[name] = parse_field(name, value.strip())
    return tuple(overrides.items())


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets: a list value keeps its own commas."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return [item for item in items if item.strip()]


def parse_field(name: str, text: str) -> Any:
    """A recipe field's value from its text, by the field's type."""
    declared = typing.get_type_hints(Recipe)[name]
    union = typing.get_origin(declared) in (typing.Union, types.UnionType)
    kind = next(k for k in typing.get_args(declared) if k is not type(None)) if union else declared
    if union and type(None) in typing.get_args(declared) and text.lower() in ("none", "null", ""):
        return None
    try:
        if typing.get_origin(kind) is tuple:
            items = json.loads(text if text.startswith("[") else f"[{text}]")
            element = typing.get_args(kind)[0]
            return tuple(element(item) if element is float else _as_int(item) for item in items)
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if kind is int:
            return _as_int(float(text) if "e" in text.lower() else int(text))
        if kind is float:
            return float(text)
        return text
    except (ValueError, TypeError):
        raise ConfigError(f"--set {name}={text}: not a value of {name} ({declared})") from None


def _as_int(value: Any) -> int:
    if isinstance(value, bool) or float(value) != int(float(value)):
        raise ValueError(value)
    return int(float(value))


def with_overrides(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """The recipe with some fields changed, validated as every recipe is; a length given in
    steps or epochs replaces the other."""
    if not overrides:
        return recipe
    changes = dict(overrides)
    if "steps" in changes and "epochs" not in changes:
        changes["epochs"] = None
    if "epochs" in changes and "steps" not in changes:
        changes["steps"] = None
    if "step_boundaries" in changes and "boundaries" not in changes:
        changes["boundaries"] = ()
    if "boundaries" in changes and "step_boundaries" not in changes:
        changes["step_boundaries"] = ()
    return dataclasses.replace(recipe, **changes)


def recipe_settings(recipe: Recipe) -> dict[str, Any]:
    """The recipe's fields that decide what a run computes, as JSON keeps them (lists, not tuples)."""
    return json.loads(json.dumps({name: getattr(recipe, name) for name in OVERRIDABLE}))


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


def recipes_help() -> str:
    return "; ".join(f"{r.name}: {r.description}" for r in RECIPES.values())


def recipes_with(predicate) -> str:
    return ", ".join(r.name for r in RECIPES.values() if predicate(r))
