"""Version labels under TF Serving's rule, as `accresnet serve` enforces it.

ServerCore::UpdateModelVersionLabelMap (model_servers/server_core.cc), run by
ReloadConfig before the config's models are added: with
--allow_version_labels_for_unavailable_models a label that does not exist yet
may name a version that is not loaded, but an existing label may move only to
an AVAILABLE version; otherwise the whole config is refused with
FAILED_PRECONDITION, its new versions are not even added, and the next poll
of the file tries again."""

import logging
import shutil
import time

import grpc
import pytest
from tensorflow_serving.apis import get_model_status_pb2

from helpers import free_ports, wait_until
from server_clients import Clients, images, predict_request, start_server, versions

AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
REFUSAL = "Request to assign label to version {} of model m, which is not currently available for inference"


def config_text(base, versions_, labels):
    policy = " ".join(f"versions: {v}" for v in versions_)
    labelled = "".join(f' version_labels {{ key: "{k}" value: {v} }}' for k, v in labels.items())
    return (f'model_config_list {{ config {{ name: "m" base_path: "{base}" model_platform: "tensorflow" '
            f"model_version_policy {{ specific {{ {policy} }} }}{labelled} }} }}\n")


def answered_by(clients, label):
    request = predict_request(model="m", batch=images(1), version_label=label)
    try:
        return clients.predictions.Predict(request, timeout=30).model_spec.version.value
    except grpc.RpcError as error:
        return error.code()


@pytest.fixture
def labelled_server(exported_model, tmp_path):
    """The server serves version 1 as stable and canary, re-reading its config every second;
    version 2 lies beside it, not wanted."""
    base = tmp_path / "m"
    shutil.copytree(exported_model, base / "1")
    server = start_server(tmp_path, {"m": base}, "--model_config_file_poll_wait_seconds=1",
                          "--allow_version_labels_for_unavailable_models=true")
    config = tmp_path / "models.config"
    config.write_text(config_text(base, [1], {"stable": 1, "canary": 1}))
    clients = Clients(server)
    try:
        assert wait_until(lambda: answered_by(clients, "canary") == 1)
        shutil.copytree(exported_model, base / "2")  # beside it, not wanted by the policy in force
        yield clients, config, base
    finally:
        server.stop(grace=2)


def test_moving_a_label_to_a_version_the_same_config_adds_stalls_and_keeps_the_old_labels(labelled_server, caplog):
    clients, config, base = labelled_server
    with caplog.at_level(logging.ERROR):
        config.write_text(config_text(base, [1, 2], {"stable": 1, "canary": 2}))  # one write: the stall
        time.sleep(4)
    assert answered_by(clients, "canary") == 1 and answered_by(clients, "stable") == 1
    assert 2 not in versions(clients, "m")  # refused whole: version 2 was never even added
    assert caplog.text.count(REFUSAL.format(2)) >= 2, caplog.text  # tried, and refused, at every poll
    # A label moved to a version that does not exist at all: refused the same way.
    config.write_text(config_text(base, [1], {"stable": 1, "canary": 7}))
    time.sleep(3)
    assert answered_by(clients, "canary") == 1


def test_two_phases_get_the_label_moved(labelled_server):
    clients, config, base = labelled_server
    config.write_text(config_text(base, [1, 2], {"stable": 1, "canary": 1}))  # phase 1: add, move nothing
    assert wait_until(lambda: versions(clients, "m").get(2) == AVAILABLE)
    config.write_text(config_text(base, [1, 2], {"stable": 1, "canary": 2}))  # phase 2: 2 is AVAILABLE
    assert wait_until(lambda: answered_by(clients, "canary") == 2)
    assert answered_by(clients, "stable") == 1
    # A label that does not exist yet may name a version that is not loaded (the flag is on).
    shutil.copytree(base / "1", base / "3")
    config.write_text(config_text(base, [1, 2, 3], {"stable": 1, "canary": 2, "next": 3}))
    assert wait_until(lambda: versions(clients, "m").get(3) == AVAILABLE)
    assert wait_until(lambda: answered_by(clients, "next") == 3)


def test_without_the_flag_a_first_config_labelling_what_is_not_loaded_stops_the_start(exported_model, tmp_path):
    from serving.server.errors import ServingError
    from serving.server.main import RunningServer, build_parser
    from serving.server.options import options_from_args

    shutil.copytree(exported_model, tmp_path / "m" / "1")
    config = tmp_path / "labelled.config"
    config.write_text(config_text(tmp_path / "m", [1], {"stable": 1}))
    port, = free_ports(1)
    args = build_parser().parse_args([f"--model_config_file={config}", f"--port={port}"])
    # As ServerCore::Create fails in TF Serving: nothing is loaded when the first config is applied.
    with pytest.raises(ServingError, match=REFUSAL.format(1)) as refused:
        RunningServer(options_from_args(args))
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
