"""What a model server's answer must be before the client uses it.

Every answer is checked against the request and the model's metadata (model,
version, signature, each output's dtype, shape and the size of its values)
before an array is built from it; anything else is refused as a ClientError.
The transports (serving/client.py over gRPC, serving/rest_client.py over
REST) read their own wire formats and hand the values here.
"""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np

from serving.contract import (
    IMAGE_SIZE,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    PROBABILITIES,
    TOP_K_NAMES,
    TOP_K_PROBABILITIES,
)
from serving.serving_apis import serving_apis

# The most classes a probabilities output may have (ImageNet-21k has 21,841).
MAX_CLASSES = 65536
FLOAT_TYPES = {"DT_FLOAT": np.float32, "DT_DOUBLE": np.float64, "DT_HALF": np.float16}


class ClientError(Exception):
    """The server could not be used (unreachable, unknown model, unsuitable signature)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class Refused(ClientError):
    """An answer the client will not use; `row` names the image it is about, when one is."""

    def __init__(self, message: str, row: int | None = None):
        super().__init__(message)
        self.row = row


@dataclasses.dataclass(frozen=True)
class SignatureInput:
    alias: str
    takes_bytes: bool  # a DT_STRING input takes encoded files; otherwise uint8 pixels
    names_top_k: bool  # outputs top_k_class_names and top_k_probabilities
    # What the metadata declares of the outputs the client reads; every answer is checked against it.
    outputs: dict[str, Declared] = dataclasses.field(default_factory=dict)
    only_output: bool = False  # probabilities is the signature's one output (REST answers it bare)
    # The side of the square pixels a uint8 input takes (its declared [-1, S, S, 3]); files
    # sent to a bytes input are decoded by the model at its own size.
    image_size: int = IMAGE_SIZE


def input_image_size(dtype_is_uint8: bool, unknown_rank: bool, dims: list[int], signature: str) -> int:
    """The side S of a uint8 input declared [-1, S, S, 3]; IMAGE_SIZE for a bytes input."""
    if not dtype_is_uint8:
        return IMAGE_SIZE
    if unknown_rank or len(dims) != 4 or dims[1] != dims[2] or dims[3] != 3 \
            or not MIN_IMAGE_SIZE <= dims[1] <= MAX_IMAGE_SIZE:
        raise ClientError(f"signature {signature!r} takes uint8 pixels of shape {dims}; the client sends square "
                          f"RGB images [batch, S, S, 3] with S from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}")
    return dims[1]


@dataclasses.dataclass(frozen=True)
class Answer:
    """What the server said about a batch: all probabilities and, when the
    model names them, its k most probable classes per image."""

    probabilities: np.ndarray  # float [n, classes]
    top_k_names: list[list[str]] | None  # [n][k], best first
    top_k_probabilities: np.ndarray | None  # float [n, k]
    version: int | None = None  # the version that answered, when the answer says


@dataclasses.dataclass(frozen=True)
class Declared:
    """What the model's metadata says an output is: its dtype's name and, when known, its
    columns (the size of the second of its two dimensions; None where it is -1)."""

    dtype: str
    columns: int | None


def declared_output(alias: str, dtype: str, unknown_rank: bool, dims: list[int], signature: str) -> Declared:
    """An output of the metadata, as the client can use it, or a ClientError that says why not."""
    wanted = "DT_STRING" if alias == TOP_K_NAMES else "a floating-point dtype (DT_FLOAT, DT_DOUBLE, DT_HALF)"
    if (dtype != "DT_STRING") if alias == TOP_K_NAMES else (dtype not in FLOAT_TYPES):
        raise ClientError(f"signature {signature!r} declares output '{alias}' as {dtype}; the client reads {wanted}")
    if unknown_rank:
        return Declared(dtype, None)
    if len(dims) != 2 or dims[1] == 0 or dims[1] < -1 or dims[1] > MAX_CLASSES:
        raise ClientError(f"signature {signature!r} declares output '{alias}' of shape {dims}; the client reads "
                          f"[batch, columns] with 1 to {MAX_CLASSES} columns")
    return Declared(dtype, None if dims[1] == -1 else dims[1])


def check_columns(alias: str, shape: list[int], rows: int, declared: Declared) -> None:
    """An answered tensor's shape against the request's rows and the declared columns."""
    if len(shape) != 2 or shape[0] != rows:
        raise Refused(f"the server answered '{alias}' of shape {shape} for {rows} image(s); "
                       f"the request needs [{rows}, columns]")
    if declared.columns is not None and shape[1] != declared.columns:
        raise Refused(f"the server answered '{alias}' of shape {shape}; the model's metadata declares "
                       f"{declared.columns} columns")
    if not 1 <= shape[1] <= MAX_CLASSES:
        raise Refused(f"the server answered '{alias}' of shape {shape}; the client reads 1 to {MAX_CLASSES} columns")


def check_finite(alias: str, values: np.ndarray) -> None:
    """Probabilities are numbers: NaN or infinity is refused (and so never printed, nor
    written as JSON's invalid NaN)."""
    bad = ~np.isfinite(values)
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        raise Refused(f"the server answered {values[row, column]} in '{alias}' (column {column}); "
                       "probabilities must be finite numbers", row)


def answered_array(proto, alias: str, rows: int, declared: Declared):
    """An output TensorProto of the answer as an array (float) or rows of names (str), after
    its dtype, shape and the size of its values are checked against the request and the
    metadata: nothing is allocated for a shape the values do not fill."""
    dtype = dtype_name(proto.dtype)
    if dtype != declared.dtype:
        raise Refused(f"the server answered '{alias}' as {dtype}; the model's metadata declares {declared.dtype}")
    if proto.tensor_shape.unknown_rank:
        raise Refused(f"the server answered '{alias}' without a shape")
    shape = [dim.size for dim in proto.tensor_shape.dim]
    check_columns(alias, shape, rows, declared)
    count = shape[0] * shape[1]
    if dtype == "DT_STRING":
        if proto.tensor_content or len(proto.string_val) != count:
            raise Refused(f"the server answered '{alias}' of shape {shape} with {len(proto.string_val)} "
                           f"string(s); the shape needs {count}")
        names = [value.decode("utf-8", "replace") for value in proto.string_val]
        return [names[row * shape[1]:(row + 1) * shape[1]] for row in range(shape[0])]
    numpy_type = np.dtype(FLOAT_TYPES[dtype])
    field = {"DT_FLOAT": "float_val", "DT_DOUBLE": "double_val", "DT_HALF": "half_val"}[dtype]
    listed = getattr(proto, field)
    if proto.tensor_content:
        if len(listed) or len(proto.tensor_content) != count * numpy_type.itemsize:
            raise Refused(f"the server answered '{alias}' of shape {shape} with {len(proto.tensor_content)} bytes "
                           f"of tensor_content{' and a ' + field if len(listed) else ''}; the shape needs "
                           f"{count * numpy_type.itemsize} bytes")
        values = np.frombuffer(proto.tensor_content, numpy_type)
    else:
        # TensorFlow would fill the elements past the values given with copies of the last one:
        # a few bytes could declare gigabytes. A server sends every value.
        if len(listed) != count:
            raise Refused(f"the server answered '{alias}' of shape {shape} with {len(listed)} value(s); "
                           f"the shape needs {count}")
        values = np.array(listed, np.int64 if dtype == "DT_HALF" else numpy_type)
        if dtype == "DT_HALF":  # half_val holds the 16-bit patterns as int32s
            if values.size and (values.min() < 0 or values.max() > 0xFFFF):
                raise Refused(f"the server answered '{alias}' with a half_val that is not 16 bits")
            values = values.astype(np.uint16).view(np.float16)
    with np.errstate(over="ignore"):  # a double beyond float32 becomes inf, refused below
        values = values.reshape(shape).astype(np.float32)
    check_finite(alias, values)
    return values


def dtype_name(dtype: int) -> str:
    types_pb2 = serving_apis().types_pb2
    return types_pb2.DataType.Name(dtype) if dtype in types_pb2.DataType.values() else f"dtype {dtype}"


def answer_of(read: dict, names_top_k: bool, version: int | None) -> Answer:
    """The checked outputs of one answer, with what holds between them checked too."""
    probabilities = read[PROBABILITIES]
    if not names_top_k:
        return Answer(probabilities, None, None, version)
    names, top = read[TOP_K_NAMES], read[TOP_K_PROBABILITIES]
    names_shape = (len(names), len(names[0]) if names else top.shape[1])
    if top.shape != names_shape or top.shape[1] > probabilities.shape[1]:
        raise Refused(f"the server answered {TOP_K_NAMES} {list(names_shape)} and {TOP_K_PROBABILITIES} "
                       f"{list(top.shape)} for {PROBABILITIES} {list(probabilities.shape)}")
    return Answer(probabilities, names, top, version)
