"""The TF-Serving-compatible server, exercised from outside with TF Serving's own
gRPC stubs and plain HTTP, on our exported model and on a TF1-style SavedModel."""

import base64
import io
import math
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    predict_pb2,
    regression_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

from helpers import free_ports
from serving.server.main import RunningServer, build_parser
from serving.server.options import options_from_args
from server_clients import Clients, images, predict_request, start_server
from tf1_model import BIAS, WEIGHTS, build_tf1_saved_model, example

AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END


@pytest.fixture(scope="module")
def served(exported_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    shutil.copytree(exported_model, root / "accresnet" / "1")
    build_tf1_saved_model(str(root / "tf1" / "7"))
    server = start_server(root, {"accresnet": root / "accresnet", "tf1": root / "tf1"})
    yield Clients(server), root
    server.stop(grace=5)


# --- Predict ------------------------------------------------------------------------------------


def test_grpc_predict_matches_the_saved_model(served, exported_model):
    clients, _ = served
    batch = images()
    response = clients.predictions.Predict(predict_request(batch=batch), timeout=30)
    assert response.model_spec.name == "accresnet" and response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    probabilities = tf.make_ndarray(response.outputs["probabilities"])
    # TF Serving fills the typed value fields.
    assert len(response.outputs["probabilities"].float_val) == 4 * 10
    expected = tf.saved_model.load(str(exported_model)).signatures["serving_default"](images=tf.constant(batch))
    np.testing.assert_allclose(probabilities, expected["probabilities"].numpy(), rtol=1e-6)
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs["class_names"]),
                                  expected["class_names"].numpy())


def test_rest_predict_row_and_columnar_agree_with_grpc(served):
    clients, _ = served
    batch = images(3, seed=1)
    grpc_response = clients.predictions.Predict(predict_request(batch=batch), timeout=30)
    expected = tf.make_ndarray(grpc_response.outputs["probabilities"])
    status, rows = clients.json("/v1/models/accresnet:predict", {"instances": batch.tolist()})
    assert status == 200
    assert [sorted(p) for p in rows["predictions"]] == [["class_ids", "class_names", "probabilities",
                                                        "top_k_class_names", "top_k_probabilities"]] * 3
    np.testing.assert_allclose([p["probabilities"] for p in rows["predictions"]], expected, rtol=1e-6)
    status, columns = clients.json("/v1/models/accresnet/versions/1:predict", {"inputs": {"images": batch.tolist()}})
    assert status == 200
    np.testing.assert_allclose(columns["outputs"]["probabilities"], expected, rtol=1e-6)
    assert columns["outputs"]["class_names"] == [p["class_names"] for p in rows["predictions"]]


def test_encoded_images_over_both_apis(served):
    clients, _ = served
    batch = images(2, seed=2)
    files = []
    for image in batch:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        files.append(buffer.getvalue())
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "accresnet", "serving_bytes"
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(files))
    from_bytes = tf.make_ndarray(clients.predictions.Predict(request, timeout=30).outputs["probabilities"])
    from_pixels = tf.make_ndarray(clients.predictions.Predict(predict_request(batch=batch), timeout=30)
                                  .outputs["probabilities"])
    np.testing.assert_allclose(from_bytes, from_pixels, rtol=1e-5)
    body = {"signature_name": "serving_bytes",
            "instances": [{"b64": base64.b64encode(f).decode()} for f in files]}
    status, result = clients.json("/v1/models/accresnet:predict", body)
    assert status == 200
    np.testing.assert_allclose([p["probabilities"] for p in result["predictions"]], from_pixels, rtol=1e-5)


def test_output_filter(served):
    clients, _ = served
    request = predict_request()
    request.output_filter.append("class_ids")
    response = clients.predictions.Predict(request, timeout=30)
    assert list(response.outputs) == ["class_ids"]


def _png(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_classify_api_names_the_top_classes_over_both_apis(served):
    """TF Serving's Classify API on the exported `classify` signature, batching on."""
    clients, _ = served
    batch = images(2, seed=4)
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name, request.model_spec.signature_name = "accresnet", "classify"
    for image in batch:
        request.input.example_list.examples.add().features.feature["image/encoded"].bytes_list.value.append(
            _png(image))
    response = clients.predictions.Classify(request, timeout=30)
    predicted = clients.predictions.Predict(predict_request(batch=batch), timeout=30)
    names = tf.make_ndarray(predicted.outputs["top_k_class_names"])
    scores = tf.make_ndarray(predicted.outputs["top_k_probabilities"])
    for row, result in enumerate(response.result.classifications):
        assert [c.label.encode() for c in result.classes] == list(names[row])
        assert [c.score for c in result.classes] == pytest.approx(scores[row].tolist(), rel=1e-5)
    examples = [{"image/encoded": {"b64": base64.b64encode(_png(image)).decode()}} for image in batch]
    status, body = clients.json("/v1/models/accresnet:classify", {"signature_name": "classify", "examples": examples})
    assert status == 200, body
    assert [[label for label, _ in row] for row in body["results"]] == [[n.decode() for n in r] for r in names]


def _model_with_unbatchable_signatures(path):
    """A SavedModel whose signatures break TF Serving's batching rules."""

    class Unbatchable(tf.Module):
        @tf.function(input_signature=[])
        def no_input(self):
            return {"names": tf.constant(["a", "b"])}

        @tf.function(input_signature=[tf.TensorSpec([], tf.float32, name="x")])
        def scalar_input(self, x):
            return {"y": tf.reshape(x, [1])}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def unbatched_output(self, x):
            return {"total": tf.reduce_sum(x)}

    module = Unbatchable()
    tf.saved_model.save(module, str(path), signatures={
        "serving_default": module.scalar_input, "no_input": module.no_input,
        "unbatched_output": module.unbatched_output})


def test_batching_refuses_what_tf_serving_refuses(tmp_path):
    """With --enable_batching, TF Serving runs every signature through its batching
    session, which refuses a Run without inputs, scalar inputs and outputs that lose
    the batch dimension; the local server refuses them the same way."""
    _model_with_unbatchable_signatures(tmp_path / "u" / "1")
    server = start_server(tmp_path, {"u": tmp_path / "u"})
    assert server.batcher is not None
    try:
        clients = Clients(server)
        cases = [("no_input", {}, grpc.StatusCode.INVALID_ARGUMENT,
                  "Batching Run() must have at least one input tensor"),
                 ("serving_default", {"x": np.float32(1.0)}, grpc.StatusCode.INVALID_ARGUMENT,
                  "Batching Run() input tensors must have at least one dimension"),
                 ("unbatched_output", {"x": np.ones(3, np.float32)}, grpc.StatusCode.FAILED_PRECONDITION,
                  "Batched output tensor has 0 dimensions")]
        for signature, inputs, code, message in cases:
            request = predict_pb2.PredictRequest()
            request.model_spec.name, request.model_spec.signature_name = "u", signature
            for alias, value in inputs.items():
                request.inputs[alias].CopyFrom(tf.make_tensor_proto(value))
            with pytest.raises(grpc.RpcError) as raised:
                clients.predictions.Predict(request, timeout=30)
            assert raised.value.code() == code and message in raised.value.details(), signature
            status, body = clients.json("/v1/models/u:predict", {"signature_name": signature, "inputs": {
                alias: value.tolist() for alias, value in inputs.items()}})
            assert status == 400 and message in body["error"], (signature, body)
    finally:
        server.stop(grace=2)


# --- Classify, Regress, metadata, status on a TF1 SavedModel -----------------------------------


def _expected_y(x0, x1):
    return WEIGHTS[0] * x0 + WEIGHTS[1] * x1 + BIAS


def test_tf1_classify_and_regress_over_grpc(served):
    clients, _ = served
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name, request.model_spec.signature_name = "tf1", "classify"
    request.input.example_list.examples.extend([example(1.0, 0.0), example(-1.0, 2.0)])
    response = clients.predictions.Classify(request, timeout=30)
    assert response.model_spec.version.value == 7
    for (x0, x1), result in zip([(1.0, 0.0), (-1.0, 2.0)], response.result.classifications):
        positive = 1 / (1 + math.exp(-_expected_y(x0, x1)))
        assert [c.label for c in result.classes] == ["negative", "positive"]
        assert result.classes[1].score == pytest.approx(positive, rel=1e-5)
        assert result.classes[0].score == pytest.approx(1 - positive, rel=1e-5)
    regression = regression_pb2.RegressionRequest()
    regression.model_spec.name, regression.model_spec.signature_name = "tf1", "regress"
    context = regression.input.example_list_with_context
    context.context.CopyFrom(example(0.0, 0.0))
    context.examples.extend([example(3.0, 1.0)])
    values = [r.value for r in clients.predictions.Regress(regression, timeout=30).result.regressions]
    assert values == pytest.approx([_expected_y(3.0, 1.0)])


def test_tf1_over_rest(served):
    clients, _ = served
    status, result = clients.json("/v1/models/tf1:classify",
                                  {"signature_name": "classify", "examples": [{"x": [1.0, 0.0]}]})
    assert status == 200
    (label, score), = [r for r in result["results"][0] if r[0] == "positive"]
    assert score == pytest.approx(1 / (1 + math.exp(-_expected_y(1.0, 0.0))), rel=1e-5)
    status, result = clients.json("/v1/models/tf1/versions/7:regress",
                                  {"signature_name": "regress", "context": {"x": [0.0, 0.0]},
                                   "examples": [{"x": [2.0, 2.0]}, {"x": [0.5, 1]}]})
    assert status == 200 and result["results"] == pytest.approx([_expected_y(2, 2), _expected_y(0.5, 1)])
    status, result = clients.json("/v1/models/tf1:predict", {"instances": [[1.0, 1.0]]})
    assert status == 200 and result["predictions"] == [[_expected_y(1, 1)]]


def test_metadata_over_both_apis(served):
    clients, _ = served
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "tf1"
    response = clients.predictions.GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    assert signatures.signature_def["classify"].method_name == "tensorflow/serving/classify"
    assert set(signatures.signature_def) >= {"serving_default", "classify", "regress"}
    status, body = clients.json("/v1/models/accresnet/metadata")
    assert status == 200 and body["model_spec"] == {"name": "accresnet", "signature_name": "", "version": "1"}
    default = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert default["inputs"]["images"]["dtype"] == "DT_UINT8"
    assert set(default["outputs"]) == {"probabilities", "class_ids", "class_names", "top_k_class_names",
                                       "top_k_probabilities"}


def test_model_status_over_both_apis(served):
    clients, _ = served
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "tf1"
    (status,) = clients.models.GetModelStatus(request, timeout=30).model_version_status
    assert (status.version, status.state, status.status.error_code) == (7, AVAILABLE, 0)
    code, body = clients.json("/v1/models/tf1")
    assert code == 200 and body == {"model_version_status": [
        {"version": "7", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    assert clients.json("/v1/models/tf1/versions/7")[0] == 200
    assert clients.json("/v1/models/tf1/versions/8")[0] == 404


def test_health_reports_serving(served):
    clients, _ = served
    stub = health_pb2_grpc.HealthStub(clients.channel)
    for service in ("", "tensorflow.serving.PredictionService"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING


# --- bad input: the right status, and the server keeps serving ---------------------------------------


def _bad_predictions():
    wrong_dtype = predict_request(batch=images().astype(np.float32))
    wrong_shape = predict_request(batch=np.zeros((2, 28, 28, 3), np.uint8))
    empty = predict_request(batch=np.zeros((0, 32, 32, 3), np.uint8))
    unknown_input = predict_request()
    unknown_input.inputs["pixels"].CopyFrom(unknown_input.inputs.pop("images"))
    undecodable = predict_pb2.PredictRequest()
    undecodable.model_spec.name, undecodable.model_spec.signature_name = "accresnet", "serving_bytes"
    undecodable.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([b"this is not an image"]))
    classify_on_predict = classification_pb2.ClassificationRequest()
    classify_on_predict.model_spec.name = "accresnet"
    classify_on_predict.input.example_list.examples.add()
    empty_classify = classification_pb2.ClassificationRequest()
    empty_classify.model_spec.name, empty_classify.model_spec.signature_name = "tf1", "classify"
    return [
        ("Predict", wrong_dtype, grpc.StatusCode.INVALID_ARGUMENT, "expects uint8 but got float32"),
        ("Predict", wrong_shape, grpc.StatusCode.INVALID_ARGUMENT, "the signature declares uint8 [?,32,32,3]"),
        ("Predict", empty, grpc.StatusCode.INVALID_ARGUMENT, "empty batch"),
        ("Predict", unknown_input, grpc.StatusCode.INVALID_ARGUMENT, "Sent extra: {pixels}"),
        ("Predict", undecodable, grpc.StatusCode.INVALID_ARGUMENT, ""),
        ("Predict", predict_request(model="nope"), grpc.StatusCode.NOT_FOUND, "Latest(nope)"),
        ("Predict", predict_request(version=9), grpc.StatusCode.NOT_FOUND, "Specific(accresnet, 9)"),
        ("Predict", predict_request(version_label="canary"), grpc.StatusCode.INVALID_ARGUMENT,
         "Unrecognized servable version label: canary"),
        ("Predict", predict_request(signature="nope"), grpc.StatusCode.FAILED_PRECONDITION,
         'Serving signature key "nope" not found'),
        ("Classify", classify_on_predict, grpc.StatusCode.INVALID_ARGUMENT, "method_name to be tensorflow/serving"),
        ("Classify", empty_classify, grpc.StatusCode.INVALID_ARGUMENT, "Input is empty"),
    ]


@pytest.mark.parametrize("method, request_, code, message", _bad_predictions(),
                         ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None)
def test_bad_grpc_requests_get_the_right_status(served, method, request_, code, message):
    clients, _ = served
    with pytest.raises(grpc.RpcError) as raised:
        getattr(clients.predictions, method)(request_, timeout=30)
    assert raised.value.code() == code
    assert message in raised.value.details()
    # ... and the server keeps serving.
    assert clients.predictions.Predict(predict_request(), timeout=30).outputs["class_ids"].int64_val


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/models/accresnet:predict", {"instances": [[[[0.5] * 3] * 32] * 32]}, 400, "fractional"),
    ("/v1/models/accresnet:predict", {"instances": [[[[300] * 3] * 32] * 32]}, 400, "outside the range"),
    ("/v1/models/accresnet:predict", {"instances": [[[1, 2, 3]]]}, 400, "the signature declares uint8 [?,32,32,3]"),
    ("/v1/models/accresnet:predict", {"instances": []}, 400, "empty batch"),
    ("/v1/models/accresnet:predict", {"instances": [[1, 2], [3]]}, 400, "ragged"),
    ("/v1/models/accresnet:predict", {"rows": []}, 400, "'instances'"),
    ("/v1/models/accresnet:predict", {"instances": [{"pixels": 1}]}, 400, "alias not found"),
    ("/v1/models/accresnet:predict", {"signature_name": "serving_bytes", "instances": [{"b64": "bm90IGFuIGltYWdl"}]},
     400, ""),
    ("/v1/models/accresnet:predict", {"signature_name": "serving_bytes", "instances": [{"b64": "%%%"}]}, 400,
     "base64"),
    ("/v1/models/accresnet:predict", {"signature_name": "nope", "instances": [1]}, 400, "not found"),
    ("/v1/models/nope:predict", {"instances": [1]}, 404, "Latest(nope)"),
    ("/v1/models/accresnet/versions/9:predict", {"instances": [1]}, 404, "Specific(accresnet, 9)"),
    ("/v1/models/nope", None, 404, "Could not find any versions of model nope"),
    ("/v1/models/accresnet:explode", {}, 404, "Malformed request"),
    ("/v1/nothing/here", None, 404, ""),
])
def test_bad_rest_requests_get_json_errors(served, path, body, status, message):
    clients, _ = served
    code, content = clients.json(path, body)
    assert code == status and message in content["error"]
    assert clients.json("/v1/models/accresnet:predict", {"instances": images(1).tolist()})[0] == 200


def test_malformed_json(served):
    clients, _ = served
    code, content = clients.json("/v1/models/accresnet:predict", raw=b"{not json")
    assert code == 400 and "JSON Parse error" in content["error"]


def test_oversized_messages_are_refused(exported_model, tmp_path):
    shutil.copytree(exported_model, tmp_path / "m" / "1")
    server = start_server(tmp_path, {"m": tmp_path / "m"}, "--grpc_channel_arguments=grpc.max_receive_message_length=65536")
    try:
        clients = Clients(server)
        big = predict_request(model="m", batch=images(32))  # 32 * 3 KiB > 64 KiB
        with pytest.raises(grpc.RpcError) as raised:
            clients.predictions.Predict(big, timeout=30)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert clients.predictions.Predict(predict_request(model="m", batch=images(2)), timeout=30)
    finally:
        server.stop(grace=2)


def test_metrics_count_requests_by_model_and_status(served):
    clients, _ = served
    clients.predictions.Predict(predict_request(), timeout=30)
    unknown_before = _count(clients, '{model_name="<unknown>",status="NOT_FOUND"}')
    for name in ("ghost", "x" * 4000, "spectre"):
        with pytest.raises(grpc.RpcError):
            clients.predictions.Predict(predict_request(model=name), timeout=30)
        clients.http(f"/v1/models/{name}")
    status, text = clients.http("/monitoring/prometheus/metrics")
    text = text.decode()
    assert status == 200
    assert ':tensorflow:serving:request_count{model_name="accresnet",status="OK"}' in text
    assert ':tensorflow:serving:request_latency_bucket{API="predict",entrypoint="GRPC"' in text
    # Names nobody configured never become label values: they are counted under one.
    assert "ghost" not in text and "spectre" not in text and "xxxx" not in text
    assert _count(clients, '{model_name="<unknown>",status="NOT_FOUND"}') == unknown_before + 6


def _count(clients, labels: str) -> float:
    text = clients.http("/monitoring/prometheus/metrics")[1].decode()
    line = next((l for l in text.splitlines() if l.startswith(":tensorflow:serving:request_count" + labels)), None)
    return 0.0 if line is None else float(line.rsplit(" ", 1)[1])


# --- versions ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_new_version_goes_live_under_load_with_no_failed_request(trained_run, tmp_path):
    from pipeline.export.saved_model import export_run

    base = tmp_path / "models" / "acc"
    export_run(trained_run, base)
    server = start_server(tmp_path, {"acc": base})
    clients = Clients(server)
    seen, failures, stop = [], [], threading.Event()

    def client_loop():
        while not stop.is_set():
            try:
                response = clients.predictions.Predict(predict_request(model="acc", batch=images(2)), timeout=30)
                seen.append(response.model_spec.version.value)
            except grpc.RpcError as error:
                failures.append(error)

    threads = [threading.Thread(target=client_loop) for _ in range(3)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        export_run(trained_run, base)  # version 2, renamed into place whole
        deadline = time.monotonic() + 60
        while (not seen or seen[-1] != 2) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "acc"
        statuses = {s.version: s.state for s in clients.models.GetModelStatus(request).model_version_status}
        server.stop(grace=2)
    assert not failures, failures[:3]
    assert 1 in seen and seen[-1] == 2 and len(seen) > 20
    assert statuses == {2: AVAILABLE, 1: END}


def test_a_broken_version_is_skipped_and_the_current_one_keeps_serving(served):
    clients, root = served
    broken = root / "accresnet" / "5"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"garbage")
    try:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "accresnet"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            statuses = {s.version: s for s in clients.models.GetModelStatus(request, timeout=30).model_version_status}
            if 5 in statuses and statuses[5].state == END:
                break
            time.sleep(0.2)
        assert statuses[5].state == END and statuses[5].status.error_message
        assert statuses[1].state == AVAILABLE
        assert clients.predictions.Predict(predict_request(), timeout=30).model_spec.version.value == 1
    finally:
        shutil.rmtree(broken)


def _reload_request(models: dict):
    config = model_management_pb2.ReloadConfigRequest()
    for name, path in models.items():
        config.config.model_config_list.config.add(name=name, base_path=str(path), model_platform="tensorflow")
    return config


def test_reload_config_is_off_unless_turned_on(served):
    clients, root = served
    with pytest.raises(grpc.RpcError) as raised:
        clients.models.HandleReloadConfigRequest(_reload_request({"accresnet": root / "accresnet"}), timeout=60)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "--enable_model_reload_rpc" in raised.value.details()


def test_reload_config_adds_and_removes_models_under_the_allowed_roots(exported_model, tmp_path):
    shutil.copytree(exported_model, tmp_path / "models" / "accresnet" / "1")
    build_tf1_saved_model(str(tmp_path / "models" / "tf1" / "7"))
    server = start_server(tmp_path, {"accresnet": tmp_path / "models" / "accresnet"}, "--enable_model_reload_rpc")
    try:
        clients = Clients(server)
        models = {"accresnet": tmp_path / "models" / "accresnet", "tf1-copy": tmp_path / "models" / "tf1"}
        response = clients.models.HandleReloadConfigRequest(_reload_request(models), timeout=60)
        assert response.status.error_code == 0
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "tf1-copy"
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([[1.0, 1.0]], np.float32)))
        assert tf.make_ndarray(clients.predictions.Predict(request, timeout=30).outputs["y"]).tolist() == [[1.5]]
        # Paths outside the roots (the folder of the configured models), also through "..", are refused.
        for outside in ("/proc", tmp_path / "models" / ".." / "elsewhere", tmp_path):
            with pytest.raises(grpc.RpcError) as raised:
                clients.models.HandleReloadConfigRequest(_reload_request({"x": outside}), timeout=60)
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED, outside
        clients.models.HandleReloadConfigRequest(_reload_request({"accresnet": models["accresnet"]}), timeout=60)
        with pytest.raises(grpc.RpcError) as raised:
            clients.predictions.Predict(request, timeout=30)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop(grace=2)


def test_version_labels_and_policies(exported_model, tmp_path):
    for version in (1, 2, 3):
        shutil.copytree(exported_model, tmp_path / "m" / str(version))
    config = model_server_config_pb2.ModelConfig(name="m", base_path=str(tmp_path / "m"))
    config.model_version_policy.specific.versions.extend([1, 2])
    config.version_labels["stable"] = 1
    config.version_labels["canary"] = 2
    grpc_port, = free_ports(1)
    # The labels name versions not loaded yet: TF Serving starts only with the last flag.
    args = build_parser().parse_args([f"--port={grpc_port}", f"--model_base_path={tmp_path / 'm'}",
                                      "--model_name=m", "--file_system_poll_wait_seconds=0",
                                      "--allow_version_labels_for_unavailable_models"])
    from dataclasses import replace

    server = RunningServer(replace(options_from_args(args), model_configs=(config,)))
    try:
        clients = Clients(server)
        versions = {label: clients.predictions.Predict(predict_request(model="m", version_label=label),
                                                       timeout=30).model_spec.version.value
                    for label in ("stable", "canary")}
        assert versions == {"stable": 1, "canary": 2}
        # "specific" serves 1 and 2, not the newer 3; the latest of those answers by default.
        assert clients.predictions.Predict(predict_request(model="m"), timeout=30).model_spec.version.value == 2
        with pytest.raises(grpc.RpcError):
            clients.predictions.Predict(predict_request(model="m", version=3), timeout=30)
    finally:
        server.stop(grace=2)


# --- batching ---------------------------------------------------------------------------------------------


def test_batching_merges_concurrent_requests(exported_model, tmp_path):
    shutil.copytree(exported_model, tmp_path / "m" / "1")
    parameters = tmp_path / "batching.config"
    parameters.write_text("max_batch_size { value: 16 }\nbatch_timeout_micros { value: 200000 }\n"
                          "num_batch_threads { value: 1 }\nmax_enqueued_batches { value: 4 }\n"
                          "allowed_batch_sizes: 8\nallowed_batch_sizes: 16\n")
    server = start_server(tmp_path, {"m": tmp_path / "m"}, "--enable_batching",
                          f"--batching_parameters_file={parameters}")
    try:
        clients = Clients(server)
        batches_before = server.batcher.batches_run  # warmup ran through the batcher too
        batch = images(12, seed=5)
        results = [None] * 12

        def one(i):
            response = clients.predictions.Predict(predict_request(model="m", batch=batch[i:i + 1]), timeout=30)
            results[i] = tf.make_ndarray(response.outputs["probabilities"])[0]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        whole = tf.make_ndarray(clients.predictions.Predict(predict_request(model="m", batch=batch), timeout=30)
                                .outputs["probabilities"])
        assert server.batcher.batches_run - batches_before < 12 and server.batcher.largest_batch > 1
        np.testing.assert_allclose(np.stack(results), whole, rtol=1e-5, atol=1e-6)
        with pytest.raises(grpc.RpcError) as raised:
            clients.predictions.Predict(predict_request(model="m", batch=images(17)), timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "larger than maximum input batch size 16" in raised.value.details()
    finally:
        server.stop(grace=2)


def test_the_shipped_tf_serving_configs_parse_and_serve(exported_model, tmp_path):
    """serving/config/*.config start a server once the base path points at a real model."""
    import pathlib

    config_dir = pathlib.Path(__file__).parents[1] / "serving" / "config"
    models = (config_dir / "models.config").read_text().replace("/models/accresnet", str(tmp_path / "accresnet"))
    (tmp_path / "models.config").write_text(models)
    shutil.copytree(exported_model, tmp_path / "accresnet" / "1")
    grpc_port, rest_port = free_ports(2)
    args = build_parser().parse_args([
        f"--port={grpc_port}", f"--rest_api_port={rest_port}", f"--model_config_file={tmp_path / 'models.config'}",
        "--enable_batching", f"--batching_parameters_file={config_dir / 'batching.config'}",
        f"--monitoring_config_file={config_dir / 'monitoring.config'}", "--file_system_poll_wait_seconds=0"])
    options = options_from_args(args)
    assert options.batching.max_batch_size == 64 and options.batching.allowed_batch_sizes == ()
    assert options.metrics_path == "/monitoring/prometheus/metrics"
    server = RunningServer(options)
    try:
        clients = Clients(server)
        assert clients.predictions.Predict(predict_request(batch=images(3)), timeout=30).model_spec.version.value == 1
        assert clients.http("/monitoring/prometheus/metrics")[0] == 200
    finally:
        server.stop(grace=2)


def test_bad_server_flags_are_explained(tmp_path):
    from serving.server.options import OptionsError

    bad = tmp_path / "bad.config"
    bad.write_text("model_config_list { config { name: 'x' } }")
    cases = [([], "--model_base_path"),
             ([f"--model_config_file={bad}"], "needs a name and a base_path"),
             ([f"--model_config_file={tmp_path / 'missing'}"], "cannot read"),
             (["--model_base_path=/m", "--port=9000", "--rest_api_port=9000"], "must differ"),
             (["--model_base_path=/m", "--grpc_channel_arguments=nonsense"], "not key=value"),
             (["--model_base_path=/m", "--tensorflow_session_parallelism=2", "--tensorflow_intra_op_parallelism=2",
               "--tensorflow_inter_op_parallelism=2"], "not all three"),
             (["--model_base_path=/m", "--tensorflow_inter_op_parallelism=-1"], "cannot be negative"),
             (["--model_base_path=/m", f"--tensorflow_session_config_file={bad}"],
              "not a valid tensorflow.ConfigProto")]
    for flags, message in cases:
        with pytest.raises(OptionsError, match=message):
            options_from_args(build_parser().parse_args(flags))


def test_session_config_is_tf_servings_file_with_the_flags_thread_counts(tmp_path):
    """As in TF Serving: the file's settings, its thread counts replaced by the flags'."""
    config_file = tmp_path / "session.config"
    config_file.write_text("intra_op_parallelism_threads: 7 experimental { disable_thread_spinning: true }")
    base = ["--model_base_path=/m", f"--tensorflow_session_config_file={config_file}"]

    def threads(*flags):
        config = options_from_args(build_parser().parse_args(base + list(flags))).session_config
        assert config.experimental.disable_thread_spinning
        return config.intra_op_parallelism_threads, config.inter_op_parallelism_threads

    assert threads() == (0, 0)
    assert threads("--tensorflow_session_parallelism=3") == (3, 3)
    assert threads("--tensorflow_intra_op_parallelism=2") == (2, 0)
    assert threads("--tensorflow_intra_op_parallelism=2", "--tensorflow_inter_op_parallelism=1") == (2, 1)
    assert threads("--tensorflow_session_parallelism=5", "--tensorflow_inter_op_parallelism=1") == (0, 1)


def test_every_version_runs_in_a_session_of_the_configured_config(exported_model, tmp_path):
    from tensorflow.core.protobuf import config_pb2

    from serving.server.manager import ModelManager

    shutil.copytree(exported_model, tmp_path / "m" / "1")
    wanted = config_pb2.ConfigProto(intra_op_parallelism_threads=1)
    wanted.experimental.disable_thread_spinning = True
    manager = ModelManager([model_server_config_pb2.ModelConfig(name="m", base_path=str(tmp_path / "m"))],
                           poll_seconds=0, session_config=wanted)
    manager.start()
    servable = manager.servable("m")
    assert servable.session._config == wanted  # the config tf.compat.v1.Session was created with
    signature = servable.signature("")
    outputs = servable.run(signature, {"images": images(2)}, sorted(signature.outputs))
    assert outputs["probabilities"].shape[0] == 2
