"""The hostile requests a soak mixes in: each must be refused with a 4xx or a gRPC
status that names the client's fault, never answered 5xx, and cost nothing lasting.

`hostile_requests(grpc_port, rest_port)` returns named callables; each sends one
request and returns the status it got (a gRPC code name or an HTTP status).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
import pathlib

import grpc
import numpy as np
import tensorflow as tf
from PIL import Image
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import classification_pb2, predict_pb2, prediction_service_pb2_grpc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from hostile_files import gif_hiding_a_frame  # noqa: E402

# What a refusal may be: the client's fault, never the server's.
REFUSALS = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "FAILED_PRECONDITION",
            "400", "404", "413", "429", "504"}


def _tensor(shape, dtype=types_pb2.DT_UINT8, **fields) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape]))
    for name, values in fields.items():
        getattr(proto, name).extend(values)
    return proto


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def hostile_requests(model: str, grpc_port: int, rest_port: int) -> dict[str, Callable[[], str]]:
    channel = grpc.insecure_channel(f"localhost:{grpc_port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    url = f"http://localhost:{rest_port}/v1/models/{model}"

    def predict(inputs: dict, signature: str = "", **options) -> Callable[[], str]:
        message = predict_pb2.PredictRequest()
        message.model_spec.name, message.model_spec.signature_name = model, signature
        for alias, proto in inputs.items():
            message.inputs[alias].CopyFrom(proto)

        def send() -> str:
            try:
                stub.Predict(message, timeout=options.get("timeout", 30), compression=options.get("compression"))
                return "OK"
            except grpc.RpcError as error:
                return error.code().name
        return send

    def rest(path: str, body) -> Callable[[], str]:
        data = json.dumps(body).encode()

        def send() -> str:
            try:
                with urllib.request.urlopen(urllib.request.Request(url + path, data), timeout=30) as reply:
                    reply.read()
                    return str(reply.status)
            except urllib.error.HTTPError as error:
                error.read()
                return str(error.code)
        return send

    def classify_context() -> str:
        message = classification_pb2.ClassificationRequest()
        message.model_spec.name, message.model_spec.signature_name = model, "classify"
        context = message.input.example_list_with_context.context
        context.features.feature["padding"].bytes_list.value.append(b"\x00" * (1 << 20))
        for _ in range(1000):
            message.input.example_list_with_context.examples.add()
        try:
            stub.Classify(message, timeout=30)
            return "OK"
        except grpc.RpcError as error:
            return error.code().name

    def expect_continue() -> str:
        with socket.create_connection(("localhost", rest_port), timeout=10) as connection:
            connection.sendall(f"POST /v1/models/{model}:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000"
                               "\r\nExpect: 100-continue\r\n\r\n".encode())
            return connection.recv(64).split(b" ")[1].decode()

    bomb = _tensor([(100 << 20) // 3072, 32, 32, 3])
    bomb.tensor_content = bytes(bomb.tensor_shape.dim[0].size * 3072)
    gif = {"b64": base64.b64encode(gif_hiding_a_frame()).decode()}
    return {
        "wrong rank (gRPC)": predict({"images": tf.make_tensor_proto(np.zeros((1, 3), np.uint8))}),
        "wrong rank (REST)": rest(":predict", {"instances": [[[1, 2, 3]]]}),
        "one file declared 10000 times": predict({"image_bytes": _tensor([10000], types_pb2.DT_STRING,
                                                                         string_val=[_png()])}, "serving_bytes"),
        "1 MiB context x 1000 examples": classify_context,
        "GIF hiding an 8000x8000 frame": rest(":predict", {"signature_name": "serving_bytes", "instances": [gif]}),
        "100 MiB gzip bomb": predict({"images": bomb}, compression=grpc.Compression.Gzip),
        "5000 images declared in 42 bytes": predict({"images": _tensor([5000, 32, 32, 3], int_val=[7])}),
        "int64 feature of 10**30": rest(":classify", {"signature_name": "classify", "examples": [{"x": 10**30}]}),
        "version in Arabic-Indic digits": rest("/versions/%D9%A1:predict", {"instances": [1]}),
        "Expect: 100-continue, 1 GB": expect_continue,
    }
