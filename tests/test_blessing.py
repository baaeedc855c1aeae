"""A model is served only once it has earned it: validate, push, promote, rollback."""

import hashlib
import json
import pathlib
import re
import shutil
import threading
import time

import grpc
import numpy as np
import pytest

from helpers import deployed_server, free_ports, run_accresnet
from pipeline.release import blessing
from pipeline.export import saved_model
from pipeline.release.blessing import BLESSING_FILE, BlessingError
from pipeline.release.push import push
from pipeline.release.configs import PushConfig
from pipeline.release.validate import CONFUSION_FILE, validate
from pipeline.release.configs import ValidateConfig
from serving import labels
from serving.deployment import MODEL_NAME
from server_clients import Clients, images, predict_request

pytestmark = pytest.mark.slow  # every test here trains or starts processes

DATASET = "synthetic:1200"  # a model trained 3 epochs on it reaches about 0.4 on its test split


def validate_config(candidate, **overrides):
    from pipeline.data.specs import DataConfig

    settings = dict(candidate=str(candidate), data=DataConfig(DATASET), eval_images=200)
    return ValidateConfig(**{**settings, **overrides})


def untrained_export(class_names, base):
    """A candidate that is much worse than the trained one: the same net, never trained."""
    import keras

    from pipeline.model.architecture import ModelConfig
    from pipeline.model.network import build_model

    keras.utils.set_random_seed(7)
    model = build_model(ModelConfig("accumulated", 8, len(class_names)))
    return pathlib.Path(saved_model.export_saved_model(model, list(class_names), base))


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    from pipeline import flags
    from pipeline.settings.config import TrainConfig
    from pipeline.train.loop import train

    model_dir = tmp_path_factory.mktemp("good-run")
    train(flags.build(TrainConfig, dict(model_dir=str(model_dir), depth=8, dataset=DATASET, epochs=3, batch_size=32,
                                        devices=1, progress=False)))
    return model_dir


@pytest.fixture(scope="module")
def candidate(good_run, tmp_path_factory):
    return pathlib.Path(saved_model.export_run(good_run, tmp_path_factory.mktemp("staging") / MODEL_NAME))


@pytest.fixture(scope="module")
def class_names(trained_run):
    from pipeline.train.rundir import RunDir

    return RunDir(trained_run).read_settings().class_names


def test_a_good_candidate_is_blessed_and_pushed_whole_as_the_next_version(candidate, tmp_path):
    record = validate(validate_config(candidate), announce=lambda line: None)
    assert record.verdict == "blessed", record.reasons
    assert record.infra["grpc_rest_max_difference"] < 1e-3 and record.infra["latency_ms_p50"] > 0
    metrics = record.candidate_metrics
    assert metrics.accuracy > 0.25 and sum(map(sum, metrics.confusion)) == metrics.images == 200
    written = json.loads((candidate / BLESSING_FILE).read_text())
    assert written["verdict"] == "blessed" and written["candidate_metrics"]["accuracy"] == metrics.accuracy
    assert blessing.read(candidate) == record  # the record reads back as it was written
    assert (candidate / CONFUSION_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The record is bound to every file of the candidate, the confusion matrix included.
    files = record.content.files
    assert {"saved_model.pb", CONFUSION_FILE, "variables/variables.index"} <= set(files) and BLESSING_FILE not in files
    assert files["saved_model.pb"] == hashlib.sha256((candidate / "saved_model.pb").read_bytes()).hexdigest()
    assert set(record.checks) == {"operations", "serving", "grpc_rest_agree", "probabilities", "latency",
                                  "accuracy"} and set(record.checks.values()) == {"passed"}
    assert record.data["spec"] == DATASET and record.data["images"] == 200 and len(record.data["digest"]) == 64
    assert record.project["version"] == "0.1.0" and record.tensorflow and "Conv2D" in record.ops
    # The model card, written at export, carries validate's measurements too, and is bound like the rest.
    card = json.loads((candidate / "model_card.json").read_text())
    assert card["model"]["depth"] == 8 and card["validation"]["verdict"] == "blessed"
    assert card["validation"]["accuracy"] == metrics.accuracy and "model_card.json" in files

    base = tmp_path / "models" / MODEL_NAME
    pushed = push(PushConfig(candidate=str(candidate), export_base=str(base)))
    assert pathlib.Path(pushed.path) == base / "1" and pushed.labels is None
    assert (base / "1" / BLESSING_FILE).exists()  # every served version carries why it was let in
    assert (base / "1" / "model_card.json").read_text() == (candidate / "model_card.json").read_text()
    assert not [p for p in base.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_a_broken_candidate_is_refused_and_cannot_be_pushed(candidate, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(candidate, broken)
    for data_file in (broken / "variables").glob("variables.data-*"):
        data_file.write_bytes(data_file.read_bytes()[:100])  # a copy cut short
    record = validate(validate_config(broken), announce=lambda line: None)
    assert record.verdict == "refused" and "does not load or answer" in record.reasons[0], record
    assert record.candidate_metrics is None
    with pytest.raises(BlessingError, match="refused by validate: it does not load"):
        push(PushConfig(candidate=str(broken), export_base=str(tmp_path / "models")))
    assert not (tmp_path / "models").exists()
    unvalidated = tmp_path / "staging" / "3"  # a staging base path: push takes its latest version
    shutil.copytree(candidate, unvalidated, ignore=shutil.ignore_patterns(BLESSING_FILE))
    code, output = run_accresnet("push", "--candidate", unvalidated.parent, "--export-base", tmp_path / "m")
    assert code == 3 and f"{unvalidated} has no blessing record" in output, output
    code, output = run_accresnet("push", "--candidate", tmp_path / "nothing", "--export-base", tmp_path / "m")
    assert code == 2 and "neither a SavedModel folder" in output, output
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def blessed(candidate, tmp_path_factory):
    """A copy of the candidate that validate blessed."""
    folder = tmp_path_factory.mktemp("blessed") / "1"
    shutil.copytree(candidate, folder, ignore=shutil.ignore_patterns(BLESSING_FILE, CONFUSION_FILE))
    assert validate(validate_config(folder), announce=lambda line: None).blessed
    return folder


def tampered(blessed, tmp_path, how):
    folder = tmp_path / "candidate" / "1"
    shutil.copytree(blessed, folder)
    blessing = folder / BLESSING_FILE
    if how == "hand-written":
        blessing.write_text('{"verdict": "blessed"}')
    elif how == "digest-mismatch":
        record = json.loads(blessing.read_text())
        record["content"]["files"]["saved_model.pb"] = "0" * 64
        blessing.write_text(json.dumps(record))
    elif how == "changed-after":
        data = next((folder / "variables").glob("variables.data-*"))
        data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    elif how == "file-added":
        (folder / "assets.extra" / "note.txt").write_text("added after validate")
    elif how == "incomplete":
        record = json.loads(blessing.read_text())
        del record["checks"]
        blessing.write_text(json.dumps(record))
    elif how == "malformed":
        blessing.write_text('{"verdict": "blessed", ')
    elif how == "not-an-object":
        blessing.write_text("[1, 2]")
    return folder


@pytest.mark.parametrize("how,reason", [
    ("hand-written", "names no content (no file digests): it is forged"),
    ("digest-mismatch", "is forged: its digest is not that of the entries it lists"),
    ("changed-after", "is not what validate blessed (stale blessing): changed: variables/variables.data-"),
    ("file-added", "is not what validate blessed (stale blessing): added: assets.extra/note.txt"),
    ("incomplete", "is not a whole blessing record (KeyError: 'checks')"),
    ("malformed", "cannot be read as a blessing record"),
    ("not-an-object", "is not a blessing record validate writes"),
])
def test_push_refuses_a_forged_stale_or_malformed_blessing_in_one_line(blessed, tmp_path, how, reason):
    folder = tampered(blessed, tmp_path, how)
    with pytest.raises(BlessingError, match=re.escape(reason)):
        push(PushConfig(candidate=str(folder), export_base=str(tmp_path / "models")))
    assert not (tmp_path / "models").exists()


def test_push_exits_3_with_one_line_for_a_blessing_that_names_other_content(blessed, class_names, tmp_path):
    """A real blessing copied beside another candidate."""
    other = untrained_export(class_names, tmp_path / "staging")
    shutil.copy(blessed / BLESSING_FILE, other / BLESSING_FILE)
    code, output = run_accresnet("push", "--candidate", tmp_path / "staging", "--export-base", tmp_path / "m")
    assert code == 3 and "stale blessing" in output and "changed: " in output, output
    (line,) = [line for line in output.splitlines() if line.startswith("accresnet push: error: ")]
    assert "stale blessing" in line, output  # the whole reason on that one line
    assert not (tmp_path / "m").exists()


def test_a_graph_that_reads_or_writes_files_is_refused_before_any_server_runs_it(good_run, tmp_path):
    """The candidate answers as well as the good one, and also copies a file into an extra output."""
    import tensorflow as tf

    target = tmp_path / "leaked"

    class Leaky(saved_model.ServingModule):
        def _outputs(self, images):
            outputs = super()._outputs(images)
            secret = tf.io.read_file("/etc/passwd")
            with tf.control_dependencies([tf.io.write_file(str(target), secret)]):
                outputs["leak"] = tf.fill(tf.shape(outputs["class_ids"]), secret)
            return outputs

    model, names = saved_model.restore_trained_model(good_run)
    (tmp_path / "labels.txt").write_text("\n".join(names) + "\n")
    module = Leaky(model, names, str(tmp_path / "labels.txt"))
    leaky = tmp_path / "staging" / "1"
    tf.saved_model.save(module, str(leaky), signatures=module.signatures())
    record = validate(validate_config(leaky), announce=lambda line: None)
    assert record.verdict == "refused" and record.candidate_metrics is None, record.reasons
    (reason,) = record.reasons
    assert "uses operations no export of this project uses" in reason and reason.endswith("ReadFile, WriteFile")
    assert record.checks == {"operations": reason} and {"ReadFile", "WriteFile"} <= set(record.ops)
    assert not target.exists()  # no server ever ran it
    handed_over = tmp_path / "sidecar" / MODEL_NAME
    handed_over.mkdir(parents=True)
    (port,) = free_ports(1)
    again = validate(validate_config(leaky, candidate_server=f"localhost:{port}", candidate_rest_server=f"localhost:{port}",
                                     candidate_server_base=str(handed_over)), announce=lambda line: None)
    assert again.reasons == (reason,) and not list(handed_over.iterdir())  # never handed to the sidecar
    with pytest.raises(BlessingError, match="refused by validate: its graph uses operations"):
        push(PushConfig(candidate=str(leaky), export_base=str(tmp_path / "models")))


def test_a_candidate_whose_saver_writes_at_load_is_refused_before_any_server_loads_it(candidate, tmp_path):
    """A SaveV2 hung on the restore op passes an op-type check of the saver's part; no server
    may load the candidate to find out, since loading runs it."""
    import hostile_savers

    hostile = tmp_path / "staging" / "1"
    shutil.copytree(candidate, hostile, ignore=shutil.ignore_patterns(BLESSING_FILE, CONFUSION_FILE))
    target = tmp_path / "written-at-load"
    hostile_savers.save_on_restore(hostile, target)
    record = validate(validate_config(hostile), announce=lambda line: None)
    assert record.verdict == "refused" and record.candidate_metrics is None, record.reasons
    assert record.infra == {"skipped": "the operations check refused the graph"}
    assert "SaveV2" in record.reasons[0] and not pathlib.Path(f"{target}.index").exists()
    with pytest.raises(BlessingError, match="refused by validate"):
        push(PushConfig(candidate=str(hostile), export_base=str(tmp_path / "models")))


def test_validate_checks_the_candidate_on_a_server_it_hands_it_to(candidate, tmp_path):
    """As in the release pod: a server started with the deployed flags on an empty base path
    (the sidecar); validate puts the candidate there once its graph passed the operations check."""
    folder = tmp_path / "candidate" / "4"
    shutil.copytree(candidate, folder, ignore=shutil.ignore_patterns(BLESSING_FILE, CONFUSION_FILE))
    served = tmp_path / "sidecar-volume" / MODEL_NAME
    served.mkdir(parents=True)
    server = deployed_server(served.parent, tmp_path / "config", file_system_poll_wait_seconds=1)
    try:
        record = validate(validate_config(folder, candidate_server=f"localhost:{server.port}",
                                          candidate_rest_server=f"localhost:{server.rest_port}",
                                          candidate_server_base=str(served)), announce=lambda line: None)
    finally:
        server.stop(grace=1)
    assert record.blessed, record.reasons
    assert record.infra["latency_ms_p50"] > 0 and record.candidate_metrics.images == 200
    assert sorted(p.name for p in served.iterdir()) == ["4"]  # served as its own version, nothing else


def test_a_worse_candidate_is_refused_by_the_comparison_with_the_served_version(class_names, good_run, tmp_path):
    served_base = tmp_path / "served" / MODEL_NAME
    saved_model.export_run(good_run, served_base)
    server = deployed_server(tmp_path / "served", tmp_path / "config")
    try:
        worse = untrained_export(class_names, tmp_path / "staging")
        # No absolute floor: only the comparison can refuse it.
        record = validate(validate_config(worse, current_server=f"localhost:{server.port}", min_accuracy=0.0),
                          announce=lambda line: None)
    finally:
        server.stop(grace=1)
    assert record.verdict == "refused", record
    assert any("below the served version's" in reason for reason in record.reasons), record.reasons
    current = record.current.metrics
    assert current.accuracy > record.candidate_metrics.accuracy
    assert (worse / CONFUSION_FILE).exists()  # both confusion matrices, side by side
    with pytest.raises(BlessingError):
        push(PushConfig(candidate=str(worse), export_base=str(served_base)))
    assert sorted(p.name for p in served_base.iterdir()) == ["1"]  # never reached the served base path


def test_an_unreachable_server_refuses_the_candidate_unless_nothing_was_released_yet(tmp_path):
    from pipeline.release.validate import _served_metrics

    (port,) = free_ports(1)  # nobody listens there
    images, image_labels = np.zeros((2, 32, 32, 3), np.uint8), np.zeros(2, np.int64)
    served = tmp_path / "models" / MODEL_NAME
    config = validate_config(tmp_path, current_server=f"127.0.0.1:{port}", export_base=str(served))
    said = []
    assert _served_metrics(config, images, image_labels, said.append) == (None, None)  # the first release
    assert "holds no version yet" in said[-1]
    (served / "1").mkdir(parents=True)
    current, reason = _served_metrics(config, images, image_labels, said.append)
    assert current is None and reason.startswith("the served version could not be compared with") and (
        "UNAVAILABLE" in reason), reason
    without_base = validate_config(tmp_path, current_server=f"127.0.0.1:{port}")
    assert "UNAVAILABLE" in _served_metrics(without_base, images, image_labels, said.append)[1]


@pytest.mark.slow
def test_promote_and_rollback_flip_what_stable_answers_with_no_failed_request(trained_run, class_names, tmp_path):
    base = tmp_path / "models" / MODEL_NAME
    saved_model.export_run(trained_run, base)  # version 1
    untrained_export(class_names, base)  # version 2: answers otherwise
    server = deployed_server(tmp_path / "models", tmp_path / "config", model_config_file_poll_wait_seconds=1)
    config = tmp_path / "config" / "models.config"  # the file the server re-reads
    rest = f"localhost:{server.rest_port}"
    labels.add_version(config, MODEL_NAME, 2, served=[1])
    labels.label_canary(config, MODEL_NAME, 2, served=1, available=servers_have(rest))
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
        labels.promote(config, MODEL_NAME, servers_have(rest))
        promoted = wait_for(2)
        labels.rollback(config, MODEL_NAME, servers_have(rest))
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


def servers_have(*addresses):
    """labels.py's `available`: wait until these REST addresses report the versions AVAILABLE."""
    from serving.availability import Servers, wait_until_available

    return lambda versions: wait_until_available(Servers(addresses, 120), MODEL_NAME, versions, lambda line: None)


def check_labels_reach_the_same_versions_over_grpc_and_rest(server, tmp_path):
    """stable is version 1 and canary version 2, by gRPC and by REST, through the client."""
    from PIL import Image

    from serving.client import Classifier
    from serving.rest_client import RestClassifier

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
    # REST answers name no version (as TF Serving's); gRPC's model spec does.
    assert {(a["version"], a["label"]) for a in answers} == {(None, "canary")}
    code, output = run_accresnet("classify", "--server", grpc_address, "--label", "canary", "--json", folder)
    assert code == 0 and {(a["version"], a["label"]) for a in map(json.loads, filter(
        lambda line: line.startswith("{"), output.splitlines()))} == {(2, "canary")}, output
