"""The client and `accresnet classify` against a running server; TLS; retries."""

import datetime
import json
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from helpers import REPO, deployed_server, free_ports
from pipeline.data.synthetic import CLASS_NAMES
from serving.client import Classifier, ClientError, image_files
from serving.images import read_pixels
from serving.server.main import RunningServer, build_parser
from serving.server.options import options_from_args


def _server(base, *flags, port=None):
    port = port or free_ports(1)[0]
    args = build_parser().parse_args([f"--port={port}", "--model_name=accresnet", f"--model_base_path={base}",
                                      "--file_system_poll_wait_seconds=0", *flags])
    return RunningServer(options_from_args(args))


@pytest.fixture(scope="module")
def model_base(exported_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("client") / "accresnet"
    shutil.copytree(exported_model, base / "1")
    return base


@pytest.fixture(scope="module")
def server(model_base, tmp_path_factory):
    """The server as the Kubernetes Deployment starts it: shipped configs, batching on."""
    running = deployed_server(model_base.parent, tmp_path_factory.mktemp("server-config"))
    assert running.batcher is not None
    yield running
    running.stop(grace=2)


@pytest.fixture(scope="module")
def picture_folder(tmp_path_factory):
    """Images of every kind a user may have: formats, sizes, modes; and one broken file."""
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    for i, (fmt, size, mode) in enumerate([("PNG", (32, 32), "RGB"), ("JPEG", (120, 80), "RGB"),
                                           ("GIF", (40, 40), "P"), ("BMP", (64, 64), "RGB"),
                                           ("PNG", (50, 30), "L"), ("PNG", (32, 32), "RGBA")]):
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
        (folder / "sub" if i % 2 else folder).mkdir(exist_ok=True)
        image.save((folder / "sub" if i % 2 else folder) / f"image{i}.{fmt.lower()}", format=fmt)
    (folder / "notes.txt").write_text("not an image, not picked up from a folder")
    return folder


def expected_probabilities(exported_model, paths):
    loaded = tf.saved_model.load(str(exported_model))
    pixels = np.stack([read_pixels(str(p)) for p in paths])
    return loaded.signatures["serving_default"](images=tf.constant(pixels))["probabilities"].numpy()


def test_image_files_finds_images_in_folders_sorted(picture_folder):
    files = image_files([str(picture_folder)])
    names = [f.replace(str(picture_folder), "") for f in files]
    assert names == ["/image0.png", "/image2.gif", "/image4.png",
                     "/sub/image1.jpeg", "/sub/image3.bmp", "/sub/image5.png"]


def test_classifier_matches_the_model_on_the_same_pixels(server, picture_folder, exported_model):
    files = image_files([str(picture_folder)])
    with Classifier(f"localhost:{server.port}") as classifier:
        predictions = list(classifier.classify_files(files, batch_size=4, top_k=3))
    expected = expected_probabilities(exported_model, files)
    assert [p.path for p in predictions] == files
    for prediction, row in zip(predictions, expected):
        assert prediction.class_id == int(row.argmax())
        assert prediction.class_name == CLASS_NAMES[prediction.class_id]
        assert prediction.probability == pytest.approx(float(row.max()), rel=1e-5)
        order = np.argsort(-row, kind="stable")[:3]
        assert [name for name, _ in prediction.top_k] == [CLASS_NAMES[i] for i in order]
        assert [p for _, p in prediction.top_k] == pytest.approx(row[order].tolist(), rel=1e-5)


def test_top_k_is_at_most_what_the_model_names(server, picture_folder):
    files = image_files([str(picture_folder)])[:2]
    with Classifier(f"localhost:{server.port}") as classifier:
        predictions = list(classifier.classify_files(files, top_k=8))
    assert all(len(p.top_k) == 5 for p in predictions)  # exported with the default k of 5


def test_a_model_without_top_k_outputs_gets_classes_named_by_index():
    from serving.client import Answer, _prediction

    answer = Answer(np.array([[0.1, 0.7, 0.2]], np.float32), None, None)
    prediction = _prediction("x.png", answer, 0, 2)
    assert (prediction.class_name, prediction.class_id) == ("1", 1)
    assert [name for name, _ in prediction.top_k] == ["1", "2"]


def test_bytes_signature_sends_the_files(server, picture_folder):
    files = [f for f in image_files([str(picture_folder)]) if f.endswith(".png")]
    with Classifier(f"localhost:{server.port}", signature="serving_bytes") as classifier:
        assert classifier.signature_input().takes_bytes
        predictions = list(classifier.classify_files(files))
    assert len(predictions) == len(files) and all(0 <= p.probability <= 1 for p in predictions)


def test_unknown_model_or_signature_is_a_clear_error(server):
    with Classifier(f"localhost:{server.port}", model="nope") as classifier:
        with pytest.raises(ClientError, match="NOT_FOUND.*Latest\\(nope\\)"):
            classifier.signature_input()
    with Classifier(f"localhost:{server.port}", signature="serving_nothing") as classifier:
        with pytest.raises(ClientError, match="no signature 'serving_nothing'"):
            classifier.signature_input()


def test_retries_until_the_server_comes_up(model_base):
    port = free_ports(1)[0]
    started = {}

    def start_late():
        time.sleep(1.5)
        started["server"] = _server(model_base, port=port)

    thread = threading.Thread(target=start_late)
    thread.start()
    try:
        with Classifier(f"localhost:{port}", retries=6, timeout=10) as classifier:
            assert classifier.predict(np.zeros((1, 32, 32, 3), np.uint8)).shape == (1, 10)
    finally:
        thread.join()
        started["server"].stop(grace=1)
    with Classifier(f"localhost:{free_ports(1)[0]}", retries=1, timeout=2) as classifier:
        with pytest.raises(ClientError, match="UNAVAILABLE"):
            classifier.predict(np.zeros((1, 32, 32, 3), np.uint8))


def _certificates(folder):
    """A CA and a server certificate for localhost, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject, issuer, key, signing_key, ca):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "accresnet test CA")])
    ca = certificate(ca_name, ca_name, ca_key, ca_key, True)
    server = certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), ca_name, server_key,
                         ca_key, False)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()).decode()
    (folder / "ca.pem").write_text(pem(ca))
    ssl_config = folder / "ssl.config"
    ssl_config.write_text(f"server_key: {json.dumps(key_pem)}\nserver_cert: {json.dumps(pem(server))}\n")
    return folder / "ca.pem", ssl_config


def test_tls(model_base, tmp_path):
    ca, ssl_config = _certificates(tmp_path)
    running = _server(model_base, f"--ssl_config_file={ssl_config}")
    try:
        with Classifier(f"localhost:{running.port}", tls_ca=str(ca)) as classifier:
            assert classifier.predict(np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 10)
        with Classifier(f"localhost:{running.port}", retries=0, timeout=5) as plain:
            with pytest.raises(ClientError):
                plain.predict(np.zeros((1, 32, 32, 3), np.uint8))
    finally:
        running.stop(grace=1)


# --- the command line ---------------------------------------------------------------------------


def classify_command(*args):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "classify", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_classify_json_lines_and_unreadable_files(server, picture_folder, exported_model, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    result = classify_command("--server", f"localhost:{server.port}", "--json", "--top-k", "2",
                              picture_folder, broken)
    assert result.returncode == 1
    assert "cannot read" in result.stderr and "broken.jpg" in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    files = image_files([str(picture_folder)])
    assert [line["path"] for line in lines] == files
    expected = expected_probabilities(exported_model, files)
    for line, row in zip(lines, expected):
        assert set(line) == {"path", "class_name", "class_id", "probability", "top_k", "version", "label"}
        assert (line["version"], line["label"]) == (1, None)  # the version that answered, from the response
        assert line["class_id"] == int(row.argmax()) and len(line["top_k"]) == 2
        assert line["top_k"][0] == {"class_name": line["class_name"], "probability": line["probability"]}


def test_classify_table(server, picture_folder):
    result = classify_command("--server", f"localhost:{server.port}", picture_folder)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["image", "class", "prob", "top-5"] and len(rows) == 6
    result = classify_command("--server", f"localhost:{server.port}", "--top-k", "3", picture_folder)
    assert result.stdout.splitlines()[0].split()[-1] == "top-3"


@pytest.mark.slow
def test_classify_reports_an_unreachable_server(picture_folder):
    result = classify_command("--server", f"localhost:{free_ports(1)[0]}", "--retries", "0", "--timeout", "3",
                              picture_folder)
    assert result.returncode == 1
    assert "accresnet classify: error:" in result.stderr and "UNAVAILABLE" in result.stderr
    assert result.stdout == ""  # no table header without an answer


def test_bytes_signature_names_and_skips_a_file_the_server_cannot_decode(server, picture_folder, tmp_path):
    """Pillow opens it (a WebP), the model's graph refuses it: only that file fails, by name."""
    odd = tmp_path / "odd.webp"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(odd, format="WEBP")
    files = [f for f in image_files([str(picture_folder)]) if f.endswith(".png")]
    failed = []
    with Classifier(f"localhost:{server.port}", signature="serving_bytes") as classifier:
        predictions = list(classifier.classify_files([files[0], str(odd), *files[1:]], batch_size=4,
                                                     on_error=lambda path, error: failed.append((path, error))))
    assert [p.path for p in predictions] == files
    assert [path for path, _ in failed] == [str(odd)]
    assert "unsupported image format" in str(failed[0][1])


def test_concurrent_requests_answer_in_order_as_one_at_a_time(server, picture_folder, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    files = image_files([str(picture_folder)])
    paths = [*files[:3], str(broken), *files[3:]] * 3
    answers = {}
    for concurrency in (1, 4):
        failed = []
        with Classifier(f"localhost:{server.port}") as classifier:
            answers[concurrency] = list(classifier.classify_files(
                paths, batch_size=2, on_error=lambda path, error: failed.append(path), concurrency=concurrency))
        assert failed == [str(broken)] * 3
    assert [p.path for p in answers[4]] == [p for p in paths if p != str(broken)]
    assert [(p.path, p.class_id) for p in answers[4]] == [(p.path, p.class_id) for p in answers[1]]
    # The server batches concurrent requests together; a batch of another size may round the
    # last bit differently (Eigen's kernels with TF_ENABLE_ONEDNN_OPTS=0).
    for four, one in zip(answers[4], answers[1]):
        assert [name for name, _ in four.top_k] == [name for name, _ in one.top_k]
        assert [p for _, p in four.top_k] == pytest.approx([p for _, p in one.top_k], rel=1e-5)


@pytest.mark.parametrize("extension", ["jsonl", "csv"])
def test_classify_writes_every_prediction_to_an_output_file(server, picture_folder, tmp_path, extension):
    import csv

    out = tmp_path / f"predictions.{extension}"
    result = classify_command("--server", f"localhost:{server.port}", "--concurrency", "3", "--batch-size", "2",
                              "--output", out, picture_folder)
    assert result.returncode == 0, result.stderr
    table = [line.split()[:2] for line in result.stdout.splitlines()[1:]]
    if extension == "jsonl":
        written = [json.loads(line) for line in out.read_text().splitlines()]
        assert [[r["path"], r["class_name"]] for r in written] == table
        assert all(len(r["top_k"]) == 5 and r["version"] == 1 for r in written)  # the contract's top-k default
    else:
        with out.open(newline="") as file:
            written = list(csv.DictReader(file))
        assert [[r["path"], r["class_name"]] for r in written] == table
        assert all(r["version"] == "1" and r["label"] == "" and len(r["top_k"].split()) == 5 for r in written)
    assert len(table) == 6 and not (tmp_path / f"predictions.{extension}.partial").exists()


@pytest.mark.parametrize("flags, message", [
    (["--output", "predictions.txt"], "name a .jsonl or .csv file"),
    (["--output", "/no/such/folder/p.jsonl"], "no folder /no/such/folder"),
    (["--concurrency", "0"], "--concurrency must be at least 1, not 0"),
])
def test_classify_refuses_bad_flags_in_one_line(picture_folder, flags, message):
    result = classify_command(*flags, picture_folder)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_classify_names_a_folder_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    result = classify_command(tmp_path / "empty")
    assert result.returncode == 2
    assert f"no image files in folder {tmp_path / 'empty'}" in result.stderr, result.stderr
