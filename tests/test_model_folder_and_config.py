"""Neither what lies in a model's folder nor a bad model config stops the server.

TF Serving skips folder names that are not int64 versions (absl::SimpleAtoi in
sources/storage_path/file_system_storage_path_source.cc) and, when a polled
config is refused, logs it and keeps the one in force (model_servers/server.cc,
PollFilesystemAndReloadConfig); a config it refuses at start stops the start."""

import logging
import shutil
import time

import pytest
from tensorflow_serving.apis import get_model_status_pb2

from pipeline.export.saved_model import existing_versions
from serving.server.main import build_parser
from serving.server.options import OptionsError, options_from_args
from helpers import wait_until
from server_clients import Clients, images, predict_request, start_server, versions

STRANGE_NAMES = ["²", "١", "99999999999999999999", "-3", " 4", "1e3"]


def test_folders_that_are_not_versions_are_skipped(exported_model, tmp_path, caplog):
    base = tmp_path / "m"
    for name in ["1", *STRANGE_NAMES]:
        shutil.copytree(exported_model, base / name)
    assert existing_versions(base) == [1]
    with caplog.at_level(logging.WARNING):
        server = start_server(tmp_path, {"m": base})
    try:
        clients = Clients(server)
        assert versions(clients, "m") == {1: get_model_status_pb2.ModelVersionStatus.AVAILABLE}
        assert clients.predictions.Predict(predict_request(model="m", batch=images(1)), timeout=30).outputs
        assert clients.http("/v1/models/m/metadata")[0] == 200  # the readiness probe
        assert all(f"ignoring {name} under" in caplog.text for name in STRANGE_NAMES)
        # Polling goes on: a new version is found and served.
        shutil.copytree(exported_model, base / "2")
        assert wait_until(lambda: versions(clients, "m").get(2) == get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    finally:
        server.stop(grace=2)


def test_a_refused_config_keeps_the_last_good_one_and_polling_goes_on(exported_model, tmp_path):
    for name in ("m", "m2"):
        shutil.copytree(exported_model, tmp_path / name / "1")
    server = start_server(tmp_path, {"m": tmp_path / "m"}, "--model_config_file_poll_wait_seconds=1")
    config = tmp_path / "models.config"
    entry = 'config {{ name: "{}" base_path: "{}" model_platform: "tensorflow" }}\n'
    try:
        clients = Clients(server)
        config.write_text("model_config_list {\n" + entry.format("m", tmp_path / "m") * 2 + "}\n")
        time.sleep(3)  # polled and refused
        assert clients.predictions.Predict(predict_request(model="m", batch=images(1)), timeout=30).outputs
        config.write_text("model_config_list {\n" + "".join(entry.format(name, tmp_path / name)
                                                            for name in ("m", "m2")) + "}\n")
        assert wait_until(lambda: versions(clients, "m2").get(1) == get_model_status_pb2.ModelVersionStatus.AVAILABLE)
        config.write_text("model_config_list { config { name: ")  # torn: refused too
        time.sleep(3)
        assert clients.predictions.Predict(predict_request(model="m2", batch=images(1)), timeout=30).outputs
    finally:
        server.stop(grace=2)


def test_a_config_naming_a_model_twice_stops_the_start(tmp_path):
    config = tmp_path / "models.config"
    config.write_text('model_config_list { config { name: "m" base_path: "/a" } config { name: "m" base_path: "/b" } }')
    with pytest.raises(OptionsError, match="Illegal to list model m multiple times in config list"):
        options_from_args(build_parser().parse_args([f"--model_config_file={config}"]))
