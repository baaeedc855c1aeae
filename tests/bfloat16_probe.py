"""Run in a subprocess by tests/test_bfloat16_kernels.py, with the project's bfloat16 kernels
("project") or TensorFlow's ("stock"):

    python tests/bfloat16_probe.py ops OUT.npz project|stock     the four ops on awkward inputs, as uint16 bits
    python tests/bfloat16_probe.py train OUT.json project|stock  the losses of a few mixed-precision steps

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

from pipeline.kernels import bfloat16  # noqa: E402
from pipeline.train.precision import MIXED_BFLOAT16, Machine, kernels_for  # noqa: E402

# Zeros of both signs, infinities, a NaN, subnormals of both signs, the largest values.
SPECIAL = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-39, -1e-39, -3e-39, 3.38e38, -3.38e38], np.float32)
# Sizes, and what is left after the vectors of 16: several chunks of the thread pool (3, done
# alone); 7735 (7 alone); 7 (no vector at all); 24 (a vector of 8); 15 (8, then 7 alone); empty.
SIZES = {"chunks": (3, 16384 + 1), "odd": (7, 13, 5, 17), "short": (7,), "24": (24,), "small": (3, 5),
         "empty": (0, 3)}


def float_array(rng, shape, special=True):
    """Values over 20 binary orders of magnitude (so that the order of a sum shows), with the
    special values at the start (the vector loops) and at the end (the remainders)."""
    values = (rng.normal(size=shape) * 2.0 ** rng.integers(-10, 10, size=shape)).astype(np.float32).reshape(-1)
    if special and values.size >= 2 * SPECIAL.size:
        values[:SPECIAL.size] = SPECIAL
        values[-SPECIAL.size:] = SPECIAL[::-1]
    return values.reshape(shape)


def ties(shape):
    """(a, b) whose sums fall halfway between two bfloat16 values: 1 + k/128 plus 1/256."""
    count = int(np.prod(shape))
    a = (1.0 + (np.arange(count) % 128) / 128.0).astype(np.float32)
    b = np.where(np.arange(count) % 2 == 0, 2.0 ** -8, -(2.0 ** -8)).astype(np.float32)
    return a.reshape(shape), b.reshape(shape)


def op_results() -> dict[str, np.ndarray]:
    # Grappler's arithmetic optimizer reorders the inputs of sums; off, the graph is the one written.
    tf.config.optimizer.set_experimental_options({"arithmetic_optimization": False})
    rng = np.random.default_rng(0)
    results = {}
    for label, shape in SIZES.items():
        a, b, c = (tf.constant(float_array(rng, shape)) for _ in range(3))
        # A sum of three or more depends on which input's buffer holds it (that one goes first):
        # each sum gets inputs of its own, used by nothing else, so that it is input 0 in both runs.
        sums = {count: [tf.constant(float_array(rng, shape, special=i % 4 == 0)) for i in range(count)]
                for count in (3, 9, 10, 11, 17)}
        third = tf.constant(float_array(rng, shape))
        tie_a, tie_b = (tf.constant(t) for t in ties(shape))
        # Captured inputs: their buffers are never reused.
        kept, other = tf.cast(a, tf.bfloat16), tf.cast(b, tf.bfloat16)

        @tf.function
        def compute():
            # Inputs made inside the function are fresh buffers that the kernels may reuse for
            # their outputs, as in a training step.
            x, y, z = (tf.cast(t, tf.bfloat16) for t in (a, b, c))
            out = {
                "add": x + y, "add_kept": kept + other, "add_ties": tf.cast(tie_a, tf.bfloat16) + tf.cast(tie_b, tf.bfloat16),
                "add_n_2": tf.add_n([x, y]),
                # Only the third input's buffer can be reused: TensorFlow moves it to the front of the sum.
                "add_n_reuse_third": tf.add_n([kept, other, tf.cast(third, tf.bfloat16)]),
                "add_n_ties": tf.add_n([tf.cast(tie_a, tf.bfloat16), tf.cast(tie_b, tf.bfloat16),
                                        tf.cast(tie_b, tf.bfloat16)]),
                "relu": tf.nn.relu(x), "relu_kept": tf.nn.relu(kept),
                "relu_grad": tf.raw_ops.ReluGrad(gradients=x, features=y),
                "relu_grad_specials": tf.raw_ops.ReluGrad(gradients=y, features=z),
            }
            for count, inputs in sums.items():  # the first group, and groups of 8 after it
                out[f"add_n_{count}"] = tf.add_n([tf.cast(t, tf.bfloat16) for t in inputs])
            if shape[0]:
                out["add_broadcast"] = x + y[:1]
            return out

        results.update({f"{name}_{label}": tf.bitcast(value, tf.uint16).numpy() for name, value in compute().items()})
    return results


def train_losses(model_dir: str, project_kernels: bool) -> list[float]:
    """The losses of a mixed-precision run's first 4 steps, built as `accresnet train` builds it."""
    from pipeline import flags
    from pipeline.settings.config import TrainConfig
    from pipeline.train.run import build_run

    run = build_run(flags.build(TrainConfig, dict(
        model_dir=model_dir, arch="accumulated", depth=8, dataset="synthetic:256", recipe="quick", steps=4,
        batch_size=32, mixed_precision=True, project_bfloat16_kernels=project_kernels, progress=False)))
    with run.precision.scope():
        batches = run.batches()
        return [run.step(batches)[0] for _ in range(4)]


def main() -> None:
    mode, out, kernels_wanted = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
    library = kernels_for(MIXED_BFLOAT16, Machine.read()) if kernels_wanted == "project" else None
    print(f"library: {library or 'stock'}")
    for op in bfloat16.OPS:
        priorities = [kernel.priority for kernel in kernels.get_registered_kernels_for_op(op).kernel
                      if kernel.device_type == "CPU" and any(
                          tf.dtypes.as_dtype(dtype) == tf.bfloat16 for constraint in kernel.constraint
                          for dtype in constraint.allowed_values.list.type)]
        print(f"priorities {op}: {sorted(priorities)}")
    if mode == "ops":
        np.savez(out, **op_results())
        print(f"calls: {json.dumps(bfloat16.kernel_calls())}")
    else:
        with tempfile.TemporaryDirectory() as model_dir:
            out.write_text(json.dumps(train_losses(model_dir, kernels_wanted == "project")))


if __name__ == "__main__":
    main()
