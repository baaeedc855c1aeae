"""The built-in `synthetic` dataset: ten classes of procedurally drawn images.

Each class is a kind of pattern (a disk, a ring, stripes, a checkerboard, ...)
drawn at a random position and size, in random colours, over a random
gradient background, with pixel noise. Colour and position carry no
information about the class, so a network has to learn shapes. Every class
is closed under horizontal flips, so the standard augmentation keeps labels
true. The images are a pure function of the seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from serving.contract import IMAGE_SIZE

SIZE = IMAGE_SIZE

CLASS_NAMES = (
    "disk",
    "square",
    "triangle",
    "ring",
    "cross",
    "horizontal_stripes",
    "vertical_stripes",
    "checkerboard",
    "diagonal_stripes",
    "dots",
)

# Seeds of the two splits; fixed so that `synthetic:N` means the same images
# on every machine.
TRAIN_SEED = 1803_05778
TEST_SEED = 1512_03385


def _masks(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Foreground masks in [0, 1], shape [N, 32, 32], one pattern per label."""
    n = len(labels)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    yy, xx = yy[None], xx[None]

    def col(values):
        return values.astype(np.float32)[:, None, None]

    cy = col(rng.uniform(10, 22, n))
    cx = col(rng.uniform(10, 22, n))
    radius = col(rng.uniform(5, 10, n))
    period = col(rng.uniform(4, 8, n))
    phase = col(rng.uniform(0, 2 * np.pi, n))
    dy, dx = yy - cy, xx - cx
    dist = np.sqrt(dy**2 + dx**2)
    # Patterns that fill the image are windowed to a random box so that
    # their extent varies as the shapes' does.
    window = (np.abs(dy) < radius * 1.4) & (np.abs(dx) < radius * 1.4)
    diagonal_sign = col(rng.choice([-1.0, 1.0], n))

    patterns = {
        0: dist < radius,
        1: (np.abs(dy) < radius * 0.85) & (np.abs(dx) < radius * 0.85),
        2: (dy > -radius) & (dy < radius * 0.8) & (np.abs(dx) < (dy + radius) * 0.6),
        3: (dist < radius) & (dist > radius * 0.55),
        4: ((np.abs(dy) < radius * 0.3) | (np.abs(dx) < radius * 0.3))
        & (np.abs(dy) < radius) & (np.abs(dx) < radius),
        5: (np.sin(2 * np.pi * yy / period + phase) > 0) & window,
        6: (np.sin(2 * np.pi * xx / period + phase) > 0) & window,
        7: ((np.floor(yy / (period * 0.7) + phase) + np.floor(xx / (period * 0.7) + phase)) % 2 == 0)
        & window,
        8: (np.sin(2 * np.pi * (yy + diagonal_sign * xx) / (period * 1.4) + phase) > 0) & window,
    }
    masks = np.zeros((n, SIZE, SIZE), np.float32)
    for label, pattern in patterns.items():
        chosen = labels == label
        masks[chosen] = np.broadcast_to(pattern, (n, SIZE, SIZE))[chosen]
    # Dots: a handful of small disks scattered over the image.
    chosen = np.flatnonzero(labels == 9)
    for _ in range(6):
        py = rng.uniform(3, 29, (len(chosen), 1, 1))
        px = rng.uniform(3, 29, (len(chosen), 1, 1))
        r = rng.uniform(1.5, 2.8, (len(chosen), 1, 1))
        masks[chosen] = np.maximum(
            masks[chosen], ((yy - py) ** 2 + (xx - px) ** 2 < r**2).astype(np.float32)
        )
    return masks


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """How hard the images are to tell apart."""

    noise: float  # pixel noise, standard deviation
    min_contrast: float  # least distance between foreground and background colours
    distractors: int  # small blobs of other colours scattered over the image
    occlusion: float  # chance that a random bar hides part of the pattern


EASY = Difficulty(noise=12, min_contrast=80, distractors=0, occlusion=0.0)
# For comparing architectures: a ResNet-20 stays well below perfect accuracy
# in a CPU-sized run, so differences between nets can show.
HARD = Difficulty(noise=40, min_contrast=25, distractors=3, occlusion=0.5)


def _colours(n: int, rng: np.random.Generator, min_contrast: float) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background colours, kept apart so the pattern is visible."""
    foreground = rng.uniform(0, 255, (n, 3))
    background = rng.uniform(0, 255, (n, 3))
    too_close = np.linalg.norm(foreground - background, axis=1) < min_contrast
    # Push a too-similar background to the opposite side of the colour cube.
    background[too_close] = 255 - foreground[too_close]
    return foreground.astype(np.float32), background.astype(np.float32)


def _clutter(images: np.ndarray, difficulty: Difficulty, rng: np.random.Generator) -> np.ndarray:
    """Distractor blobs in random colours, and bars that hide part of the pattern."""
    n = len(images)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    for _ in range(difficulty.distractors):
        cy, cx = rng.uniform(0, SIZE, (2, n, 1, 1))
        radius = rng.uniform(1.0, 2.5, (n, 1, 1))
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2)[..., None]
        images = np.where(blob, rng.uniform(0, 255, (n, 1, 1, 3)), images)
    hidden = rng.random(n) < difficulty.occlusion
    if hidden.any():
        start = rng.integers(0, SIZE - 6, (n, 1, 1))
        width = rng.integers(3, 7, (n, 1, 1))
        horizontal = rng.random((n, 1, 1)) < 0.5
        position = np.where(horizontal, yy, xx)
        bar = ((position >= start) & (position < start + width) & hidden[:, None, None])[..., None]
        images = np.where(bar, rng.uniform(0, 255, (n, 1, 1, 3)), images)
    return images


def generate(count: int, seed: int, difficulty: Difficulty = EASY) -> tuple[np.ndarray, np.ndarray]:
    """`count` images uint8 [count, 32, 32, 3] and labels int64 [count]."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASS_NAMES), count).astype(np.int64)
    masks = _masks(labels, rng)[..., None]
    foreground, background = _colours(count, rng, difficulty.min_contrast)
    # A linear gradient across the background makes the task less trivial.
    gy, gx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1) - 0.5
    slope = rng.uniform(-60, 60, (count, 2)).astype(np.float32)
    gradient = (slope[:, 0, None, None] * gy + slope[:, 1, None, None] * gx)[..., None]
    images = masks * foreground[:, None, None, :] + (1 - masks) * (background[:, None, None, :] + gradient)
    images = _clutter(images, difficulty, rng)
    images = images + rng.normal(0, difficulty.noise, (count, SIZE, SIZE, 3)).astype(np.float32)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels


def train_and_test(count: int, difficulty: Difficulty = EASY
                   ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The `synthetic:count` splits: `count` training images and a fifth as many test images."""
    return generate(count, TRAIN_SEED, difficulty), generate(max(count // 5, 100), TEST_SEED, difficulty)
