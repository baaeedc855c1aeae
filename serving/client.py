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

from serving.contract import (
    DEFAULT_TOP_K,
    MODEL_NAME,
    PROBABILITIES,
    SERVING_DEFAULT,
    TOP_K_NAMES,
    TOP_K_PROBABILITIES,
)

log = logging.getLogger(__name__)
MAX_MESSAGE = 256 * 1024 * 1024


class ClientError(Exception):
    """The server could not be used (unreachable, unknown model, unsuitable signature)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


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
        options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
        if tls_ca:
            with open(tls_ca, "rb") as file:
                credentials = grpc.ssl_channel_credentials(root_certificates=file.read())
            self.channel = grpc.secure_channel(server, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(server, options=options)
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

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
        """Retry UNAVAILABLE (server starting, restarting, swapping pods) with exponential backoff."""
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise ClientError(f"{self.server}: {error.code().name}: {error.details()}", error.code()) from None
                log.info("%s unavailable (%s); retrying in %.1fs", self.server, error.details(), delay)
                time.sleep(delay)
                delay *= 2

    # --- what the model takes and names -------------------------------------------------------

    def signature_input(self) -> _SignatureInput:
        if self._input is None:
            from tensorflow.core.framework import types_pb2
            from tensorflow_serving.apis import get_model_metadata_pb2

            request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
            self._spec(request.model_spec, "")
            response = self._call(self.stub.GetModelMetadata, request)
            signatures = get_model_metadata_pb2.SignatureDefMap()
            response.metadata["signature_def"].Unpack(signatures)
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
                raise ClientError(f"signature {self.signature!r} takes {types_pb2.DataType.Name(info.dtype)}; "
                                  "the client sends uint8 pixels or encoded image bytes")
            names_top_k = TOP_K_NAMES in definition.outputs and TOP_K_PROBABILITIES in definition.outputs
            self._input = _SignatureInput(alias, info.dtype == types_pb2.DT_STRING, names_top_k)
        return self._input

    # --- predicting --------------------------------------------------------------------------------

    def predict(self, batch) -> np.ndarray:
        """Probabilities [n, classes] for uint8 pixels [n, 32, 32, 3] or a list of encoded files."""
        return self.answer(batch).probabilities

    def answer(self, batch) -> Answer:
        """The model's answer for uint8 pixels [n, 32, 32, 3] or a list of encoded files."""
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        signature_input = self.signature_input()
        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, self.signature)
        request.inputs[signature_input.alias].CopyFrom(tf.make_tensor_proto(batch))
        request.output_filter.append(PROBABILITIES)
        if signature_input.names_top_k:
            request.output_filter.extend([TOP_K_NAMES, TOP_K_PROBABILITIES])
        response = self._call(self.stub.Predict, request)
        probabilities = tf.make_ndarray(response.outputs[PROBABILITIES])
        # TF Serving names the version that answered (MakeModelSpec, servables/tensorflow/util.cc).
        version = response.model_spec.version.value if response.model_spec.HasField("version") else None
        if not signature_input.names_top_k:
            return Answer(probabilities, None, None, version)
        names = [[n.decode("utf-8", "replace") for n in row]
                 for row in tf.make_ndarray(response.outputs[TOP_K_NAMES])]
        return Answer(probabilities, names, tf.make_ndarray(response.outputs[TOP_K_PROBABILITIES]), version)

    def classify_files(self, paths: Iterable[str], batch_size: int = 64, top_k: int = DEFAULT_TOP_K,
                       on_error: Callable[[str, Exception], None] | None = None,
                       on_batch: Callable[[int], None] | None = None,
                       concurrency: int = 1) -> Iterator[Prediction]:
        """Predictions for the readable files, in order; unreadable ones go to `on_error`.
        `concurrency` batches are read and in flight at once (the answers still come in order)."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        takes_bytes = self.signature_input().takes_bytes  # once, before any thread asks
        batches = _chunks(paths, batch_size)
        with concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="classify") as pool:
            in_flight = collections.deque()
            for batch in itertools.islice(batches, concurrency):
                in_flight.append(pool.submit(self._classify_batch, batch, takes_bytes, top_k, on_error is not None))
            while in_flight:
                outcomes = in_flight.popleft().result()
                for batch in itertools.islice(batches, 1):  # keep `concurrency` in flight
                    in_flight.append(pool.submit(self._classify_batch, batch, takes_bytes, top_k,
                                                 on_error is not None))
                for path, outcome in outcomes:
                    if isinstance(outcome, Exception):
                        on_error(path, outcome)
                    else:
                        yield outcome
                if on_batch is not None:
                    on_batch(sum(not isinstance(outcome, Exception) for _, outcome in outcomes))

    def _classify_batch(self, paths: list[str], takes_bytes: bool, top_k: int,
                        report_errors: bool) -> list[tuple[str, Prediction | Exception]]:
        """Read and send one batch of files: (path, prediction or the error that stopped it), in order."""
        from serving.images import read_pixels

        outcomes: dict[str, Prediction | Exception] = {}
        items: list[tuple[str, object]] = []
        for path in paths:
            try:
                pixels = read_pixels(path)  # also proves the file is an image
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
    from serving.images import image_extensions

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
        import ssl

        self._remember(server, model, signature, version, label, timeout, retries)
        self._context = ssl.create_default_context(cafile=tls_ca) if tls_ca else None
        path = f"/v1/models/{model}" + (f"/versions/{version}" if version is not None else
                                        f"/labels/{label}" if label else "")
        self._url = f"{'https' if tls_ca else 'http'}://{server}{path}"

    def close(self) -> None:
        pass

    def _request(self, suffix: str, body: dict | None = None) -> dict:
        """GET (or POST `body`) with retries while the server is unreachable; errors as ClientError."""
        import json
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        delay = 0.5
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self._url + suffix, data=data,
                                             headers={"Content-Type": "application/json"} if data else {})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout, context=self._context) as reply:
                    return json.loads(reply.read())
            except urllib.error.HTTPError as error:
                try:
                    message = json.loads(error.read()).get("error", error.reason)
                except ValueError:
                    message = error.reason
                code = _GRPC_CODE_OF_HTTP.get(error.code, grpc.StatusCode.UNKNOWN)
                raise ClientError(f"{self.server}: HTTP {error.code}: {message}", code) from None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
                if attempt == self.retries:
                    raise ClientError(f"{self.server}: UNAVAILABLE: {error}", grpc.StatusCode.UNAVAILABLE) from None
                log.info("%s unavailable (%s); retrying in %.1fs", self.server, error, delay)
                time.sleep(delay)
                delay *= 2

    def signature_input(self) -> _SignatureInput:
        if self._input is None:
            signatures = self._request("/metadata")["metadata"]["signature_def"]["signature_def"]
            definition = signatures.get(self.signature)
            if definition is None:
                raise ClientError(f"model {self.model} has no signature {self.signature!r} "
                                  f"(it has {', '.join(sorted(signatures))})")
            inputs, outputs = definition.get("inputs", {}), definition.get("outputs", {})
            if len(inputs) != 1 or PROBABILITIES not in outputs:
                raise ClientError(f"signature {self.signature!r} must take one input and output '{PROBABILITIES}'")
            (alias, info), = inputs.items()
            if info.get("dtype") not in ("DT_STRING", "DT_UINT8"):
                raise ClientError(f"signature {self.signature!r} takes {info.get('dtype')}; "
                                  "the client sends uint8 pixels or encoded image bytes")
            self._input = _SignatureInput(alias, info["dtype"] == "DT_STRING",
                                          TOP_K_NAMES in outputs and TOP_K_PROBABILITIES in outputs)
        return self._input

    def answer(self, batch) -> Answer:
        import base64

        signature_input = self.signature_input()
        if signature_input.takes_bytes:
            values = [{"b64": base64.b64encode(item).decode("ascii")} for item in batch]
        else:
            values = np.asarray(batch).tolist()
        outputs = self._request(":predict", {"signature_name": self.signature,
                                             "inputs": {signature_input.alias: values}})["outputs"]
        probabilities = np.asarray(outputs[PROBABILITIES], np.float32)
        # TF Serving's REST predict answers outputs only: no version, unless one was asked for.
        version = self.version
        if not signature_input.names_top_k:
            return Answer(probabilities, None, None, version)
        return Answer(probabilities, outputs[TOP_K_NAMES], np.asarray(outputs[TOP_K_PROBABILITIES], np.float32),
                      version)


# TF Serving's REST statuses back to the gRPC codes they stand for.
_GRPC_CODE_OF_HTTP = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
                      408: grpc.StatusCode.DEADLINE_EXCEEDED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
                      429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
                      504: grpc.StatusCode.DEADLINE_EXCEEDED}
