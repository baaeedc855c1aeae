"""The trainer's numbers stay what they were: the first steps' losses of a seeded run,
recorded from the trainer before its speed work (issue 23), must come out again.

A faster trainer may sum in another order (threads, fused kernels), and so do
TensorFlow's two CPU kernel libraries: with TF_ENABLE_ONEDNN_OPTS=0 (Eigen) the
8th loss differs from oneDNN's by up to 0.16 % (AMD EPYC Zen 4, AVX-512). So
float32 losses are compared within 0.5 %, far below what a change of the model,
the data order, the initialisation or the learning rate moves them by;
bfloat16 rounds every activation, so its losses must stay near the float32 ones.
"""

import pytest

from pipeline import flags
from pipeline.settings.config import TrainConfig
from pipeline.train.run import build_run

pytestmark = pytest.mark.slow  # trains

# Cross-entropy of each of the first 8 steps: depth 14, synthetic:400, quick recipe,
# batch 32 per replica, seed 0; recorded from the trainer of commit dd5bb24 (oneDNN on).
FLOAT32_TOLERANCE = 5e-3
RECORDED = {
    ("accumulated", None): [3.129466, 2.945391, 2.566552, 2.535754, 2.504222, 2.649834, 2.65037, 2.395367],
    ("accumulated", 2): [3.082185, 2.606935, 2.516215, 2.480619, 2.287812, 2.340101, 2.456834, 2.520773],
    ("resnet", None): [4.194991, 3.288273, 3.02661, 3.178648, 2.877199, 3.356561, 3.241835, 3.779099],
}


def step_losses(tmp_path, arch, devices=None, mixed_precision=False):
    """The first 8 steps' losses of a run built as `accresnet train` builds it."""
    run = build_run(flags.build(TrainConfig, dict(
        model_dir=str(tmp_path), arch=arch, depth=14, dataset="synthetic:400", recipe="quick", steps=8,
        batch_size=32, devices=devices, mixed_precision=mixed_precision, progress=False)))
    with run.precision.scope():
        batches = run.batches()
        return [run.step(batches)[0] for _ in range(8)]


@pytest.mark.parametrize("arch, devices", list(RECORDED))
def test_float32_losses_are_the_recorded_ones(tmp_path, arch, devices):
    assert step_losses(tmp_path, arch, devices) == pytest.approx(RECORDED[arch, devices], rel=FLOAT32_TOLERANCE)


def test_bfloat16_losses_stay_near_the_float32_ones(tmp_path):
    losses = step_losses(tmp_path, "accumulated", mixed_precision=True)
    assert losses == pytest.approx(RECORDED["accumulated", None], rel=0.02)
