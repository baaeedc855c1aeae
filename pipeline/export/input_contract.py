"""The exported signatures' input contract, checked in the graph.

TF Serving feeds a request's tensors to a signature's placeholders as they
are: TensorFlow's C++ session compares neither rank nor shape with what the
signature declares, so whatever the graph lets through reaches every kernel.
A wrong-rank image reaches oneDNN's convolution, whose CHECK aborts the whole
server on AVX-512 CPUs; a [1, 1, 1, 3] image is broadcast and answered. So
every signature's first ops check its inputs and fail with INVALID_ARGUMENT,
naming the input, its declared shape and the shape it got, before anything
heavy runs; TF Serving, which runs the graph as it is, is protected too.

The checks read the shape at run time from Rank and Shape ops made directly:
the traced function knows the declared shape, and a check written against
that would be folded away while the graph is built.
"""

from __future__ import annotations

import tensorflow as tf

# Rows one call may carry: 1024 images of 32x32 cost about 0.5 s of CPU and
# 0.3 GB of activations. Clients send 64 at a time, and TF Serving's batching
# (serving/config/batching.config) refuses a request above its max_batch_size.
MAX_ROWS = 1024


def describe_shape(inner_shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(["batch", *map(str, inner_shape)]) + "]"


def checked_batch(tensor: tf.Tensor, name: str, inner_shape: tuple[int, ...] = ()) -> tf.Tensor:
    """`tensor`, once it is known to have shape [rows, *inner_shape] with 1 <= rows <= MAX_ROWS."""
    rank = len(inner_shape) + 1
    actual_rank = tf.raw_ops.Rank(input=tensor)
    shape = tf.raw_ops.Shape(input=tensor, out_type=tf.int64)
    # The first `rank` dimensions, padded with zeros when there are fewer, so that
    # the comparison below has a fixed length whatever arrived.
    leading = tf.concat([shape, tf.zeros([rank], tf.int64)], 0)[:rank]
    rows = leading[0]
    fits = tf.equal(actual_rank, rank) & (rows >= 1) & (rows <= MAX_ROWS)
    if inner_shape:
        fits &= tf.reduce_all(tf.equal(leading[1:], tf.constant(inner_shape, tf.int64)))
    check = tf.debugging.Assert(
        fits, [f"input {name} must have shape {describe_shape(inner_shape)} with 1 to {MAX_ROWS} rows "
               f"({tensor.dtype.name}); got shape", shape], summarize=8)
    with tf.control_dependencies([check]):
        return tf.identity(tensor)
