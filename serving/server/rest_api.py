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
no other request. The JSON <-> tensor codec is rest_codec's; the event loop,
TLS, connection limits and drain are rest_server's.

What one client may cost is bounded (`RestLimits`): the body size, the JSON
depth, the time to send headers and body, the REST timeout (a request
answered 504, or whose client has gone, is dropped before the model runs
it) and the number of open connections.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import re
import time
from collections.abc import Callable

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from google.protobuf import json_format
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    regression_pb2,
)

from serving.server import rest_json
from serving.server.rest_codec import (INT64_MAX, INT64_MIN, examples_input, json_bytes, parse_predict_body,
                                        predict_body, preview)
from serving.server.calls import Call
from serving.server.errors import ServingError, invalid
from serving.server.metrics import ServingMetrics
from serving.server.service import ModelServer

log = logging.getLogger(__name__)

_MODEL_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>-?[0-9]+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<suffix>/metadata|:predict|:classify|:regress)?$")


# --- the app ---------------------------------------------------------------------------------



@dataclasses.dataclass(frozen=True)
class RestLimits:
    """What one REST client may cost the server (the --rest_api_* flags)."""

    max_body_bytes: int
    max_json_depth: int
    read_timeout: float  # for a request's headers, and again for its body
    max_connections: int

# --rest_api_enable_cors_support: TF Serving's headers (AddCORSHeaders, model_servers/http_rest_api_util.cc).
CORS_HEADERS = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "POST, GET",
                "Access-Control-Allow-Headers": "Content-Type"}
_CORS_ORIGIN = re.compile(r"https?://")


def _json_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json_response(json_bytes({"error": message}), status)


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
        raise invalid(f"'signature_name' must be a string; got {preview(name)}")
    return name


def _connected(request: web.Request) -> Callable[[], bool]:
    transport = request.transport
    return lambda: transport is not None and not transport.is_closing()


class RestApi:
    def __init__(self, server: ModelServer, metrics: ServingMetrics, threads: int, timeout_ms: int,
                 metrics_path: str | None, limits: RestLimits, cors: bool = False):
        self.server, self.metrics = server, metrics
        self.executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="rest")
        self.timeout = timeout_ms / 1000 if timeout_ms > 0 else None
        self.metrics_path = metrics_path
        self.limits = limits
        self.cors = cors
        self._calls: set[Call] = set()  # requests in flight, cancelled when the drain time is up

    def app(self) -> web.Application:
        middlewares = [self._cors] if self.cors else []
        app = web.Application(client_max_size=self.limits.max_body_bytes,
                              middlewares=[*middlewares, self._errors_as_json])
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
    async def _cors(self, request: web.Request, handler):
        """TF Serving's CORS (RestApiRequestDispatcher, model_servers/http_server.cc): a preflight
        from an http(s) origin is answered 200, any other 400; every answer has the headers."""
        if request.method == "OPTIONS":
            response = (web.Response(status=200) if _CORS_ORIGIN.search(request.headers.get("Origin", ""))
                        else _error(400, "Origin header is missing in CORS preflight"))
        else:
            response = await handler(request)
        response.headers.update(CORS_HEADERS)
        return response

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
            if not INT64_MIN <= version <= INT64_MAX:
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
                status, payload = 504, json_bytes({"error": TIMED_OUT})
        except asyncio.TimeoutError:
            call.cancel()  # answered 504: the model must not run it any more
            status, code, payload = 504, "DEADLINE_EXCEEDED", json_bytes({"error": TIMED_OUT})
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
            return 200, "OK", json_bytes(handler(spec, request, call))
        except ServingError as error:
            return error.http_status, error.code.name, json_bytes({"error": error.message})
        except Exception as error:
            log.exception("REST %s failed", api)
            return 500, "INTERNAL", json_bytes({"error": f"Internal error: {type(error).__name__}: {error}"})

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
