"""Run every signature of an exported version on random inputs, the way TF Serving runs it.

    python tests/model_fuzz.py SAVED_MODEL_DIR SEED CASES

TF Serving loads a version into a TF1 session and feeds a request's tensors to
the signature's placeholders as they are (no shape check; that is the
graph's job). This does the same, with random ranks and shapes (zero and
large dimensions included), dtypes, file contents and tf.Example protos, and
prints one JSON line: how many cases each signature answered with which
status, and the process's peak RSS and its RSS once the model was loaded. A case may only end in a status; a
crashed process prints nothing.
"""

from __future__ import annotations

import collections
import io
import json
import resource
import sys

import numpy as np
import tensorflow as tf
from PIL import Image
from tensorflow.core.protobuf import config_pb2

from hostile_files import gif_hiding_a_frame, gif_of_frames, gif_of_sub_blocks, jpeg_declaring, png_declaring

DIMS = (0, 1, 2, 3, 4, 31, 32, 33, 1025)
MAX_ELEMENTS = 1 << 23  # what one case may allocate here, so that the fuzzer itself stays small


def random_shape(rng: np.random.Generator, max_rank: int) -> tuple[int, ...]:
    while True:
        shape = tuple(int(rng.choice(DIMS)) for _ in range(rng.integers(0, max_rank + 1)))
        if np.prod(shape, dtype=np.int64) <= MAX_ELEMENTS:
            return shape


def valid_shape(rng: np.random.Generator, inner: tuple[int, ...]) -> tuple[int, ...]:
    return (int(rng.integers(1, 5)), *inner)


def encoded(rng: np.random.Generator, valid: bool = False) -> bytes:
    """A file: a real image, a damaged one, random bytes, or one that declares too much."""
    kind = 0 if valid else rng.integers(0, 9)
    if kind <= 2:
        pixels = rng.integers(0, 256, (int(rng.integers(1, 80)), int(rng.integers(1, 80)), 3), dtype=np.uint8)
        buffer = io.BytesIO()
        formats = ["PNG", "JPEG", "GIF", "BMP"] + ([] if valid else ["WEBP"])
        Image.fromarray(pixels).save(buffer, format=str(rng.choice(formats)))
        data = buffer.getvalue()
        if kind == 1:  # truncated
            return data[:int(rng.integers(0, len(data)))]
        if kind == 2:  # a few bytes flipped
            damaged = bytearray(data)
            for position in rng.integers(0, len(damaged), 4):
                damaged[position] ^= 0xFF
            return bytes(damaged)
        return data
    if kind == 3:
        return rng.bytes(int(rng.integers(0, 200)))
    hostile = [lambda: png_declaring(30000, 30000), gif_hiding_a_frame, lambda: gif_of_frames(3000),
               lambda: gif_of_sub_blocks(20000), lambda: jpeg_declaring(65000, 65000)]
    return hostile[kind - 4]()


def example(rng: np.random.Generator, valid: bool = False) -> bytes:
    kind = 4 if valid else rng.integers(0, 5)
    if kind == 0:
        return rng.bytes(int(rng.integers(0, 64)))
    proto = tf.train.Example()
    feature = proto.features.feature
    if kind == 1:
        feature["image/encoded"].int64_list.value.extend([1, 2])
    elif kind == 2:
        feature["image/encoded"].bytes_list.value.extend([encoded(rng), encoded(rng)])
    elif kind == 3:
        feature["other"].bytes_list.value.append(encoded(rng))
    else:
        feature["image/encoded"].bytes_list.value.append(encoded(rng, valid))
    return proto.SerializeToString()


def strings(rng: np.random.Generator, make, max_rank: int) -> np.ndarray:
    if rng.random() < 0.25:  # a batch that should be answered
        return np.array([make(rng, valid=True) for _ in range(rng.integers(1, 4))], object)
    shape = random_shape(rng, max_rank) if rng.random() < 0.5 else (int(rng.integers(1, 4)),)
    if np.prod(shape, dtype=np.int64) > 64:
        shape = (2,)
    values = np.empty(shape, object)
    for index in np.ndindex(*shape):
        values[index] = make(rng)
    return values


def inputs_for(rng: np.random.Generator, dtype: tf.DType, declared: tuple) -> np.ndarray:
    """A value for a signature input of `dtype` and declared shape (None for unknown dims)."""
    if dtype == tf.string:
        return strings(rng, example if rng.random() < 0.5 else encoded, 3)
    inner = tuple(d for d in declared[1:])
    shape = valid_shape(rng, inner) if rng.random() < 0.3 and None not in inner else random_shape(rng, 6)
    if rng.random() < 0.15:  # a dtype other than the declared one
        return np.zeros(shape, rng.choice([np.float32, np.int32, np.int64]))
    return rng.integers(0, 256, shape).astype(dtype.as_numpy_dtype)


def main(path: str, seed: int, cases: int) -> None:
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph)
    with graph.as_default():
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
    rng = np.random.default_rng(seed)
    baseline_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    outcomes: dict[str, collections.Counter] = {}
    for key, signature in sorted(meta_graph.signature_def.items()):
        if key.startswith("__"):
            continue
        (alias, info), = signature.inputs.items()
        dtype = tf.dtypes.as_dtype(info.dtype)
        declared = tuple(None if d.size < 0 else d.size for d in info.tensor_shape.dim)
        run = session._make_callable_from_options(config_pb2.CallableOptions(
            feed=[info.name], fetch=[output.name for output in signature.outputs.values()]))
        counts = outcomes.setdefault(key, collections.Counter())
        for _ in range(cases):
            value = inputs_for(rng, dtype, declared)
            try:
                run(value)
                counts["OK"] += 1
            except tf.errors.OpError as error:
                counts[type(error).__name__] += 1
            except UnicodeDecodeError:
                # A status whose message quotes the input's bytes: TF Serving passes it on as it
                # is; Python's session binding cannot decode it (the model server maps it).
                counts["status with undecodable message"] += 1
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"outcomes": {key: dict(counts) for key, counts in outcomes.items()},
                      "baseline_rss_mib": baseline_mib, "peak_rss_mib": peak_mib}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
