"""The client trusts no server: crafted gRPC and REST answers, on loopback, are refused
in one line (or escaped, for class names) before any array is built from them; and the
classify path starts without TensorFlow."""

import concurrent.futures
import http.server
import json
import os
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from PIL import Image
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

from helpers import REPO
from serving import client as client_module
from serving.client import Classifier, ClientError
from serving.rest_client import RestClassifier

NAMES = ["cat", "dog", "ship"]
CLASSES = 10


def tensor(dtype, shape, **fields):
    proto = tensor_pb2.TensorProto(dtype=dtype, **fields)
    for size in shape:
        proto.tensor_shape.dim.add(size=size)
    return proto


def floats(values):
    values = np.asarray(values, np.float32)
    return tensor(types_pb2.DT_FLOAT, values.shape, tensor_content=values.tobytes())


def strings(rows):
    return tensor(types_pb2.DT_STRING, [len(rows), len(rows[0])],
                  string_val=[name.encode() for row in rows for name in row])


def honest_outputs(rows, names=NAMES):
    probabilities = np.full((rows, CLASSES), 0.05, np.float32)
    probabilities[:, :3] = [0.4, 0.2, 0.1]
    return {"probabilities": floats(probabilities), "top_k_class_names": strings([names] * rows),
            "top_k_probabilities": floats([[0.4, 0.2, 0.1]] * rows)}


def metadata(probabilities_shape=(-1, CLASSES), probabilities_dtype=types_pb2.DT_FLOAT, name="accresnet",
             version=1):
    signatures = get_model_metadata_pb2.SignatureDefMap()
    definition = signatures.signature_def["serving_default"]
    images = definition.inputs["images"]
    images.dtype = types_pb2.DT_UINT8
    for size in (-1, 32, 32, 3):
        images.tensor_shape.dim.add(size=size)
    for alias, dtype, shape in [("probabilities", probabilities_dtype, probabilities_shape),
                                ("top_k_class_names", types_pb2.DT_STRING, (-1, 3)),
                                ("top_k_probabilities", types_pb2.DT_FLOAT, (-1, 3))]:
        output = definition.outputs[alias]
        output.dtype = dtype
        for size in shape:
            output.tensor_shape.dim.add(size=size)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = name
    response.model_spec.version.value = version
    response.metadata["signature_def"].Pack(signatures)
    return response


class Hostile(prediction_service_pb2_grpc.PredictionServiceServicer):
    """A PredictionService whose answers each test crafts: `metadata` is the
    GetModelMetadataResponse, `outputs(rows)` the Predict outputs, `spec` their model spec."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.metadata = metadata()
        self.outputs = honest_outputs
        self.spec = {"name": "accresnet", "version": 1, "signature_name": "serving_default"}

    def GetModelMetadata(self, request, context):
        return self.metadata

    def Predict(self, request, context):
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.spec["name"]
        response.model_spec.version.value = self.spec["version"]
        response.model_spec.signature_name = self.spec["signature_name"]
        rows = request.inputs["images"].tensor_shape.dim[0].size
        for alias, value in self.outputs(rows).items():
            response.outputs[alias].CopyFrom(value)
        return response


@pytest.fixture(scope="module")
def grpc_server():
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(2),
                         options=[("grpc.max_send_message_length", 512 * 1024 * 1024)])
    service = Hostile()
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield service, f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def hostile(grpc_server):
    service, address = grpc_server
    service.reset()
    yield service, address
    service.reset()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / f"image{i}.png")
    return sorted(str(path) for path in folder.iterdir())


PIXELS = np.zeros((3, 32, 32, 3), np.uint8)


def classify(address, *args, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "classify", "--server", address, "--retries", "0",
                           "--timeout", "10", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def assert_refused(result, *fragments):
    """Exit status 1, one line on stderr, no traceback, nothing on stdout."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("accresnet classify: error: "), result.stderr
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_an_honest_answer_is_read(hostile):
    service, address = hostile
    with Classifier(address) as classifier:
        answer = classifier.answer(PIXELS)
    assert answer.probabilities.shape == (3, CLASSES) and answer.top_k_names == [NAMES] * 3
    assert answer.version == 1
    # TF Serving's default layout: the values in float_val, not tensor_content.
    service.outputs = lambda rows: {**honest_outputs(rows), "probabilities": tensor(
        types_pb2.DT_FLOAT, [rows, CLASSES], float_val=[0.1] * (rows * CLASSES))}
    with Classifier(address) as classifier:
        assert classifier.answer(PIXELS).probabilities == pytest.approx(np.full((3, CLASSES), 0.1))


def test_a_huge_shape_in_a_few_bytes_is_refused_before_anything_is_allocated(hostile, images):
    service, address = hostile
    service.outputs = lambda rows: {**honest_outputs(rows),
                                    "probabilities": tensor(types_pb2.DT_FLOAT, [rows, 2 ** 27], float_val=[0.5])}
    with Classifier(address) as classifier:
        with pytest.raises(ClientError, match=r"shape \[3, 134217728\]; the model's metadata declares 10 columns"):
            classifier.answer(PIXELS)
    # Without a declared class count, the shape is still checked against the values it has.
    service.metadata = metadata(probabilities_shape=(-1, -1))
    with Classifier(address) as classifier:
        with pytest.raises(ClientError, match=r"the client reads 1 to 65536 columns"):
            classifier.answer(PIXELS)
    service.outputs = lambda rows: {**honest_outputs(rows),
                                    "probabilities": tensor(types_pb2.DT_FLOAT, [rows, 5000], float_val=[0.5])}
    with Classifier(address) as classifier:
        with pytest.raises(ClientError, match=r"with 1 value\(s\); the shape needs 15000"):
            classifier.answer(PIXELS)
    # The command refuses it in one line, and its memory stays that of a client.
    # VmHWM, the peak of this process's own memory (ru_maxrss would count the forking test's).
    code = ("import sys; from pipeline.cli import main; status = main(sys.argv[1:]); "
            "print([int(line.split()[1]) // 1024 for line in open('/proc/self/status') if line.startswith('VmHWM')][0], "
            "file=sys.stderr); sys.exit(status)")
    result = subprocess.run([sys.executable, "-c", code, "classify", "--server", address, "--retries", "0",
                             *images], cwd=REPO, capture_output=True, text=True, timeout=60)
    *message, megabytes = result.stderr.splitlines()
    assert_refused(subprocess.CompletedProcess(result.args, result.returncode, result.stdout, "\n".join(message)),
                   "with 1 value(s)")
    assert int(megabytes) < 300


def test_too_few_rows_is_refused(hostile, images):
    service, address = hostile
    service.outputs = lambda rows: honest_outputs(1)
    assert_refused(classify(address, *images), "shape [1, 10] for 3 image(s)")


def test_string_probabilities_are_refused(hostile, images):
    service, address = hostile
    service.outputs = lambda rows: {**honest_outputs(rows), "probabilities": tensor(
        types_pb2.DT_STRING, [rows, CLASSES], string_val=[b"0.1"] * (rows * CLASSES))}
    assert_refused(classify(address, *images), "answered 'probabilities' as DT_STRING",
                   "metadata declares DT_FLOAT")
    service.reset()
    service.metadata = metadata(probabilities_dtype=types_pb2.DT_STRING)
    assert_refused(classify(address, *images), "declares output 'probabilities' as DT_STRING")


@pytest.mark.parametrize("spec, flags, message", [
    ({"name": "other"}, [], "the server answered the prediction of model 'other', not 'accresnet'"),
    ({"version": 7}, ["--version", "1"], "the server answered the prediction of version 7, not 1"),
    ({"signature_name": "serving_bytes"}, [], "answered signature 'serving_bytes', not 'serving_default'"),
])
def test_an_answer_of_another_model_version_or_signature_is_refused(hostile, images, spec, flags, message):
    service, address = hostile
    service.spec.update(spec)
    assert_refused(classify(address, *flags, *images), message)


def test_metadata_of_another_model_is_refused(hostile, images):
    service, address = hostile
    service.metadata = metadata(name="other")
    assert_refused(classify(address, *images), "the metadata of model 'other'")
    service.metadata = metadata(version=3)
    assert_refused(classify(address, "--version", "1", *images), "the metadata of version 3, not 1")
    service.metadata = get_model_metadata_pb2.GetModelMetadataResponse()
    service.metadata.metadata["signature_def"].Pack(predict_pb2.PredictRequest())
    assert_refused(classify(address, *images), "holds no SignatureDefMap")


def test_values_that_do_not_fill_the_shape_are_refused(hostile):
    service, address = hostile
    cases = [
        (lambda rows: {**honest_outputs(rows), "probabilities": tensor(
            types_pb2.DT_FLOAT, [rows, CLASSES], tensor_content=b"\0" * 12)}, "with 12 bytes of tensor_content"),
        (lambda rows: {**honest_outputs(rows), "top_k_class_names": tensor(
            types_pb2.DT_STRING, [rows, 3], string_val=[b"cat"])}, "with 1 string(s); the shape needs 9"),
        (lambda rows: {**honest_outputs(rows), "top_k_probabilities": floats([[0.4, 0.2]] * rows)},
         "metadata declares 3 columns"),
        (lambda rows: {key: value for key, value in honest_outputs(rows).items() if key != "top_k_class_names"},
         "lacks the output(s) top_k_class_names"),
        (lambda rows: {**honest_outputs(rows), "probabilities": tensor(
            types_pb2.DT_FLOAT, [rows, CLASSES], tensor_content=b"\0" * 120, float_val=[1.0])}, "and a float_val"),
    ]
    for outputs, message in cases:
        service.outputs = outputs
        with Classifier(address) as classifier:
            with pytest.raises(ClientError, match=message.replace("(", r"\(").replace(")", r"\)")):
                classifier.answer(PIXELS)


def test_top_k_outputs_must_agree_and_an_answer_is_bounded(hostile, monkeypatch):
    service, address = hostile
    service.metadata = metadata(probabilities_shape=(-1, 2))  # names 3 classes of 2
    service.outputs = lambda rows: {**honest_outputs(rows), "probabilities": floats([[0.6, 0.4]] * rows)}
    with Classifier(address) as classifier:
        with pytest.raises(ClientError, match=r"top_k_probabilities \[3, 3\] for probabilities \[3, 2\]"):
            classifier.answer(PIXELS)
    service.reset()
    monkeypatch.setattr(client_module, "MAX_ANSWER_BYTES", 4096)
    service.outputs = lambda rows: honest_outputs(rows, ["x" * 5000, "dog", "ship"])
    with Classifier(address) as classifier:
        with pytest.raises(ClientError, match="RESOURCE_EXHAUSTED"):
            classifier.answer(PIXELS)


def test_nan_probabilities_are_refused_and_json_stays_json(hostile, images):
    service, address = hostile

    def outputs(rows):
        probabilities = np.full((rows, CLASSES), 0.1, np.float32)
        probabilities[1, 4] = np.nan
        return {**honest_outputs(rows), "probabilities": floats(probabilities)}

    service.outputs = outputs
    result = classify(address, "--json", *images)
    assert_refused(result, "the server answered nan in 'probabilities' (column 4)", f"for {images[1]}")


def test_class_names_are_shown_not_obeyed_in_the_table(hostile, images):
    service, address = hostile
    hostile_names = ["\x1b]0;owned\x07\x1b[2J", "fake\nrow 1.000", "over\rwrite\u202e"]
    service.outputs = lambda rows: honest_outputs(rows, hostile_names)
    result = classify(address, "--top-k", "2", *images)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split()[-1] == "top-2" and len(rows) == 3
    assert not any(ch in result.stdout for ch in "\x1b\x07\r\u202e")
    assert rows[0].split("  ")[-1].endswith(r"\x1b]0;owned\x07\x1b[2J 0.400, fake\nrow 1.000 0.200")
    # JSON lines carry the names as they are, escaped by JSON itself.
    result = classify(address, "--json", *images)
    assert [json.loads(line)["class_name"] for line in result.stdout.splitlines()] == [hostile_names[0]] * 3


def test_the_header_names_what_is_shown_and_comes_with_the_first_answer(hostile, images):
    service, address = hostile
    result = classify(address, *images)  # --top-k 5 asked; the model names 3
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split() == ["image", "class", "prob", "top-3"]
    with socket_closed() as closed:
        result = classify(closed, *images)
    assert_refused(result, "UNAVAILABLE")


class socket_closed:
    """A loopback address where nothing listens."""

    def __enter__(self):
        import socket

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{self.socket.getsockname()[1]}"

    def __exit__(self, *exc):
        self.socket.close()


def test_a_server_error_message_is_shown_not_obeyed(grpc_server, images):
    class Failing(Hostile):
        def GetModelMetadata(self, request, context):
            context.abort(grpc.StatusCode.NOT_FOUND, "no model\x1b[2J\nforged line")

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(1))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Failing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert_refused(classify(f"127.0.0.1:{port}", *images), r"no model\x1b[2J\nforged line")
    finally:
        server.stop(grace=None)


# --- no TensorFlow on the classify path -------------------------------------------------------


def test_classify_over_grpc_does_not_import_tensorflow(hostile, images):
    _, address = hostile
    code = ("import sys; from pipeline.cli import main; status = main(sys.argv[1:]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'), file=sys.stderr); "
            "sys.exit(status)")
    result = subprocess.run([sys.executable, "-c", code, "classify", "--server", address, "--json", images[0]],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["class_name"] == "cat"
    assert result.stderr.strip() == "[]"  # not even the protos' package stays behind


@pytest.mark.slow  # it imports TensorFlow in a process of its own
def test_tensorflow_imports_as_usual_after_the_client():
    """The client's protos loaded first, TensorFlow afterwards reads and writes the same messages."""
    code = """
import numpy as np
from serving.serving_apis import request_tensor, serving_apis
apis = serving_apis()
proto = request_tensor(np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3), takes_bytes=False)
import tensorflow as tf
assert (tf.make_ndarray(proto) == np.arange(24).reshape(2, 2, 2, 3)).all()
request = apis.predict_pb2.PredictRequest()
request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.float32([1.5])))
assert tf.make_ndarray(request.inputs["x"]).tolist() == [1.5]
from tensorflow_serving.apis import classification_pb2
print(tf.constant(2).numpy() * 21)
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0 and result.stdout.strip() == "42", result.stderr


# --- REST ---------------------------------------------------------------------------------------------


class RestHostile(http.server.BaseHTTPRequestHandler):
    """TF Serving's REST API as a test crafts it: `server.body` answers :predict (bytes, or a
    callable writing the answer itself), `server.metadata` answers /metadata."""

    def log_message(self, *args):
        pass

    def _send(self, body: bytes, status: int = 200):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(json.dumps(self.server.metadata).encode())

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        rows = len(next(iter(request["inputs"].values())))
        body = self.server.body
        if callable(body):
            body(self, rows)
        else:
            self._send(body)


def rest_metadata(outputs=("probabilities", "top_k_class_names", "top_k_probabilities")):
    declared = {"probabilities": ("DT_FLOAT", CLASSES), "top_k_class_names": ("DT_STRING", 3),
                "top_k_probabilities": ("DT_FLOAT", 3)}
    return {"model_spec": {"name": "accresnet", "version": "1", "signature_name": ""},
            "metadata": {"signature_def": {"signature_def": {"serving_default": {
                "inputs": {"images": {"dtype": "DT_UINT8", "tensor_shape": {
                    "dim": [{"size": "-1"}, {"size": "32"}, {"size": "32"}, {"size": "3"}]}}},
                "outputs": {name: {"dtype": declared[name][0], "tensor_shape": {
                    "dim": [{"size": "-1"}, {"size": str(declared[name][1])}]}} for name in outputs}}}}}}


def rest_outputs(rows, probabilities=None):
    return {"outputs": {"probabilities": probabilities or [[0.4, 0.2, 0.1] + [0.05] * 7] * rows,
                        "top_k_class_names": [NAMES] * rows, "top_k_probabilities": [[0.4, 0.2, 0.1]] * rows}}


@pytest.fixture
def rest():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RestHostile)
    server.daemon_threads = True
    server.metadata = rest_metadata()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def rest_answer(address, rows=3, **kwargs):
    with RestClassifier(address, retries=0, **kwargs) as classifier:
        return classifier.answer(np.zeros((rows, 32, 32, 3), np.uint8))


def test_rest_an_honest_answer_is_read(rest):
    server, address = rest
    server.body = json.dumps(rest_outputs(3)).encode()
    answer = rest_answer(address)
    assert answer.probabilities.shape == (3, CLASSES) and answer.top_k_names == [NAMES] * 3
    # A signature with one output is answered bare, as TF Serving does.
    server.metadata = rest_metadata(outputs=("probabilities",))
    server.body = json.dumps({"outputs": [[0.1] * CLASSES] * 3}).encode()
    assert rest_answer(address).probabilities.shape == (3, CLASSES)


@pytest.mark.parametrize("body, message", [
    (json.dumps(rest_outputs(1)), r"shape \[1, 10\] for 3 image\(s\)"),
    (json.dumps(rest_outputs(3, [["0.4"] * CLASSES] * 3)), "values that are not numbers"),
    (json.dumps(rest_outputs(3, [[True] * CLASSES] * 3)), "values that are not numbers"),
    (json.dumps(rest_outputs(3, [[0.1] * CLASSES, [0.1] * 3, [0.1] * CLASSES])), "rows of different lengths"),
    (json.dumps(rest_outputs(3, [[0.1] * 2 ** 17] * 3)), r"shape \[3, 131072\]"),
    (json.dumps(rest_outputs(3, [[float("nan")] * CLASSES] * 3)), "answered nan in 'probabilities'"),
    (json.dumps(rest_outputs(3, [[10 ** 400] * CLASSES] * 3)), "beyond floating point"),
    ("[" * 100000 + "]" * 100000, "is not JSON"),
    ("[1, 2]", "is not a JSON object"),
    ('{"outputs": {"probabilities": 3}}', "lacks the output"),
    ('{"predictions": []}', "no 'outputs' object"),
])
def test_rest_answers_that_do_not_fit_the_request_are_refused(rest, body, message):
    server, address = rest
    server.body = body.encode()
    with pytest.raises(ClientError, match=message):
        rest_answer(address)


def test_rest_metadata_of_another_model_or_shape_is_refused(rest):
    server, address = rest
    server.body = json.dumps(rest_outputs(3)).encode()
    server.metadata = {**rest_metadata(), "model_spec": {"name": "other", "version": "1"}}
    with pytest.raises(ClientError, match="the metadata of model 'other'"):
        rest_answer(address)
    server.metadata = rest_metadata()
    server.metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]["outputs"]["probabilities"] = {
        "dtype": "DT_FLOAT", "tensor_shape": {"dim": [{"size": "-1"}, {"size": str(2 ** 27)}]}}
    with pytest.raises(ClientError, match="declares output 'probabilities' of shape"):
        rest_answer(address)
    server.metadata = {"metadata": "nothing"}
    with pytest.raises(ClientError, match="no metadata.signature_def.signature_def"):
        rest_answer(address)


def test_rest_bodies_are_read_up_to_a_bound(rest, monkeypatch):
    server, address = rest
    monkeypatch.setattr(client_module, "MAX_ANSWER_BYTES", 4096)
    server.body = json.dumps(rest_outputs(3)).encode() + b" " * 5000
    with pytest.raises(ClientError, match="has 5[0-9]{3} bytes, more than the 4096"):
        rest_answer(address)

    def endless(handler, rows):  # no Content-Length: read until the bound, then refused
        handler.send_response(200)
        handler.end_headers()
        try:
            for _ in range(1000):
                handler.wfile.write(b" " * 1024)
        except OSError:
            pass

    server.body = endless
    with pytest.raises(ClientError, match="more than the 4096 bytes"):
        rest_answer(address)


def test_rest_a_busy_server_is_asked_again_other_refusals_are_not(rest, monkeypatch):
    """503 is TF Serving's UNAVAILABLE (a full batch queue, the connection limit): retried with backoff,
    as the gRPC client retries it. 429 (RESOURCE_EXHAUSTED) and 400 are answers about the request."""
    server, address = rest
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    statuses = []

    def busy_then(status, times):
        def answer(handler, rows):
            statuses.append(status if len(statuses) < times else 200)
            if statuses[-1] == 200:
                handler._send(json.dumps(rest_outputs(rows)).encode())
            else:
                handler._send(json.dumps({"error": "the batch queue is full"}).encode(), status=status)
        return answer

    server.body = busy_then(503, 2)
    with RestClassifier(address, retries=3) as classifier:
        assert classifier.answer(np.zeros((2, 32, 32, 3), np.uint8)).probabilities.shape == (2, CLASSES)
    assert statuses == [503, 503, 200]
    statuses.clear()
    with pytest.raises(ClientError, match="HTTP 503: the batch queue is full") as refused:
        rest_answer(address)  # retries=0: the first 503 is the answer
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE and statuses == [503]
    for status in (429, 400):
        statuses.clear()
        server.body = busy_then(status, 5)
        with pytest.raises(ClientError, match=f"HTTP {status}"):
            with RestClassifier(address, retries=3) as classifier:
                classifier.answer(np.zeros((2, 32, 32, 3), np.uint8))
        assert statuses == [status]


def test_rest_a_trickled_answer_ends_at_the_timeout(rest):
    server, address = rest

    def trickle(handler, rows):
        handler.send_response(200)
        handler.end_headers()
        try:
            for _ in range(40):
                handler.wfile.write(b" ")
                handler.wfile.flush()
                time.sleep(0.25)
        except OSError:
            pass

    server.body = trickle
    started = time.monotonic()
    with pytest.raises(ClientError, match="DEADLINE_EXCEEDED"):
        rest_answer(address, timeout=1)
    assert time.monotonic() - started < 3


def test_rest_class_names_are_escaped_in_the_table(rest, images):
    server, address = rest
    answer = rest_outputs(3)
    answer["outputs"]["top_k_class_names"] = [["\x1b[31mred", "a\nb", "c"]] * 3
    server.body = json.dumps(answer).encode()
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "classify", "--rest", "--server", address,
                             *images], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and len(result.stdout.splitlines()) == 4
    assert r"\x1b[31mred" in result.stdout
