"""tf.data input pipelines over decoded images, for training and evaluation.

Training data is an endless stream of batches whose order and augmentation
are pure functions of (seed, epoch, batch), computed with stateless random
ops. So the data position is just the epoch number: a run resumed at epoch e
sees exactly the batches an uninterrupted run would have seen, and two
architectures trained with one seed see the same batches.

Augmentation, the recipe's (He et al. 2016: 4-pixel zero pad, random 32x32
crop, horizontal flip; or the Keras cifar10_resnet example: random shifts of
up to 10% with nearest fill, horizontal flip), runs on whole uint8 batches,
vectorized, so the pipeline outruns the model by a wide margin on a CPU, with
fixed parallelism and prefetching rather than autotuning (see _with_options).
Scaling and mean subtraction are not here: they are the model's first layer.
"""

from __future__ import annotations

import os

import tensorflow as tf

from pipeline.data.splits import Split

PAD = 4
# The Keras example's width_shift_range and height_shift_range: a fraction of the size.
SHIFT = 0.1
PARALLEL_CALLS = max(2, os.cpu_count() or 1)
PREFETCH_BATCHES = 4


def augment_batch(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Pad by 4 with zeros, crop a random 32x32 window and flip half the images.

    images: uint8 [B, H, W, C]; seed: int [2], for stateless random ops.
    """
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    padded = tf.pad(images, [[0, 0], [PAD, PAD], [PAD, PAD], [0, 0]])
    seeds = tf.random.experimental.stateless_split(seed, num=3)
    offset_y = tf.random.stateless_uniform([batch], seeds[0], 0, 2 * PAD + 1, tf.int32)
    offset_x = tf.random.stateless_uniform([batch], seeds[1], 0, 2 * PAD + 1, tf.int32)
    flip = tf.random.stateless_uniform([batch], seeds[2]) < 0.5
    # A per-image crop as two batched gathers: rows, then columns.
    rows = offset_y[:, None] + tf.range(height)[None, :]
    cols = offset_x[:, None] + tf.range(width)[None, :]
    cols = tf.where(flip[:, None], tf.reverse(cols, axis=[1]), cols)
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(cropped, cols, axis=2, batch_dims=1)


def shift_batch(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Shift each image by up to 10% of its height and width, filling in with the
    nearest pixels, and flip half the images: what the Keras example's
    ImageDataGenerator(width_shift_range=0.1, height_shift_range=0.1,
    fill_mode="nearest", horizontal_flip=True) does, shifts by fractions of a
    pixel interpolated bilinearly as there, rounded back to uint8.

    images: uint8 [B, H, W, C]; seed: int [2], for stateless random ops.
    """
    shape = tf.shape(images)
    shifted = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(images, tf.float32), transforms=shift_transforms(shape, seed), output_shape=shape[1:3],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="NEAREST")
    return tf.saturate_cast(tf.round(shifted), tf.uint8)


def shift_transforms(shape: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """shift_batch's random transforms, [B, 8] as ImageProjectiveTransform takes
    them: output pixel (x, y) reads the input at (a x + b, y + c), where c is the
    vertical shift, and a = 1, b = the horizontal shift, or a = -1 and b =
    width - 1 + the shift for a mirrored image."""
    batch = shape[0]
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    seeds = tf.random.experimental.stateless_split(seed, num=3)
    shift_y = tf.random.stateless_uniform([batch], seeds[0], -SHIFT, SHIFT) * height
    shift_x = tf.random.stateless_uniform([batch], seeds[1], -SHIFT, SHIFT) * width
    flip = tf.random.stateless_uniform([batch], seeds[2]) < 0.5
    scale_x = tf.where(flip, -1.0, 1.0)
    offset_x = tf.where(flip, width - 1.0, 0.0) + shift_x
    zeros, ones = tf.zeros([batch]), tf.ones([batch])
    return tf.stack([scale_x, zeros, offset_x, zeros, ones, shift_y, zeros, zeros], axis=1)


# The recipes' augmentations by name (config.AUGMENTATIONS).
AUGMENT = {"pad-crop": augment_batch, "shift": shift_batch}


def _pipeline_context(input_context: tf.distribute.InputContext | None) -> tuple[int, int]:
    if input_context is None:
        return 1, 0
    return input_context.num_input_pipelines, input_context.input_pipeline_id


def train_dataset(
    split: Split,
    *,
    batch_size: int,
    seed: int,
    start_epoch: int,
    steps_per_epoch: int,
    start_step: int = 0,
    end_epoch: int | None = None,
    augmentation: str | None = "pad-crop",
    global_batch: int | None = None,
    input_context: tf.distribute.InputContext | None = None,
) -> tf.data.Dataset:
    """(uint8 images [b, 32, 32, 3], int32 labels [b]) batches of epochs
    `start_epoch` to `end_epoch` (exclusive; None: endless), starting at step
    `start_step` of the first: a run resumed mid-epoch sees the batches an
    uninterrupted run would have seen.

    `batch_size` is this pipeline's batch (the per-replica batch under a
    distribution strategy). Each epoch takes a fresh seeded permutation of the
    split, cut to `steps_per_epoch` global batches, and deals it out to the
    input pipelines (one per worker) in disjoint shards. `augmentation` names
    one of AUGMENT, or None for the images as they are.
    """
    num_pipelines, pipeline_id = _pipeline_context(input_context)
    global_batch = global_batch or batch_size * num_pipelines
    images = tf.constant(split.images)
    labels = tf.constant(split.labels, tf.int32)
    count = len(split)
    used = steps_per_epoch * global_batch
    augment = AUGMENT[augmentation] if augmentation else None
    if used > count:
        raise ValueError(f"{steps_per_epoch} steps of {global_batch} need {used} images; the split has {count}")

    def epoch_batches(epoch):
        epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])
        order = tf.random.experimental.stateless_shuffle(tf.range(count), seed=epoch_seed)[:used]
        indices = tf.data.Dataset.from_tensor_slices(order).shard(num_pipelines, pipeline_id)
        batches = indices.batch(batch_size, drop_remainder=True)
        return batches.enumerate().map(lambda step, idx: (epoch_seed, step, idx))

    def gather(epoch_seed, step, idx):
        batch = tf.gather(images, idx)
        if augment:
            batch_seed = tf.random.experimental.stateless_fold_in(
                tf.random.experimental.stateless_fold_in(epoch_seed, step), pipeline_id)
            batch = augment(batch, batch_seed)
        return batch, tf.gather(labels, idx)

    # A run's stream ends with its last epoch, so nothing is prefetched past it.
    dataset = tf.data.Dataset.range(start_epoch, end_epoch or tf.int64.max).flat_map(epoch_batches)
    dataset = dataset.skip(start_step)  # indices only: nothing is gathered or augmented for the skipped steps
    dataset = dataset.map(gather, num_parallel_calls=PARALLEL_CALLS)
    return _with_options(dataset).prefetch(PREFETCH_BATCHES)


def eval_dataset(
    split: Split,
    *,
    batch_size: int,
    global_batch: int | None = None,
    input_context: tf.distribute.InputContext | None = None,
) -> tf.data.Dataset:
    """(images, labels, weights) batches covering `split` once, no augmentation.

    The split is padded to a whole number of global batches with weight-0
    copies, so every replica of every worker runs the same number of equal
    batches (uneven ends would stall a multi-worker collective).
    """
    num_pipelines, pipeline_id = _pipeline_context(input_context)
    global_batch = global_batch or batch_size * num_pipelines
    images = tf.constant(split.images)
    labels = tf.constant(split.labels, tf.int32)
    count = len(split)
    padded_count = -(-count // global_batch) * global_batch

    def gather(idx):
        real = tf.minimum(idx, count - 1)
        weights = tf.cast(idx < count, tf.float32)
        return tf.gather(images, real), tf.gather(labels, real), weights

    dataset = tf.data.Dataset.range(padded_count).shard(num_pipelines, pipeline_id)
    dataset = dataset.batch(batch_size, drop_remainder=True).map(gather, num_parallel_calls=PARALLEL_CALLS)
    return _with_options(dataset).prefetch(PREFETCH_BATCHES)


def eval_steps(count: int, global_batch: int) -> int:
    """Global steps that `eval_dataset` takes to cover `count` images."""
    return -(-count // global_batch)


def _with_options(dataset: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    # The pipelines shard themselves; order must stay fixed for resumes.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.deterministic = True
    # No autotuning: its background thread outlives the loop and makes
    # destroying the iterator block for up to a minute; the pipeline is two
    # orders of magnitude faster than training without it.
    options.autotune.enabled = False
    return dataset.with_options(options)
