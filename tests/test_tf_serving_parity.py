"""TF Serving's own test models, sent the requests TF Serving's documentation and
its users' clients send, get TF Serving's answers from `accresnet serve`, started
with the deployed flags (batching on) and with batching off.

The models are TF Serving's testdata SavedModels (tests/data/tf_serving): a TF1
and a TF2 export of half_plus_two, and half_plus_three. Their signatures declare
shapes that TF Serving's quickstart does not send ([3] where x is [?, 1]); TF
Serving feeds a request's tensors as they come, and so does this server.
"""

import json
import pathlib
import shutil
import subprocess
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import classification_pb2, get_model_metadata_pb2, predict_pb2, regression_pb2

from server_clients import Clients, start_server

pytestmark = pytest.mark.slow

TESTDATA = pathlib.Path(__file__).parent / "data" / "tf_serving"
MODELS = {"half_plus_two": "saved_model_half_plus_two_cpu", "half_plus_two_tf2": "saved_model_half_plus_two_tf2_cpu",
          "half_plus_three": "saved_model_half_plus_three"}
# TF Serving refuses a batching parameters file without batching: the deployed one goes too.
UNBATCHED = ("--enable_batching=false", "--batching_parameters_file=")


@pytest.fixture(scope="module", params=["batching", "unbatched"])
def served(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("tf_serving_testdata")
    for name, folder in MODELS.items():
        shutil.copytree(TESTDATA / folder, root / name)
    server = start_server(root, {name: root / name for name in MODELS},
                          *(UNBATCHED if request.param == "unbatched" else ()))
    yield Clients(server)
    server.stop(grace=2)


def _post(url: str, body: bytes, headers: dict | None = None):
    request = urllib.request.Request(url, body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _predict_request(model: str, values, signature: str = "") -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.asarray(values, np.float32)))
    return request


def _examples_request(kind, model: str, signature: str, xs):
    request = kind()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for x in xs:
        request.input.example_list.examples.add().features.feature["x"].float_list.value.append(x)
    return request


# --- TF Serving's documented REST requests ---------------------------------------------------


@pytest.mark.parametrize("model", ["half_plus_two", "half_plus_two_tf2"])
def test_the_rest_quickstart_answers_as_in_tf_servings_readme(served, model):
    # TF Serving's README and docker.md: curl -d '{"instances": [1.0, 2.0, 5.0]}' -X POST ...
    status, body = _post(f"{served.rest}/v1/models/{model}:predict", b'{"instances": [1.0, 2.0, 5.0]}')
    assert (status, body) == (200, {"predictions": [2.5, 3.0, 4.5]})


def test_curl_without_a_content_type_is_answered(served):
    # curl -d sends application/x-www-form-urlencoded; TF Serving reads the body as JSON all the same.
    status, body = _post(f"{served.rest}/v1/models/half_plus_two:predict", b'{"instances": [1.0]}',
                         {"Content-Type": "application/x-www-form-urlencoded"})
    assert (status, body) == (200, {"predictions": [2.5]})


def test_the_rest_api_documents_regress_and_classify_on_tf_examples(served):
    status, body = served.json("/v1/models/half_plus_two:regress",
                               {"signature_name": "regress_x_to_y", "examples": [{"x": 1.0}, {"x": 6.0}]})
    assert (status, body) == (200, {"results": [2.5, 5.0]})
    status, body = served.json("/v1/models/half_plus_two:classify",
                               {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]})
    assert (status, body) == (200, {"results": [[["", 3.0]]]})


def test_the_columnar_format_and_a_named_signature(served):
    status, body = served.json("/v1/models/half_plus_two:predict",
                               {"signature_name": "serving_default", "inputs": {"x": [[1.0], [3.0]]}})
    assert (status, body) == (200, {"outputs": [[2.5], [3.5]]})


def test_a_signature_that_declares_a_scalar_takes_rows_as_tf_serving_feeds_them(served):
    # half_plus_three's x is declared as a scalar; the graph is elementwise.
    status, body = served.json("/v1/models/half_plus_three:predict", {"instances": [1.0, 3.0]})
    assert (status, body) == (200, {"predictions": [3.5, 4.5]})


def test_model_status_and_metadata_over_rest(served):
    status, body = served.json("/v1/models/half_plus_two")
    assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"
    assert body["model_version_status"][0]["version"] == "123"
    status, body = served.json("/v1/models/half_plus_two/metadata")
    signature = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert status == 200 and signature["inputs"]["x"]["tensor_shape"]["dim"][1]["size"] == "1"


# --- gRPC, as the clients users have call it ---------------------------------------------------


@pytest.mark.parametrize("timeout", [None, 3600.0, 30.0], ids=["no-deadline", "one-hour", "30s"])
def test_predict_without_a_deadline_or_with_a_long_one_is_answered(served, timeout):
    # grpcurl's and a bare stub call's default is no deadline at all.
    response = served.predictions.Predict(_predict_request("half_plus_two", [[1.0], [2.0], [5.0]]), timeout=timeout)
    assert tf.make_ndarray(response.outputs["y"]).tolist() == [[2.5], [3.0], [4.5]]
    assert response.model_spec.version.value == 123
    response = served.predictions.Predict(_predict_request("half_plus_two", [1.0, 2.0, 5.0]), timeout=timeout)
    assert tf.make_ndarray(response.outputs["y"]).tolist() == [2.5, 3.0, 4.5]


@pytest.mark.parametrize("timeout", [None, 3600.0], ids=["no-deadline", "one-hour"])
def test_classify_regress_and_metadata_without_a_deadline(served, timeout):
    request = _examples_request(classification_pb2.ClassificationRequest, "half_plus_two", "classify_x_to_y", [2.0])
    result = served.predictions.Classify(request, timeout=timeout).result
    assert [(c.label, c.score) for c in result.classifications[0].classes] == [("", 3.0)]
    request = _examples_request(regression_pb2.RegressionRequest, "half_plus_two", "regress_x_to_y", [1.0, 6.0])
    assert [r.value for r in served.predictions.Regress(request, timeout=timeout).result.regressions] == [2.5, 5.0]
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "half_plus_two_tf2"
    assert served.predictions.GetModelMetadata(request, timeout=timeout).model_spec.version.value == 123


def test_the_tf2_export_answers_its_declared_signatures(served):
    # saved_model_cli run --signature_def serving_default --input_exprs 'x=[1.0]'
    response = served.predictions.Predict(_predict_request("half_plus_two_tf2", [1.0], "serving_default"))
    assert tf.make_ndarray(response.outputs["y"]).tolist() == [2.5]
    response = served.predictions.Predict(_predict_request("half_plus_two_tf2", [[1.0], [3.0]]))
    assert tf.make_ndarray(response.outputs["y"]).tolist() == [[2.5], [3.5]]


# --- the server's own shape check, off by default ----------------------------------------------


def test_with_check_input_shapes_an_undeclared_shape_is_refused_with_the_declared_one(tmp_path):
    shutil.copytree(TESTDATA / MODELS["half_plus_two"], tmp_path / "half_plus_two")
    server = start_server(tmp_path, {"half_plus_two": tmp_path / "half_plus_two"}, "--check_input_shapes")
    try:
        status, body = Clients(server).json("/v1/models/half_plus_two:predict", {"instances": [1.0, 2.0, 5.0]})
        assert status == 400 and body["error"] == "input 'x' has shape [3], the signature declares float32 [?,1]"
        status, body = Clients(server).json("/v1/models/half_plus_two:predict", {"instances": [[1.0], [2.0]]})
        assert (status, body) == (200, {"predictions": [[2.5], [3.0]]})
    finally:
        server.stop(grace=2)


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on PATH")
def test_curl_as_tf_servings_docs_call_it(served):
    reply = subprocess.run(["curl", "-s", "-d", '{"instances": [1.0, 2.0, 5.0]}', "-X", "POST",
                            f"{served.rest}/v1/models/half_plus_two:predict"],
                           capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(reply.stdout) == {"predictions": [2.5, 3.0, 4.5]}
