"""RestClassifier: the client over REST, its JSON answers checked as the gRPC client's
protos are (serving/answers.py)."""

from __future__ import annotations

import base64
import json
import logging
import ssl
import time
import urllib.error
import urllib.request

import grpc
import numpy as np

from serving import client
from serving.answers import (
    Answer,
    ClientError,
    Declared,
    Refused,
    SignatureInput,
    answer_of,
    check_columns,
    check_finite,
    declared_output,
    input_image_size,
)
from serving.contract import MODEL_NAME, PROBABILITIES, SERVING_DEFAULT, TOP_K_NAMES, TOP_K_PROBABILITIES

log = logging.getLogger(__name__)


class RestClassifier(client.Classifier):
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
        The answer must be a JSON object of at most client.MAX_ANSWER_BYTES, read within --timeout."""
        data = json.dumps(body).encode() if body is not None else None
        delay = 0.5
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self._url + suffix, data=data,
                                             headers={"Content-Type": "application/json"} if data else {})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout, context=self._context) as reply:
                    text = self._body(reply, client.MAX_ANSWER_BYTES)
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
            raise Refused(f"{self.server}: the answer to {suffix} is not JSON") from None
        if not isinstance(answer, dict):
            raise Refused(f"{self.server}: the answer to {suffix} is not a JSON object")
        return answer

    def _body(self, reply, limit: int) -> bytes:
        """At most `limit` bytes of a reply's body (more is refused, by its Content-Length before
        any is read), read within --timeout even from a server that sends a byte at a time."""
        declared = reply.headers.get("Content-Length")
        if declared and declared.strip().isdigit() and int(declared) > limit:
            raise Refused(f"{self.server}: the answer has {int(declared)} bytes, more than the {limit} "
                           "the client reads")
        deadline = time.monotonic() + self.timeout
        chunks, size = [], 0
        while chunk := reply.read1(64 * 1024):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise Refused(f"{self.server}: the answer has more than the {limit} bytes the client reads")
            if time.monotonic() > deadline:
                raise ClientError(f"{self.server}: DEADLINE_EXCEEDED: the answer took more than {self.timeout:g}s",
                                  grpc.StatusCode.DEADLINE_EXCEEDED)
        return b"".join(chunks)

    def signature_input(self) -> SignatureInput:
        if self._input is None:
            metadata = self._request("/metadata")
            spec = metadata.get("model_spec", {})
            if isinstance(spec, dict):
                if spec.get("name") not in (None, "", self.model):
                    raise Refused(f"the server answered the metadata of model {spec['name']!r}, not {self.model!r}")
                if self.version is not None and spec.get("version") not in (None, str(self.version), self.version):
                    raise Refused(f"the server answered the metadata of version {spec['version']}, "
                                   f"not {self.version}")
            signatures = _json_path(metadata, "metadata", "signature_def", "signature_def")
            if not isinstance(signatures, dict):
                raise Refused("the server's metadata holds no metadata.signature_def.signature_def object")
            definition = signatures.get(self.signature)
            if definition is None:
                raise ClientError(f"model {self.model} has no signature {self.signature!r} "
                                  f"(it has {', '.join(sorted(signatures))})")
            inputs, outputs = _json_path(definition, "inputs"), _json_path(definition, "outputs")
            if not isinstance(inputs, dict) or not isinstance(outputs, dict):
                raise Refused(f"the server's metadata of signature {self.signature!r} has no inputs and outputs")
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
                raise Refused(f"the server's metadata declares input '{alias}' with sizes that are not "
                               "integers") from None
            size = input_image_size(dtype == "DT_UINT8", bool(_json_path(shape, "unknown_rank")), dims,
                                     self.signature)
            self._input = SignatureInput(alias, dtype == "DT_STRING", names_top_k, declared, len(outputs) == 1,
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
            raise Refused("the server's answer has no 'outputs' object")
        wanted = [PROBABILITIES, *((TOP_K_NAMES, TOP_K_PROBABILITIES) if signature_input.names_top_k else ())]
        missing = [name for name in wanted if name not in outputs]
        if missing:
            raise Refused(f"the server's answer lacks the output(s) {', '.join(missing)}")
        read = {name: _json_array(outputs[name], name, len(values), signature_input.outputs[name])
                for name in wanted}
        # TF Serving's REST predict answers outputs only: no version, unless one was asked for.
        return answer_of(read, signature_input.names_top_k, self.version)


def _json_path(value, *keys):
    """value[k1][k2]... where each step is a JSON object that has the key; None otherwise."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _declared_json_output(alias: str, output, signature: str) -> Declared:
    """An output of the REST metadata (TensorInfo as proto3 JSON: int64 sizes are strings)."""
    shape = _json_path(output, "tensor_shape") or {}
    dims = _json_path(shape, "dim") or []
    try:
        sizes = [int(_json_path(dim, "size") or 0) for dim in dims]
    except (TypeError, ValueError):
        raise Refused(f"the server's metadata declares output '{alias}' with sizes that are not integers") from None
    return declared_output(alias, str(_json_path(output, "dtype")), bool(_json_path(shape, "unknown_rank")),
                            sizes, signature)


def _json_array(value, alias: str, rows: int, declared: Declared):
    """An output of a REST answer as an array (numbers) or rows of names (strings), after its
    structure is checked: `rows` lists of the same length, each of numbers (not booleans, not
    strings) or of strings, as the metadata declares."""
    if not isinstance(value, list) or not all(isinstance(row, list) for row in value):
        raise Refused(f"the server answered '{alias}' that is not a list of rows")
    columns = len(value[0]) if value else 0
    if any(len(row) != columns for row in value):
        raise Refused(f"the server answered '{alias}' with rows of different lengths")
    shape = [len(value), columns]
    check_columns(alias, shape, rows, declared)
    if declared.dtype == "DT_STRING":
        if not all(isinstance(item, str) for row in value for item in row):
            raise Refused(f"the server answered '{alias}' with values that are not strings")
        return value
    if not all(type(item) in (int, float) for row in value for item in row):
        raise Refused(f"the server answered '{alias}' with values that are not numbers")
    try:
        with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused below
            values = np.array(value, np.float64).astype(np.float32)
    except OverflowError:  # an integer beyond float64
        raise Refused(f"the server answered '{alias}' with a number beyond floating point") from None
    check_finite(alias, values)
    return values


# TF Serving's REST statuses back to the gRPC codes they stand for.
_GRPC_CODE_OF_HTTP = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
                      408: grpc.StatusCode.DEADLINE_EXCEEDED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
                      429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
                      504: grpc.StatusCode.DEADLINE_EXCEEDED}
