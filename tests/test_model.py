import keras
import numpy as np
import pytest

from pipeline.model.architecture import ModelConfig
from pipeline.errors import ConfigError
from pipeline.model.network import build_model, set_pixel_mean


def count_batch_norms(model: keras.Model) -> int:
    """BatchNormalization layers anywhere in the model, nested ones included."""
    return sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model._flatten_layers())



def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def images(count=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("depth, millions", [(20, 0.27), (32, 0.46)])
def test_plain_resnet_parameter_counts_match_he_et_al(depth, millions):
    model = build_model(ModelConfig("resnet", depth))
    assert trainable_count(model) / 1e6 == pytest.approx(millions, rel=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("depth", [8, 20, 32])
def test_accumulated_adds_exactly_one_batch_norm_per_block(depth):
    plain = build_model(ModelConfig("resnet", depth))
    accumulated = build_model(ModelConfig("accumulated", depth))
    blocks = 3 * (depth - 2) // 6
    assert count_batch_norms(accumulated) - count_batch_norms(plain) == blocks
    conv_count = lambda m: sum(isinstance(l, keras.layers.Conv2D) for l in m._flatten_layers())
    assert conv_count(plain) == conv_count(accumulated)


@pytest.mark.parametrize("classes", [2, 10, 100])
def test_any_class_count_outputs_probabilities(classes):
    model = build_model(ModelConfig("accumulated", 8, num_classes=classes))
    probabilities = np.asarray(model(images(), training=False))
    assert probabilities.shape == (4, classes)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_wrong_depth_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"depth must be 6n\+2.*got 30"):
        build_model(ModelConfig("accumulated", 30))


def test_model_takes_raw_pixels_and_subtracts_the_stored_mean():
    model = build_model(ModelConfig("resnet", 8))
    mean = np.random.default_rng(1).uniform(0, 1, (32, 32, 3)).astype(np.float32)
    set_pixel_mean(model, mean)
    standardize = keras.Model(model.input, model.get_layer("standardize").output)
    batch = images()
    np.testing.assert_allclose(np.asarray(standardize(batch)), batch / 255.0 - mean, atol=1e-6)


def _randomize_batch_norms(model, seed=0):
    """Non-trivial BN statistics so that the accumulator terms are distinguishable."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.5, beta.shape),
                               rng.normal(0, 0.5, mean.shape), rng.uniform(0.5, 2, variance.shape)])


def test_accumulator_sums_normalized_inputs_and_restarts_at_stage_boundaries():
    model = build_model(ModelConfig("accumulated", 14))  # n = 2 blocks per stage
    _randomize_batch_norms(model)
    names = [f"stage{s}_block{b}" for s in (1, 2, 3) for b in (1, 2)]
    blocks = [model.get_layer(name) for name in names]
    outputs = [model.get_layer("stem_relu").output]
    for block in blocks:
        outputs.extend(block.output)  # (y, accumulator)
    probe = keras.Model(model.input, outputs)
    values = [np.asarray(v) for v in probe(images(), training=False)]
    inputs = [values[0]] + values[1::2][:-1]  # x_i: the stem, then each block's y
    accumulators = values[2::2]

    def norm(block, x):
        return np.asarray(block.accumulator_norm(x, training=False))

    for i, (block, x, accumulator) in enumerate(zip(blocks, inputs, accumulators)):
        if block.changes_shape:  # stage 2 and 3, block 1: A = N(P(x)), nothing carried over
            expected = norm(block, np.asarray(block.projection(x)))
        elif i == 0:  # the network's first block: A_0 = 0
            expected = norm(block, x)
        else:  # A_i = A_{i-1} + N_i(x_i)
            expected = accumulators[i - 1] + norm(block, x)
        np.testing.assert_allclose(accumulator, expected, rtol=1e-4, atol=1e-4, err_msg=names[i])
        # y = ReLU(F(x) + A)
        branch = np.asarray(block.branch(x, training=False))
        np.testing.assert_allclose(values[1 + 2 * i], np.maximum(branch + accumulator, 0), rtol=1e-4, atol=1e-4)
    assert [b.changes_shape for b in blocks] == [False, False, True, False, True, False]


def test_plain_block_adds_the_identity_or_the_projection():
    model = build_model(ModelConfig("resnet", 8))
    _randomize_batch_norms(model)
    block = model.get_layer("stage2_block1")
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 16)).astype(np.float32)
    y = np.asarray(block(x, training=False))
    expected = np.maximum(np.asarray(block.branch(x, training=False)) + np.asarray(block.projection(x)), 0)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet", "accumulated"])
def test_saved_model_file_round_trips_through_get_config(arch, tmp_path):
    model = build_model(ModelConfig(arch, 8))
    _randomize_batch_norms(model)
    set_pixel_mean(model, np.full((32, 32, 3), 0.5, np.float32))
    model.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    batch = images()
    np.testing.assert_allclose(np.asarray(restored(batch)), np.asarray(model(batch)), rtol=1e-5, atol=1e-6)
    assert restored.get_layer("stage1_block1").get_config()["filters"] == 16


def test_fused_batch_norm_matches_keras_batch_norm():
    from pipeline.model.network import FusedBatchNormalization

    x = np.random.default_rng(0).normal(2.0, 3.0, (8, 6, 6, 5)).astype(np.float32)
    fused = FusedBatchNormalization(momentum=0.9, epsilon=1e-5)
    stock = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    fused.build(x.shape)
    stock.build(x.shape)
    rng = np.random.default_rng(1)
    weights = [rng.uniform(0.5, 1.5, 5), rng.normal(0, 1, 5), rng.normal(0, 1, 5), rng.uniform(0.5, 2, 5)]
    fused.set_weights(weights)
    stock.set_weights(weights)
    np.testing.assert_allclose(np.asarray(fused(x, training=False)), np.asarray(stock(x, training=False)),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fused(x, training=True)), np.asarray(stock(x, training=True)),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(fused.moving_mean), np.asarray(stock.moving_mean), rtol=1e-5, atol=1e-6)
    # The fused kernel's moving variance takes the unbiased batch variance (n = 8*6*6).
    n = 8 * 6 * 6
    batch_variance = x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(fused.moving_variance),
                               0.9 * weights[3] + 0.1 * batch_variance * n / (n - 1), rtol=1e-4)


WIDER = [("wrn", "accumulated-wrn", 10, dict(width=2)), ("wrn", "accumulated-wrn", 16, {}),
         ("resnext", "accumulated-resnext", 11, dict(cardinality=4, width=2)),
         ("resnext", "accumulated-resnext", 20, {})]


@pytest.mark.slow
@pytest.mark.parametrize("plain, accumulated, depth, extra", WIDER)
def test_wide_and_aggregated_nets_add_one_batch_norm_per_block(plain, accumulated, depth, extra):
    per_block = 6 if plain == "wrn" else 9
    blocks = 3 * (depth - (4 if plain == "wrn" else 2)) // per_block
    plain_model = build_model(ModelConfig(plain, depth, **extra))
    accumulated_model = build_model(ModelConfig(accumulated, depth, **extra))
    assert count_batch_norms(accumulated_model) - count_batch_norms(plain_model) == blocks
    probabilities = np.asarray(accumulated_model(images(), training=False))
    assert probabilities.shape == (4, 10)


@pytest.mark.slow
def test_wrn_and_resnext_layouts():
    wrn = build_model(ModelConfig("wrn", 28, width=10))
    assert wrn.name == "wrn-28-10" and trainable_count(wrn) / 1e6 == pytest.approx(36.5, rel=0.01)
    resnext = build_model(ModelConfig("resnext", 11, cardinality=4, width=2))
    grouped = [l for l in resnext._flatten_layers() if isinstance(l, keras.layers.Conv2D) and l.groups > 1]
    assert [l.groups for l in grouped] == [4, 4, 4] and grouped[0].filters == 4 * 2
    with pytest.raises(ConfigError, match=r"6n\+4"):
        ModelConfig("wrn", 20)
    with pytest.raises(ConfigError, match="cardinality"):
        ModelConfig("wrn", 16, cardinality=4)


@pytest.mark.slow
@pytest.mark.parametrize("arch, depth", [("accumulated-wrn", 10), ("accumulated-resnext", 11)])
def test_wider_variants_train_a_step_and_round_trip(arch, depth, tmp_path):
    model = build_model(ModelConfig(arch, depth, width=2, cardinality=2 if "resnext" in arch else None))
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    before = [np.array(w) for w in model.trainable_weights]
    loss = model.train_on_batch(images(8), np.arange(8) % 10)
    assert np.isfinite(loss)
    assert any(not np.allclose(a, np.array(b)) for a, b in zip(before, model.trainable_weights))
    model.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(np.asarray(restored(images())), np.asarray(model(images())), rtol=1e-5, atol=1e-6)


# --- the shortcut where a block changes shape ----------------------------------------------------


def test_padding_shortcut_is_the_subsampled_identity_with_zero_channels():
    from pipeline.model.network import PaddingShortcut

    x = np.random.default_rng(0).normal(size=(2, 8, 8, 16)).astype(np.float32)
    layer = PaddingShortcut(32, strides=2)
    y = np.asarray(layer(x))
    assert y.shape == (2, 4, 4, 32) == layer.compute_output_shape(x.shape)
    np.testing.assert_array_equal(y[..., :16], x[:, ::2, ::2, :])
    assert not y[..., 16:].any()
    assert not layer.weights
    assert PaddingShortcut.from_config(layer.get_config()).get_config() == layer.get_config()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet", "accumulated"])
def test_option_a_has_no_shortcut_parameters(arch):
    projection = build_model(ModelConfig(arch, 32, shortcut="projection"))
    padding = build_model(ModelConfig(arch, 32, shortcut="padding"))
    # The two 1x1 projections, 16 -> 32 and 32 -> 64 channels, are all that goes.
    assert trainable_count(projection) - trainable_count(padding) == 16 * 32 + 32 * 64
    assert not [l for l in padding._flatten_layers() if l.name == "projection"]
    assert count_batch_norms(padding) == count_batch_norms(projection)
    if arch == "resnet":  # He et al.'s 0.46M for ResNet-32 counts option A
        assert trainable_count(padding) == 464_154


@pytest.mark.parametrize("arch", ["resnet", "accumulated"])
def test_projection_bn_adds_a_batch_norm_per_shape_change(arch):
    projection = build_model(ModelConfig(arch, 8))
    with_bn = build_model(ModelConfig(arch, 8, shortcut="projection-bn"))
    assert count_batch_norms(with_bn) - count_batch_norms(projection) == 2
    assert trainable_count(with_bn) - trainable_count(projection) == 2 * (32 + 64)


@pytest.mark.parametrize("shortcut", ["padding", "projection-bn"])
def test_plain_and_accumulated_blocks_add_their_shortcut(shortcut):
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 16)).astype(np.float32)
    if shortcut == "padding":
        shortcut_of = lambda block: np.pad(x[:, ::2, ::2, :], [(0, 0), (0, 0), (0, 0), (0, 16)])
    else:
        shortcut_of = lambda block: np.asarray(block.projection_norm(block.projection(x), training=False))
    plain = build_model(ModelConfig("resnet", 8, shortcut=shortcut))
    _randomize_batch_norms(plain)
    block = plain.get_layer("stage2_block1")
    branch = np.asarray(block.branch(x, training=False))
    np.testing.assert_allclose(np.asarray(block(x, training=False)), np.maximum(branch + shortcut_of(block), 0),
                               rtol=1e-4, atol=1e-4)
    accumulated = build_model(ModelConfig("accumulated", 8, shortcut=shortcut))
    _randomize_batch_norms(accumulated)
    block = accumulated.get_layer("stage2_block1")
    y, accumulator = (np.asarray(v) for v in block(x, training=False))
    expected = np.asarray(block.accumulator_norm(shortcut_of(block), training=False))  # A = N(S(x))
    np.testing.assert_allclose(accumulator, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y, np.maximum(np.asarray(block.branch(x, training=False)) + expected, 0),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["resnet", "accumulated"])
def test_padding_nets_round_trip_through_get_config(arch, tmp_path):
    model = build_model(ModelConfig(arch, 8, shortcut="padding"))
    _randomize_batch_norms(model)
    model.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(np.asarray(restored(images())), np.asarray(model(images())), rtol=1e-5, atol=1e-6)
    assert restored.get_layer("stage3_block1").get_config()["shortcut"] == "padding"


def test_unknown_shortcut_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown shortcut 'identity'.*padding"):
        ModelConfig("resnet", 8, shortcut="identity")


@pytest.mark.parametrize("arch", ["resnet", "accumulated"])
def test_zero_init_residual_starts_every_block_as_its_shortcut(arch):
    model = build_model(ModelConfig(arch, 8, shortcut="padding", zero_init_residual=True))
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 16)).astype(np.float32)
    block = model.get_layer("stage2_block1")
    assert not np.asarray(block.branch(x, training=True)).any()  # F(x) = 0
    assert np.all(np.asarray(block.branch.bn1.gamma) == 1)  # only the branch's last BN starts at zero
    shortcut = np.pad(x[:, ::2, ::2, :], [(0, 0), (0, 0), (0, 0), (0, 16)])
    if arch == "resnet":  # y = ReLU(S(x))
        np.testing.assert_allclose(np.asarray(block(x, training=True)), np.maximum(shortcut, 0), atol=1e-6)
    else:  # y = ReLU(A), A = N(S(x))
        y, accumulator = (np.asarray(v) for v in block(x, training=True))
        np.testing.assert_allclose(y, np.maximum(accumulator, 0), atol=1e-6)
    default = build_model(ModelConfig(arch, 8))
    assert np.all(np.asarray(default.get_layer("stage2_block1").branch.bn2.gamma) == 1)


@pytest.mark.parametrize("arch", ["resnet", "accumulated"])
def test_weight_decay_and_batch_norm_settings_reach_every_layer(arch):
    from keras import layers

    model = build_model(ModelConfig(arch, 8, weight_decay=5e-5, batch_norm_momentum=0.99, batch_norm_epsilon=1e-3))
    nested = list(model._flatten_layers())
    convolutions = [layer for layer in nested if isinstance(layer, layers.Conv2D)]
    norms = [layer for layer in nested if isinstance(layer, layers.BatchNormalization)]
    assert len(convolutions) == 9 and len(norms) >= 7  # stem, 3 blocks of 2, 2 projections
    assert [float(layer.kernel_regularizer.l2) for layer in convolutions] == pytest.approx([5e-5] * 9)
    assert {(layer.momentum, layer.epsilon) for layer in norms} == {(0.99, 1e-3)}
    # The L2 loss is l * sum(w^2): the gradient 2 l w of an SGD weight decay of 2 l.
    kernels = sum(float(np.sum(np.square(layer.kernel))) for layer in convolutions)
    assert float(sum(model.losses)) == pytest.approx(5e-5 * kernels, rel=1e-5)
    default = build_model(ModelConfig(arch, 8))
    assert {(layer.momentum, layer.epsilon) for layer in default._flatten_layers()
            if isinstance(layer, layers.BatchNormalization)} == {(0.9, 1e-5)}
