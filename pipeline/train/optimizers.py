"""A recipe's optimizer and its learning-rate schedule."""

from __future__ import annotations

import keras

from pipeline.settings.recipes import Recipe


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


def make_optimizer(recipe: Recipe, schedule) -> keras.optimizers.Optimizer:
    """The recipe's optimizer; precision.Precision.optimizer adds loss scaling where it is needed."""
    if recipe.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=schedule, momentum=recipe.momentum)
    return keras.optimizers.Adam(learning_rate=schedule)
