"""Shared test setup: quiet TensorFlow, two logical CPUs, tiny data."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

# Split the CPU before TensorFlow starts, so that MirroredStrategy tests can
# run two replicas; tests that do not ask for a strategy use CPU:0 only.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

from pipeline.data.splits import Split  # noqa: E402


def random_split(count: int, num_classes: int = 10, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    return Split(
        rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, num_classes, count).astype(np.int64),
    )


@pytest.fixture
def split_factory():
    return random_split


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A finished tiny training run (accumulated ResNet-8, synthetic data): its model dir."""
    from pipeline import flags
    from pipeline.settings.config import TrainConfig
    from pipeline.train.loop import train

    model_dir = tmp_path_factory.mktemp("trained")
    train(flags.build(TrainConfig, dict(model_dir=str(model_dir), arch="accumulated", depth=8,
                                        dataset="synthetic:400", recipe="quick", epochs=2, batch_size=32,
                                        progress=False)))
    return model_dir


@pytest.fixture(scope="session")
def exported_model(trained_run, tmp_path_factory):
    """The tiny run exported as version 1 under a fresh base path."""
    from pipeline.export.saved_model import export_run

    import pathlib

    base = tmp_path_factory.mktemp("models") / "accresnet"
    return pathlib.Path(export_run(trained_run, base))


# A test that needs a trained or exported model (and so every server test) belongs to the
# slow tier; `make test-fast` runs the others. Tests that train, start processes or scan
# manifests themselves say so with @pytest.mark.slow (modules of such tests, with pytestmark).
MODEL_FIXTURES = {"trained_run", "exported_model", "finished_run", "good_run", "experiment"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
