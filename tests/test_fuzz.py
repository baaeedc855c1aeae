"""Property-based fuzzing of what a client controls: TensorProtos of any dtype,
shape and contents, and REST bodies (any JSON, request-shaped or mangled). Whatever arrives, decoding gives the declared array within
the size bound or refuses it with INVALID_ARGUMENT / RESOURCE_EXHAUSTED; it
never raises anything else, and never allocates past the bound.

Each test has a fixed budget (examples and no per-example deadline), so the
suite's time stays bounded on a slow machine.
"""

import grpc
import numpy as np
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from serving.server import tensors
from serving.server.errors import ServingError

LIMIT = 1 << 20
REFUSALS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
BUDGET = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALUE_FIELDS = {
    types_pb2.DT_FLOAT: ("float_val", st.floats(width=32, allow_nan=True)),
    types_pb2.DT_DOUBLE: ("double_val", st.floats(allow_nan=True)),
    types_pb2.DT_INT32: ("int_val", st.integers(-2**31, 2**31 - 1)),
    types_pb2.DT_UINT8: ("int_val", st.integers(-2**31, 2**31 - 1)),
    types_pb2.DT_INT64: ("int64_val", st.integers(-2**63, 2**63 - 1)),
    types_pb2.DT_BOOL: ("bool_val", st.booleans()),
    types_pb2.DT_STRING: ("string_val", st.binary(max_size=64)),
    types_pb2.DT_HALF: ("half_val", st.integers(0, 65535)),
}
DTYPES = st.sampled_from([*VALUE_FIELDS, types_pb2.DT_INVALID, types_pb2.DT_RESOURCE, types_pb2.DT_VARIANT, 9999])
DIMS = st.one_of(st.integers(0, 8), st.integers(-3, 2**40), st.sampled_from([100000, 2**31, 2**62]))


@st.composite
def tensor_protos(draw):
    dtype = draw(DTYPES)
    proto = tensor_pb2.TensorProto(dtype=dtype)
    if draw(st.booleans()) and draw(st.booleans()):
        proto.tensor_shape.unknown_rank = True
    else:
        proto.tensor_shape.CopyFrom(tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in draw(st.lists(DIMS, max_size=5))]))
    if dtype in VALUE_FIELDS and draw(st.booleans()):
        field, values = VALUE_FIELDS[dtype]
        getattr(proto, field).extend(draw(st.lists(values, max_size=40)))
    elif draw(st.booleans()):
        proto.tensor_content = draw(st.binary(max_size=256))
    return proto


@BUDGET
@given(st.dictionaries(st.sampled_from(["images", "x", "image_bytes"]), tensor_protos(), max_size=3))
def test_decoding_any_tensor_proto_is_bounded_and_fails_cleanly(protos):
    try:
        arrays = tensors.to_arrays(protos, max_bytes=LIMIT)
    except ServingError as error:
        assert error.code in REFUSALS, error
        return
    total = 0
    for alias, array in arrays.items():
        declared = tuple(d.size for d in protos[alias].tensor_shape.dim)
        assert array.shape == declared
        total += array.size * (8 if array.dtype == object else array.itemsize)
    assert total <= LIMIT + sum(len(v) for p in protos.values() for v in p.string_val)


@BUDGET
@given(st.binary(max_size=512))
def test_any_bytes_as_a_serialized_tensor_proto(data):
    """What gRPC would hand over after parsing arbitrary bytes, when they parse."""
    try:
        proto = tensor_pb2.TensorProto.FromString(data)
    except Exception:  # not a message: gRPC refuses it before our code runs
        return
    try:
        tensors.to_arrays({"x": proto}, max_bytes=LIMIT)
    except ServingError as error:
        assert error.code in REFUSALS, error


@BUDGET
@given(st.integers(1, 64), st.integers(1, 8))
def test_a_declared_size_past_the_bound_is_refused_whatever_values_it_carries(rows, values):
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in (rows, 1024, 1024)]))
    proto.float_val.extend(np.ones(values, np.float32))
    try:
        tensors.to_arrays({"x": proto}, max_bytes=LIMIT)
    except ServingError as error:
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    else:
        raise AssertionError(f"{rows}x1024x1024 float32 is more than {LIMIT} bytes")


# --- REST bodies -------------------------------------------------------------------------------

from serving.server import rest_json  # noqa: E402
from serving.server.rest_codec import parse_predict_body  # noqa: E402
from serving.contract import PREDICT_METHOD  # noqa: E402
from serving.server.servable import Signature, TensorInfo  # noqa: E402

SIGNATURES = [
    Signature("serving_default", PREDICT_METHOD, {"images": TensorInfo(tf.uint8, (None, 32, 32, 3))}, {}),
    Signature("serving_bytes", PREDICT_METHOD, {"image_bytes": TensorInfo(tf.string, (None,))}, {}),
    Signature("two", PREDICT_METHOD, {"x": TensorInfo(tf.float32, None), "y": TensorInfo(tf.int64, (None,))}, {}),
]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=60)
# Bodies shaped like requests, so the fuzzing reaches past the first check.
REQUEST_BODIES = st.fixed_dictionaries({}, optional={
    "instances": JSON_VALUES, "inputs": JSON_VALUES, "signature_name": JSON_VALUES,
    "extra": JSON_VALUES}) | JSON_VALUES


def _mutated(data: bytes, cuts: list[int], junk: bytes) -> bytes:
    for cut in cuts:
        position = cut % (len(data) + 1)
        data = data[:position] + junk + data[position + 1:]
    return data


@BUDGET
@given(JSON_VALUES, st.integers(2, 40))
def test_json_decoded_in_pieces_equals_json_loads(value, chunk):
    import json

    data = json.dumps(value).encode()
    saved = rest_json.CHUNK_CHARS
    rest_json.CHUNK_CHARS = chunk  # small pieces, so the piecewise path runs on small documents
    try:
        decoded = rest_json.decode(data, max_depth=1000)
    finally:
        rest_json.CHUNK_CHARS = saved
    assert decoded == json.loads(data)


@BUDGET
@given(REQUEST_BODIES, st.lists(st.integers(0, 10_000), max_size=3), st.binary(max_size=3),
       st.sampled_from(SIGNATURES), st.integers(2, 64))
def test_any_rest_body_gives_arrays_or_a_clean_refusal(body, cuts, junk, signature, chunk):
    import json

    data = _mutated(json.dumps(body).encode(), cuts, junk) if cuts else json.dumps(body).encode()
    saved = rest_json.CHUNK_CHARS
    rest_json.CHUNK_CHARS = chunk
    try:
        decoded = rest_json.decode(data, max_depth=16, numeric_rows=True)
    except ValueError:  # TooDeep, JSONDecodeError, UnicodeDecodeError: the server answers 400
        return
    finally:
        rest_json.CHUNK_CHARS = saved
    if not isinstance(decoded, dict):
        return  # the server answers 400 "expects a JSON object"
    try:
        arrays, _ = parse_predict_body(decoded, signature)
    except ServingError as error:
        assert error.code in REFUSALS, error
        return
    for alias, array in arrays.items():
        assert isinstance(array, np.ndarray)
        expected = signature.inputs[alias].dtype
        assert array.dtype == expected.as_numpy_dtype or (expected == tf.string and array.dtype == object)
