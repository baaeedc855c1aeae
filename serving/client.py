"""Classify image files through a model server's gRPC PredictionService (or its
REST API: RestClassifier).

Works against TF Serving or `accresnet serve`. The client opens any image
file with Pillow and converts it to 32x32 RGB the way the trainer reads
`folder:` datasets (serving/images.py), then sends batches as Predict
requests: raw pixels to a uint8 signature such as serving_default, the file's
own bytes to a string one such as serving_bytes. It learns which from the
model's metadata. Class names come with each answer, as the batched outputs
top_k_class_names and top_k_probabilities, so the client works against a
server that batches requests (where a signature without inputs is refused);
a model that only outputs probabilities gets its classes named by index.

    from serving.client import Classifier
    with Classifier("localhost:8500") as classifier:
        for prediction in classifier.classify_files(["cat.jpg"], top_k=3):
            print(prediction.path, prediction.class_name, prediction.probability)

The client does not import TensorFlow: requests and answers are built from
numpy with the protos that tensorflow-serving-api ships (see _serving_apis),
so it starts in well under a second. It trusts no server: every answer is
checked against the request and the model's metadata (model, version,
signature, each output's dtype, shape and the size of its values) before an
array is built from it, and anything else is refused as a ClientError.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import dataclasses
import importlib
import importlib.machinery
import importlib.util
import itertools
import json
import logging
import os
import pathlib
import ssl
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator

import grpc
import numpy as np

from serving.contract import (
    DEFAULT_TOP_K,
    IMAGE_SIZE,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    MODEL_NAME,
    PROBABILITIES,
    SERVING_DEFAULT,
    TOP_K_NAMES,
    TOP_K_PROBABILITIES,
)
from serving.images import image_extensions, read_pixels

log = logging.getLogger(__name__)
MAX_MESSAGE = 256 * 1024 * 1024  # a request the client sends (64 images' own bytes)
# What an answer may take: gRPC refuses a larger response message, REST a larger body.
# 64 images of 65,536 float32 probabilities are 16 MiB; in JSON, about 4 times that.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
# The most classes a probabilities output may have (ImageNet-21k has 21,841).
MAX_CLASSES = 65536
_FLOAT_TYPES = {"DT_FLOAT": np.float32, "DT_DOUBLE": np.float64, "DT_HALF": np.float16}


class ClientError(Exception):
    """The server could not be used (unreachable, unknown model, unsuitable signature)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class _Refused(ClientError):
    """An answer the client will not use; `row` names the image it is about, when one is."""

    def __init__(self, message: str, row: int | None = None):
        super().__init__(message)
        self.row = row


# --- the protos, without TensorFlow's runtime ------------------------------------------------------

_APIS: types.SimpleNamespace | None = None
_APIS_LOCK = threading.Lock()
_API_MODULES = ("tensorflow_serving.apis.predict_pb2", "tensorflow_serving.apis.get_model_metadata_pb2",
                "tensorflow_serving.apis.prediction_service_pb2_grpc", "tensorflow.core.framework.tensor_pb2",
                "tensorflow.core.framework.types_pb2")


def _serving_apis() -> types.SimpleNamespace:
    """The generated modules of tensorflow-serving-api the client uses, and TensorFlow's
    TensorProto and DataType, loaded without TensorFlow's runtime.

    Those modules are plain protobuf code, but they import TensorFlow's own
    (`from tensorflow.core.framework import tensor_pb2`), and importing anything under
    `tensorflow` first runs tensorflow/__init__.py, which loads the whole runtime: 3-4 s
    and 700 MB for a client that only needs to build one message. So, unless TensorFlow
    is already imported, `tensorflow` is a bare package while they load (its folder
    only: the generated modules and the empty __init__.py of tensorflow/core/... are
    all that run), and afterwards the bare package and every tensorflow.* module are
    taken out of sys.modules again: the client keeps its references, and an
    `import tensorflow` later in the process loads TensorFlow as usual (its generated
    modules register the same descriptors again, which protobuf allows).
    This relies only on Python's documented import system (a package is a module with
    __path__) and on TensorFlow keeping its generated protos in plain packages, as every
    release has done."""
    global _APIS
    with _APIS_LOCK:
        if _APIS is None:
            _APIS = _load_serving_apis()
        return _APIS


def _load_serving_apis() -> types.SimpleNamespace:
    def load() -> types.SimpleNamespace:
        return types.SimpleNamespace(**{name.rsplit(".", 1)[1]: importlib.import_module(name)
                                        for name in _API_MODULES})

    spec = None if "tensorflow" in sys.modules else importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        return load()  # TensorFlow is already loaded (or missing: the import names what is)
    bare_spec = importlib.machinery.ModuleSpec("tensorflow", None, origin=spec.origin, is_package=True)
    bare_spec.submodule_search_locations = list(spec.submodule_search_locations)
    sys.modules["tensorflow"] = importlib.util.module_from_spec(bare_spec)
    try:
        return load()
    finally:
        for name in [name for name in sys.modules if name == "tensorflow" or name.startswith("tensorflow.")]:
            del sys.modules[name]


# --- tensors: numpy in, checked numpy out -------------------------------------------------------


def _request_tensor(batch, takes_bytes: bool):
    """A TensorProto of uint8 pixels [n, height, width, 3] or of encoded files [n], laid out
    as tf.make_tensor_proto lays them out (raw bytes in tensor_content; strings in string_val)."""
    apis = _serving_apis()
    proto = apis.tensor_pb2.TensorProto()
    if takes_bytes:
        items = list(batch)
        if not all(isinstance(item, bytes) for item in items):
            raise ValueError("a string signature takes the files' own bytes")
        proto.dtype = apis.types_pb2.DT_STRING
        proto.tensor_shape.dim.add(size=len(items))
        proto.string_val.extend(items)
        return proto
    pixels = np.asarray(batch)
    if pixels.dtype != np.uint8 or pixels.ndim != 4:
        raise ValueError(f"pixels must be uint8 [n, height, width, 3], not {pixels.dtype} {list(pixels.shape)}")
    proto.dtype = apis.types_pb2.DT_UINT8
    for size in pixels.shape:
        proto.tensor_shape.dim.add(size=size)
    proto.tensor_content = np.ascontiguousarray(pixels).tobytes()
    return proto


@dataclasses.dataclass(frozen=True)
class _Declared:
    """What the model's metadata says an output is: its dtype's name and, when known, its
    columns (the size of the second of its two dimensions; None where it is -1)."""

    dtype: str
    columns: int | None


def _declared_output(alias: str, dtype: str, unknown_rank: bool, dims: list[int], signature: str) -> _Declared:
    """An output of the metadata, as the client can use it, or a ClientError that says why not."""
    wanted = "DT_STRING" if alias == TOP_K_NAMES else "a floating-point dtype (DT_FLOAT, DT_DOUBLE, DT_HALF)"
    if (dtype != "DT_STRING") if alias == TOP_K_NAMES else (dtype not in _FLOAT_TYPES):
        raise ClientError(f"signature {signature!r} declares output '{alias}' as {dtype}; the client reads {wanted}")
    if unknown_rank:
        return _Declared(dtype, None)
    if len(dims) != 2 or dims[1] == 0 or dims[1] < -1 or dims[1] > MAX_CLASSES:
        raise ClientError(f"signature {signature!r} declares output '{alias}' of shape {dims}; the client reads "
                          f"[batch, columns] with 1 to {MAX_CLASSES} columns")
    return _Declared(dtype, None if dims[1] == -1 else dims[1])


def _check_columns(alias: str, shape: list[int], rows: int, declared: _Declared) -> None:
    """An answered tensor's shape against the request's rows and the declared columns."""
    if len(shape) != 2 or shape[0] != rows:
        raise _Refused(f"the server answered '{alias}' of shape {shape} for {rows} image(s); "
                       f"the request needs [{rows}, columns]")
    if declared.columns is not None and shape[1] != declared.columns:
        raise _Refused(f"the server answered '{alias}' of shape {shape}; the model's metadata declares "
                       f"{declared.columns} columns")
    if not 1 <= shape[1] <= MAX_CLASSES:
        raise _Refused(f"the server answered '{alias}' of shape {shape}; the client reads 1 to {MAX_CLASSES} columns")


def _check_finite(alias: str, values: np.ndarray) -> None:
    """Probabilities are numbers: NaN or infinity is refused (and so never printed, nor
    written as JSON's invalid NaN)."""
    bad = ~np.isfinite(values)
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        raise _Refused(f"the server answered {values[row, column]} in '{alias}' (column {column}); "
                       "probabilities must be finite numbers", row)


def _answered_array(proto, alias: str, rows: int, declared: _Declared):
    """An output TensorProto of the answer as an array (float) or rows of names (str), after
    its dtype, shape and the size of its values are checked against the request and the
    metadata: nothing is allocated for a shape the values do not fill."""
    dtype = _dtype_name(proto.dtype)
    if dtype != declared.dtype:
        raise _Refused(f"the server answered '{alias}' as {dtype}; the model's metadata declares {declared.dtype}")
    if proto.tensor_shape.unknown_rank:
        raise _Refused(f"the server answered '{alias}' without a shape")
    shape = [dim.size for dim in proto.tensor_shape.dim]
    _check_columns(alias, shape, rows, declared)
    count = shape[0] * shape[1]
    if dtype == "DT_STRING":
        if proto.tensor_content or len(proto.string_val) != count:
            raise _Refused(f"the server answered '{alias}' of shape {shape} with {len(proto.string_val)} "
                           f"string(s); the shape needs {count}")
        names = [value.decode("utf-8", "replace") for value in proto.string_val]
        return [names[row * shape[1]:(row + 1) * shape[1]] for row in range(shape[0])]
    numpy_type = np.dtype(_FLOAT_TYPES[dtype])
    field = {"DT_FLOAT": "float_val", "DT_DOUBLE": "double_val", "DT_HALF": "half_val"}[dtype]
    listed = getattr(proto, field)
    if proto.tensor_content:
        if len(listed) or len(proto.tensor_content) != count * numpy_type.itemsize:
            raise _Refused(f"the server answered '{alias}' of shape {shape} with {len(proto.tensor_content)} bytes "
                           f"of tensor_content{' and a ' + field if len(listed) else ''}; the shape needs "
                           f"{count * numpy_type.itemsize} bytes")
        values = np.frombuffer(proto.tensor_content, numpy_type)
    else:
        # TensorFlow would fill the elements past the values given with copies of the last one:
        # a few bytes could declare gigabytes. A server sends every value.
        if len(listed) != count:
            raise _Refused(f"the server answered '{alias}' of shape {shape} with {len(listed)} value(s); "
                           f"the shape needs {count}")
        values = np.array(listed, np.int64 if dtype == "DT_HALF" else numpy_type)
        if dtype == "DT_HALF":  # half_val holds the 16-bit patterns as int32s
            if values.size and (values.min() < 0 or values.max() > 0xFFFF):
                raise _Refused(f"the server answered '{alias}' with a half_val that is not 16 bits")
            values = values.astype(np.uint16).view(np.float16)
    with np.errstate(over="ignore"):  # a double beyond float32 becomes inf, refused below
        values = values.reshape(shape).astype(np.float32)
    _check_finite(alias, values)
    return values


def _dtype_name(dtype: int) -> str:
    types_pb2 = _serving_apis().types_pb2
    return types_pb2.DataType.Name(dtype) if dtype in types_pb2.DataType.values() else f"dtype {dtype}"


def _answer(read: dict, names_top_k: bool, version: int | None) -> Answer:
    """The checked outputs of one answer, with what holds between them checked too."""
    probabilities = read[PROBABILITIES]
    if not names_top_k:
        return Answer(probabilities, None, None, version)
    names, top = read[TOP_K_NAMES], read[TOP_K_PROBABILITIES]
    names_shape = (len(names), len(names[0]) if names else top.shape[1])
    if top.shape != names_shape or top.shape[1] > probabilities.shape[1]:
        raise _Refused(f"the server answered {TOP_K_NAMES} {list(names_shape)} and {TOP_K_PROBABILITIES} "
                       f"{list(top.shape)} for {PROBABILITIES} {list(probabilities.shape)}")
    return Answer(probabilities, names, top, version)


# RESOURCE_EXHAUSTED with these details means every gRPC thread was busy: gRPC C++'s sync server
# (TF Serving, src/cpp/server/server_cc.cc) and Python's (accresnet serve). Other RESOURCE_EXHAUSTED
# answers (a request too large) would fail again.
_BUSY_SERVER_DETAILS = ("Server Threadpool Exhausted", "Concurrent RPC limit exceeded!")


def _worth_retrying(error: grpc.RpcError) -> bool:
    return error.code() == grpc.StatusCode.UNAVAILABLE or (
        error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error.details() in _BUSY_SERVER_DETAILS)


@dataclasses.dataclass(frozen=True)
class Prediction:
    path: str
    class_name: str
    class_id: int
    probability: float
    top_k: list[tuple[str, float]]
    # The version that answered (the response's model spec; TF Serving's REST answers name none,
    # so over REST only a requested version is known) and the label asked for.
    version: int | None = None
    label: str | None = None

    def to_json(self) -> dict:
        return {"path": self.path, "class_name": self.class_name, "class_id": self.class_id,
                "probability": self.probability,
                "top_k": [{"class_name": name, "probability": p} for name, p in self.top_k],
                "version": self.version, "label": self.label}


@dataclasses.dataclass(frozen=True)
class _SignatureInput:
    alias: str
    takes_bytes: bool  # a DT_STRING input takes encoded files; otherwise uint8 pixels
    names_top_k: bool  # outputs top_k_class_names and top_k_probabilities
    # What the metadata declares of the outputs the client reads; every answer is checked against it.
    outputs: dict[str, _Declared] = dataclasses.field(default_factory=dict)
    only_output: bool = False  # probabilities is the signature's one output (REST answers it bare)
    # The side of the square pixels a uint8 input takes (its declared [-1, S, S, 3]); files
    # sent to a bytes input are decoded by the model at its own size.
    image_size: int = IMAGE_SIZE


def _input_image_size(dtype_is_uint8: bool, unknown_rank: bool, dims: list[int], signature: str) -> int:
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


class Classifier:
    """A gRPC connection to one model (and optionally one version or label)."""

    def __init__(self, server: str, model: str = MODEL_NAME, signature: str = SERVING_DEFAULT,
                 version: int | None = None, label: str | None = None, timeout: float = 30.0,
                 retries: int = 3, tls_ca: str | None = None):
        self._remember(server, model, signature, version, label, timeout, retries)
        options = [("grpc.max_receive_message_length", MAX_ANSWER_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE)]
        if tls_ca:
            with open(tls_ca, "rb") as file:
                credentials = grpc.ssl_channel_credentials(root_certificates=file.read())
            self.channel = grpc.secure_channel(server, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(server, options=options)
        self.stub = _serving_apis().prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def _remember(self, server: str, model: str, signature: str, version: int | None, label: str | None,
                  timeout: float, retries: int) -> None:
        """The target and the call settings, whatever the transport."""
        if version is not None and label:
            raise ValueError("give a version or a label, not both")
        self.server, self.model, self.signature = server, model, signature
        self.version, self.label = version, label
        self.timeout, self.retries = timeout, retries
        self._input: _SignatureInput | None = None

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    # --- calls with retries ------------------------------------------------------------------

    def _spec(self, target, signature: str) -> None:
        target.name = self.model
        target.signature_name = signature
        if self.version is not None:
            target.version.value = self.version
        elif self.label:
            target.version_label = self.label

    def _call(self, method: Callable, request):
        """Retry, with exponential backoff, UNAVAILABLE (server starting, restarting, swapping pods)
        and a server whose gRPC threads were all busy (the call was refused before it ran)."""
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as error:
                if not _worth_retrying(error) or attempt == self.retries:
                    raise ClientError(f"{self.server}: {error.code().name}: {error.details()}", error.code()) from None
                log.info("%s: %s (%s); retrying in %.1fs", self.server, error.code().name, error.details(), delay)
                time.sleep(delay)
                delay *= 2

    # --- what the model takes and names -------------------------------------------------------

    def _check_spec(self, spec, what: str) -> None:
        """The model spec an answer names (TF Serving names the model, the version that
        answered and, for Predict, the signature) against what was asked."""
        if spec.name and spec.name != self.model:
            raise _Refused(f"the server answered the {what} of model {spec.name!r}, not {self.model!r}")
        if self.version is not None and spec.HasField("version") and spec.version.value != self.version:
            raise _Refused(f"the server answered the {what} of version {spec.version.value}, not {self.version}")
        if what == "prediction" and spec.signature_name and spec.signature_name != self.signature:
            raise _Refused(f"the server answered signature {spec.signature_name!r}, not {self.signature!r}")

    def signature_input(self) -> _SignatureInput:
        if self._input is None:
            apis = _serving_apis()
            types_pb2 = apis.types_pb2
            request = apis.get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
            self._spec(request.model_spec, "")
            response = self._call(self.stub.GetModelMetadata, request)
            self._check_spec(response.model_spec, "metadata")
            signatures = apis.get_model_metadata_pb2.SignatureDefMap()
            if "signature_def" not in response.metadata or not response.metadata["signature_def"].Unpack(signatures):
                raise _Refused("the server's metadata holds no SignatureDefMap under 'signature_def'")
            definition = signatures.signature_def.get(self.signature)
            if definition is None:
                raise ClientError(f"model {self.model} has no signature {self.signature!r} "
                                  f"(it has {', '.join(sorted(signatures.signature_def))})")
            if len(definition.inputs) != 1 or PROBABILITIES not in definition.outputs:
                raise ClientError(f"signature {self.signature!r} must take one input and output "
                                  f"'{PROBABILITIES}'; it takes {sorted(definition.inputs)} and outputs "
                                  f"{sorted(definition.outputs)}")
            (alias, info), = definition.inputs.items()
            if info.dtype not in (types_pb2.DT_STRING, types_pb2.DT_UINT8):
                raise ClientError(f"signature {self.signature!r} takes {_dtype_name(info.dtype)}; "
                                  "the client sends uint8 pixels or encoded image bytes")
            names_top_k = TOP_K_NAMES in definition.outputs and TOP_K_PROBABILITIES in definition.outputs
            outputs = {name: _declared_output(name, _dtype_name(output.dtype), output.tensor_shape.unknown_rank,
                                              [dim.size for dim in output.tensor_shape.dim], self.signature)
                       for name, output in definition.outputs.items()
                       if name == PROBABILITIES or (names_top_k and name in (TOP_K_NAMES, TOP_K_PROBABILITIES))}
            size = _input_image_size(info.dtype == types_pb2.DT_UINT8, info.tensor_shape.unknown_rank,
                                     [dim.size for dim in info.tensor_shape.dim], self.signature)
            self._input = _SignatureInput(alias, info.dtype == types_pb2.DT_STRING, names_top_k, outputs,
                                          len(definition.outputs) == 1, size)
        return self._input

    @property
    def image_size(self) -> int:
        """The side of the square pixels the signature takes (from the model's metadata)."""
        return self.signature_input().image_size

    # --- predicting --------------------------------------------------------------------------------

    def predict(self, batch) -> np.ndarray:
        """Probabilities [n, classes] for uint8 pixels [n, S, S, 3] (S: the model's image size,
        `image_size`) or a list of encoded files."""
        return self.answer(batch).probabilities

    def answer(self, batch) -> Answer:
        """The model's answer for uint8 pixels [n, S, S, 3] or a list of encoded files,
        checked against the request and the model's metadata (a _Refused ClientError if not)."""
        signature_input = self.signature_input()
        request = _serving_apis().predict_pb2.PredictRequest()
        self._spec(request.model_spec, self.signature)
        tensor = _request_tensor(batch, signature_input.takes_bytes)
        rows = tensor.tensor_shape.dim[0].size
        request.inputs[signature_input.alias].CopyFrom(tensor)
        request.output_filter.append(PROBABILITIES)
        if signature_input.names_top_k:
            request.output_filter.extend([TOP_K_NAMES, TOP_K_PROBABILITIES])
        response = self._call(self.stub.Predict, request)
        self._check_spec(response.model_spec, "prediction")
        missing = [name for name in request.output_filter if name not in response.outputs]
        if missing:
            raise _Refused(f"the server's answer lacks the output(s) {', '.join(missing)}")
        read = {name: _answered_array(response.outputs[name], name, rows, signature_input.outputs[name])
                for name in request.output_filter}
        # TF Serving names the version that answered (MakeModelSpec, servables/tensorflow/util.cc).
        version = response.model_spec.version.value if response.model_spec.HasField("version") else None
        return _answer(read, signature_input.names_top_k, version)

    def classify_files(self, paths: Iterable[str], batch_size: int = 64, top_k: int = DEFAULT_TOP_K,
                       on_error: Callable[[str, Exception], None] | None = None,
                       on_batch: Callable[[int], None] | None = None,
                       concurrency: int = 1) -> Iterator[Prediction]:
        """Predictions for the readable files, in order; unreadable ones go to `on_error`.
        `concurrency` batches are read and in flight at once (the answers still come in order)."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        takes_bytes = self.signature_input().takes_bytes  # once, before any thread asks
        size = self.signature_input().image_size
        batches = _chunks(paths, batch_size)
        with concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="classify") as pool:
            in_flight = collections.deque()
            for batch in itertools.islice(batches, concurrency):
                in_flight.append(pool.submit(self._classify_batch, batch, takes_bytes, top_k, on_error is not None,
                                             size))
            while in_flight:
                outcomes = in_flight.popleft().result()
                for batch in itertools.islice(batches, 1):  # keep `concurrency` in flight
                    in_flight.append(pool.submit(self._classify_batch, batch, takes_bytes, top_k,
                                                 on_error is not None, size))
                for path, outcome in outcomes:
                    if isinstance(outcome, Exception):
                        on_error(path, outcome)
                    else:
                        yield outcome
                if on_batch is not None:
                    on_batch(sum(not isinstance(outcome, Exception) for _, outcome in outcomes))

    def _classify_batch(self, paths: list[str], takes_bytes: bool, top_k: int, report_errors: bool,
                        size: int = IMAGE_SIZE) -> list[tuple[str, Prediction | Exception]]:
        """Read and send one batch of files: (path, prediction or the error that stopped it), in order."""
        outcomes: dict[str, Prediction | Exception] = {}
        items: list[tuple[str, object]] = []
        for path in paths:
            try:
                pixels = read_pixels(path, size)  # also proves the file is an image
                items.append((path, pathlib.Path(path).read_bytes() if takes_bytes else pixels))
            except Exception as error:  # Pillow raises many kinds for bad files
                if not report_errors:
                    raise
                outcomes[path] = error

        def answer(items: list[tuple[str, object]]) -> None:
            """A file the server cannot decode is reported on its own (its batch is sent
            again one file at a time)."""
            batch = [item for _, item in items]
            try:
                reply = self.answer(batch if takes_bytes else np.stack(batch))
            except _Refused as error:
                if error.row is None or not 0 <= error.row < len(items):
                    raise
                raise _Refused(f"{error}, for {items[error.row][0]}") from None
            except ClientError as error:
                if error.code != grpc.StatusCode.INVALID_ARGUMENT or not takes_bytes or not report_errors:
                    raise
                if len(items) == 1:
                    outcomes[items[0][0]] = error
                    return
                for item in items:
                    answer([item])
                return
            for row, (path, _) in enumerate(items):
                outcomes[path] = dataclasses.replace(_prediction(path, reply, row, top_k), label=self.label or None)

        if items:
            answer(items)
        return [(path, outcomes[path]) for path in paths if path in outcomes]


def _chunks(paths: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(paths)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _prediction(path: str, answer: Answer, row: int, top_k: int) -> Prediction:
    """Row `row` of an answer; at most the k classes the model names (or indices, if it names none)."""
    probabilities = answer.probabilities[row]
    best = int(np.argmax(probabilities))
    if answer.top_k_names is None:
        order = np.argsort(-probabilities, kind="stable")[:top_k]
        ranked = [(str(int(i)), float(probabilities[i])) for i in order]
        return Prediction(path, str(best), best, float(probabilities[best]), ranked, answer.version)
    ranked = [(name, float(p)) for name, p in zip(answer.top_k_names[row], answer.top_k_probabilities[row])]
    return Prediction(path, ranked[0][0], best, float(probabilities[best]), ranked[:top_k], answer.version)


def image_files(arguments: Iterable[str]) -> list[str]:
    """Files named on the command line, and the image files under named folders (sorted).
    A folder with no image file in it is a ClientError that names it."""
    extensions = image_extensions()
    files = []
    for argument in arguments:
        if os.path.isdir(argument):
            found = []
            for root, dirs, names in os.walk(argument):
                dirs.sort()
                found.extend(os.path.join(root, n) for n in sorted(names)
                             if os.path.splitext(n)[1].lower() in extensions and not n.startswith("."))
            if not found:
                raise ClientError(f"no image files in folder {argument} (looked for "
                                  f"{', '.join(sorted(extensions))})")
            files.extend(found)
        else:
            files.append(argument)
    return files


class RestClassifier(Classifier):
    """The same client over TF Serving's REST API (`--rest_api_port`): metadata and
    columnar Predict requests, versions and labels in the URL."""

    def __init__(self, server: str, model: str = MODEL_NAME, signature: str = SERVING_DEFAULT,
                 version: int | None = None, label: str | None = None, timeout: float = 30.0,
                 retries: int = 3, tls_ca: str | None = None):
        self._remember(server, model, signature, version, label, timeout, retries)
        self._context = ssl.create_default_context(cafile=tls_ca) if tls_ca else None
        path = f"/v1/models/{model}" + (f"/versions/{version}" if version is not None else
                                        f"/labels/{label}" if label else "")
        self._url = f"{'https' if tls_ca else 'http'}://{server}{path}"

    def close(self) -> None:
        pass

    def _request(self, suffix: str, body: dict | None = None) -> dict:
        """GET (or POST `body`) with retries while the server is unreachable or answers 503; errors as
        ClientError.
        The answer must be a JSON object of at most MAX_ANSWER_BYTES, read within --timeout."""
        data = json.dumps(body).encode() if body is not None else None
        delay = 0.5
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self._url + suffix, data=data,
                                             headers={"Content-Type": "application/json"} if data else {})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout, context=self._context) as reply:
                    text = self._body(reply, MAX_ANSWER_BYTES)
                break
            except urllib.error.HTTPError as error:
                try:
                    message = json.loads(self._body(error, 64 * 1024)).get("error", error.reason)
                except (ValueError, RecursionError, AttributeError, ClientError):
                    message = error.reason
                code = _GRPC_CODE_OF_HTTP.get(error.code, grpc.StatusCode.UNKNOWN)
                # 503 is UNAVAILABLE (a full batch queue, the connection limit, a restart): retried as the
                # gRPC client retries it.
                if code != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise ClientError(f"{self.server}: HTTP {error.code}: {message}", code) from None
                log.info("%s: HTTP %d (%s); retrying in %.1fs", self.server, error.code, message, delay)
            except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
                if attempt == self.retries:
                    raise ClientError(f"{self.server}: UNAVAILABLE: {error}", grpc.StatusCode.UNAVAILABLE) from None
                log.info("%s unavailable (%s); retrying in %.1fs", self.server, error, delay)
            time.sleep(delay)
            delay *= 2
        try:
            answer = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's stack
            raise _Refused(f"{self.server}: the answer to {suffix} is not JSON") from None
        if not isinstance(answer, dict):
            raise _Refused(f"{self.server}: the answer to {suffix} is not a JSON object")
        return answer

    def _body(self, reply, limit: int) -> bytes:
        """At most `limit` bytes of a reply's body (more is refused, by its Content-Length before
        any is read), read within --timeout even from a server that sends a byte at a time."""
        declared = reply.headers.get("Content-Length")
        if declared and declared.strip().isdigit() and int(declared) > limit:
            raise _Refused(f"{self.server}: the answer has {int(declared)} bytes, more than the {limit} "
                           "the client reads")
        deadline = time.monotonic() + self.timeout
        chunks, size = [], 0
        while chunk := reply.read1(64 * 1024):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise _Refused(f"{self.server}: the answer has more than the {limit} bytes the client reads")
            if time.monotonic() > deadline:
                raise ClientError(f"{self.server}: DEADLINE_EXCEEDED: the answer took more than {self.timeout:g}s",
                                  grpc.StatusCode.DEADLINE_EXCEEDED)
        return b"".join(chunks)

    def signature_input(self) -> _SignatureInput:
        if self._input is None:
            metadata = self._request("/metadata")
            spec = metadata.get("model_spec", {})
            if isinstance(spec, dict):
                if spec.get("name") not in (None, "", self.model):
                    raise _Refused(f"the server answered the metadata of model {spec['name']!r}, not {self.model!r}")
                if self.version is not None and spec.get("version") not in (None, str(self.version), self.version):
                    raise _Refused(f"the server answered the metadata of version {spec['version']}, "
                                   f"not {self.version}")
            signatures = _json_path(metadata, "metadata", "signature_def", "signature_def")
            if not isinstance(signatures, dict):
                raise _Refused("the server's metadata holds no metadata.signature_def.signature_def object")
            definition = signatures.get(self.signature)
            if definition is None:
                raise ClientError(f"model {self.model} has no signature {self.signature!r} "
                                  f"(it has {', '.join(sorted(signatures))})")
            inputs, outputs = _json_path(definition, "inputs"), _json_path(definition, "outputs")
            if not isinstance(inputs, dict) or not isinstance(outputs, dict):
                raise _Refused(f"the server's metadata of signature {self.signature!r} has no inputs and outputs")
            if len(inputs) != 1 or PROBABILITIES not in outputs:
                raise ClientError(f"signature {self.signature!r} must take one input and output '{PROBABILITIES}'")
            (alias, info), = inputs.items()
            dtype = _json_path(info, "dtype")
            if dtype not in ("DT_STRING", "DT_UINT8"):
                raise ClientError(f"signature {self.signature!r} takes {dtype}; "
                                  "the client sends uint8 pixels or encoded image bytes")
            names_top_k = TOP_K_NAMES in outputs and TOP_K_PROBABILITIES in outputs
            declared = {name: _declared_json_output(name, output, self.signature) for name, output in outputs.items()
                        if name == PROBABILITIES or (names_top_k and name in (TOP_K_NAMES, TOP_K_PROBABILITIES))}
            shape = _json_path(info, "tensor_shape") or {}
            try:
                dims = [int(_json_path(dim, "size") or 0) for dim in _json_path(shape, "dim") or []]
            except (TypeError, ValueError):
                raise _Refused(f"the server's metadata declares input '{alias}' with sizes that are not "
                               "integers") from None
            size = _input_image_size(dtype == "DT_UINT8", bool(_json_path(shape, "unknown_rank")), dims,
                                     self.signature)
            self._input = _SignatureInput(alias, dtype == "DT_STRING", names_top_k, declared, len(outputs) == 1,
                                          size)
        return self._input

    def answer(self, batch) -> Answer:
        signature_input = self.signature_input()
        if signature_input.takes_bytes:
            values = [{"b64": base64.b64encode(item).decode("ascii")} for item in batch]
        else:
            values = np.asarray(batch).tolist()
        outputs = self._request(":predict", {"signature_name": self.signature,
                                             "inputs": {signature_input.alias: values}}).get("outputs")
        # A signature of one output is answered bare ("outputs": [...]), as TF Serving does.
        if signature_input.only_output and isinstance(outputs, list):
            outputs = {PROBABILITIES: outputs}
        if not isinstance(outputs, dict):
            raise _Refused("the server's answer has no 'outputs' object")
        wanted = [PROBABILITIES, *((TOP_K_NAMES, TOP_K_PROBABILITIES) if signature_input.names_top_k else ())]
        missing = [name for name in wanted if name not in outputs]
        if missing:
            raise _Refused(f"the server's answer lacks the output(s) {', '.join(missing)}")
        read = {name: _json_array(outputs[name], name, len(values), signature_input.outputs[name])
                for name in wanted}
        # TF Serving's REST predict answers outputs only: no version, unless one was asked for.
        return _answer(read, signature_input.names_top_k, self.version)


def _json_path(value, *keys):
    """value[k1][k2]... where each step is a JSON object that has the key; None otherwise."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _declared_json_output(alias: str, output, signature: str) -> _Declared:
    """An output of the REST metadata (TensorInfo as proto3 JSON: int64 sizes are strings)."""
    shape = _json_path(output, "tensor_shape") or {}
    dims = _json_path(shape, "dim") or []
    try:
        sizes = [int(_json_path(dim, "size") or 0) for dim in dims]
    except (TypeError, ValueError):
        raise _Refused(f"the server's metadata declares output '{alias}' with sizes that are not integers") from None
    return _declared_output(alias, str(_json_path(output, "dtype")), bool(_json_path(shape, "unknown_rank")),
                            sizes, signature)


def _json_array(value, alias: str, rows: int, declared: _Declared):
    """An output of a REST answer as an array (numbers) or rows of names (strings), after its
    structure is checked: `rows` lists of the same length, each of numbers (not booleans, not
    strings) or of strings, as the metadata declares."""
    if not isinstance(value, list) or not all(isinstance(row, list) for row in value):
        raise _Refused(f"the server answered '{alias}' that is not a list of rows")
    columns = len(value[0]) if value else 0
    if any(len(row) != columns for row in value):
        raise _Refused(f"the server answered '{alias}' with rows of different lengths")
    shape = [len(value), columns]
    _check_columns(alias, shape, rows, declared)
    if declared.dtype == "DT_STRING":
        if not all(isinstance(item, str) for row in value for item in row):
            raise _Refused(f"the server answered '{alias}' with values that are not strings")
        return value
    if not all(type(item) in (int, float) for row in value for item in row):
        raise _Refused(f"the server answered '{alias}' with values that are not numbers")
    try:
        with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused below
            values = np.array(value, np.float64).astype(np.float32)
    except OverflowError:  # an integer beyond float64
        raise _Refused(f"the server answered '{alias}' with a number beyond floating point") from None
    _check_finite(alias, values)
    return values


# TF Serving's REST statuses back to the gRPC codes they stand for.
_GRPC_CODE_OF_HTTP = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
                      408: grpc.StatusCode.DEADLINE_EXCEEDED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
                      429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
                      504: grpc.StatusCode.DEADLINE_EXCEEDED}
