"""TF Serving's REST API on aiohttp.

    GET  /v1/models/NAME[/versions/V | /labels/L]            model status
    GET  /v1/models/NAME[/versions/V | /labels/L]/metadata   signature defs
    POST /v1/models/NAME[/versions/V | /labels/L]:predict    {"instances": [...]} or {"inputs": ...}
    POST /v1/models/NAME[/versions/V | /labels/L]:classify   {"examples": [...], "context": {...}}
    POST /v1/models/NAME[/versions/V | /labels/L]:regress
    GET  <monitoring path>                                    Prometheus metrics, when enabled

Binary strings travel as {"b64": "..."}; errors come back as {"error": "..."}
with the HTTP status of the gRPC code. Model calls run on a thread pool, so
the event loop keeps accepting requests while TensorFlow works.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import logging
import re
import time

import numpy as np
import tensorflow as tf
from aiohttp import web
from google.protobuf import json_format
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    input_pb2,
    model_pb2,
    regression_pb2,
)

from serving.server.errors import ServingError, invalid
from serving.server.metrics import ServingMetrics
from serving.server.servable import Signature
from serving.server.service import ModelServer

log = logging.getLogger(__name__)

_MODEL_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>-?\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<suffix>/metadata|:predict|:classify|:regress)?$")
MAX_BODY_BYTES = 1 << 30


# --- JSON <-> arrays -------------------------------------------------------------------


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
    raise invalid(f"expected a string or {{\"b64\": ...}} for a DT_STRING input; got {json.dumps(value)[:80]}")


def json_to_array(value, dtype: tf.DType, alias: str) -> np.ndarray:
    """A JSON value (nested lists) as an array of the signature input's dtype."""
    if dtype == tf.string:
        decoded = _decode_strings(value)
        array = np.array(decoded, dtype=object)
        if array.dtype != object or (array.ndim and any(isinstance(v, list) for v in array.ravel())):
            raise invalid(f"input '{alias}': the nested lists are ragged")
        return array
    try:
        array = np.array(value)
    except ValueError:
        raise invalid(f"input '{alias}': the nested lists are ragged") from None
    if array.dtype == object or array.dtype.kind in "US":
        raise invalid(f"input '{alias}': expects {dtype.name} numbers; got {json.dumps(value)[:80]}")
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
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))
    if all(isinstance(v, str) or _is_b64(v) for v in values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[_decode_strings(v) for v in values]))
    raise invalid(f"a feature must be numbers, strings or {{\"b64\": ...}} values, all of one kind; "
                  f"got {json.dumps(value)[:80]}")


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


def _json_response(value: dict, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(value, indent=1), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json_response({"error": message}, status)


class RestApi:
    def __init__(self, server: ModelServer, metrics: ServingMetrics, threads: int, timeout_ms: int,
                 metrics_path: str | None):
        self.server, self.metrics = server, metrics
        self.executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="rest")
        self.timeout = timeout_ms / 1000 if timeout_ms > 0 else None
        self.metrics_path = metrics_path

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors_as_json])
        app.router.add_route("*", "/v1/models/{tail:.*}", self._models)
        if self.metrics_path:
            app.router.add_get(self.metrics_path, self._metrics)
        return app

    @web.middleware
    async def _errors_as_json(self, request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException as error:  # aiohttp's own 404/405/413: still JSON
            if error.status < 400:
                raise
            return _error(error.status, error.reason if error.status != 413 else
                          f"request body larger than {MAX_BODY_BYTES} bytes")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": "text/plain; version=0.0.4"})

    async def _models(self, request: web.Request) -> web.Response:
        match = _MODEL_PATH.match(request.path)
        if not match:
            return _error(404, f"Malformed request: {request.method} {request.path}")
        suffix = match["suffix"] or ""
        wants_post = suffix.startswith(":")
        if (request.method == "POST") != wants_post:
            return _error(405 if request.method not in ("GET", "POST") else 404,
                          f"Malformed request: {request.method} {request.path}")
        spec = model_pb2.ModelSpec(name=match["name"])
        if match["version"] is not None:
            spec.version.value = int(match["version"])
        elif match["label"] is not None:
            spec.version_label = match["label"]
        api = {"": "GetModelStatus", "/metadata": "GetModelMetadata"}.get(suffix, suffix[1:])
        body = None
        if wants_post:
            try:
                body = json.loads(await request.read() or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                return self._record(spec.name, api, "INVALID_ARGUMENT", 0.0,
                                    _error(400, f"JSON Parse error: {error}"))
            if not isinstance(body, dict):
                return self._record(spec.name, api, "INVALID_ARGUMENT", 0.0,
                                    _error(400, "JSON request body must be an object"))
        started = time.perf_counter()
        handler = {"GetModelStatus": self._status, "GetModelMetadata": self._metadata, "predict": self._predict,
                   "classify": self._classify, "regress": self._regress}[api]
        try:
            future = asyncio.get_running_loop().run_in_executor(self.executor, handler, spec, body)
            result = await asyncio.wait_for(future, self.timeout)
            response, status = _json_response(result), "OK"
        except ServingError as error:
            response, status = _error(error.http_status, error.message), error.code.name
        except asyncio.TimeoutError:
            response, status = _error(504, "Request timed out"), "DEADLINE_EXCEEDED"
        except Exception as error:
            log.exception("REST %s failed", api)
            response, status = _error(500, f"{type(error).__name__}: {error}"), "INTERNAL"
        return self._record(spec.name, api, status, time.perf_counter() - started, response)

    def _record(self, model: str, api: str, status: str, seconds: float, response: web.Response) -> web.Response:
        self.metrics.record(model, api, "REST", status, seconds)
        return response

    # Handlers run on the thread pool.

    def _status(self, spec: model_pb2.ModelSpec, body) -> dict:
        response = self.server.get_model_status(get_model_status_pb2.GetModelStatusRequest(model_spec=spec))
        return json_format.MessageToDict(response, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)

    def _metadata(self, spec: model_pb2.ModelSpec, body) -> dict:
        request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=spec, metadata_field=["signature_def"])
        response = self.server.get_model_metadata(request)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return {
            "model_spec": json_format.MessageToDict(response.model_spec, preserving_proto_field_name=True,
                                                    always_print_fields_with_no_presence=True),
            "metadata": {"signature_def": json_format.MessageToDict(signature_map, preserving_proto_field_name=True)},
        }

    def _predict(self, spec: model_pb2.ModelSpec, body: dict) -> dict:
        servable = self.server.resolve(spec)
        signature = servable.signature(body.get("signature_name", ""))
        inputs, row_format = parse_predict_body(body, signature)
        _, outputs = self.server.predict_arrays(servable, signature.key, inputs, [])
        return predict_body(outputs, row_format)

    def _classify(self, spec: model_pb2.ModelSpec, body: dict) -> dict:
        spec.signature_name = body.get("signature_name", "")
        request = classification_pb2.ClassificationRequest(model_spec=spec, input=examples_input(body))
        response = self.server.classify(request)
        return {"results": [[[c.label, c.score] for c in result.classes]
                            for result in response.result.classifications]}

    def _regress(self, spec: model_pb2.ModelSpec, body: dict) -> dict:
        spec.signature_name = body.get("signature_name", "")
        request = regression_pb2.RegressionRequest(model_spec=spec, input=examples_input(body))
        response = self.server.regress(request)
        return {"results": [r.value for r in response.result.regressions]}

