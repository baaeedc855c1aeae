"""TensorProto <-> numpy, the way TF Serving reads requests and writes responses."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from serving.server.errors import invalid

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


def to_array(proto: tensor_pb2.TensorProto, alias: str) -> np.ndarray:
    """A request tensor as a numpy array; malformed protos are INVALID_ARGUMENT."""
    try:
        array = tf.make_ndarray(proto)
    except Exception as error:  # make_ndarray raises TypeError/ValueError on bad protos
        raise invalid(f"tensor parsing error: {alias} ({error})") from None
    return array


def to_proto(value) -> tensor_pb2.TensorProto:
    """A response tensor in TF Serving's layout: dtype, shape and the typed value field."""
    tensor = tf.convert_to_tensor(value)
    proto = tensor_pb2.TensorProto(
        dtype=tensor.dtype.as_datatype_enum,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in tensor.shape]),
    )
    array = tensor.numpy()
    if proto.dtype in _HALF_TYPES:
        bits = np.asarray(array).view(np.uint16)
        proto.half_val.extend(bits.ravel().tolist())
    elif proto.dtype in (types_pb2.DT_COMPLEX64, types_pb2.DT_COMPLEX128):
        flat = np.asarray(array).ravel()
        getattr(proto, _VALUE_FIELDS[proto.dtype]).extend(np.column_stack([flat.real, flat.imag]).ravel().tolist())
    elif proto.dtype in _VALUE_FIELDS:
        getattr(proto, _VALUE_FIELDS[proto.dtype]).extend(np.asarray(array).ravel().tolist())
    else:
        return tf.make_tensor_proto(array)
    return proto
