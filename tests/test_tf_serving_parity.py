"""What TF Serving's own documentation shows works the same on `accresnet serve`,
started with the deployed flags (batching on) and --check_input_shapes=false: TF
Serving's quickstart feeds half_plus_two a shape its signature does not declare,
which this server refuses by default.

The rebuilt half_plus_two model stands in for TF Serving's testdata; set
TF_SERVING_TESTDATA to a checkout's tensorflow_serving/servables/tensorflow/testdata
to run the same checks on the original models too.
"""

import json
import os
import pathlib
import shutil
import urllib.request

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from half_plus_two import build_half_plus_two
from server_clients import Clients, start_server

TESTDATA = os.environ.get("TF_SERVING_TESTDATA")


def _models():
    yield "rebuilt"
    if TESTDATA and (pathlib.Path(TESTDATA) / "saved_model_half_plus_two_cpu").is_dir():
        yield "original"


@pytest.fixture(scope="module", params=list(_models()))
def half_plus_two(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("half_plus_two")
    if request.param == "original":
        shutil.copytree(pathlib.Path(TESTDATA) / "saved_model_half_plus_two_cpu", root / "half_plus_two")
    else:
        build_half_plus_two(str(root / "half_plus_two" / "123"))
    server = start_server(root, {"half_plus_two": root / "half_plus_two"}, "--check_input_shapes=false")
    yield Clients(server)
    server.stop(grace=2)


def test_the_rest_quickstart_answers_as_in_tf_servings_readme(half_plus_two):
    request = urllib.request.Request(f"{half_plus_two.rest}/v1/models/half_plus_two:predict",
                                     json.dumps({"instances": [1.0, 2.0, 5.0]}).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert json.loads(reply.read()) == {"predictions": [2.5, 3.0, 4.5]}


def test_a_shape_other_than_the_declared_one_is_fed_as_tf_serving_feeds_it(half_plus_two):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half_plus_two"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([1.0, 2.0, 5.0], np.float32)))
    response = half_plus_two.predictions.Predict(request, timeout=30)
    assert tf.make_ndarray(response.outputs["y"]).tolist() == [2.5, 3.0, 4.5]
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([[1.0], [2.0]], np.float32)))
    assert tf.make_ndarray(half_plus_two.predictions.Predict(request, timeout=30).outputs["y"]).tolist() == \
        [[2.5], [3.0]]


def test_regress_and_classify_on_tf_examples(half_plus_two):
    status, body = half_plus_two.json("/v1/models/half_plus_two:regress",
                                      {"signature_name": "regress_x_to_y", "examples": [{"x": 1.0}, {"x": 6.0}]})
    assert status == 200 and body == {"results": [2.5, 5.0]}
    status, body = half_plus_two.json("/v1/models/half_plus_two:classify",
                                      {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]})
    assert status == 200 and body == {"results": [[["", 3.0]]]}


def test_by_default_an_undeclared_shape_is_refused_with_the_declared_one(tmp_path):
    build_half_plus_two(str(tmp_path / "half_plus_two" / "123"))
    server = start_server(tmp_path, {"half_plus_two": tmp_path / "half_plus_two"})
    try:
        status, body = Clients(server).json("/v1/models/half_plus_two:predict", {"instances": [1.0, 2.0, 5.0]})
        assert status == 400 and body["error"] == "input 'x' has shape [3], the signature declares float32 [?,1]"
        status, body = Clients(server).json("/v1/models/half_plus_two:predict", {"instances": [[1.0], [2.0]]})
        assert status == 200 and body == {"predictions": [[2.5], [3.0]]}
    finally:
        server.stop(grace=2)
