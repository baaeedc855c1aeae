"""TensorProto <-> numpy, the way TF Serving reads requests and writes responses."""

from __future__ import annotations

import math

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

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
# Looked up once per dtype: TensorFlow's dtype objects cost microseconds a lookup, on every request.
_NUMPY_DTYPES: dict[int, np.dtype] = {}  # request DataType -> numpy dtype (only dtypes that have one)
_DATA_TYPES: dict[np.dtype, int] = {}  # response numpy dtype (not a string) -> DataType


def declared_size(proto: tensor_pb2.TensorProto, alias: str) -> tuple[tuple[int, ...], int]:
    """The shape a request tensor declares and the bytes it would take once decoded,
    read from the proto's header alone: nothing is allocated yet."""
    tensor_shape = proto.tensor_shape
    if tensor_shape.unknown_rank:
        raise invalid(f"tensor parsing error: {alias} (a request tensor needs a known shape)")
    shape = tuple([dim.size for dim in tensor_shape.dim])
    if shape and min(shape) < 0:
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
    dtype = _NUMPY_DTYPES.get(proto.dtype)
    if dtype is not None:
        return dtype
    try:
        dtype = _NUMPY_DTYPES[proto.dtype] = np.dtype(tf.dtypes.as_dtype(proto.dtype).as_numpy_dtype)
        return dtype
    except (TypeError, ValueError, KeyError):
        raise invalid(f"tensor parsing error: {alias} (unsupported dtype {types_pb2.DataType.Name(proto.dtype)})"
                      if proto.dtype in types_pb2.DataType.values() else
                      f"tensor parsing error: {alias} (unknown dtype {proto.dtype})") from None


def to_array(proto: tensor_pb2.TensorProto, alias: str,
             declared: tuple[tuple[int, ...], int] | None = None) -> np.ndarray:
    """A request tensor as a numpy array; malformed protos are INVALID_ARGUMENT.
    `tensor_content` is read in place, without a copy. Bound the size first
    (`to_arrays`): TensorFlow fills a tensor with its last value when fewer
    values than elements are given, so a few bytes can declare gigabytes.
    `declared` is what `declared_size` said of this proto, where the caller has it already."""
    shape, size = declared or declared_size(proto, alias)
    if proto.dtype != types_pb2.DT_STRING:
        content = proto.tensor_content  # read once: each read of a bytes field is a copy
        if content:
            if len(content) != size:
                raise invalid(f"tensor parsing error: {alias} (tensor_content has {len(content)} bytes; "
                              f"shape {list(shape)} of {types_pb2.DataType.Name(proto.dtype)} needs {size})")
            return np.frombuffer(content, dtype=numpy_dtype(proto, alias)).reshape(shape)
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
    if max_rows is not None:
        for alias, (shape, _) in sorted(sizes.items()):
            if shape and shape[0] > max_rows:
                raise invalid(f"input '{alias}' has {shape[0]} rows; a request may have at most {max_rows} "
                              "(--max_request_rows)")
    return {alias: to_array(proto, alias, sizes[alias]) for alias, proto in protos.items()}


def to_proto(value, as_content: bool = False) -> tensor_pb2.TensorProto:
    """A response tensor in TF Serving's layout: dtype, shape and the typed value field, or with
    `as_content` (--enable_serialization_as_tensor_content) the raw bytes in tensor_content, as
    Tensor::AsProtoTensorContent writes them (strings keep string_val).
    Built from the numpy array as it is, without a round trip through a tf.Tensor."""
    proto = tensor_pb2.TensorProto()
    fill_proto(proto, value, as_content)
    return proto


def _data_type(dtype: np.dtype) -> int:
    """The DataType of a response array (strings of any length are DT_STRING, not remembered)."""
    if dtype.kind in "OSU":
        return types_pb2.DT_STRING
    data_type = _DATA_TYPES.get(dtype)
    if data_type is None:
        data_type = _DATA_TYPES[dtype] = tf.dtypes.as_dtype(dtype).as_datatype_enum
    return data_type


def fill_proto(proto: tensor_pb2.TensorProto, value, as_content: bool = False) -> None:
    """`to_proto` written into an empty TensorProto in place (a response's map entry, say),
    without building a message and copying it over."""
    array = np.asarray(value)
    dtype = _data_type(array.dtype)
    proto.dtype = dtype
    proto.tensor_shape.SetInParent()  # present for a scalar too, as TF Serving writes it
    dims = proto.tensor_shape.dim
    for size in array.shape:
        dims.add().size = size
    if as_content and dtype != types_pb2.DT_STRING:
        proto.tensor_content = np.ascontiguousarray(array).tobytes()  # the session's own, native byte order
        return
    flat = array.ravel()
    if dtype == types_pb2.DT_STRING:
        proto.string_val.extend([v if isinstance(v, bytes) else str(v).encode("utf-8") for v in flat])
    elif dtype in _HALF_TYPES:
        proto.half_val.extend(flat.view(np.uint16).tolist())
    elif dtype in (types_pb2.DT_COMPLEX64, types_pb2.DT_COMPLEX128):
        getattr(proto, _VALUE_FIELDS[dtype]).extend(np.column_stack([flat.real, flat.imag]).ravel().tolist())
    elif dtype in _VALUE_FIELDS:
        getattr(proto, _VALUE_FIELDS[dtype]).extend(flat.tolist())
    else:
        proto.CopyFrom(tf.make_tensor_proto(array))
