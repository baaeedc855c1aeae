"""TensorProto <-> numpy, the way TF Serving reads requests and writes responses."""

from __future__ import annotations

import math

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from serving.server.errors import ServingError, invalid

# What a string element costs TensorFlow besides its bytes (a tstring).
STRING_ELEMENT_BYTES = 32

# The typed repeated field TF Serving fills for each dtype (Tensor::AsProtoField).
_VALUE_FIELDS = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_INT16: "int_val",
    types_pb2.DT_INT8: "int_val",
    types_pb2.DT_UINT8: "int_val",
    types_pb2.DT_UINT16: "int_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_UINT32: "uint32_val",
    types_pb2.DT_UINT64: "uint64_val",
    types_pb2.DT_BOOL: "bool_val",
    types_pb2.DT_STRING: "string_val",
    types_pb2.DT_COMPLEX64: "scomplex_val",
    types_pb2.DT_COMPLEX128: "dcomplex_val",
}
_HALF_TYPES = (types_pb2.DT_HALF, types_pb2.DT_BFLOAT16)


def declared_size(proto: tensor_pb2.TensorProto, alias: str) -> tuple[tuple[int, ...], int]:
    """The shape a request tensor declares and the bytes it would take once decoded,
    read from the proto's header alone: nothing is allocated yet."""
    if proto.tensor_shape.unknown_rank:
        raise invalid(f"tensor parsing error: {alias} (a request tensor needs a known shape)")
    shape = tuple(dim.size for dim in proto.tensor_shape.dim)
    if any(size < 0 for size in shape):
        raise invalid(f"tensor parsing error: {alias} (negative dimension in shape {list(shape)})")
    elements = math.prod(shape)
    if proto.dtype == types_pb2.DT_STRING:
        # TensorFlow fills the elements past the values given with copies of the last one
        # (Tensor::FromProto), so ten thousand elements declared with one file given are
        # ten thousand files; each element also costs a tensor string of its own.
        values = proto.string_val
        given = sum(len(value) for value in values[:elements])
        padding = max(0, elements - len(values)) * (len(values[-1]) if values else 0)
        return shape, elements * STRING_ELEMENT_BYTES + given + padding
    return shape, elements * numpy_dtype(proto, alias).itemsize


def numpy_dtype(proto: tensor_pb2.TensorProto, alias: str) -> np.dtype:
    """The numpy dtype of a request tensor; INVALID_ARGUMENT for dtypes a request cannot carry."""
    try:
        return np.dtype(tf.dtypes.as_dtype(proto.dtype).as_numpy_dtype)
    except (TypeError, ValueError, KeyError):
        raise invalid(f"tensor parsing error: {alias} (unsupported dtype {types_pb2.DataType.Name(proto.dtype)})"
                      if proto.dtype in types_pb2.DataType.values() else
                      f"tensor parsing error: {alias} (unknown dtype {proto.dtype})") from None


def to_array(proto: tensor_pb2.TensorProto, alias: str) -> np.ndarray:
    """A request tensor as a numpy array; malformed protos are INVALID_ARGUMENT.
    `tensor_content` is read in place, without a copy. Bound the size first
    (`to_arrays`): TensorFlow fills a tensor with its last value when fewer
    values than elements are given, so a few bytes can declare gigabytes."""
    shape, size = declared_size(proto, alias)
    if proto.tensor_content and proto.dtype != types_pb2.DT_STRING:
        if len(proto.tensor_content) != size:
            raise invalid(f"tensor parsing error: {alias} (tensor_content has {len(proto.tensor_content)} bytes; "
                          f"shape {list(shape)} of {types_pb2.DataType.Name(proto.dtype)} needs {size})")
        return np.frombuffer(proto.tensor_content, dtype=numpy_dtype(proto, alias)).reshape(shape)
    try:
        return tf.make_ndarray(proto)
    except Exception as error:  # make_ndarray raises TypeError/ValueError on bad protos
        raise invalid(f"tensor parsing error: {alias} ({error})") from None


def to_arrays(protos, max_bytes: int | None = None, max_rows: int | None = None) -> dict[str, np.ndarray]:
    """A request's {alias: TensorProto} as arrays, their declared sizes summed and
    checked against `max_bytes`, and their rows against `max_rows`, before any is decoded."""
    sizes = {alias: declared_size(proto, alias) for alias, proto in protos.items()}
    total = sum(size for _, size in sizes.values())
    if max_bytes is not None and total > max_bytes:
        shapes = ", ".join(f"{alias} {list(shape)}" for alias, (shape, _) in sorted(sizes.items()))
        raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"the inputs ({shapes}) declare {total} bytes once decoded, more than the {max_bytes} "
                           "bytes a request may take (--max_request_tensor_bytes)")
    for alias, (shape, _) in sorted(sizes.items()):
        if max_rows is not None and shape and shape[0] > max_rows:
            raise invalid(f"input '{alias}' has {shape[0]} rows; a request may have at most {max_rows} "
                          "(--max_request_rows)")
    return {alias: to_array(proto, alias) for alias, proto in protos.items()}


def to_proto(value, as_content: bool = False) -> tensor_pb2.TensorProto:
    """A response tensor in TF Serving's layout: dtype, shape and the typed value field, or with
    `as_content` (--enable_serialization_as_tensor_content) the raw bytes in tensor_content, as
    Tensor::AsProtoTensorContent writes them (strings keep string_val).
    Built from the numpy array as it is, without a round trip through a tf.Tensor."""
    array = np.asarray(value)
    if array.dtype == object or array.dtype.kind in "SU":
        dtype = types_pb2.DT_STRING
    else:
        dtype = tf.dtypes.as_dtype(array.dtype).as_datatype_enum
    proto = tensor_pb2.TensorProto(
        dtype=dtype,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape]),
    )
    flat = array.ravel()
    if as_content and dtype != types_pb2.DT_STRING:
        proto.tensor_content = np.ascontiguousarray(array).tobytes()  # the session's own, native byte order
        return proto
    if dtype == types_pb2.DT_STRING:
        proto.string_val.extend(v if isinstance(v, bytes) else str(v).encode("utf-8") for v in flat)
    elif dtype in _HALF_TYPES:
        proto.half_val.extend(flat.view(np.uint16).tolist())
    elif dtype in (types_pb2.DT_COMPLEX64, types_pb2.DT_COMPLEX128):
        getattr(proto, _VALUE_FIELDS[dtype]).extend(np.column_stack([flat.real, flat.imag]).ravel().tolist())
    elif dtype in _VALUE_FIELDS:
        getattr(proto, _VALUE_FIELDS[dtype]).extend(flat.tolist())
    else:
        return tf.make_tensor_proto(array)
    return proto
