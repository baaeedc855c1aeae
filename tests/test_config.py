import dataclasses

import pytest

from pipeline.model import architecture
from pipeline import errors, flags
from pipeline.settings import recipes
from pipeline.settings import config as cfg
from pipeline.settings.config import TrainConfig, scaled_learning_rate
from pipeline.errors import ConfigError
from pipeline.settings.recipes import RECIPES, parse_overrides, with_overrides
from pipeline.train.rundir import RunSettings


@pytest.mark.parametrize("depth, n", [(8, 1), (20, 3), (32, 5), (44, 7), (56, 9), (110, 18)])
def test_depth_is_6n_plus_2(depth, n):
    assert architecture.blocks_per_stage(depth) == n


@pytest.mark.parametrize("depth", [0, 2, 7, 21, 33, 100])
def test_wrong_depth_names_the_rule(depth):
    with pytest.raises(errors.ConfigError, match=rf"6n\+2.*got {depth}"):
        architecture.blocks_per_stage(depth)


def test_unknown_arch_and_recipe():
    with pytest.raises(errors.ConfigError, match="unknown arch 'vgg'"):
        architecture.ModelConfig(arch="vgg")
    with pytest.raises(errors.ConfigError, match="unknown recipe 'fast'"):
        cfg.TrainConfig(model_dir="m", recipe="fast")
    with pytest.raises(errors.ConfigError, match="--epochs or --steps"):
        cfg.TrainConfig(model_dir="m", epochs=1, steps=1)


def test_he2016_runs_64k_iterations_by_default():
    recipe = recipes.get_recipe("he2016")
    length = cfg.run_length(recipe, num_train=45_000, global_batch=128)
    assert length.total_steps == 64_000
    assert length.steps_per_epoch == 351
    assert length.epochs == 183  # 64k iterations of 128 on 45k images
    assert recipe.boundaries == (0.5, 0.75)  # 32k and 48k of 64k


def test_steps_cut_the_last_epoch_short():
    length = cfg.run_length(recipes.get_recipe("quick"), num_train=1000, global_batch=100, steps=25)
    assert (length.steps_per_epoch, length.epochs) == (10, 3)
    assert [length.steps_in_epoch(e) for e in range(3)] == [10, 10, 5]


def test_epochs_override_the_recipe():
    length = cfg.run_length(recipes.get_recipe("he2016"), num_train=1000, global_batch=100, epochs=4)
    assert length.total_steps == 40


def test_too_little_data_for_one_batch():
    with pytest.raises(errors.ConfigError, match="fewer than one global batch"):
        cfg.run_length(recipes.get_recipe("quick"), num_train=100, global_batch=128)


def test_learning_rate_follows_the_global_batch_linearly():
    recipe = recipes.get_recipe("he2016")
    assert cfg.scaled_learning_rate(recipe, 128) == pytest.approx(0.1)
    assert cfg.scaled_learning_rate(recipe, 256) == pytest.approx(0.2)
    assert cfg.scaled_learning_rate(recipe, 64) == pytest.approx(0.05)


@pytest.mark.parametrize("name, optimizer, rate, batch, shortcut, zero_init, l2, augmentation, bn", [
    ("he2016", "sgd", 0.1, 128, "padding", False, 5e-5, "pad-crop", (0.9, 1e-5)),
    ("he2016-subset", "sgd", 0.1, 128, "padding", False, 5e-5, "pad-crop", (0.9, 1e-5)),
    ("paper50", "sgd", 0.1, 128, "padding", False, 5e-5, "pad-crop", (0.9, 1e-5)),
    ("keras", "adam", 1e-3, 32, "projection", False, 1e-4, "shift", (0.99, 1e-3)),
    ("keras-subset", "adam", 1e-3, 32, "projection", False, 1e-4, "shift", (0.99, 1e-3)),
    # The settings of the first subset runs, whose records are committed.
    ("he2016-subset-v0", "sgd", 0.1, 128, "padding", True, 1e-4, "pad-crop", (0.9, 1e-5)),
    ("keras-subset-v0", "adam", 1e-3, 32, "projection", False, 1e-4, "pad-crop", (0.9, 1e-5)),
])
def test_recipes_read_their_sources(name, optimizer, rate, batch, shortcut, zero_init, l2, augmentation, bn):
    recipe = recipes.get_recipe(name)
    assert (recipe.optimizer, recipe.learning_rate, recipe.batch_size, recipe.shortcut) == \
        (optimizer, rate, batch, shortcut)
    assert recipe.zero_init_residual is zero_init
    assert recipe.weight_decay == pytest.approx(l2)
    assert recipe.augmentation == augmentation
    assert (recipe.batch_norm_momentum, recipe.batch_norm_epsilon) == bn
    if optimizer == "sgd":
        assert recipe.momentum == 0.9


def test_he_et_al_s_weight_decay_is_half_of_it_in_keras_l2_terms():
    # Keras' L2(l) adds l * sum(w^2) to the loss, so its gradient is 2 l w: He et al.'s decay of 1e-4 is L2(5e-5).
    assert 2 * recipes.get_recipe("he2016").weight_decay == pytest.approx(1e-4)
    model = cfg.TrainConfig(model_dir="m", recipe="he2016-subset").net.model_config(10, recipes.get_recipe("he2016-subset"))
    assert model.weight_decay == pytest.approx(5e-5) and model.zero_init_residual is False


def test_subset_recipes_are_their_sources_for_15_epochs_dropping_at_50_and_75_percent():
    for full, subset in (("he2016", "he2016-subset"), ("keras", "keras-subset")):
        source, short = recipes.get_recipe(full), recipes.get_recipe(subset)
        assert short.epochs == recipes.SUBSET_EPOCHS == 15 and short.steps is None
        assert (short.boundaries, short.factors) == ((0.5, 0.75), (0.1, 0.01))
        same = ("optimizer", "learning_rate", "batch_size", "momentum", "shortcut", "zero_init_residual",
                "weight_decay", "batch_norm_momentum", "batch_norm_epsilon", "augmentation")
        assert [getattr(short, k) for k in same] == [getattr(source, k) for k in same]
    # The first keras-subset reached lr 1e-5 after 60% of its 5 epochs; the new one never goes below 1e-5.
    assert recipes.get_recipe("keras-subset-v0").boundaries[1] == 0.6 and recipes.get_recipe("keras-subset-v0").epochs == 5
    keras_subset = recipes.get_recipe("keras-subset")
    assert keras_subset.learning_rate * min(keras_subset.factors) == pytest.approx(1e-5)


def test_the_keras_schedule_drops_after_the_examples_epochs_81_121_161_181():
    # The example counts epochs from 0 and lowers the rate when epoch > 80.
    recipe = recipes.get_recipe("keras")
    assert [round(b * recipe.epochs) for b in recipe.boundaries] == [81, 121, 161, 181]


def test_every_recipe_says_where_it_comes_from_and_every_recipe_is_in_the_help():
    from pipeline.settings.recipes import recipes_help

    help_text = recipes_help()
    for recipe in recipes.RECIPES.values():
        assert len(recipe.description) > 40, recipe.name
        assert f"{recipe.name}: {recipe.description}" in help_text


def test_zero_init_residual_is_the_recipes_unless_set():
    recipe = recipes.get_recipe("he2016-subset-v0")
    assert cfg.NetConfig().model_config(10, recipe).zero_init_residual is True
    assert cfg.NetConfig(zero_init_residual=False).model_config(10, recipe).zero_init_residual is False
    assert cfg.NetConfig(zero_init_residual=True).model_config(10, recipes.get_recipe("he2016")).zero_init_residual
    keras = cfg.NetConfig().model_config(10, recipes.get_recipe("keras"))
    assert (keras.batch_norm_momentum, keras.batch_norm_epsilon, keras.weight_decay) == (0.99, 1e-3, 1e-4)


def test_every_network_setting_of_a_recipe_reaches_the_model():
    recipe = dataclasses.replace(recipes.get_recipe("he2016"), shortcut="projection-bn", zero_init_residual=True,
                                 weight_decay=3e-4, batch_norm_momentum=0.5, batch_norm_epsilon=1e-2,
                                 classifier_initializer="torch-linear", projection_initializer="torch-conv",
                                 batch_norm_weight_decay=2e-5, fused_batch_norm=False)
    model = cfg.NetConfig().model_config(10, recipe)
    shared = architecture.network_settings(recipe)
    assert len(shared) == 9 and architecture.network_settings(model) == shared
    # Declared once: the recipe, the model config and the run record take them from NetworkSettings.
    for kind in (recipes.Recipe, architecture.ModelConfig, RunSettings):
        assert issubclass(kind, architecture.NetworkSettings)


def test_unknown_augmentation_is_a_clear_error():
    with pytest.raises(errors.ConfigError, match="unknown augmentation 'cutout'"):
        dataclasses.replace(recipes.get_recipe("he2016"), augmentation="cutout")
    assert cfg.TrainConfig(recipe="keras").augmentation == "shift"
    assert cfg.TrainConfig(recipe="keras", data=cfg.DataConfig(augment=False)).augmentation is None


def test_shortcut_setting_is_checked():
    assert cfg.TrainConfig(model_dir="m").net.shortcut is None  # the recipe's
    assert cfg.NetConfig(shortcut="padding").shortcut == "padding"
    with pytest.raises(errors.ConfigError, match="unknown shortcut 'B'"):
        cfg.NetConfig(shortcut="B")
    assert architecture.ModelConfig().shortcut == "projection"


def test_the_recipes_fields_are_flags_and_the_run_resolves_them():
    config = flags.build(TrainConfig, {"recipe": "paper50", "learning_rate": 0.05, "weight_decay": 1e-4,
                                        "momentum": 0.8, "optimizer": "sgd", "batch_size": 64,
                                        "set": "schedule=cosine,warmup=0.1,epochs=7"})
    recipe = config.recipe
    assert (recipe.learning_rate, recipe.momentum, recipe.weight_decay, recipe.batch_size) == (0.05, 0.8, 5e-5, 64)
    assert (recipe.schedule, recipe.warmup, recipe.epochs, recipe.steps) == ("cosine", 0.1, 7, None)
    assert recipe.name == "paper50" and RECIPES["paper50"].learning_rate == 0.1  # the named recipe is unchanged
    # The rate given is the rate of one replica's batch; more replicas scale it.
    assert scaled_learning_rate(recipe, 64) == 0.05 and scaled_learning_rate(recipe, 128) == 0.1
    assert flags.values(config)["set"] == "schedule=cosine,warmup=0.1,epochs=7"
    assert dataclasses.replace(config, seed=1).recipe == recipe  # applied once, however often rebuilt


def test_set_parses_each_field_by_its_type():
    assert parse_overrides("boundaries=[0.25,0.5],factors=[0.1,0.01],train_images=none,fused_batch_norm=false") == (
        ("boundaries", (0.25, 0.5)), ("factors", (0.1, 0.01)), ("train_images", None), ("fused_batch_norm", False))
    assert parse_overrides("step-boundaries=[100,200]") == (("step_boundaries", (100, 200)),)
    assert with_overrides(RECIPES["he2016"], {"epochs": 3}).steps is None  # a length replaces the other


@pytest.mark.parametrize("settings, message", [
    ({"set": "lr=0.1"}, "a recipe has no field 'lr'"),
    ({"set": "momentum"}, "--set takes FIELD=VALUE"),
    ({"set": "steps=1.5"}, r"--set steps=1.5: not a value of steps"),
    ({"set": "momentum=0.5,momentum=0.6"}, "--set gives momentum twice"),
    ({"momentum": 1.0}, "momentum must be below 1.0; got 1.0"),
    ({"learning_rate": 0.0}, "learning_rate must be above 0.0"),
    ({"weight_decay": -1e-4}, "weight_decay must be 0 or more"),
    ({"set": "optimizer=rmsprop"}, "unknown optimizer 'rmsprop'"),
    ({"set": "boundaries=[0.5]"}, "a factor for each boundary"),
    ({"set": "boundaries=[0.75,0.5],factors=[0.1,0.01]"}, "boundaries rise"),
    ({"momentum": 0.5, "set": "momentum=0.6"}, "--set gives momentum, which a flag of its own gives too"),
])
def test_bad_recipe_settings_are_named(settings, message):
    with pytest.raises(ConfigError, match=message):
        flags.build(TrainConfig, {"recipe": "paper50", **settings})
