import pytest

from pipeline import config as cfg


@pytest.mark.parametrize("depth, n", [(8, 1), (20, 3), (32, 5), (44, 7), (56, 9), (110, 18)])
def test_depth_is_6n_plus_2(depth, n):
    assert cfg.blocks_per_stage(depth) == n


@pytest.mark.parametrize("depth", [0, 2, 7, 21, 33, 100])
def test_wrong_depth_names_the_rule(depth):
    with pytest.raises(cfg.ConfigError, match=rf"6n\+2.*got {depth}"):
        cfg.blocks_per_stage(depth)


def test_unknown_arch_and_recipe():
    with pytest.raises(cfg.ConfigError, match="unknown arch 'vgg'"):
        cfg.ModelConfig(arch="vgg")
    with pytest.raises(cfg.ConfigError, match="unknown recipe 'fast'"):
        cfg.TrainConfig(model_dir="m", recipe="fast")
    with pytest.raises(cfg.ConfigError, match="--epochs or --steps"):
        cfg.TrainConfig(model_dir="m", epochs=1, steps=1)


def test_he2016_runs_64k_iterations_by_default():
    recipe = cfg.get_recipe("he2016")
    length = cfg.run_length(recipe, num_train=45_000, global_batch=128)
    assert length.total_steps == 64_000
    assert length.steps_per_epoch == 351
    assert length.epochs == 183  # 64k iterations of 128 on 45k images
    assert recipe.boundaries == (0.5, 0.75)  # 32k and 48k of 64k


def test_steps_cut_the_last_epoch_short():
    length = cfg.run_length(cfg.get_recipe("quick"), num_train=1000, global_batch=100, steps=25)
    assert (length.steps_per_epoch, length.epochs) == (10, 3)
    assert [length.steps_in_epoch(e) for e in range(3)] == [10, 10, 5]


def test_epochs_override_the_recipe():
    length = cfg.run_length(cfg.get_recipe("he2016"), num_train=1000, global_batch=100, epochs=4)
    assert length.total_steps == 40


def test_too_little_data_for_one_batch():
    with pytest.raises(cfg.ConfigError, match="fewer than one global batch"):
        cfg.run_length(cfg.get_recipe("quick"), num_train=100, global_batch=128)


def test_learning_rate_follows_the_global_batch_linearly():
    recipe = cfg.get_recipe("he2016")
    assert cfg.scaled_learning_rate(recipe, 128) == pytest.approx(0.1)
    assert cfg.scaled_learning_rate(recipe, 256) == pytest.approx(0.2)
    assert cfg.scaled_learning_rate(recipe, 64) == pytest.approx(0.05)


@pytest.mark.parametrize("name, optimizer, rate, batch, shortcut, zero_init", [
    ("he2016", "sgd", 0.1, 128, "padding", True),
    ("he2016-subset", "sgd", 0.1, 128, "padding", True),
    ("paper50", "sgd", 0.1, 128, "padding", True),
    ("keras", "adam", 1e-3, 32, "projection", False),
    ("keras-subset", "adam", 1e-3, 32, "projection", False),
])
def test_recipes_read_their_sources(name, optimizer, rate, batch, shortcut, zero_init):
    recipe = cfg.get_recipe(name)
    assert (recipe.optimizer, recipe.learning_rate, recipe.batch_size, recipe.shortcut) == \
        (optimizer, rate, batch, shortcut)
    assert recipe.zero_init_residual is zero_init
    if optimizer == "sgd":
        assert recipe.momentum == 0.9


def test_subset_recipes_keep_their_sources_schedules_in_fewer_epochs():
    for full, subset in (("he2016", "he2016-subset"), ("keras", "keras-subset")):
        assert cfg.get_recipe(subset).boundaries == cfg.get_recipe(full).boundaries
        assert cfg.get_recipe(subset).factors == cfg.get_recipe(full).factors
        assert cfg.get_recipe(subset).epochs == cfg.SUBSET_EPOCHS


def test_shortcut_setting_is_checked():
    assert cfg.TrainConfig(model_dir="m").net.shortcut is None  # the recipe's
    assert cfg.NetConfig(shortcut="padding").shortcut == "padding"
    with pytest.raises(cfg.ConfigError, match="unknown shortcut 'B'"):
        cfg.NetConfig(shortcut="B")
    assert cfg.ModelConfig().shortcut == "projection"
