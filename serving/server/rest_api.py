"""TF Serving's REST API on aiohttp.

    GET  /v1/models/NAME[/versions/V | /labels/L]            model status
    GET  /v1/models/NAME[/versions/V | /labels/L]/metadata   signature defs
    POST /v1/models/NAME[/versions/V | /labels/L]:predict    {"instances": [...]} or {"inputs": ...}
    POST /v1/models/NAME[/versions/V | /labels/L]:classify   {"examples": [...], "context": {...}}
    POST /v1/models/NAME[/versions/V | /labels/L]:regress
    GET  <monitoring path>                                    Prometheus metrics, when enabled

Binary strings travel as {"b64": "..."}; errors come back as {"error": "..."}
with the HTTP status of the gRPC code. Model calls run on a thread pool, so
the event loop keeps accepting requests while TensorFlow works; JSON is
decoded there too, in short pieces (rest_json), so that a large body holds up
no other request.

What one client may cost is bounded (`RestLimits`): the body size, the JSON
depth, the time to send headers and body, the REST timeout (a request
answered 504, or whose client has gone, is dropped before the model runs
it) and the number of open connections. `RestServer` runs the app on an
event loop thread of its own, with TLS when gRPC has it, and drains it in
bounded time.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import json
import logging
import pathlib
import re
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable

import aiohttp
import numpy as np
import tensorflow as tf
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from google.protobuf import json_format
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    input_pb2,
    model_pb2,
    regression_pb2,
)

from serving.server import rest_json
from serving.server.calls import Call
from serving.server.errors import ServingError, invalid
from serving.server.metrics import ServingMetrics
from serving.server.flags import (
    DEFAULT_DRAIN_TIMEOUT_SECONDS,
    DEFAULT_REST_MAX_BODY_BYTES,
    DEFAULT_REST_MAX_CONNECTIONS,
    DEFAULT_REST_MAX_JSON_DEPTH,
    DEFAULT_REST_READ_TIMEOUT_SECONDS,
)
from serving.server.servable import Signature
from serving.server.service import ModelServer

log = logging.getLogger(__name__)

_MODEL_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>-?[0-9]+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<suffix>/metadata|:predict|:classify|:regress)?$")


# --- JSON <-> arrays -------------------------------------------------------------------

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _preview(value) -> str:
    """The start of a JSON value for an error message, without serializing all of it."""

    def shorten(item, depth=0):
        if isinstance(item, np.ndarray):  # a row rest_json made an array
            item = item[:4].tolist() if item.ndim else item.item()
        if isinstance(item, list):
            return [shorten(element, depth + 1) for element in item[:4]] if depth < 4 else "..."
        if isinstance(item, dict):
            return {key[:20]: shorten(element, depth + 1) for key, element in list(item.items())[:4]} \
                if depth < 4 else "..."
        return item[:80] if isinstance(item, str) else item

    return json.dumps(shorten(value))[:80]


def _is_b64(value) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _decode_strings(value):
    if _is_b64(value):
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (ValueError, TypeError) as error:
            raise invalid(f"invalid base64 value: {error}") from None
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, list):
        return [_decode_strings(item) for item in value]
    raise invalid(f"expected a string or {{\"b64\": ...}} for a DT_STRING input; got {_preview(value)}")


def json_to_array(value, dtype: tf.DType, alias: str) -> np.ndarray:
    """A JSON value (nested lists) as an array of the signature input's dtype."""
    if dtype == tf.string:
        decoded = _decode_strings(value)
        array = np.array(decoded, dtype=object)
        if array.dtype != object or (array.ndim and any(isinstance(v, list) for v in array.ravel())):
            raise invalid(f"input '{alias}': the nested lists are ragged")
        return array
    array = _numbers(value, dtype, alias)
    target = np.dtype(dtype.as_numpy_dtype)
    if target.kind in "iu":
        if array.dtype.kind == "f" and array.size and not np.all(np.equal(np.mod(array, 1), 0)):
            raise invalid(f"input '{alias}': expects {dtype.name} but got fractional numbers")
        info = np.iinfo(target)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise invalid(f"input '{alias}': values outside the range of {dtype.name} [{info.min}, {info.max}]")
    elif target.kind == "b" and array.dtype.kind != "b":
        raise invalid(f"input '{alias}': expects booleans")
    return array.astype(target)


def _numbers(value, dtype: tf.DType, alias: str) -> np.ndarray:
    """np.array(value), converted one row at a time: one NumPy call on a large body
    would hold the GIL, and stall the REST event loop, for as long as it takes."""

    def refuse():
        return invalid(f"input '{alias}': expects {dtype.name} numbers; got {_preview(value)}")

    try:
        if isinstance(value, list) and len(value) > 1:
            rows = [np.asarray(row) for row in value]  # rest_json may have made them arrays already
            if any(row.dtype == object or row.dtype.kind in "US" for row in rows):
                raise refuse()
            array = np.stack(rows)
        else:
            array = np.array(value)
    except (ValueError, TypeError):
        raise invalid(f"input '{alias}': the nested lists are ragged") from None
    if array.dtype == object or array.dtype.kind in "US":
        raise refuse()
    return array


def _string_out(value: bytes, alias: str):
    if alias.endswith("_bytes"):
        return {"b64": base64.b64encode(value).decode("ascii")}
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(value).decode("ascii")}


def array_to_json(array: np.ndarray, alias: str):
    if array.dtype == object or array.dtype.kind == "S":
        return np.vectorize(lambda v: _string_out(v, alias), otypes=[object])(array).tolist() if array.ndim \
            else _string_out(array.item(), alias)
    return array.tolist()


def parse_predict_body(body: dict, signature: Signature) -> tuple[dict[str, np.ndarray], bool]:
    """Inputs of a predict request and whether it used the row ("instances") format."""
    if "instances" in body and "inputs" in body:
        raise invalid("JSON request has both 'instances' and 'inputs'; use one")
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list):
            raise invalid("'instances' must be a list")
        if not instances:
            raise invalid("'instances' is an empty list: an empty batch")
        named = all(isinstance(item, dict) and not _is_b64(item) for item in instances)
        if named:
            names = set(instances[0])
            if any(set(item) != names for item in instances):
                raise invalid("every instance must name the same inputs")
            columns = {name: [item[name] for item in instances] for name in names}
        else:
            if len(signature.inputs) != 1:
                raise invalid(f"the signature has {len(signature.inputs)} inputs "
                              f"({', '.join(sorted(signature.inputs))}); name them in each instance")
            columns = {next(iter(signature.inputs)): instances}
        return _convert(columns, signature), True
    if "inputs" in body:
        inputs = body["inputs"]
        if isinstance(inputs, dict) and not _is_b64(inputs):
            columns = inputs
        else:
            if len(signature.inputs) != 1:
                raise invalid(f"the signature has {len(signature.inputs)} inputs; name them in 'inputs'")
            columns = {next(iter(signature.inputs)): inputs}
        return _convert(columns, signature), False
    raise invalid("JSON request needs 'instances' (row format) or 'inputs' (columnar format)")


def _convert(columns: dict, signature: Signature) -> dict[str, np.ndarray]:
    arrays = {}
    for alias, value in columns.items():
        info = signature.inputs.get(alias)
        if info is None:
            raise invalid(f"input tensor alias not found in signature: {alias}. Inputs expected to be in the "
                          f"set {{{','.join(sorted(signature.inputs))}}}.")
        arrays[alias] = json_to_array(value, info.dtype, alias)
    return arrays


def predict_body(outputs: dict[str, np.ndarray], row_format: bool) -> dict:
    if not row_format:
        if len(outputs) == 1:
            (alias, value), = outputs.items()
            return {"outputs": array_to_json(value, alias)}
        return {"outputs": {alias: array_to_json(value, alias) for alias, value in outputs.items()}}
    rows = {value.shape[0] if value.ndim else None for value in outputs.values()}
    if len(rows) != 1 or None in rows:
        raise invalid("the outputs do not share a batch dimension; use the columnar 'inputs' format")
    if len(outputs) == 1:
        (alias, value), = outputs.items()
        return {"predictions": array_to_json(value, alias)}
    columns = {alias: array_to_json(value, alias) for alias, value in outputs.items()}
    return {"predictions": [{alias: column[i] for alias, column in columns.items()} for i in range(rows.pop())]}


def _feature(value) -> "tf.train.Feature":
    values = value if isinstance(value, list) else [value]
    if all(isinstance(v, bool) for v in values) or all(isinstance(v, int) and not isinstance(v, bool)
                                                      for v in values):
        if any(not _INT64_MIN <= v <= _INT64_MAX for v in values):
            raise invalid(f"an integer feature must fit in int64 [{_INT64_MIN}, {_INT64_MAX}]; got {_preview(value)}")
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        try:
            return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))
        except OverflowError:
            raise invalid(f"a number of a float feature is beyond float range; got {_preview(value)}") from None
    if all(isinstance(v, str) or _is_b64(v) for v in values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[_decode_strings(v) for v in values]))
    raise invalid(f"a feature must be numbers, strings or {{\"b64\": ...}} values, all of one kind; "
                  f"got {_preview(value)}")


def _example(features: dict) -> tf.train.Example:
    if not isinstance(features, dict):
        raise invalid("each example must be a JSON object of features")
    return tf.train.Example(features=tf.train.Features(feature={k: _feature(v) for k, v in features.items()}))


def examples_input(body: dict) -> input_pb2.Input:
    examples = body.get("examples")
    if not isinstance(examples, list) or not examples:
        raise invalid("'examples' must be a non-empty list")
    request_input = input_pb2.Input()
    if "context" in body:
        target = request_input.example_list_with_context
        target.context.CopyFrom(_example(body["context"]))
    else:
        target = request_input.example_list
    target.examples.extend(_example(e) for e in examples)
    return request_input


# --- the app ---------------------------------------------------------------------------------

# While accept() fails (EMFILE and the like) asyncio retries every second: log it once a minute.
ACCEPT_ERROR_LOG_SECONDS = 60.0


@dataclasses.dataclass(frozen=True)
class RestLimits:
    """What one REST client may cost the server."""

    max_body_bytes: int = DEFAULT_REST_MAX_BODY_BYTES
    max_json_depth: int = DEFAULT_REST_MAX_JSON_DEPTH
    read_timeout: float = DEFAULT_REST_READ_TIMEOUT_SECONDS  # for a request's headers, and again for its body
    max_connections: int = DEFAULT_REST_MAX_CONNECTIONS


def _json_bytes(value) -> bytes:
    return json.dumps(value, indent=1).encode()


def _json_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json_response(_json_bytes({"error": message}), status)


# The answer to a REST request that outlives --rest_api_timeout_in_ms.
TIMED_OUT = "Request timed out"


class _Refused(Exception):
    """A request answered before it reaches the model server."""

    def __init__(self, status: int, code: str, message: str, close: bool = False):
        super().__init__(message)
        self.status, self.code, self.message, self.close = status, code, message, close


def _signature_name(body: dict) -> str:
    name = body.get("signature_name", "")
    if not isinstance(name, str):
        raise invalid(f"'signature_name' must be a string; got {_preview(name)}")
    return name


def _connected(request: web.Request) -> Callable[[], bool]:
    transport = request.transport
    return lambda: transport is not None and not transport.is_closing()


class RestApi:
    def __init__(self, server: ModelServer, metrics: ServingMetrics, threads: int, timeout_ms: int,
                 metrics_path: str | None, limits: RestLimits = RestLimits()):
        self.server, self.metrics = server, metrics
        self.executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="rest")
        self.timeout = timeout_ms / 1000 if timeout_ms > 0 else None
        self.metrics_path = metrics_path
        self.limits = limits
        self._calls: set[Call] = set()  # requests in flight, cancelled when the drain time is up

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_body_bytes, middlewares=[self._errors_as_json])
        app.router.add_route("*", "/v1/models/{tail:.*}", self._models, expect_handler=self._expect)
        if self.metrics_path:
            app.router.add_get(self.metrics_path, self._metrics)
        return app

    async def _expect(self, request: web.Request) -> web.Response | None:
        """`Expect: 100-continue`: a body larger than the limit is refused before the client sends it."""
        expect = request.headers.get("Expect", "")
        if request.version != aiohttp.HttpVersion11:
            return None
        if expect.lower() != "100-continue":
            response = _error(417, f"Unknown Expect: {expect[:80]}")
        elif request.content_length is not None and request.content_length > self.limits.max_body_bytes:
            response = _error(413, f"request body of {request.content_length} bytes is larger than the limit of "
                                   f"{self.limits.max_body_bytes} bytes (--rest_api_max_body_bytes)")
        else:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the 100 is not part of the response
            return None
        response.force_close()  # the body was never asked for: the connection cannot be reused
        return response

    def cancel_all(self) -> None:
        for call in list(self._calls):
            call.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    @web.middleware
    async def _errors_as_json(self, request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException as error:  # aiohttp's own 404/405/413: still JSON
            if error.status < 400:
                raise
            response = _error(error.status, error.reason if error.status != 413 else
                              f"request body larger than {self.limits.max_body_bytes} bytes")
            if "Allow" in error.headers:
                response.headers["Allow"] = error.headers["Allow"]
            return response
        except ConnectionError:  # the client left: an answer nobody reads, and no traceback per client
            return _error(499, "the client closed the connection")
        except Exception as error:
            log.exception("REST %s %s failed", request.method, request.path)
            return _error(500, f"Internal error: {type(error).__name__}: {error}")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": "text/plain; version=0.0.4"})

    async def _models(self, request: web.Request) -> web.Response:
        match = _MODEL_PATH.match(request.path)
        if not match:
            return _error(404, f"Malformed request: {request.method} {request.path}")
        suffix = match["suffix"] or ""
        wants_post = suffix.startswith(":")
        if request.method not in ("GET", "POST"):
            allowed = "POST" if wants_post else "GET"
            response = _error(405, f"Method {request.method} is not allowed on {request.path}; use {allowed}")
            response.headers["Allow"] = allowed
            return response
        if (request.method == "POST") != wants_post:
            return _error(404, f"Malformed request: {request.method} {request.path}")
        spec = model_pb2.ModelSpec(name=match["name"])
        if match["version"] is not None:
            version = int(match["version"])
            if not _INT64_MIN <= version <= _INT64_MAX:
                return _error(400, f"Invalid version {match['version']}: a version is a signed 64-bit integer")
            spec.version.value = version
        elif match["label"] is not None:
            spec.version_label = match["label"]
        api = {"": "GetModelStatus", "/metadata": "GetModelMetadata"}.get(suffix, suffix[1:])
        body = None
        if wants_post:
            try:
                body = await self._read_body(request)
            except _Refused as refusal:
                response = _error(refusal.status, refusal.message)
                if refusal.close:  # a stalled client gets its answer and the connection ends there
                    await response.prepare(request)
                    await response.write_eof()
                    if request.transport is not None:
                        request.transport.close()
                return self._record(spec.name, api, refusal.code, 0.0, response)
        started = time.perf_counter()
        # The REST timeout counts once the body is in; the read timeout covers the body.
        call = Call(self.timeout, alive=_connected(request))
        self._calls.add(call)
        try:
            future = asyncio.get_running_loop().run_in_executor(self.executor, self._respond, api, spec, body, call)
            status, code, payload = await asyncio.wait_for(future, self.timeout)
            if code == "DEADLINE_EXCEEDED" and call.expired:  # the REST timeout, seen first by the batcher
                status, payload = 504, _json_bytes({"error": TIMED_OUT})
        except asyncio.TimeoutError:
            call.cancel()  # answered 504: the model must not run it any more
            status, code, payload = 504, "DEADLINE_EXCEEDED", _json_bytes({"error": TIMED_OUT})
        except BaseException:
            call.cancel()
            raise
        finally:
            self._calls.discard(call)
        return self._record(spec.name, api, code, time.perf_counter() - started, _json_response(payload, status))

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.limits.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _Refused(413, "RESOURCE_EXHAUSTED", f"request body of {request.content_length} bytes is larger "
                           f"than the limit of {limit} bytes (--rest_api_max_body_bytes)")
        try:
            return await asyncio.wait_for(request.read(), self.limits.read_timeout)
        except asyncio.TimeoutError:
            raise _Refused(408, "DEADLINE_EXCEEDED", f"the request body did not arrive within "
                           f"{self.limits.read_timeout:g} s (--rest_api_read_timeout_seconds)", close=True) from None
        except web.HTTPRequestEntityTooLarge:
            raise _Refused(413, "RESOURCE_EXHAUSTED", f"request body larger than the limit of {limit} bytes "
                           "(--rest_api_max_body_bytes)") from None
        except RequestPayloadError as error:
            raise _Refused(400, "INVALID_ARGUMENT", f"malformed request body: {error}", close=True) from None

    def _record(self, model: str, api: str, status: str, seconds: float, response: web.Response) -> web.Response:
        self.metrics.record(model, api, "REST", status, seconds)
        return response

    # On the thread pool: everything that takes time, JSON included.

    def _respond(self, api: str, spec: model_pb2.ModelSpec, body: bytes | None, call: Call
                 ) -> tuple[int, str, bytes]:
        """HTTP status, gRPC code name and the JSON answer of one request."""
        handler = {"GetModelStatus": self._status, "GetModelMetadata": self._metadata, "predict": self._predict,
                   "classify": self._classify, "regress": self._regress}[api]
        try:
            call.check()  # waited for a thread until its client gave up
            request = self._parse(body, call) if body is not None else None
            return 200, "OK", _json_bytes(handler(spec, request, call))
        except ServingError as error:
            return error.http_status, error.code.name, _json_bytes({"error": error.message})
        except Exception as error:
            log.exception("REST %s failed", api)
            return 500, "INTERNAL", _json_bytes({"error": f"Internal error: {type(error).__name__}: {error}"})

    def _parse(self, body: bytes, call: Call) -> dict:
        try:
            value = rest_json.decode(body or b"null", self.limits.max_json_depth, check=call.check,
                                     numeric_rows=True)
        except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError and TooDeep are ValueErrors
            raise invalid(f"JSON Parse error: {error}") from None
        if not isinstance(value, dict):
            raise invalid("JSON request body must be an object")
        return value

    def _status(self, spec: model_pb2.ModelSpec, body, call: Call) -> dict:
        response = self.server.get_model_status(get_model_status_pb2.GetModelStatusRequest(model_spec=spec))
        return json_format.MessageToDict(response, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)

    def _metadata(self, spec: model_pb2.ModelSpec, body, call: Call) -> dict:
        request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=spec, metadata_field=["signature_def"])
        response = self.server.get_model_metadata(request)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return {
            "model_spec": json_format.MessageToDict(response.model_spec, preserving_proto_field_name=True,
                                                    always_print_fields_with_no_presence=True),
            "metadata": {"signature_def": json_format.MessageToDict(signature_map, preserving_proto_field_name=True)},
        }

    def _predict(self, spec: model_pb2.ModelSpec, body: dict, call: Call) -> dict:
        servable = self.server.resolve(spec)
        signature = servable.signature(_signature_name(body))
        inputs, row_format = parse_predict_body(body, signature)
        _, outputs = self.server.predict_arrays(servable, signature.key, inputs, [], call=call)
        return predict_body(outputs, row_format)

    def _classify(self, spec: model_pb2.ModelSpec, body: dict, call: Call) -> dict:
        spec.signature_name = _signature_name(body)
        request = classification_pb2.ClassificationRequest(model_spec=spec, input=examples_input(body))
        response = self.server.classify(request, call=call)
        return {"results": [[[c.label, c.score] for c in result.classes]
                            for result in response.result.classifications]}

    def _regress(self, spec: model_pb2.ModelSpec, body: dict, call: Call) -> dict:
        spec.signature_name = _signature_name(body)
        request = regression_pb2.RegressionRequest(model_spec=spec, input=examples_input(body))
        response = self.server.regress(request, call=call)
        return {"results": [r.value for r in response.result.regressions]}


# --- the server: its own event loop thread, TLS, connection limits, drain --------------------------


_BUSY_BODY = _json_bytes({"error": "too many connections (--rest_api_max_connections); retry later"})
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class _Busy(asyncio.Protocol):
    """A connection beyond --rest_api_max_connections: told so, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(_BUSY)
        transport.close()


class _Throttle:
    """Lets a repeated message through once per interval, with how often it was held back."""

    def __init__(self, seconds: float = ACCEPT_ERROR_LOG_SECONDS):
        self.seconds, self.last, self.held = seconds, None, 0

    def __call__(self, log_it: Callable[[int], None]) -> None:
        now = time.monotonic()
        if self.last is not None and now - self.last < self.seconds:
            self.held += 1
            return
        log_it(self.held)
        self.last, self.held = now, 0


def ssl_context(config) -> ssl.SSLContext:
    """REST's TLS from the SSLConfig gRPC uses: the same certificate, the same client verification."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory() as folder:  # load_cert_chain reads files only; the folder is private
        certificate, key = pathlib.Path(folder, "cert.pem"), pathlib.Path(folder, "key.pem")
        certificate.write_text(config.server_cert)
        key.touch(mode=0o600)
        key.write_text(config.server_key)
        context.load_cert_chain(certificate, key)
    if config.client_verify:
        if not config.custom_ca:
            raise ssl.SSLError("SSLConfig has client_verify but no custom_ca to verify client certificates with")
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=config.custom_ca)
    return context


class RestServer:
    """The REST API on an event loop thread of its own."""

    def __init__(self, api: RestApi, tls: ssl.SSLContext | None = None,
                 drain_seconds: float = DEFAULT_DRAIN_TIMEOUT_SECONDS):
        self.api, self.limits, self.tls, self.drain_seconds = api, api.limits, tls, drain_seconds
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._loop_error)
        self._accept_errors, self._refusals = _Throttle(), _Throttle()
        self._thread: threading.Thread | None = None
        self._listener: asyncio.AbstractServer | None = None
        self.runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (never sharing the port with another process); the bound address."""
        try:
            sock = self._listen(host, port)
        except OSError:
            self.loop.close()
            raise
        self._thread = threading.Thread(target=self.loop.run_forever, name="rest", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(sock), self.loop).result()
        except BaseException:
            sock.close()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._join()
            raise
        self.address = sock.getsockname()[:2]
        return self.address

    def stop(self, drain_seconds: float | None = None) -> None:
        """Stop accepting, let requests in flight finish for at most `drain_seconds`, then close the rest."""
        if self._thread is None:
            return
        drain_seconds = self.drain_seconds if drain_seconds is None else drain_seconds
        try:
            asyncio.run_coroutine_threadsafe(self._stop(drain_seconds), self.loop).result(drain_seconds + 5)
        except (concurrent.futures.TimeoutError, RuntimeError):
            log.warning("the REST API did not stop in time")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._join()

    def _join(self) -> None:
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()
        self._thread = None

    @staticmethod
    def _listen(host: str, port: int) -> socket.socket:
        try:
            family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        except socket.gaierror as error:
            raise OSError(f"cannot listen for REST on {host}:{port}: {error}") from None
        sock = socket.socket(family, kind)
        try:
            # SO_REUSEADDR lets a restarted server bind past TIME_WAIT; without SO_REUSEPORT a second
            # server on a port in use fails here instead of taking a share of the traffic.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
        except OSError as error:
            sock.close()
            raise OSError(f"cannot listen for REST on {host}:{port}: {error.strerror or error}") from None
        sock.setblocking(False)
        return sock

    async def _start(self, sock: socket.socket) -> None:
        self.runner = web.AppRunner(
            self.api.app(), access_log=None, shutdown_timeout=self.drain_seconds,
            # aiohttp starts this timer with the connection and ends only an idle one: a client that
            # has not sent a whole request (line and headers) within the read timeout is dropped.
            keepalive_timeout=self.limits.read_timeout,
            # After a refusal aiohttp reads and discards the rest of a body, for at most this long.
            lingering_time=min(10.0, self.limits.read_timeout))
        await self.runner.setup()
        self._listener = await self.loop.create_server(
            self._connection, sock=sock, ssl=self.tls, backlog=128,
            ssl_handshake_timeout=self.limits.read_timeout if self.tls else None)

    def _connection(self) -> asyncio.Protocol:
        server = self.runner.server
        if len(server.connections) >= self.limits.max_connections:
            self._refusals(lambda held: log.warning(
                "REST: %d connections open, the limit (--rest_api_max_connections); refusing more "
                "(%d refusals not logged since the last message)", len(server.connections), held))
            return _Busy()
        return server()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        error = context.get("exception")
        if context.get("message", "").startswith("socket.accept()") and isinstance(error, OSError):
            # A traceback per retry would fill the disk while descriptors run out.
            self._accept_errors(lambda held: log.error(
                "REST cannot accept connections: %s (%d more such errors not logged since the last message)",
                error.strerror or error, held))
            return
        loop.default_exception_handler(context)

    async def _stop(self, drain_seconds: float) -> None:
        if self._listener is not None:
            self._listener.close()  # no new connections
        server = self.runner.server if self.runner is not None else None
        if server is None:
            return
        try:
            # aiohttp closes idle connections, then waits for the requests in flight.
            await asyncio.wait_for(self.runner.cleanup(), drain_seconds)
        except asyncio.TimeoutError:
            log.warning("REST: %d connections still open after %g s; closing them", len(server.connections),
                        drain_seconds)
            for handler in server.connections:
                handler.force_close()
        self.api.cancel_all()
