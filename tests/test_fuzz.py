"""Property-based fuzzing of what a client controls: TensorProtos of any dtype,
shape and contents. Whatever arrives, decoding gives the declared array within
the size bound or refuses it with INVALID_ARGUMENT / RESOURCE_EXHAUSTED; it
never raises anything else, and never allocates past the bound.

Each test has a fixed budget (examples and no per-example deadline), so the
suite's time stays bounded on a slow machine.
"""

import grpc
import numpy as np
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
