"""The CIFAR ResNet v1 of He et al. (2016) and its accumulated variant.

Block i computes the residual branch F_i(x) = BN(conv3x3(ReLU(BN(conv3x3(x))))).

    plain:        y_i = ReLU(F_i(x_i) + s_i),  s_i = x_i or the shortcut S_i(x_i)
    accumulated:  y_i = ReLU(F_i(x_i) + A_i),  A_i = N_i(S_i(x_i))       where the shape changes
                                               A_i = A_{i-1} + N_i(x_i)  otherwise, A_0 = 0

where the shape changes, S_i is one of (ModelConfig.shortcut):

    projection     P_i(x), a 1x1 convolution (He et al.'s option B, as the Keras
                   cifar10_resnet example builds it: no BN after it)
    projection-bn  BN(P_i(x)) (option B as in He et al.'s ImageNet nets)
    padding        x subsampled by the stride, zero channels appended (He et
                   al.'s option A for CIFAR: no parameters)

N_i is a BatchNormalization of the block's own, so the accumulated net has
exactly one more BN per block than the plain one and the same convolutions.
Both nets come from `build_model`, at any depth 6n+2 and any class count.

Beyond the paper, the same accumulator in wide residual networks (WRN-d-k,
Zagoruyko & Komodakis 2016: pre-activation blocks, y = F(x) + A) and in
aggregated bottleneck blocks (ResNeXt, Xie et al. 2017: grouped 3x3
convolutions, y = ReLU(F(x) + A)): the arches wrn, resnext and their
accumulated-* twins.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf
from keras import layers, ops

from pipeline.model.architecture import (BN_EPSILON, BN_MOMENTUM, INITIALIZERS, KERAS_L2, ModelConfig, blocks_per_stage,
                                   is_accumulated)
from serving.contract import IMAGES_INPUT, image_shape

STAGE_FILTERS = (16, 32, 64)


@keras.saving.register_keras_serializable(package="accresnet")
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras' BatchNormalization computed by TensorFlow's fused kernel.

    Keras 3 normalizes with a chain of elementwise ops; the fused kernel
    (oneDNN's on CPUs, cuDNN's on GPUs) does the statistics, the
    normalization and the moving-average update in one pass and keeps
    bfloat16/float16 inputs as they are. Same weights, same config, same
    results up to rounding, and about 1.4x (float32) to 2x (bfloat16) the
    training speed of the whole network on a CPU; it also shrinks the cost
    of the accumulated net's extra BN per block. The moving variance uses the
    unbiased batch variance, as TensorFlow's fused kernel defines it.
    """

    def call(self, inputs, training=None, mask=None):
        if len(inputs.shape) != 4 or self.axis not in (-1, 3):
            return super().call(inputs, training=training, mask=mask)  # the kernel wants NHWC
        scale = self.gamma if self.scale else tf.ones(self.moving_mean.shape)
        offset = self.beta if self.center else tf.zeros(self.moving_mean.shape)
        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, scale, offset, mean=self.moving_mean, variance=self.moving_variance,
                epsilon=self.epsilon, is_training=True, exponential_avg_factor=1.0 - self.momentum)
            self.moving_mean.assign(mean)
            self.moving_variance.assign(variance)
            return outputs
        outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
            inputs, scale, offset, mean=self.moving_mean, variance=self.moving_variance,
            epsilon=self.epsilon, is_training=False)
        return outputs


def _batch_norm(name: str, fused: bool = True, gamma_initializer="ones", momentum: float = BN_MOMENTUM,
                epsilon: float = BN_EPSILON, weight_decay: float = 0.0) -> layers.BatchNormalization:
    kind = FusedBatchNormalization if fused else layers.BatchNormalization
    decay = keras.regularizers.L2(weight_decay) if weight_decay else None
    return kind(momentum=momentum, epsilon=epsilon, gamma_initializer=gamma_initializer,
                gamma_regularizer=decay, beta_regularizer=decay, name=name)


def _conv(filters: int, kernel_size: int, strides: int, weight_decay: float, name: str,
          groups: int = 1, initializer: str = "he_normal") -> layers.Conv2D:
    return layers.Conv2D(
        filters, kernel_size, strides=strides, padding="same", use_bias=False, groups=groups,
        kernel_initializer=initializer, kernel_regularizer=keras.regularizers.L2(weight_decay), name=name,
    )


@keras.saving.register_keras_serializable(package="accresnet")
class PaddingShortcut(layers.Layer):
    """He et al.'s option A: the identity where the shape changes, without parameters.

    Subsamples by `strides` (the pixels a stride-2 1x1 projection would read)
    and appends zero channels up to `filters`.
    """

    def __init__(self, filters: int, strides: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.strides = filters, strides

    def call(self, x):
        if self.strides > 1:
            x = x[:, ::self.strides, ::self.strides, :]
        extra = self.filters - x.shape[-1]
        if extra < 0:
            raise ValueError(f"option A pads channels, it cannot drop them: {x.shape[-1]} -> {self.filters}")
        return ops.pad(x, [[0, 0], [0, 0], [0, 0], [0, extra]]) if extra else x

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        shrink = lambda size: None if size is None else -(-size // self.strides)
        return batch, shrink(height), shrink(width), self.filters

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "strides": self.strides}


@keras.saving.register_keras_serializable(package="accresnet")
class PixelStandardization(layers.Layer):
    """Raw uint8 pixels -> x / 255 minus the per-pixel mean of the training images.

    The mean is a non-trainable weight, set once from the training split with
    `set_mean`, so it travels inside checkpoints and SavedModels and a served
    model takes raw pixels.
    """

    def __init__(self, **kwargs):
        # Computed in float32 whatever the policy: bfloat16 keeps only about
        # three significant digits of the subtraction.
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)

    def build(self, input_shape):
        self.mean = self.add_weight(name="mean", shape=tuple(input_shape[1:]), initializer="zeros", trainable=False)

    def set_mean(self, mean) -> None:
        self.mean.assign(ops.cast(mean, "float32"))

    def call(self, images):
        return ops.cast(images, "float32") / 255.0 - self.mean

    def compute_output_spec(self, images):
        return keras.KerasTensor(images.shape, dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        return config


class _ConvUnit(layers.Layer):
    """Configuration shared by the branches and the blocks.

    style: "basic" (ResNet v1: two 3x3 convs, ReLU after the addition),
    "preact" (WRN: BN-ReLU before each conv, nothing after the addition) or
    "bottleneck" (ResNeXt: 1x1, grouped 3x3, 1x1 expanding to `filters`).
    """

    def __init__(self, filters: int, strides: int = 1, weight_decay: float = KERAS_L2, fused_batch_norm: bool = True,
                 style: str = "basic", bottleneck: int = 0, groups: int = 1, shortcut: str = "projection",
                 zero_init_residual: bool = False, batch_norm_momentum: float = BN_MOMENTUM,
                 batch_norm_epsilon: float = BN_EPSILON, projection_initializer: str = "he_normal",
                 batch_norm_weight_decay: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.strides, self.weight_decay = filters, strides, weight_decay
        self.fused_batch_norm, self.style = fused_batch_norm, style
        self.bottleneck, self.groups, self.shortcut = bottleneck, groups, shortcut
        self.zero_init_residual = zero_init_residual
        self.batch_norm_momentum, self.batch_norm_epsilon = batch_norm_momentum, batch_norm_epsilon
        self.projection_initializer, self.batch_norm_weight_decay = projection_initializer, batch_norm_weight_decay

    def _norm(self, name: str, gamma_initializer="ones") -> layers.BatchNormalization:
        return _batch_norm(name, self.fused_batch_norm, gamma_initializer, self.batch_norm_momentum,
                           self.batch_norm_epsilon, self.batch_norm_weight_decay)

    def get_config(self):
        return {**super().get_config(), **self._unit_config()}

    def _unit_config(self) -> dict:
        return dict(filters=self.filters, strides=self.strides, weight_decay=self.weight_decay,
                    fused_batch_norm=self.fused_batch_norm, style=self.style, bottleneck=self.bottleneck,
                    groups=self.groups, shortcut=self.shortcut, zero_init_residual=self.zero_init_residual,
                    batch_norm_momentum=self.batch_norm_momentum, batch_norm_epsilon=self.batch_norm_epsilon,
                    projection_initializer=self.projection_initializer,
                    batch_norm_weight_decay=self.batch_norm_weight_decay)


@keras.saving.register_keras_serializable(package="accresnet")
class ResidualBranch(_ConvUnit):
    """The residual function F of a block, in the block's style:

        basic:       BN(conv3x3(ReLU(BN(conv3x3(x, strides)))))
        preact:      conv3x3(ReLU(BN(conv3x3(x, strides))))   (x already BN-ReLU'd by the block)
        bottleneck:  BN(conv1x1(ReLU(BN(gconv3x3(ReLU(BN(conv1x1(x))), strides, groups)))))
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        decay = self.weight_decay
        if self.style == "bottleneck":
            self.reduce = _conv(self.bottleneck, 1, 1, decay, "reduce")
            self.reduce_bn = self._norm("reduce_bn")
            self.conv1 = _conv(self.bottleneck, 3, self.strides, decay, "conv1", groups=self.groups)
            self.conv2 = _conv(self.filters, 1, 1, decay, "conv2")
        else:
            self.conv1 = _conv(self.filters, 3, self.strides, decay, "conv1")
            self.conv2 = _conv(self.filters, 3, 1, decay, "conv2")
        self.bn1 = self._norm("bn1")
        # zero_init_residual: F(x) = 0 at the start, so every block starts as its shortcut.
        gamma = "zeros" if self.zero_init_residual else "ones"
        self.bn2 = None if self.style == "preact" else self._norm("bn2", gamma)

    def call(self, x, training=None):
        if self.style == "bottleneck":
            x = ops.relu(self.reduce_bn(self.reduce(x), training=training))
        x = self.conv2(ops.relu(self.bn1(self.conv1(x), training=training)))
        return x if self.bn2 is None else self.bn2(x, training=training)


class _Block(_ConvUnit):
    """What both blocks share: the branch, a pre-activation for the preact
    style, and the shortcut S(x) where the shape changes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.branch = ResidualBranch(**self._unit_config(), name="branch")
        self.preactivation = self._norm("preact_bn") if self.style == "preact" else None
        self.projection = self.projection_norm = self.padding = None

    def _build_projection(self, input_shape) -> None:
        if self.strides == 1 and input_shape[-1] == self.filters:
            return
        if self.shortcut == "padding":
            self.padding = PaddingShortcut(self.filters, self.strides, name="padding")
            return
        self.projection = _conv(self.filters, 1, self.strides, self.weight_decay, "projection",
                                initializer=INITIALIZERS[self.projection_initializer])
        if self.shortcut == "projection-bn":
            self.projection_norm = self._norm("projection_bn")

    @property
    def changes_shape(self) -> bool:
        return self.projection is not None or self.padding is not None

    def _shortcut(self, x, training):
        """S(x): P(x), BN(P(x)) or the zero-padded identity."""
        if self.padding is not None:
            return self.padding(x)
        x = self.projection(x)
        return x if self.projection_norm is None else self.projection_norm(x, training=training)

    def _residual(self, x, training) -> tuple:
        """F(x), and the block input as the plain shortcut takes it."""
        if self.preactivation is None:
            return self.branch(x, training=training), x
        activated = ops.relu(self.preactivation(x, training=training))
        # WRN's projection reads the pre-activated input; an identity reads x.
        return self.branch(activated, training=training), activated

    def _output(self, residual, added):
        # Pre-activation blocks leave the activation to the next block.
        return residual + added if self.preactivation is not None else ops.relu(residual + added)


@keras.saving.register_keras_serializable(package="accresnet")
class ResidualBlock(_Block):
    """y = ReLU(F(x) + s) (preact: F(x) + s), s = x or S(x) where the shape changes."""

    def build(self, input_shape):
        self._build_projection(input_shape)

    def call(self, x, training=None):
        residual, shortcut_input = self._residual(x, training)
        if self.padding is not None:
            shortcut = self.padding(x)  # an identity: the raw input, as in the blocks that keep the shape
        elif self.projection is not None:
            shortcut = self._shortcut(shortcut_input, training)
        else:
            shortcut = x
        return self._output(residual, shortcut)


@keras.saving.register_keras_serializable(package="accresnet")
class AccumulatedBlock(_Block):
    """(x, A_prev) -> (y, A) with y = ReLU(F(x) + A) (preact: F(x) + A).

    A = N(S(x)) where the block changes shape (the accumulator restarts),
    else A = A_prev + N(x), where a missing A_prev (the first block) is zero.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.accumulator_norm = self._norm("accumulator_bn")

    def build(self, x_shape, accumulator_shape=None):
        self._build_projection(x_shape)

    def call(self, x, accumulator=None, training=None):
        if self.changes_shape:
            accumulator = self.accumulator_norm(self._shortcut(x, training), training=training)
        elif accumulator is None:
            accumulator = self.accumulator_norm(x, training=training)
        else:
            accumulator = accumulator + self.accumulator_norm(x, training=training)
        residual, _ = self._residual(x, training)
        return self._output(residual, accumulator), accumulator


def block_name(stage: int, block: int) -> str:
    """Layer name of a block, 1-based: stage2_block1 is the first block of stage 2."""
    return f"stage{stage}_block{block}"


@dataclasses.dataclass(frozen=True)
class _Stage:
    filters: int
    bottleneck: int = 0
    groups: int = 1


def _family_layout(config: ModelConfig) -> tuple[str, list[_Stage], str]:
    """(block style, the three stages, model name) of the config's family."""
    depth, width = config.depth, config.resolved_width
    if config.family == "wrn":
        # Zagoruyko & Komodakis: stages of 16k, 32k, 64k channels.
        stages = [_Stage(f * width) for f in STAGE_FILTERS]
        return "preact", stages, f"{config.arch}-{depth}-{width}"
    if config.family == "resnext":
        # Bottlenecks of C groups of width d (doubling per stage) between
        # 64/128/256-channel block outputs: the ResNet stages times four.
        cardinality = config.resolved_cardinality
        stages = [_Stage(4 * f, cardinality * width * 2**i, cardinality) for i, f in enumerate(STAGE_FILTERS)]
        return "bottleneck", stages, f"{config.arch}-{depth}-{cardinality}x{width}d"
    return "basic", [_Stage(f) for f in STAGE_FILTERS], f"{config.arch}_resnet{depth}"


def build_model(config: ModelConfig) -> keras.Model:
    """The plain or accumulated network; uint8 [B, S, S, 3] in (S: config.image_size), class
    probabilities out."""
    n = blocks_per_stage(config.depth, config.family)
    style, stages, name = _family_layout(config)
    images = keras.Input(shape=image_shape(config.image_size), dtype="uint8", name=IMAGES_INPUT)
    x = PixelStandardization(name="standardize")(images)
    x = _conv(STAGE_FILTERS[0], 3, 1, config.weight_decay, "stem_conv")(x)
    norm = dict(fused=config.fused_batch_norm, momentum=config.batch_norm_momentum,
                epsilon=config.batch_norm_epsilon, weight_decay=config.batch_norm_weight_decay)
    if style != "preact":  # pre-activation blocks normalise their own input
        x = layers.ReLU(name="stem_relu")(_batch_norm("stem_bn", **norm)(x))
    accumulator = None
    for stage_number, stage in enumerate(stages, start=1):
        for block_number in range(1, n + 1):
            strides = 2 if stage_number > 1 and block_number == 1 else 1
            settings = dict(filters=stage.filters, strides=strides, weight_decay=config.weight_decay,
                            fused_batch_norm=config.fused_batch_norm, style=style, bottleneck=stage.bottleneck,
                            groups=stage.groups, shortcut=config.shortcut,
                            zero_init_residual=config.zero_init_residual,
                            batch_norm_momentum=config.batch_norm_momentum,
                            batch_norm_epsilon=config.batch_norm_epsilon,
                            projection_initializer=config.projection_initializer,
                            batch_norm_weight_decay=config.batch_norm_weight_decay,
                            name=block_name(stage_number, block_number))
            if is_accumulated(config.arch):
                # A stage's first block projects and restarts the accumulator
                # (the block would ignore an A_prev; not passing one keeps the
                # graph free of a dependency that does not exist).
                previous = None if strides != 1 else accumulator
                x, accumulator = AccumulatedBlock(**settings)(x, previous)
            else:
                x = ResidualBlock(**settings)(x)
    if style == "preact":
        x = layers.ReLU(name="final_relu")(_batch_norm("final_bn", **norm)(x))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    # Softmax in float32 under mixed precision, for a stable loss.
    probabilities = layers.Dense(config.num_classes, activation="softmax",
                                 kernel_initializer=INITIALIZERS[config.classifier_initializer],
                                 dtype="float32", name="probabilities")(x)
    return keras.Model(images, probabilities, name=name)


def set_pixel_mean(model: keras.Model, mean) -> None:
    """Store the training split's per-pixel mean in the model's first layer."""
    model.get_layer("standardize").set_mean(mean)
