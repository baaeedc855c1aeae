"""push in two phases that TF Serving can follow, against two servers that read one
model config, one of them slow to load: each push gets its canary live, and a
label never names a version a server has not loaded."""

import shutil
import time

import grpc
import pytest

from helpers import free_ports, wait_until
from pipeline.release.push import ReleaseError, promote, push
from pipeline.release.configs import LabelConfig, PushConfig
from serving import labels
from serving.deployment import MODEL_CONFIG_TEMPLATE, MODEL_NAME, local_deployed_server
from server_clients import Clients, images, predict_request

SLOW_LOAD_SECONDS = 4


def start(models_dir, scratch, config, slow=False):
    """An in-process server with the deployed flags that reads `config` itself (not a mapped copy)
    every second; `slow` makes every version take SLOW_LOAD_SECONDS more to load."""
    from serving.server.main import RunningServer, build_parser
    from serving.server.options import options_from_args

    local = local_deployed_server(models_dir, scratch, *free_ports(2))
    args = build_parser().parse_args([*local.flags, f"--model_config_file={config}",
                                      "--model_config_file_poll_wait_seconds=1", "--file_system_poll_wait_seconds=1"])
    server = RunningServer(options_from_args(args))
    if slow:
        warm_up = server.manager._warm_up

        def slow_warm_up(servable):
            time.sleep(SLOW_LOAD_SECONDS)
            warm_up(servable)

        server.manager._warm_up = slow_warm_up
    return server


def answered_by(server, label):
    request = predict_request(model=MODEL_NAME, batch=images(1), version_label=label)
    try:
        return Clients(server).predictions.Predict(request, timeout=30).model_spec.version.value
    except grpc.RpcError as error:
        return error.code().name


@pytest.fixture
def volume(exported_model, tmp_path):
    """A staging folder with three candidates, and the served base path and model config."""
    for version in (1, 2, 3):
        shutil.copytree(exported_model, tmp_path / "staging" / str(version))
    return tmp_path


def push_candidate(volume, version, rest_servers=None, timeout=120.0):
    return push(PushConfig(candidate=str(volume / "staging" / str(version)),
                           export_base=str(volume / "models" / MODEL_NAME),
                           model_config_file=str(volume / "models" / "models.config"), rest_servers=rest_servers,
                           available_timeout=timeout, force=True), announce=lambda line: None)


def test_second_and_third_pushes_get_canary_live_on_a_fast_and_a_slow_server(volume):
    config = volume / "models" / "models.config"
    first = push_candidate(volume, 1)  # nothing serves yet: new labels, nothing to wait for
    assert first.labels == {"stable": 1, "canary": 1}
    assert labels.read(config).model_config_list.config[0].base_path == str(volume / "models" / MODEL_NAME)
    fast = start(volume / "models", volume / "fast", config)
    slow = start(volume / "models", volume / "slow", config, slow=True)
    servers = (fast, slow)
    rest = ",".join(f"localhost:{server.rest_port}" for server in servers)
    try:
        assert wait_until(lambda: all(answered_by(s, "canary") == 1 for s in servers))
        for version in (2, 3):
            started = time.monotonic()
            pushed = push_candidate(volume, version, rest)
            assert pushed.labels == {"stable": 1, "canary": version}
            # push waited for the slow server too before it moved the label.
            assert time.monotonic() - started >= SLOW_LOAD_SECONDS
            assert wait_until(lambda: all(answered_by(s, "canary") == version for s in servers), 30), [
                answered_by(s, "canary") for s in servers]
            assert all(answered_by(s, "stable") == 1 for s in servers)
        assert promote(LabelConfig(str(config), rest_servers=rest), announce=lambda line: None) == {
            "stable": 3, "rollback": 1}
        assert wait_until(lambda: all(answered_by(s, "stable") == 3 for s in servers), 30)
    finally:
        for server in servers:
            server.stop(grace=1)


def test_a_canary_that_exists_moves_only_with_servers_to_ask(volume):
    push_candidate(volume, 1)
    with pytest.raises(ReleaseError, match="name the servers with --rest-servers"):
        push_candidate(volume, 2)
    assert sorted(p.name for p in (volume / "models" / MODEL_NAME).iterdir()) == ["1"]  # nothing copied
    (port,) = free_ports(1)  # nobody answers there
    with pytest.raises(ReleaseError, match=rf"version 2 of accresnet is not AVAILABLE on localhost:{port} after 2 s"):
        push_candidate(volume, 2, f"localhost:{port}", timeout=2)
    # Phase 1 stays, so the servers load the version; the canary did not move.
    assert labels.labels(volume / "models" / "models.config", MODEL_NAME) == {"stable": 1, "canary": 1}
    assert 2 in labels.read(volume / "models" / "models.config").model_config_list.config[
        0].model_version_policy.specific.versions


def test_push_refuses_a_model_config_that_serves_from_elsewhere(volume):
    config = volume / "models" / "models.config"
    config.parent.mkdir()
    shutil.copy(MODEL_CONFIG_TEMPLATE, config)  # base path /models/accresnet, as the servers mount the volume
    with pytest.raises(ReleaseError, match=f"serves model accresnet from /models/accresnet, not from "
                                           f"{volume / 'models' / MODEL_NAME}"):
        push_candidate(volume, 1)
    assert not (volume / "models" / MODEL_NAME).exists()
