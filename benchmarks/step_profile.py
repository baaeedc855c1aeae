"""Where one training step's time goes: TensorFlow's profiler trace of the trainer's
steps, summed per class of op, with the FLOPs of each class.

The run is built as `accresnet train` builds it (pipeline/train/run.py's
build_run) on synthetic data; after warm-up
steps, `--steps` steps are timed, then `--traced-steps` more run under
`tf.profiler.experimental`. The trace's op events (the executor threads'
`name:type` events) are classified and summed per step:

- op time: the kernels' wall time per step, summed. Ops can overlap (two
  inter-op threads), so the column may add up to more than the step;
- FLOPs: 2 x multiply-adds of the convolutions (forward, gradient of the
  input, gradient of the kernel: each one forward pass's count) and of the
  classifier, counted from the traced graph's static shapes; the other ops
  move memory and hardly compute;
- GFLOP/s: the class's FLOPs over its own op time.

    python benchmarks/step_profile.py [--arch accumulated] [--mixed-precision] [--devices N] [--trace-dir DIR]

With --convs, each of the net's convolution shapes is timed alone instead
(forward and both gradients, float32 and bfloat16, batch 128): the rate the
convolutions reach at these shapes, which bounds the whole step's. With
--memory-ops, the blocks' memory-bound kernels (additions, ReLU and its
gradient, BN forward and backward) alone at each stage's activation shape:
the bytes per second they move, in float32 and in bfloat16 (TensorFlow's kernels, or with --project-bfloat16-kernels the
project's opt-in ones where they load, pipeline/kernels/bfloat16.py).

    python benchmarks/step_profile.py --convs
    python benchmarks/step_profile.py --memory-ops
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import pathlib
import re
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import tensorflow as tf  # noqa: E402

from flops import forward_flops, layer_key  # noqa: E402
from pipeline import flags  # noqa: E402
from pipeline.settings.config import TrainConfig  # noqa: E402
from pipeline.train.distribute import Cluster  # noqa: E402
from pipeline.train.precision import MIXED_BFLOAT16, Machine, kernels_for  # noqa: E402
from pipeline.train.run import build_run  # noqa: E402

# Op classes, first match wins: (class, pattern on "type" or "name:type").
OP_CLASSES = (
    ("conv forward", r"Conv2D$|FusedConv2D"),
    ("conv grad input", r"Conv2DBackpropInput"),
    ("conv grad kernel", r"Conv2DBackpropFilter"),
    ("BN forward", r"FusedBatchNormV3|FusedBatchNormEx"),
    ("BN backward", r"FusedBatchNormGrad"),
    ("ReLU forward and backward", r"Relu"),
    ("all-reduce and copies across replicas", r"Collective|NcclAllReduce|^_Send|^_Recv|_HostSend|_HostRecv"),
    ("optimizer update", r"ResourceApply|AssignSub|AssignAdd|AssignVariable"),
    ("casts", r"^Cast$"),
    ("input pipeline (IteratorGetNext)", r"IteratorGetNext|MultiDeviceIteratorGetNext"),
    ("residual and accumulator adds", r"^(AddV2|AddN|Add)$"),
    ("classifier, loss, regularizer, metrics", r"MatMul|Softmax|SparseSoftmax|Log|Square|Sum|Mean|Mul|L2Loss"),
)
CONV_DIRECTIONS = {"Conv2D": "conv forward", "Conv2DBackpropInput": "conv grad input",
                   "Conv2DBackpropFilter": "conv grad kernel"}


def op_class(name: str, op_type: str) -> str:
    base = op_type.removeprefix("_MklNative").removeprefix("_Mkl").removeprefix("_")
    for label, pattern in OP_CLASSES:
        if re.search(pattern, base):
            return label
    return "other"


@dataclasses.dataclass
class ClassTotal:
    seconds: float = 0.0
    count: int = 0
    flops: float = 0.0


def op_events(trace_dir: str):
    """(op name, op type, seconds) of every kernel the executor ran in the trace."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    paths = sorted(pathlib.Path(trace_dir).rglob("*.xplane.pb"))
    if not paths:
        raise RuntimeError(f"no *.xplane.pb under {trace_dir}: the profiler wrote no trace")
    space = xplane_pb2.XSpace()
    space.ParseFromString(paths[-1].read_bytes())
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith(("tf_Compute", "tf_inter_op")):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" not in name or "::" in name:  # executor and thread-pool events, not kernels
                    continue
                op_name, op_type = name.rsplit(":", 1)
                yield op_name, op_type, event.duration_ps * 1e-12


def classify(events, flops: dict[str, int], steps: int) -> dict[str, ClassTotal]:
    """Per-step totals by op class. `flops` are one replica's, and each replica's kernels are
    events of their own, so a convolution counts once per direction and replica."""
    totals: dict[str, ClassTotal] = collections.defaultdict(ClassTotal)
    for op_name, op_type, seconds in events:
        label = op_class(op_name, op_type)
        total = totals[label]
        total.seconds += seconds / steps
        total.count += 1
        base = re.sub(r"^_(MklNative|Mkl)?(Fused)?", "", op_type)
        if label in CONV_DIRECTIONS.values() or base == "MatMul":
            total.flops += flops.get(layer_key(op_name), 0) / steps
    for total in totals.values():
        total.count = round(total.count / steps)
    return dict(totals)


def profile(arch: str, mixed_precision: bool, devices: int | None, batch: int, steps: int, traced_steps: int,
            trace_dir: str, project_kernels: bool = False) -> tuple[float, dict[str, ClassTotal], int]:
    """(images/s over `steps` timed steps, per-step op classes of `traced_steps` traced ones,
    training FLOPs per image)."""
    replicas = devices or 1
    with tempfile.TemporaryDirectory() as model_dir:
        config = flags.build(TrainConfig, dict(
            model_dir=model_dir, arch=arch, depth=32, dataset="synthetic:10000", val_split=0.0, recipe="quick",
            steps=10_000, batch_size=batch // replicas, progress=False, mixed_precision=mixed_precision,
            project_bfloat16_kernels=project_kernels, devices=devices))
        run = build_run(config, Cluster())
        with run.precision.scope():
            flops = forward_flops(run.trainer.model, batch // replicas)
            batches = run.batches()
            for _ in range(5):
                run.step(batches)
            started = time.perf_counter()
            for _ in range(steps):
                run.step(batches)
            rate = steps * batch / (time.perf_counter() - started)
            tf.profiler.experimental.start(trace_dir)
            try:
                for _ in range(traced_steps):
                    run.step(batches)
            finally:
                tf.profiler.experimental.stop()
    per_image = 3 * sum(flops.values()) / (batch // replicas)
    return rate, classify(op_events(trace_dir), flops, traced_steps), per_image


@dataclasses.dataclass(frozen=True)
class ConvShape:
    batch: int
    size: int  # input height = width
    inputs: int
    outputs: int
    kernel: int
    stride: int

    @property
    def flops(self) -> int:
        out = -(-self.size // self.stride)
        return 2 * self.batch * out * out * self.outputs * self.kernel * self.kernel * self.inputs


def conv_shapes(model, batch: int) -> collections.Counter:
    """The forward pass's distinct convolutions and how many of each."""
    forward = tf.function(lambda images: model(images, training=False))
    graph = forward.get_concrete_function(tf.TensorSpec([batch, 32, 32, 3], tf.uint8)).graph
    shapes = collections.Counter()
    for op in graph.get_operations():
        if op.type == "Conv2D":
            kernel, _, inputs, outputs = op.inputs[1].shape
            shapes[ConvShape(batch, op.inputs[0].shape[1], inputs, outputs, kernel, op.get_attr("strides")[1])] += 1
    return shapes


def time_conv(shape: ConvShape, dtype: tf.DType, repeats: int = 10) -> dict[str, float]:
    """Seconds of one forward, input-gradient and kernel-gradient convolution of `shape`, alone:
    `repeats` in a loop inside one graph, best of 5 calls."""
    strides = [1, shape.stride, shape.stride, 1]
    x = tf.cast(tf.random.normal([shape.batch, shape.size, shape.size, shape.inputs]), dtype)
    w = tf.cast(tf.random.normal([shape.kernel, shape.kernel, shape.inputs, shape.outputs]), dtype)
    dy = tf.cast(tf.random.normal(tf.nn.conv2d(x, w, strides, "SAME").shape), dtype)
    kernels = {
        "conv forward": lambda: tf.nn.conv2d(x, w, strides, "SAME"),
        "conv grad input": lambda: tf.raw_ops.Conv2DBackpropInput(
            input_sizes=tf.shape(x), filter=w, out_backprop=dy, strides=strides, padding="SAME"),
        "conv grad kernel": lambda: tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=tf.shape(w), out_backprop=dy, strides=strides, padding="SAME"),
    }
    return {name: time_in_graph([kernel], repeats) for name, kernel in kernels.items()}


def time_in_graph(calls, repeats: int) -> float:
    """Seconds of one call, alone: each loop iteration makes `calls` (functions of no argument
    returning a tensor) one after the other, `repeats` iterations in a loop inside one graph (no
    Python or function-call overhead per call, no two calls at once), best of 5 runs of the loop."""
    @tf.function(autograph=False)
    def repeated():
        def body(i, total):  # one element of each result kept: none is optimized away
            for call in calls:
                with tf.control_dependencies([total]):
                    total = total + tf.cast(tf.reshape(call(), [-1])[0], tf.float32)
            return i + 1, total

        return tf.while_loop(lambda i, _: i < repeats, body, (tf.constant(0), tf.constant(0.0)),
                             parallel_iterations=1)[1]

    repeated().numpy()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        repeated().numpy()
        best = min(best, (time.perf_counter() - started) / (repeats * len(calls)))
    return best


def conv_table(arch: str, batch: int) -> str:
    """Each of the net's convolution shapes timed alone, float32 and bfloat16, and what
    a training step's convolutions would take at those rates."""
    from pipeline.model.architecture import ModelConfig
    from pipeline.model.network import build_model

    shapes = conv_shapes(build_model(ModelConfig(arch, 32)), batch)
    lines = ["| shape (input, in -> out channels, kernel, stride) | count | precision | forward GFLOP/s | "
             "grad input GFLOP/s | grad kernel GFLOP/s |", "|---|---:|---|---:|---:|---:|"]
    totals = {}
    for dtype in (tf.float32, tf.bfloat16):
        step_seconds, step_flops = 0.0, 0.0
        for index, (shape, count) in enumerate(shapes.items()):
            seconds = time_conv(shape, dtype)
            if index == 0:  # the stem's input is the image: no gradient flows to it
                del seconds["conv grad input"]
            step_seconds += count * sum(seconds.values())
            step_flops += count * shape.flops * len(seconds)
            rates = [f"{shape.flops / seconds[name] / 1e9:.0f}" if name in seconds else "-"
                     for name in ("conv forward", "conv grad input", "conv grad kernel")]
            lines.append(f"| {shape.size}x{shape.size}, {shape.inputs} -> {shape.outputs}, {shape.kernel}x{shape.kernel}, "
                         f"{shape.stride} | {count} | {dtype.name} | {' | '.join(rates)} |")
        totals[dtype.name] = (step_seconds, step_flops)
    lines.append("")
    for name, (seconds, flops) in totals.items():
        lines.append(f"{name}: a step's convolutions alone take {1000 * seconds:.1f} ms "
                     f"({flops / seconds / 1e9:.0f} GFLOP/s; at most {batch / seconds:.0f} images/s)")
    return "\n".join(lines)


# The memory-bound kernels of a block, as the trainer's graph runs them, and the fewest tensors
# each one can read and write (in units of one activation tensor): what its GB/s is counted from.
MEMORY_OPS = {
    "AddV2": (lambda a, b: a + b, 3),
    "AddN of 2 (gradients)": (lambda a, b: tf.add_n([a, b]), 3),
    "Relu": (lambda a, b: tf.nn.relu(a), 2),
    "ReluGrad": (lambda a, b: tf.raw_ops.ReluGrad(gradients=a, features=b), 3),
    # At least: the statistics read the input, the normalising pass reads it again and writes.
    "FusedBatchNormV3 (training)": (lambda a, b: tf.compat.v1.nn.fused_batch_norm(
        a, tf.ones(a.shape[-1:]), tf.zeros(a.shape[-1:]), epsilon=1e-5, is_training=True)[0], 3),
    # At least: the reductions read dy and x, the pass that writes dx reads both again.
    "FusedBatchNormGradV3": (lambda a, b: tf.raw_ops.FusedBatchNormGradV3(
        y_backprop=a, x=b, scale=tf.ones(a.shape[-1:]), reserve_space_1=tf.zeros(a.shape[-1:]),
        reserve_space_2=tf.ones(a.shape[-1:]), reserve_space_3=tf.zeros(a.shape[-1:]), is_training=True)[0], 5),
}


# More than the last-level cache: the inputs rotate through copies this large in all, so that each
# call reads them from memory, as a training step does (its activations do not stay in cache).
FROM_MEMORY_BYTES = 256 * 2**20


def time_memory_op(kernel, shape: list[int], dtype: tf.DType, copies: int) -> float:
    """Seconds of one call of `kernel(a, b)` on activations of `shape`, its inputs taken in turn
    from `copies` distinct pairs."""
    pairs = [tuple(tf.cast(tf.random.normal(shape), dtype) for _ in range(2)) for _ in range(copies)]
    return time_in_graph([lambda a=a, b=b: kernel(a, b) for a, b in pairs], max(2, 40 // copies))


def memory_ops_table(batch: int) -> str:
    """Each memory-bound kernel of a block alone, at each stage's activation shape, float32 and
    bfloat16: milliseconds with the inputs in cache and read from memory, and the bytes it moves
    per second from memory (counted as the least traffic the kernel can have)."""
    lines = ["| kernel | activation | float32 ms, cached / from memory | bfloat16 ms, cached / from memory | "
             "bfloat16 / float32 time, from memory | GB/s from memory (least traffic), float32 / bfloat16 |",
             "|---|---|---:|---:|---:|---:|"]
    for name, (kernel, tensors) in MEMORY_OPS.items():
        for size, channels in ((32, 16), (16, 32), (8, 64)):
            shape = [batch, size, size, channels]
            cells = {}
            for dtype in (tf.float32, tf.bfloat16):
                tensor_bytes = batch * size * size * channels * dtype.size
                copies = -(-FROM_MEMORY_BYTES // (2 * tensor_bytes))
                cells[dtype] = (time_memory_op(kernel, shape, dtype, 1), time_memory_op(kernel, shape, dtype, copies),
                                tensor_bytes)
            (fp32_hot, fp32, fp32_bytes), (bf16_hot, bf16, bf16_bytes) = cells[tf.float32], cells[tf.bfloat16]
            lines.append(f"| {name} | {'x'.join(map(str, shape))} | {1000 * fp32_hot:.2f} / {1000 * fp32:.2f} | "
                         f"{1000 * bf16_hot:.2f} / {1000 * bf16:.2f} | {bf16 / fp32:.2f} | "
                         f"{tensors * fp32_bytes / fp32 / 1e9:.0f} / {tensors * bf16_bytes / bf16 / 1e9:.0f} |")
    return "\n".join(lines)


def table(rate: float, classes: dict[str, ClassTotal], batch: int) -> str:
    step_ms = 1000 * batch / rate
    op_ms = sum(total.seconds for total in classes.values()) * 1000
    lines = [f"step {step_ms:.1f} ms ({rate:.0f} images/s); kernels {op_ms:.1f} ms per step\n",
             "| op class | ops/step | ms/step | share of kernel time | GFLOP/step | GFLOP/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, total in sorted(classes.items(), key=lambda item: -item[1].seconds):
        flop_columns = (f"{total.flops / 1e9:.2f} | {total.flops / 1e9 / total.seconds:.0f}" if total.flops
                        else " | ")
        lines.append(f"| {label} | {total.count} | {1000 * total.seconds:.1f} | "
                     f"{total.seconds * 1000 / op_ms:.1%} | {flop_columns} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="accumulated", choices=("resnet", "accumulated"))
    parser.add_argument("--mixed-precision", action="store_true")
    parser.add_argument("--devices", type=int, default=None, help="split the CPU into N logical devices")
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--traced-steps", type=int, default=5)
    parser.add_argument("--trace-dir", default=None, help="keep the trace here (TensorBoard's profile plugin reads it)")
    parser.add_argument("--convs", action="store_true",
                        help="instead: time each of the net's convolution shapes alone, float32 and bfloat16")
    parser.add_argument("--memory-ops", action="store_true",
                        help="instead: time the blocks' memory-bound kernels (adds, ReLU, BN) alone at each "
                             "stage's shape, float32 and bfloat16")
    parser.add_argument("--project-bfloat16-kernels", action="store_true",
                        help="the project's opt-in bfloat16 kernels where they load, as the trainer's flag")
    args = parser.parse_args(argv)
    if args.memory_ops:
        library = kernels_for(MIXED_BFLOAT16, Machine.read()) if args.project_bfloat16_kernels else None
        print(f"bfloat16 AddV2, AddN, Relu, ReluGrad: {'the project' if library else 'TensorFlow'}'s kernels\n")
        print(memory_ops_table(args.batch))
        return
    if args.convs:
        print(conv_table(args.arch, args.batch))
        return
    with tempfile.TemporaryDirectory() as scratch:
        rate, classes, per_image = profile(args.arch, args.mixed_precision, args.devices, args.batch, args.steps,
                                           args.traced_steps, args.trace_dir or scratch, args.project_bfloat16_kernels)
    print(f"{args.arch} ResNet-32, {'mixed bfloat16' if args.mixed_precision else 'float32'}, global batch "
          f"{args.batch}, {args.devices or 1} replica(s); {per_image / 1e9:.3f} GFLOP per training image")
    print(table(rate, classes, args.batch))


if __name__ == "__main__":
    main()
