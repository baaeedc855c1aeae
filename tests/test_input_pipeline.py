import numpy as np
import pytest
import tensorflow as tf

from pipeline.data import input_pipeline


def take(dataset, count):
    return [tuple(np.asarray(t) for t in element) for element in dataset.take(count)]


def test_train_batches_shapes_and_dtypes(split_factory):
    split = split_factory(100)
    images, labels = take(input_pipeline.train_dataset(split, batch_size=16, seed=0, start_epoch=0, steps_per_epoch=6), 1)[0]
    assert images.shape == (16, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (16,) and labels.dtype == np.int32


def _crop_kind(original, augmented):
    """'plain' or 'flipped' when `augmented` is a 32x32 window of `original`
    zero-padded by 4 (flipped or not), else None."""
    padded = np.pad(original, ((4, 4), (4, 4), (0, 0)))
    for y in range(9):
        for x in range(9):
            window = padded[y:y + 32, x:x + 32]
            if np.array_equal(window, augmented):
                return "plain"
            if np.array_equal(window[:, ::-1], augmented):
                return "flipped"
    return None


def test_augmentation_is_a_padded_crop_with_flips(split_factory):
    images = split_factory(64).images
    augmented = input_pipeline.augment_batch(tf.constant(images), tf.constant([1, 2])).numpy()
    assert augmented.shape == images.shape and augmented.dtype == np.uint8
    kinds = [_crop_kind(o, a) for o, a in zip(images, augmented)]
    assert None not in kinds
    # Over 64 images, about half are flipped and few keep their original place.
    assert 16 <= kinds.count("flipped") <= 48
    assert sum(np.array_equal(o, a) for o, a in zip(images, augmented)) < 8


def test_shift_augmentation_is_the_keras_examples_shift_with_nearest_fill(split_factory):
    from scipy import ndimage

    images = split_factory(64).images
    seed = tf.constant([3, 4])
    shifted = input_pipeline.shift_batch(tf.constant(images), seed).numpy()
    assert shifted.shape == images.shape and shifted.dtype == np.uint8
    transforms = input_pipeline.shift_transforms(tf.shape(images), seed).numpy()
    mirrored, offset_x, shift_y = transforms[:, 0] < 0, transforms[:, 2], transforms[:, 5]
    shift_x = np.where(mirrored, offset_x - 31, offset_x)
    assert np.abs(shift_x).max() <= 3.2 and np.abs(shift_y).max() <= 3.2  # 10% of 32 pixels
    assert (shift_x < -1).any() and (shift_x > 1).any() and (shift_y < -1).any() and (shift_y > 1).any()
    assert 16 <= mirrored.sum() <= 48
    # What ImageDataGenerator computes, with scipy.ndimage as it does: bilinear (order 1), nearest fill.
    for image, result, (scale, offset, dy) in zip(images, shifted, transforms[:, [0, 2, 5]]):
        expected = np.stack([ndimage.affine_transform(image[..., c].astype(np.float64), np.diag([1.0, scale]),
                                                      offset=(dy, offset), order=1, mode="nearest")
                             for c in range(3)], axis=-1)
        assert np.abs(np.round(expected) - result).max() <= 1


def test_no_augmentation_passes_images_through(split_factory):
    split = split_factory(40)
    images, labels = take(input_pipeline.train_dataset(split, batch_size=40, seed=0, start_epoch=0, steps_per_epoch=1,
                                             augmentation=None), 1)[0]
    # A permutation of the split, image and label kept together.
    order = [int(np.flatnonzero((split.images == image).all(axis=(1, 2, 3)))[0]) for image in images]
    assert sorted(order) == list(range(40))
    np.testing.assert_array_equal(labels, split.labels[order])


def test_same_seed_same_stream_other_seed_other_stream(split_factory):
    split = split_factory(64)

    def stream(seed):
        return take(input_pipeline.train_dataset(split, batch_size=8, seed=seed, start_epoch=0, steps_per_epoch=8), 12)

    first, again, other = stream(1), stream(1), stream(2)
    for (a, la), (b, lb) in zip(first, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    assert not all(np.array_equal(a, b) for (a, _), (b, _) in zip(first, other))


def test_epochs_reshuffle_and_a_resumed_stream_matches(split_factory):
    split = split_factory(64)
    kwargs = dict(batch_size=16, seed=3, steps_per_epoch=4)
    whole = take(input_pipeline.train_dataset(split, start_epoch=0, **kwargs), 8)
    resumed = take(input_pipeline.train_dataset(split, start_epoch=1, **kwargs), 4)
    for (a, la), (b, lb) in zip(whole[4:], resumed):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    epoch0 = np.concatenate([labels for _, labels in whole[:4]])
    epoch1 = np.concatenate([labels for _, labels in whole[4:]])
    assert sorted(epoch0) == sorted(epoch1) == sorted(split.labels)
    assert not np.array_equal(epoch0, epoch1)


def test_worker_shards_are_disjoint_and_cover_the_epoch(split_factory):
    split = split_factory(48)
    split.labels[:] = np.arange(48)  # labels name the images
    shards = []
    for worker in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker,
                                             num_replicas_in_sync=2)
        dataset = input_pipeline.train_dataset(split, batch_size=8, seed=0, start_epoch=0, steps_per_epoch=3,
                                     global_batch=16, input_context=context, augmentation=None)
        shards.append(np.concatenate([labels for _, labels in take(dataset, 3)]))
    assert not set(shards[0]) & set(shards[1])
    assert sorted(np.concatenate(shards)) == list(range(48))


def test_eval_pads_to_whole_global_batches_with_zero_weights(split_factory):
    split = split_factory(21)
    batches = take(input_pipeline.eval_dataset(split, batch_size=8), 10)
    assert len(batches) == input_pipeline.eval_steps(21, 8) == 3
    weights = np.concatenate([w for _, _, w in batches])
    assert weights.sum() == 21 and list(weights[21:]) == [0, 0, 0]
    labels = np.concatenate([l for _, l, _ in batches])[:21]
    np.testing.assert_array_equal(labels, split.labels)


def test_too_many_steps_for_the_split(split_factory):
    with pytest.raises(ValueError, match="need 160 images; the split has 100"):
        input_pipeline.train_dataset(split_factory(100), batch_size=16, seed=0, start_epoch=0, steps_per_epoch=10)
