"""A recipe's optimizer: its learning-rate schedule, loss scaling and precision policy."""

from __future__ import annotations

import logging

import keras
import tensorflow as tf

from pipeline.cpu import CpuInfo
from pipeline.settings.recipes import Recipe

log = logging.getLogger(__name__)


def learning_rate_schedule(recipe: Recipe, learning_rate: float, total_steps: int):
    """The recipe's schedule stretched or shrunk to `total_steps`."""
    if recipe.schedule == "cosine":
        warmup = int(recipe.warmup * total_steps)
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else learning_rate,
            decay_steps=max(total_steps - warmup, 1),
            warmup_target=learning_rate if warmup else None,
            warmup_steps=warmup,
        )
    boundaries = list(recipe.step_boundaries) or [max(int(round(f * total_steps)), 1) for f in recipe.boundaries]
    values = [learning_rate] + [learning_rate * f for f in recipe.factors]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def make_optimizer(recipe: Recipe, schedule, loss_scaling: bool) -> keras.optimizers.Optimizer:
    if recipe.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=recipe.momentum)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=schedule)
    # float16 needs loss scaling to keep small gradients; bfloat16 does not.
    return keras.optimizers.LossScaleOptimizer(optimizer) if loss_scaling else optimizer


def mixed_precision_policy(enabled: bool, cpu: CpuInfo | None = None) -> str:
    """Mixed precision: float16 on GPUs, bfloat16 on CPUs (AVX512-BF16 / AMX). On a CPU
    without either, says that it will be slower than float32 (`cpu`: this machine's by default)."""
    if not enabled:
        return "float32"
    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    cpu = cpu or CpuInfo.read()
    if cpu is not None and not cpu.native_bfloat16:
        log.warning("--mixed-precision: this CPU (%s) has no native bfloat16 (AVX512-BF16 or AMX), so every "
                    "bfloat16 operation is emulated and training runs several times slower than float32 "
                    "(about 6x on an AVX2 machine, docs/benchmarks.md); leave --mixed-precision off here",
                    cpu.describe())
    return "mixed_bfloat16"
