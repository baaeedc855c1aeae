"""Classify image files through a model server's gRPC PredictionService (or its
REST API: serving/rest_client.py).

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
numpy with the protos that tensorflow-serving-api ships (serving/serving_apis.py),
so it starts in well under a second. It trusts no server: every answer is
checked against the request and the model's metadata before an array is
built from it (serving/answers.py), and anything else is refused as a
ClientError.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import os
import pathlib
import time
from collections.abc import Callable, Iterable, Iterator

import grpc
import numpy as np

from serving.answers import (
    Answer,
    ClientError,
    Refused,
    SignatureInput,
    answer_of,
    answered_array,
    declared_output,
    dtype_name,
    input_image_size,
)
from serving.contract import (
    DEFAULT_TOP_K,
    IMAGE_SIZE,
    MODEL_NAME,
    PROBABILITIES,
    SERVING_DEFAULT,
    TOP_K_NAMES,
    TOP_K_PROBABILITIES,
)
from serving.images import image_extensions, read_pixels
from serving.serving_apis import request_tensor, serving_apis

log = logging.getLogger(__name__)
MAX_MESSAGE = 256 * 1024 * 1024  # a request the client sends (64 images' own bytes)
# What an answer may take: gRPC refuses a larger response message, REST a larger body.
# 64 images of 65,536 float32 probabilities are 16 MiB; in JSON, about 4 times that.
MAX_ANSWER_BYTES = 64 * 1024 * 1024


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
        self.stub = serving_apis().prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def _remember(self, server: str, model: str, signature: str, version: int | None, label: str | None,
                  timeout: float, retries: int) -> None:
        """The target and the call settings, whatever the transport."""
        if version is not None and label:
            raise ValueError("give a version or a label, not both")
        self.server, self.model, self.signature = server, model, signature
        self.version, self.label = version, label
        self.timeout, self.retries = timeout, retries
        self._input: SignatureInput | None = None

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
            raise Refused(f"the server answered the {what} of model {spec.name!r}, not {self.model!r}")
        if self.version is not None and spec.HasField("version") and spec.version.value != self.version:
            raise Refused(f"the server answered the {what} of version {spec.version.value}, not {self.version}")
        if what == "prediction" and spec.signature_name and spec.signature_name != self.signature:
            raise Refused(f"the server answered signature {spec.signature_name!r}, not {self.signature!r}")

    def signature_input(self) -> SignatureInput:
        if self._input is None:
            apis = serving_apis()
            types_pb2 = apis.types_pb2
            request = apis.get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
            self._spec(request.model_spec, "")
            response = self._call(self.stub.GetModelMetadata, request)
            self._check_spec(response.model_spec, "metadata")
            signatures = apis.get_model_metadata_pb2.SignatureDefMap()
            if "signature_def" not in response.metadata or not response.metadata["signature_def"].Unpack(signatures):
                raise Refused("the server's metadata holds no SignatureDefMap under 'signature_def'")
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
                raise ClientError(f"signature {self.signature!r} takes {dtype_name(info.dtype)}; "
                                  "the client sends uint8 pixels or encoded image bytes")
            names_top_k = TOP_K_NAMES in definition.outputs and TOP_K_PROBABILITIES in definition.outputs
            outputs = {name: declared_output(name, dtype_name(output.dtype), output.tensor_shape.unknown_rank,
                                              [dim.size for dim in output.tensor_shape.dim], self.signature)
                       for name, output in definition.outputs.items()
                       if name == PROBABILITIES or (names_top_k and name in (TOP_K_NAMES, TOP_K_PROBABILITIES))}
            size = input_image_size(info.dtype == types_pb2.DT_UINT8, info.tensor_shape.unknown_rank,
                                     [dim.size for dim in info.tensor_shape.dim], self.signature)
            self._input = SignatureInput(alias, info.dtype == types_pb2.DT_STRING, names_top_k, outputs,
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
        checked against the request and the model's metadata (a Refused ClientError if not)."""
        signature_input = self.signature_input()
        request = serving_apis().predict_pb2.PredictRequest()
        self._spec(request.model_spec, self.signature)
        tensor = request_tensor(batch, signature_input.takes_bytes)
        rows = tensor.tensor_shape.dim[0].size
        request.inputs[signature_input.alias].CopyFrom(tensor)
        request.output_filter.append(PROBABILITIES)
        if signature_input.names_top_k:
            request.output_filter.extend([TOP_K_NAMES, TOP_K_PROBABILITIES])
        response = self._call(self.stub.Predict, request)
        self._check_spec(response.model_spec, "prediction")
        missing = [name for name in request.output_filter if name not in response.outputs]
        if missing:
            raise Refused(f"the server's answer lacks the output(s) {', '.join(missing)}")
        read = {name: answered_array(response.outputs[name], name, rows, signature_input.outputs[name])
                for name in request.output_filter}
        # TF Serving names the version that answered (MakeModelSpec, servables/tensorflow/util.cc).
        version = response.model_spec.version.value if response.model_spec.HasField("version") else None
        return answer_of(read, signature_input.names_top_k, version)

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
            except Refused as error:
                if error.row is None or not 0 <= error.row < len(items):
                    raise
                raise Refused(f"{error}, for {items[error.row][0]}") from None
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
