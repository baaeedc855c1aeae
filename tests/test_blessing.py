"""A model is served only once it has earned it: validate, push, promote, rollback."""

import json
import pathlib
import threading
import time

import grpc
import numpy as np
import pytest

from helpers import deployed_server, free_ports, run_accresnet
from pipeline import export
from pipeline.push import PushConfig, PushRefused, push
from pipeline.validate import BLESSING_FILE, CONFUSION_FILE, ValidateConfig, validate
from serving import labels
from serving.deployment import MODEL_NAME
from test_server import Clients, images, predict_request

pytestmark = pytest.mark.slow  # every test here trains or starts processes

DATASET = "synthetic:1200"  # a model trained 3 epochs on it reaches about 0.4 on its test split


def validate_config(candidate, **overrides):
    from pipeline.config import DataConfig

    settings = dict(candidate=str(candidate), data=DataConfig(DATASET), eval_images=200)
    return ValidateConfig(**{**settings, **overrides})


def untrained_export(class_names, base):
    """A candidate that is much worse than the trained one: the same net, never trained."""
    import keras

    from pipeline.config import ModelConfig
    from pipeline.model import build_model

    keras.utils.set_random_seed(7)
    model = build_model(ModelConfig("accumulated", 8, len(class_names)))
    return pathlib.Path(export.export_saved_model(model, list(class_names), base))


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    from pipeline import flags
    from pipeline.config import TrainConfig
    from pipeline.train import train

    model_dir = tmp_path_factory.mktemp("good-run")
    train(flags.build(TrainConfig, dict(model_dir=str(model_dir), depth=8, dataset=DATASET, epochs=3, batch_size=32,
                                        devices=1, progress=False)))
    return model_dir


@pytest.fixture(scope="module")
def candidate(good_run, tmp_path_factory):
    return pathlib.Path(export.export_run(good_run, tmp_path_factory.mktemp("staging") / MODEL_NAME))


@pytest.fixture(scope="module")
def class_names(trained_run):
    from pipeline.rundir import RunDir

    return RunDir(trained_run).read_settings().class_names


def test_a_good_candidate_is_blessed_and_pushed_whole_as_the_next_version(candidate, tmp_path):
    record = validate(validate_config(candidate), announce=lambda line: None)
    assert record["verdict"] == "blessed", record["reasons"]
    assert record["infra"]["grpc_rest_max_difference"] < 1e-3 and record["infra"]["latency_ms_p50"] > 0
    metrics = record["candidate_metrics"]
    assert metrics["accuracy"] > 0.25 and sum(map(sum, metrics["confusion"])) == metrics["images"] == 200
    assert json.loads((candidate / BLESSING_FILE).read_text()) == record
    assert (candidate / CONFUSION_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    base = tmp_path / "models" / MODEL_NAME
    path, _ = push(PushConfig(candidate=str(candidate), export_base=str(base)))
    assert pathlib.Path(path) == base / "1"
    assert (base / "1" / BLESSING_FILE).exists()  # every served version carries why it was let in
    assert not [p for p in base.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_a_broken_candidate_is_refused_and_cannot_be_pushed(candidate, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(candidate, broken)
    for data_file in (broken / "variables").glob("variables.data-*"):
        data_file.write_bytes(data_file.read_bytes()[:100])  # a copy cut short
    record = validate(validate_config(broken), announce=lambda line: None)
    assert record["verdict"] == "refused" and "does not load or answer" in record["reasons"][0], record
    assert record["candidate_metrics"] is None
    with pytest.raises(PushRefused, match="refused by validate: it does not load"):
        push(PushConfig(candidate=str(broken), export_base=str(tmp_path / "models")))
    assert not (tmp_path / "models").exists()
    unvalidated = tmp_path / "staging" / "3"  # a staging base path: push takes its latest version
    shutil.copytree(candidate, unvalidated, ignore=shutil.ignore_patterns(BLESSING_FILE))
    code, output = run_accresnet("push", "--candidate", unvalidated.parent, "--export-base", tmp_path / "m")
    assert code == 3 and f"{unvalidated} has no blessing record" in output, output
    code, output = run_accresnet("push", "--candidate", tmp_path / "nothing", "--export-base", tmp_path / "m")
    assert code == 1 and "neither a SavedModel folder" in output, output
    assert not (tmp_path / "m").exists()


def test_a_worse_candidate_is_refused_by_the_comparison_with_the_served_version(class_names, good_run, tmp_path):
    served_base = tmp_path / "served" / MODEL_NAME
    export.export_run(good_run, served_base)
    server = deployed_server(tmp_path / "served", tmp_path / "config")
    try:
        worse = untrained_export(class_names, tmp_path / "staging")
        # No absolute floor: only the comparison can refuse it.
        record = validate(validate_config(worse, current_server=f"localhost:{server.port}", min_accuracy=0.0),
                          announce=lambda line: None)
    finally:
        server.stop(grace=1)
    assert record["verdict"] == "refused", record
    assert any("below the served version's" in reason for reason in record["reasons"]), record["reasons"]
    current = record["current"]["metrics"]
    assert current["accuracy"] > record["candidate_metrics"]["accuracy"]
    assert (worse / CONFUSION_FILE).exists()  # both confusion matrices, side by side
    with pytest.raises(PushRefused):
        push(PushConfig(candidate=str(worse), export_base=str(served_base)))
    assert sorted(p.name for p in served_base.iterdir()) == ["1"]  # never reached the served base path


def test_an_unreachable_server_refuses_the_candidate_unless_nothing_was_released_yet(tmp_path):
    from pipeline.validate import _served_metrics

    (port,) = free_ports(1)  # nobody listens there
    images, image_labels = np.zeros((2, 32, 32, 3), np.uint8), np.zeros(2, np.int64)
    served = tmp_path / "models" / MODEL_NAME
    config = validate_config(tmp_path, current_server=f"127.0.0.1:{port}", served_base=str(served))
    said = []
    assert _served_metrics(config, images, image_labels, said.append) == (None, None)  # the first release
    assert "holds no version yet" in said[-1]
    (served / "1").mkdir(parents=True)
    current, reason = _served_metrics(config, images, image_labels, said.append)
    assert current is None and reason.startswith("the served version could not be compared with") and (
        "UNAVAILABLE" in reason), reason
    without_base = validate_config(tmp_path, current_server=f"127.0.0.1:{port}")
    assert "UNAVAILABLE" in _served_metrics(without_base, images, image_labels, said.append)[1]


def test_labels_move_as_push_promote_and_rollback_say(tmp_path):
    config = tmp_path / "models.config"
    config.write_text('model_config_list { config { name: "m" base_path: "/models/m" model_platform: "tensorflow" '
                      "model_version_policy { latest { num_versions: 1 } } } }")
    assert labels.label_canary(config, "m", 1, served=None) == {"stable": 1, "canary": 1}
    assert labels.promote(config, "m") == {"stable": 1}
    assert labels.label_canary(config, "m", 2, served=1) == {"stable": 1, "canary": 2}
    assert labels.promote(config, "m") == {"stable": 2, "rollback": 1}
    assert "specific" in config.read_text() and "versions: 1" in config.read_text()  # both stay loaded
    assert labels.rollback(config, "m") == {"stable": 1}
    with pytest.raises(labels.LabelError, match="no rollback version"):
        labels.rollback(config, "m")
    with pytest.raises(labels.LabelError, match="no canary"):
        labels.promote(config, "m")
    # A model volume without a model config (the first release) gets the shipped one, then the labels.
    fresh = tmp_path / "volume" / "models.config"
    assert labels.label_canary(fresh, MODEL_NAME, 1, served=None) == {"stable": 1, "canary": 1}
    assert 'base_path: "/models/accresnet"' in fresh.read_text()


@pytest.mark.slow
def test_promote_and_rollback_flip_what_stable_answers_with_no_failed_request(trained_run, class_names, tmp_path):
    base = tmp_path / "models" / MODEL_NAME
    export.export_run(trained_run, base)  # version 1
    untrained_export(class_names, base)  # version 2: answers otherwise
    server = deployed_server(tmp_path / "models", tmp_path / "config", model_config_file_poll_wait_seconds=1)
    config = tmp_path / "config" / "models.config"  # the file the server re-reads
    labels.label_canary(config, MODEL_NAME, 2, served=1)
    clients = Clients(server)
    seen, failures, stop = [], [], threading.Event()

    def client_loop():
        while not stop.is_set():
            request = predict_request(model=MODEL_NAME, batch=images(1))
            request.model_spec.version_label = "stable"
            try:
                seen.append(clients.predictions.Predict(request, timeout=30).model_spec.version.value)
            except grpc.RpcError as error:
                failures.append(error)

    def wait_for(version):
        deadline = time.monotonic() + 60
        while (not seen or seen[-1] != version) and time.monotonic() < deadline:
            time.sleep(0.2)
        return seen[-1] if seen else None

    threads = [threading.Thread(target=client_loop) for _ in range(3)]
    try:
        deadline = time.monotonic() + 30  # until the server has read the labels
        while time.monotonic() < deadline:
            request = predict_request(model=MODEL_NAME, batch=images(1))
            request.model_spec.version_label = "stable"
            try:
                clients.predictions.Predict(request, timeout=30)
                break
            except grpc.RpcError:
                time.sleep(0.2)
        check_labels_reach_the_same_versions_over_grpc_and_rest(server, tmp_path)
        for thread in threads:
            thread.start()
        first = wait_for(1)
        labels.promote(config, MODEL_NAME)
        promoted = wait_for(2)
        labels.rollback(config, MODEL_NAME)
        rolled_back = wait_for(1)
        time.sleep(1.5)  # the demoted version unloads under load
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        server.stop(grace=2)
    assert not failures, failures[:3]
    assert (first, promoted, rolled_back) == (1, 2, 1) and seen[-1] == 1
    assert len(seen) > 20 and 2 in seen and np.all(np.isin(seen, [1, 2]))


def check_labels_reach_the_same_versions_over_grpc_and_rest(server, tmp_path):
    """stable is version 1 and canary version 2, by gRPC and by REST, through the client."""
    from PIL import Image

    from serving.client import Classifier, RestClassifier

    pixels = images(4, seed=3)
    grpc_address, rest_address = f"localhost:{server.port}", f"localhost:{server.rest_port}"
    by_version = {}
    for version in (1, 2):
        with Classifier(grpc_address, MODEL_NAME, version=version) as client:
            by_version[version] = client.predict(pixels)
    assert not np.allclose(by_version[1], by_version[2], atol=1e-3)  # the labels must be told apart
    for label, version in (("stable", 1), ("canary", 2)):
        for client_class, address in ((Classifier, grpc_address), (RestClassifier, rest_address)):
            with client_class(address, MODEL_NAME, label=label) as client:
                np.testing.assert_allclose(client.predict(pixels), by_version[version], atol=1e-5,
                                           err_msg=f"{client_class.__name__} --label {label}")
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i, image in enumerate(pixels[:2]):
        Image.fromarray(image).save(folder / f"{i}.png")
    code, output = run_accresnet("classify", "--rest", "--server", rest_address, "--label", "canary",
                                 "--signature", "serving_bytes", "--json", folder)
    assert code == 0, output
    answers = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert [a["class_id"] for a in answers] == list(by_version[2][:2].argmax(axis=1)), output
