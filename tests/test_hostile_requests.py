"""What a hostile client sends, case by case, through gRPC and REST: each gets a clean
status, the server keeps serving, and its memory stays within 300 MB of where it began.

The server runs as its own process with the deployed flags (batching on), so the RSS
measured is the server's alone; a second server without batching covers the unbatched path."""

import base64
import io
import shutil
import socket
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import classification_pb2, predict_pb2

from hostile_files import gif_hiding_a_frame
from server_clients import Clients, images, predict_request, start_server, start_server_process

RSS_BUDGET_MIB = 300
WRONG_SHAPES = [(), (1,), (3,), (1, 3), (32, 32, 3), (1, 1, 1, 3), (1, 32, 32, 3, 1)]


@pytest.fixture(scope="module")
def model_root(exported_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    shutil.copytree(exported_model, root / "m" / "1")
    return root


@pytest.fixture(scope="module", params=["batching", "unbatched"])
def served(model_root, request):
    # TF Serving refuses a batching parameters file without batching: the deployed one goes too.
    flags = ["--enable_batching=false", "--batching_parameters_file="] if request.param == "unbatched" else []
    # The server feeds what arrives, as TF Serving does: only the model's own checks stand
    # between a wrong shape and the kernels.
    server = start_server_process(model_root, {"m": model_root / "m"}, *flags)
    clients = Clients(server)
    clients.predictions.Predict(predict_request(model="m", batch=images(2)), timeout=60)
    yield clients, server.rss_mib()
    server.stop(grace=2)


def still_serving(clients, start_rss):
    assert clients.predictions.Predict(predict_request(model="m", batch=images(2)), timeout=60).outputs
    assert clients.json("/v1/models/m:predict", {"instances": images(1).tolist()})[0] == 200
    assert clients.server.rss_mib() - start_rss < RSS_BUDGET_MIB


def grpc_status(call, request, timeout=60):
    with pytest.raises(grpc.RpcError) as raised:
        call(request, timeout=timeout)
    return raised.value.code(), raised.value.details()


def tensor(shape, dtype=types_pb2.DT_UINT8, **fields):
    proto = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape]))
    for name, values in fields.items():
        getattr(proto, name).extend(values)
    return proto


def bytes_request(files, model="m"):
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = model, "serving_bytes"
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(files) if isinstance(files, list) else files)
    return request


def png(seed=0):
    buffer = io.BytesIO()
    Image.fromarray(images(1, seed)[0]).save(buffer, format="PNG")
    return buffer.getvalue()


# --- 1. wrong ranks and shapes reach the model, which refuses them -----------------------------


@pytest.mark.parametrize("shape", WRONG_SHAPES, ids=str)
def test_a_wrong_shape_is_refused_by_the_model_itself(served, shape):
    clients, start = served
    request = predict_request(model="m", batch=np.zeros(shape, np.uint8))
    code, details = grpc_status(clients.predictions.Predict, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # A scalar is refused by the batcher first (TF Serving's batching session refuses it too).
    assert "input images must have shape [batch, 32, 32, 3]" in details or (
        shape == () and details == "Batching Run() input tensors must have at least one dimension")
    still_serving(clients, start)


@pytest.mark.parametrize("body", [{"instances": [[[1, 2, 3]]]}, {"inputs": [7, 7, 7]}, {"inputs": 7},
                                  {"instances": [[[[1, 2, 3]]]]}], ids=["28-byte", "18-byte", "scalar", "1x1x1x3"])
def test_a_wrong_shape_over_rest_is_refused_by_the_model_itself(served, body):
    clients, start = served
    status, content = clients.json("/v1/models/m:predict", body)
    assert status == 400
    assert "must have shape [batch, 32, 32, 3]" in content["error"] or (
        body == {"inputs": 7} and content["error"] == "Batching Run() input tensors must have at least one dimension")
    still_serving(clients, start)


def test_with_check_input_shapes_the_server_checks_declared_shapes_itself(model_root):
    server = start_server(model_root, {"m": model_root / "m"}, "--check_input_shapes")
    try:
        clients = Clients(server)
        code, details = grpc_status(clients.predictions.Predict, predict_request(model="m", batch=np.zeros((1, 3),
                                                                                                       np.uint8)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details == "input 'images' has shape [1, 3], the signature declares uint8 [?,32,32,3]"
    finally:
        server.stop(grace=2)


# --- 2. a string tensor is as large as TensorFlow makes it ----------------------------------------


def test_one_file_declared_ten_thousand_times_is_refused(served):
    clients, start = served
    proto = tensor([10000], types_pb2.DT_STRING, string_val=[png()])
    assert len(proto.SerializeToString()) < 4000
    code, details = grpc_status(clients.predictions.Predict, bytes_request(proto))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "10000 rows" in details and "--max_request_rows" in details
    body = {"signature_name": "serving_bytes", "inputs": [{"b64": base64.b64encode(png()).decode()}] * 10000}
    status, content = clients.json("/v1/models/m:predict", body)
    assert status == 400 and "10000 rows" in content["error"]
    still_serving(clients, start)


def test_string_elements_count_by_what_they_expand_to(served):
    clients, start = served
    # 1000 rows of one 100 KB file: 100 MB once TensorFlow fills the tensor with copies.
    proto = tensor([1000], types_pb2.DT_STRING, string_val=[b"\x89PNG" + b"\x00" * 100_000])
    code, details = grpc_status(clients.predictions.Predict, bytes_request(proto))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max_request_tensor_bytes" in details
    still_serving(clients, start)


# --- 3. Classify: the context is counted once per example before it is copied ---------------------


def test_a_large_context_times_many_examples_is_refused_before_copying(served):
    clients, start = served
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name, request.model_spec.signature_name = "m", "classify"
    context = request.input.example_list_with_context.context
    context.features.feature["padding"].bytes_list.value.append(b"\x00" * (1 << 20))
    for _ in range(1000):
        request.input.example_list_with_context.examples.add()
    code, details = grpc_status(clients.predictions.Classify, request)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "context merged into each" in details
    body = {"signature_name": "classify", "context": {"padding": {"b64": base64.b64encode(b"\x00" * (1 << 20)).decode()}},
            "examples": [{}] * 1000}
    status, content = clients.json("/v1/models/m:classify", body)
    assert status == 429 and "context merged into each" in content["error"]
    still_serving(clients, start)


def test_too_many_examples_are_refused(served):
    clients, start = served
    status, content = clients.json("/v1/models/m:classify", {"signature_name": "classify", "examples": [{}] * 1025})
    assert status == 400 and "1025 rows" in content["error"]
    still_serving(clients, start)


# --- 4. every GIF frame counts -----------------------------------------------------------------------


def test_a_gif_hiding_a_huge_frame_is_refused_on_every_api(served):
    clients, start = served
    hostile = gif_hiding_a_frame((1, 1), (8000, 8000))
    code, details = grpc_status(clients.predictions.Predict, bytes_request([hostile]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "more pixels than" in details
    encoded = {"b64": base64.b64encode(hostile).decode()}
    status, content = clients.json("/v1/models/m:predict", {"signature_name": "serving_bytes", "instances": [encoded]})
    assert status == 400 and "more pixels than" in content["error"]
    status, content = clients.json("/v1/models/m:classify",
                                   {"signature_name": "classify", "examples": [{"image/encoded": encoded}]})
    assert status == 400 and "more pixels than" in content["error"]
    still_serving(clients, start)


# --- 5. compressed gRPC messages are bounded once inflated ------------------------------------------


def test_a_compressed_message_is_bounded_after_inflation(served):
    clients, start = served
    rows = (100 << 20) // 3072  # 100 MiB of zeros, about 100 KiB once gzipped
    request = predict_request(model="m", batch=np.zeros((1, 32, 32, 3), np.uint8))
    request.inputs["images"].CopyFrom(tensor([rows, 32, 32, 3]))
    request.inputs["images"].tensor_content = bytes(rows * 3072)
    code, details = grpc_status(lambda r, timeout: clients.predictions.Predict(
        r, timeout=timeout, compression=grpc.Compression.Gzip), request)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details
    still_serving(clients, start)


# --- 6. rows and deadlines ---------------------------------------------------------------------------------


def test_a_tiny_request_declaring_thousands_of_images_is_refused(served):
    clients, start = served
    request = predict_request(model="m")
    request.inputs["images"].CopyFrom(tensor([5000, 32, 32, 3], int_val=[7]))
    assert request.ByteSize() < 64
    code, details = grpc_status(clients.predictions.Predict, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "5000 rows" in details
    still_serving(clients, start)


def test_a_request_past_its_deadline_gets_deadline_exceeded(served):
    clients, start = served
    rows = 64 if clients.server.batching else 1024  # the batching config's max_batch_size
    code, _ = grpc_status(clients.predictions.Predict, predict_request(model="m", batch=images(rows)), timeout=0.002)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    still_serving(clients, start)


def test_the_deadline_reaches_the_session_run(model_root):
    # TensorFlow itself ends the run (RunOptions.timeout_in_ms) with DEADLINE_EXCEEDED; without
    # the timeout the same run succeeds.
    from serving.server.errors import ServingError
    from serving.server.servable import Servable

    servable = Servable("m", 1, str(model_root / "m" / "1"))
    signature = servable.signature("serving_default")
    batch = {"images": images(1024)}
    assert servable.run(signature, batch, ["class_ids"])["class_ids"].shape == (1024,)
    with pytest.raises(ServingError) as raised:
        servable.run(signature, batch, ["class_ids"], timeout=0.001)
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


# --- 8. the smaller ones -------------------------------------------------------------------------------------


def test_an_integer_feature_beyond_int64_is_invalid(served):
    clients, start = served
    for value in (10**30, [1.5, 10**400]):
        status, content = clients.json("/v1/models/m:classify", {"signature_name": "classify",
                                                                  "examples": [{"x": value}]})
        assert status == 400, content
    still_serving(clients, start)


def test_a_version_in_other_digits_is_not_a_version(served):
    clients, start = served
    for version in ("%D9%A1", "%C2%B2"):  # Arabic-Indic one, superscript two
        status, content = clients.json(f"/v1/models/m/versions/{version}")
        assert status == 404 and "Malformed request" in content["error"]
    still_serving(clients, start)


def test_expect_continue_is_refused_before_a_body_larger_than_the_limit(served):
    clients, start = served
    with socket.create_connection(("localhost", clients.server.rest_port), timeout=10) as connection:
        connection.sendall(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n")
        answer = connection.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413") and b"100 Continue" not in answer
    still_serving(clients, start)


def test_expect_continue_within_the_limit_continues(served):
    clients, start = served
    body = b'{"instances": ' + str(images(1).tolist()).encode() + b"}"
    with socket.create_connection(("localhost", clients.server.rest_port), timeout=30) as connection:
        connection.sendall(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           + f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
        assert connection.recv(4096).startswith(b"HTTP/1.1 100 Continue")
        connection.sendall(body)
        deadline, answer = time.monotonic() + 30, b""
        while b"predictions" not in answer and time.monotonic() < deadline:
            answer += connection.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200")
    still_serving(clients, start)
