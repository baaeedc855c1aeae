"""What a network is: the architectures, their depth rules, shortcuts and BN settings,
and ModelConfig, everything pipeline/model/network.py builds a network from.

Nothing here imports TensorFlow, so the command line can check flags (and
answer `--help`) without it.
"""

from __future__ import annotations

import dataclasses

from pipeline.data.specs import check_image_size
from pipeline.errors import ConfigError
from serving.contract import IMAGE_SIZE

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

# Kernel initialisers by name, as Keras identifiers: the Keras example's he_normal, and
# fb.resnet.torch's (He et al.'s CIFAR code) for benchmarks/collapse_ablation.py.
INITIALIZERS = {
    "he_normal": "he_normal",
    # Torch's nn.Linear default, which fb.resnet.torch keeps for the classifier: U(+-1/sqrt(fan_in)).
    "torch-linear": {"class_name": "VarianceScaling",
                     "config": {"scale": 1 / 3, "mode": "fan_in", "distribution": "uniform"}},
    # fb.resnet.torch's convolutions: normal with variance 2 / (k * k * output channels).
    "torch-conv": {"class_name": "VarianceScaling",
                   "config": {"scale": 2.0, "mode": "fan_out", "distribution": "untruncated_normal"}},
}


def check_initializer(name: str) -> None:
    if name not in INITIALIZERS:
        raise ConfigError(f"unknown initializer {name!r}; choose one of {', '.join(INITIALIZERS)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NetworkSettings:
    """How a network is built beyond its family and size: the settings a recipe fixes, a
    ModelConfig builds with and a run's record keeps, declared once for the three."""

    # The shortcut where a block changes shape (SHORTCUTS).
    shortcut: str = "projection"
    # Start the last BN of every residual branch at gamma 0 (Goyal et al. 2017),
    # so that each block starts as its shortcut; see docs/collapse.md.
    zero_init_residual: bool = False
    # The L2 factor of the convolution kernels (Keras' L2: l * sum(w^2), half an SGD weight decay).
    weight_decay: float = KERAS_L2
    batch_norm_momentum: float = BN_MOMENTUM
    batch_norm_epsilon: float = BN_EPSILON
    # The classifier's and the projection shortcut's kernel initialisers (INITIALIZERS; the
    # other convolutions are he_normal), and the L2 factor of BN's gamma and beta (none, as
    # in the Keras example).
    classifier_initializer: str = "he_normal"
    projection_initializer: str = "he_normal"
    batch_norm_weight_decay: float = 0.0
    # TensorFlow's fused BN kernel; False gives Keras' own layer (a baseline).
    fused_batch_norm: bool = True

    def __post_init__(self):
        check_shortcut(self.shortcut)
        check_initializer(self.classifier_initializer)
        check_initializer(self.projection_initializer)


def network_settings(settings: NetworkSettings) -> dict:
    """The NetworkSettings fields of a recipe, model config or run record, by name."""
    return {field.name: getattr(settings, field.name) for field in dataclasses.fields(NetworkSettings)}


@dataclasses.dataclass(frozen=True)
class ModelConfig(NetworkSettings):
    arch: str = "accumulated"
    depth: int = 32
    num_classes: int = 10
    # WRN: the widening factor k. ResNeXt: the width d of each group. None: the family's default.
    width: int | None = None
    # ResNeXt: the number of groups C. None: the default.
    cardinality: int | None = None
    # The side of the square RGB images the network takes (convolutional with a global pool,
    # it takes any; the export declares this one).
    image_size: int = IMAGE_SIZE

    def __post_init__(self):
        super().__post_init__()
        check_architecture(self.arch, self.depth, self.width, self.cardinality)
        check_image_size(self.image_size)
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
