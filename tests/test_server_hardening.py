"""The model server under hostile or careless clients (gRPC side): sizes bounded
before allocation, one client's bad request never fails another's, abandoned
work dropped, administration locked down, no second server on a used port."""

import io
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2

from serving.client import Classifier

from helpers import rss_mib
from hostile_files import png_declaring
from server_clients import Clients, images, predict_request, start_server


@pytest.fixture(scope="module")
def model_root(exported_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    shutil.copytree(exported_model, root / "m" / "1")
    return root


@pytest.fixture(scope="module")
def served(model_root):
    server = start_server(model_root, {"m": model_root / "m"})
    yield server, Clients(server)
    server.stop(grace=2)


def declared_tensor(shape, dtype=types_pb2.DT_UINT8, **values):
    proto = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape]))
    for field, value in values.items():
        if field == "tensor_content":
            proto.tensor_content = value
        else:
            getattr(proto, field).extend(value)
    return proto


def test_a_tiny_request_declaring_gigabytes_is_refused_before_allocation(served):
    server, clients = served
    before = rss_mib()
    request = predict_request(model="m")
    request.inputs["images"].CopyFrom(declared_tensor([100000, 32, 32, 3], int_val=[7]))
    assert request.ByteSize() < 100
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        clients.predictions.Predict(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "307200000 bytes" in raised.value.details() and "--max_request_tensor_bytes" in raised.value.details()
    assert time.monotonic() - started < 5
    assert rss_mib() - before < 100
    # And the server keeps serving.
    assert clients.predictions.Predict(predict_request(model="m", batch=images(2)), timeout=30).outputs


@pytest.mark.parametrize("proto, message", [
    (declared_tensor([2, 32, 32, 3], tensor_content=b"\x00" * 10), "tensor_content has 10 bytes"),
    (declared_tensor([-1, 32, 32, 3], int_val=[1]), "negative dimension"),
    (tensor_pb2.TensorProto(dtype=types_pb2.DT_UINT8,
                            tensor_shape=tensor_shape_pb2.TensorShapeProto(unknown_rank=True)), "known shape"),
])
def test_malformed_tensor_protos_are_invalid(served, proto, message):
    _, clients = served
    request = predict_request(model="m")
    request.inputs["images"].CopyFrom(proto)
    with pytest.raises(grpc.RpcError) as raised:
        clients.predictions.Predict(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in raised.value.details()


def test_tensor_content_is_read_as_sent(served):
    _, clients = served
    batch = images(3, seed=9)
    as_fields = clients.predictions.Predict(predict_request(model="m", batch=batch), timeout=30)
    request = predict_request(model="m")
    request.inputs["images"].CopyFrom(declared_tensor(batch.shape, tensor_content=batch.tobytes()))
    as_content = clients.predictions.Predict(request, timeout=30)
    np.testing.assert_array_equal(tf.make_ndarray(as_content.outputs["probabilities"]),
                                  tf.make_ndarray(as_fields.outputs["probabilities"]))


def _png(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_one_clients_undecodable_file_fails_only_its_own_request(model_root, tmp_path):
    """Batched together with good requests, a bad file costs only its sender."""
    parameters = tmp_path / "batching.config"
    parameters.write_text("max_batch_size { value: 16 }\nbatch_timeout_micros { value: 300000 }\n"
                          "num_batch_threads { value: 1 }\n")
    server = start_server(tmp_path, {"m": model_root / "m"}, f"--batching_parameters_file={parameters}")
    try:
        clients = Clients(server)
        outcomes = {}

        def send(name, payload):
            request = predict_pb2.PredictRequest()
            request.model_spec.name, request.model_spec.signature_name = "m", "serving_bytes"
            request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([payload]))
            try:
                outcomes[name] = clients.predictions.Predict(request, timeout=60)
            except grpc.RpcError as error:
                outcomes[name] = error

        payloads = {f"good{i}": _png(images(1, seed=i)[0]) for i in range(6)}
        payloads.update({"bad0": b"not an image", "bad1": b"\x89PNG\r\n\x1a\n truncated"})
        threads = [threading.Thread(target=send, args=item) for item in payloads.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for name, outcome in outcomes.items():
            if name.startswith("good"):
                assert not isinstance(outcome, grpc.RpcError), (name, outcome)
            else:
                assert outcome.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert server.batcher.batches_split >= 1  # the bad files were batched with good ones
    finally:
        server.stop(grace=2)


def _server_batching_for_seconds(model_root, tmp_path, *flags):
    """A server whose batches wait 1.5 s for company: requests stay in it long enough to watch."""
    parameters = tmp_path / "batching.config"
    parameters.write_text("max_batch_size { value: 16 }\nbatch_timeout_micros { value: 1500000 }\n"
                          "num_batch_threads { value: 1 }\n")
    return start_server(tmp_path, {"m": model_root / "m"}, f"--batching_parameters_file={parameters}",
                        "--enable_model_warmup=false", *flags)


def test_a_request_past_its_deadline_is_dropped_before_it_runs(model_root, tmp_path):
    server = _server_batching_for_seconds(model_root, tmp_path)
    try:
        clients = Clients(server)
        before = server.batcher.batches_run
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            clients.predictions.Predict(predict_request(model="m", batch=images(1)), timeout=0.3)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 1.0
        time.sleep(2.0)  # past the batching window: the dropped request never ran
        assert server.batcher.batches_run == before
    finally:
        server.stop(grace=2)


def test_a_call_that_finds_every_grpc_thread_busy_is_refused_not_queued(model_root, tmp_path):
    # TF Serving's --grpc_max_threads is a gRPC ResourceQuota: its sync server answers RESOURCE_EXHAUSTED
    # when no thread is free. Two requests held in a 1.5 s batching window take both threads here.
    server = _server_batching_for_seconds(model_root, tmp_path, "--grpc_max_threads=2")
    try:
        clients = Clients(server)
        held = [clients.predictions.Predict.future(predict_request(model="m", batch=images(1)), timeout=30)
                for _ in range(2)]
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as raised:
            clients.predictions.Predict(predict_request(model="m", batch=images(1)), timeout=30)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The project's client takes that refusal for a busy server and tries again after a pause.
        with Classifier(f"localhost:{server.port}", model="m") as classifier:
            assert classifier.predict(images(1)).shape == (1, 10)
        assert all(len(call.result().outputs["probabilities"].float_val) == 10 for call in held)
        answer = clients.predictions.Predict(predict_request(model="m", batch=images(1)), timeout=30)
        assert len(answer.outputs["probabilities"].float_val) == 10
    finally:
        server.stop(grace=2)


def test_a_second_server_on_a_used_port_refuses_to_start(model_root, tmp_path, served):
    server, _ = served
    with pytest.raises(OSError, match="in use"):
        start_server(tmp_path, {"m": model_root / "m"}, f"--port={server.port}")


def test_the_grpc_api_binds_the_address_it_is_given(model_root, tmp_path, caplog):
    with caplog.at_level("INFO", logger="serving.server"):
        server = start_server(tmp_path, {"m": model_root / "m"}, "--grpc_bind_address=127.0.0.1")
    try:
        assert f"Running gRPC ModelServer at 127.0.0.1:{server.port}" in caplog.text
        assert Clients(server).predictions.Predict(predict_request(model="m", batch=images(1)), timeout=30)
    finally:
        server.stop(grace=2)


def _status(clients, model):
    from tensorflow_serving.apis import get_model_status_pb2

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    return clients.models.GetModelStatus(request, timeout=30).model_version_status


def test_a_version_copied_in_pieces_loads_once_its_files_are_complete(model_root, tmp_path):
    """saved_model.pb first, the variables later: the first load fails, the finished copy loads."""
    from tensorflow_serving.apis import get_model_status_pb2

    target = tmp_path / "m" / "1"
    target.mkdir(parents=True)
    shutil.copy(model_root / "m" / "1" / "saved_model.pb", target)
    server = start_server(tmp_path, {"m": tmp_path / "m"}, "--max_num_load_retries=0")
    try:
        clients = Clients(server)
        (status,) = _status(clients, "m")
        assert status.state == get_model_status_pb2.ModelVersionStatus.END and status.status.error_code != 0
        for item in (model_root / "m" / "1").iterdir():
            if item.name != "saved_model.pb":
                (shutil.copytree if item.is_dir() else shutil.copy)(item, target / item.name)
        deadline = time.monotonic() + 60
        while _status(clients, "m")[0].state != get_model_status_pb2.ModelVersionStatus.AVAILABLE:
            assert time.monotonic() < deadline, "the completed version was never loaded again"
            time.sleep(0.3)
        assert clients.predictions.Predict(predict_request(model="m", batch=images(1)), timeout=30).outputs
    finally:
        server.stop(grace=2)


def test_a_failed_load_is_tried_again_after_the_interval(tmp_path, caplog):
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "saved_model.pb").write_bytes(b"garbage")
    with caplog.at_level("ERROR", logger="serving.server.manager"):
        server = start_server(tmp_path, {"m": tmp_path / "m"}, "--max_num_load_retries=2",
                              "--load_retry_interval_micros=300000")
        try:
            time.sleep(4)  # polls every second: 1 load and 2 tries, then no more
        finally:
            server.stop(grace=2)
    failures = [r for r in caplog.records if "could not load m version 1" in r.getMessage()]
    assert len(failures) == 3
    assert "tried again only when its files change" in failures[-1].getMessage()


def test_a_decompression_bomb_is_refused_before_it_is_decoded(served):
    _, clients = served
    before = rss_mib()
    for _ in range(4):
        request = predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.signature_name = "m", "serving_bytes"
        request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([png_declaring(23000, 23000)]))
        with pytest.raises(grpc.RpcError) as raised:
            clients.predictions.Predict(request, timeout=60)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "more pixels than" in raised.value.details()
    assert rss_mib() - before < 100


def test_a_queue_that_is_always_full_does_not_starve_the_others():
    """Ready queues are served oldest task first: with one batch thread, gRPC requests
    that keep one queue full must leave room for REST requests, which ask for other
    outputs and so wait in another queue (the soak benchmark found them starved)."""
    import concurrent.futures

    from serving.server.batching import Batcher, BatchingOptions, _Queue, _Task

    batcher = Batcher.__new__(Batcher)  # no batch threads: _take_batch is called by hand
    batcher.options, batcher._queues, batcher._closed = BatchingOptions(max_batch_size=2,
                                                                        num_batch_threads=1), {}, False

    def task(enqueued):
        return _Task({}, 1, enqueued, concurrent.futures.Future())

    busy = _Queue(None, None, ["probabilities"], [task(1.0), task(2.0), task(3.0), task(4.0)])
    other = _Queue(None, None, [], [task(1.5)])
    batcher._queues = {"busy": busy, "other": other}
    taken = [batcher._take_batch()[0] for _ in range(3)]
    assert taken == [busy, other, busy]
