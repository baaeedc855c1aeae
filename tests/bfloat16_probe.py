"""Run in a subprocess by tests/test_bfloat16_kernels.py, with or without the project's
bfloat16 kernels (ACCRESNET_BFLOAT16_KERNELS=stock keeps TensorFlow's):

    python tests/bfloat16_probe.py ops OUT.npz     the four ops on awkward inputs, as uint16 bits
    python tests/bfloat16_probe.py train OUT.json  the losses of a few mixed-precision steps

Prints which library was loaded (or "stock") and the priorities of the CPU bfloat16
kernels registered for each op.
"""

import json
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.python.framework import kernels  # noqa: E402

from pipeline import bfloat16_kernels  # noqa: E402

OPS = ("AddV2", "AddN", "Relu", "ReluGrad")
# Zeros of both signs, infinities, a NaN, subnormals, the largest values, and halfway cases
# of float32 -> bfloat16 rounding.
SPECIAL = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-39, -1e-39, 3.38e38, -3.38e38,
                    1.00390625, 1.01171875, -2.0078125], np.float32)


def bfloat16_array(rng, shape, special=True):
    values = (rng.normal(size=shape) * 3).astype(np.float32).reshape(-1)
    if special:  # at the start (the vector loop) and at the end (the remainder)
        values[:SPECIAL.size] = SPECIAL
        values[-SPECIAL.size:] = SPECIAL[::-1]
    return tf.cast(values.reshape(shape), tf.bfloat16)


def op_results() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    big = (8, 32, 32, 16)  # several chunks of the thread pool
    odd = (7, 13, 5, 17)  # a remainder of 7 after the 16-element vectors
    a, b, c = (bfloat16_array(rng, big, special=i == 0) for i in range(3))
    d, e = bfloat16_array(rng, odd), bfloat16_array(rng, odd[::-1]).numpy().T
    e = tf.constant(e)
    many = [bfloat16_array(rng, big, special=i % 3 == 0) for i in range(9)]
    small = bfloat16_array(rng, (3, 5))

    @tf.function
    def compute():
        return {
            "add": a + b, "add_odd": d + e, "add_broadcast": a + c[0], "add_small": small + small,
            "add_n_1": tf.add_n([a]), "add_n_2": tf.add_n([a, b]), "add_n_3": tf.add_n([a, b, c]),
            "add_n_9": tf.add_n(many), "add_n_odd": tf.add_n([d, e, d]),
            "relu": tf.nn.relu(a), "relu_odd": tf.nn.relu(d), "relu_small": tf.nn.relu(small),
            "relu_grad": tf.raw_ops.ReluGrad(gradients=b, features=a),
            "relu_grad_specials": tf.raw_ops.ReluGrad(gradients=a, features=b),
            "relu_grad_odd": tf.raw_ops.ReluGrad(gradients=d, features=e),
        }

    return {name: tf.bitcast(value, tf.uint16).numpy() for name, value in compute().items()}


def train_losses(model_dir: str) -> list[float]:
    from pipeline import flags, train as training
    from pipeline.config import TrainConfig
    from pipeline.trainer import Trainer

    losses, original = [], Trainer.train_step

    def step(self, iterator, stop_vote):
        result = original(self, iterator, stop_vote)
        losses.append(float(result[0]))
        return result

    Trainer.train_step = step
    training.train(flags.build(TrainConfig, dict(
        model_dir=model_dir, arch="accumulated", depth=8, dataset="synthetic:256", recipe="quick", steps=4,
        batch_size=32, mixed_precision=True, progress=False)))
    return losses


def main() -> None:
    mode, out = sys.argv[1], pathlib.Path(sys.argv[2])
    library = bfloat16_kernels.load("mixed_bfloat16")
    print(f"library: {library or 'stock'}")
    for op in OPS:
        priorities = [kernel.priority for kernel in kernels.get_registered_kernels_for_op(op).kernel
                      if kernel.device_type == "CPU" and any(
                          tf.dtypes.as_dtype(dtype) == tf.bfloat16 for constraint in kernel.constraint
                          for dtype in constraint.allowed_values.list.type)]
        print(f"priorities {op}: {sorted(priorities)}")
    if mode == "ops":
        np.savez(out, **op_results())
    else:
        with tempfile.TemporaryDirectory() as model_dir:
            out.write_text(json.dumps(train_losses(model_dir)))


if __name__ == "__main__":
    main()
