"""The REST API under a hostile but fair client: bounded bodies and JSON, timeouts,
a connection cap, abandoned work dropped, TLS like gRPC's, exact statuses, and
a bounded drain (issue 9, REST side)."""

import datetime
import http.client
import json
import logging
import os
import resource
import shutil
import signal
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from serving.server.main import build_parser, serve
from server_clients import Clients, start_server

READ_TIMEOUT = 1.0  # --rest_api_read_timeout_seconds of the shared server
BODY_LIMIT = 32 << 20


def _raw(port, request: bytes, timeout=5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if request:
        sock.sendall(request)
    return sock


def _read_all(sock: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """What the server sends until it closes the connection (True) or the deadline passes (False)."""
    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def _answer(sock: socket.socket, timeout=5.0) -> tuple[int, dict]:
    """The status and JSON body of the response that comes on `sock`."""
    sock.settimeout(timeout)
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, json.loads(response.read())


def _status_and_json(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.fixture(scope="module")
def model_root(exported_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    shutil.copytree(exported_model, root / "accresnet" / "1")
    return root


@pytest.fixture(scope="module")
def served(model_root, tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("shared"), {"accresnet": model_root / "accresnet"},
                          f"--rest_api_read_timeout_seconds={READ_TIMEOUT}",
                          f"--rest_api_max_body_bytes={BODY_LIMIT}", "--rest_api_bind_address=127.0.0.1")
    yield Clients(server)
    server.stop(grace=2)


def _window_batching(folder):
    """Batching parameters whose 3-second window holds a request in the server."""
    parameters = folder / "batching.config"
    parameters.write_text("max_batch_size { value: 64 }\nbatch_timeout_micros { value: 3000000 }\n"
                          "num_batch_threads { value: 1 }\n")
    return f"--batching_parameters_file={parameters}"


# --- point 6: body limit, JSON depth, decoding off the event loop -----------------------------------------


def test_a_body_over_the_limit_is_refused_413_before_it_is_read(served):
    port = served.server.rest_port
    sock = _raw(port, b"POST /v1/models/accresnet:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % (BODY_LIMIT + 1))
    with sock:  # no body sent: the answer must not wait for it
        status, body = _answer(sock, timeout=3)
    assert status == 413 and f"limit of {BODY_LIMIT} bytes" in body["error"]

    # A chunked body has no Content-Length: it is cut off once it passes the limit.
    chunk = b" " * (1 << 20)
    with _raw(port, b"POST /v1/models/accresnet:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n", timeout=30) as sock:
        for _ in range(BODY_LIMIT // len(chunk) + 1):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(b"0\r\n\r\n")
        status, body = _answer(sock)
    assert status == 413 and "limit" in body["error"]


def test_json_nesting_is_refused_before_it_is_parsed(served):
    for depth in (5000, 65):
        status, body = served.json("/v1/models/accresnet:predict", raw=b'{"instances": ' + b"[" * depth + b"1" +
                                   b"]" * depth + b"}")
        assert status == 400 and "nested" in body["error"], depth
    # Brackets inside strings are text, not nesting.
    text = "[" * 5000
    status, body = served.json("/v1/models/accresnet:predict", {"signature_name": text, "instances": [1]})
    assert status in (400, 404) and "nested" not in body["error"] and "not found" in body["error"], body
    # At the limit the body parses, and the array conversion refuses it without recursing further.
    status, body = served.json("/v1/models/accresnet:predict",
                               raw=b'{"instances": ' + b"[" * 63 + b"1" + b"]" * 63 + b"}")
    assert status == 400 and "nested" not in body["error"], body


def test_a_large_body_does_not_stall_other_requests(served):
    """json.loads holds the GIL for the whole body: parsed in one call, even on a thread,
    a 20 MB body would hold up every other request for as long."""
    row = json.dumps(np.random.default_rng(0).integers(0, 256, (32, 32, 3)).tolist())
    body = ('{"inputs": {"no_such_input": [' + ",".join([row] * 1000) + "]}}").encode()
    assert 8 << 20 < len(body) < BODY_LIMIT
    polls, done = [], threading.Event()  # (start, end) of each status GET

    def poll():
        while not done.is_set():
            started = time.perf_counter()
            assert served.http("/v1/models/accresnet")[0] == 200
            polls.append((started, time.perf_counter()))
            time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.2)
    started = time.perf_counter()
    status, answer = served.json("/v1/models/accresnet:predict", raw=body)
    ended = time.perf_counter()
    parse = ended - started
    done.set()
    poller.join()
    assert status == 400 and "alias not found" in answer["error"]
    assert parse > 0.5, "the body was too quick to parse to tell"
    # Held up for the whole parse, one status GET would wait about as long as the parse itself and
    # none would be answered meanwhile; decoded in pieces, GETs keep being answered throughout. A
    # shared 2-core machine can stall one GET for a while, so the worst wait only has to stay well
    # short of the parse, and answers must keep coming during it.
    answered_during = sum(started < end < ended for _, end in polls)
    worst = max(end - start for start, end in polls)
    assert answered_during >= 5 and worst < max(0.5, 0.75 * parse), (answered_during, worst, parse)


# --- point 10: statuses, with JSON bodies -------------------------------------------------------------------


def test_a_version_beyond_int64_is_400(served):
    for path, body in [("/v1/models/accresnet/versions/99999999999999999999", None),
                       ("/v1/models/accresnet/versions/9223372036854775808:predict", {"instances": [1]}),
                       ("/v1/models/accresnet/versions/-9223372036854775809/metadata", None)]:
        status, answer = served.json(path, body)
        assert status == 400 and "64-bit" in answer["error"], path
    # int64's own bounds are versions (that are not there).
    assert served.json("/v1/models/accresnet/versions/9223372036854775807")[0] == 404


@pytest.mark.parametrize("name", [["serving_default"], {"a": 1}, 7, None])
@pytest.mark.parametrize("api", ["predict", "classify", "regress"])
def test_signature_name_must_be_a_string(served, api, name):
    body = {"signature_name": name, "instances": [1], "examples": [{"x": 1}]}
    status, answer = served.json(f"/v1/models/accresnet:{api}", body)
    assert status == 400 and "'signature_name' must be a string" in answer["error"], answer


@pytest.mark.parametrize("method", ["DELETE", "PUT", "PATCH"])
def test_other_methods_are_405(served, method):
    for path, allowed in [("/v1/models/accresnet", "GET"), ("/v1/models/accresnet/versions/1/metadata", "GET"),
                          ("/v1/models/accresnet:predict", "POST")]:
        request = urllib.request.Request(served.rest + path, data=b"{}", method=method)
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=10)
        assert raised.value.code == 405 and raised.value.headers["Allow"] == allowed
        assert "not allowed" in json.loads(raised.value.read())["error"]


def test_unexpected_errors_are_500_with_json(served, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(served.server.model_server, "get_model_status", explode)
    status, answer = served.json("/v1/models/accresnet")
    assert status == 500 and "boom" in answer["error"]
    # Outside the model handlers too (the metrics page).
    monkeypatch.setattr(served.server.metrics, "exposition", explode)
    status, content = served.http("/monitoring/prometheus/metrics")
    assert status == 500 and "boom" in json.loads(content)["error"]


# --- point 9: read timeouts, connection cap, accept errors ---------------------------------------------------


def test_stalled_connections_are_dropped_after_the_read_timeout(served):
    port = served.server.rest_port
    # Nothing sent at all.
    with _raw(port, b"") as sock:
        started = time.monotonic()
        _, closed = _read_all(sock, started + 5)
        assert closed and READ_TIMEOUT * 0.5 < time.monotonic() - started < READ_TIMEOUT + 2
    # Headers trickling in.
    with _raw(port, b"GET /v1/models/accresnet HTTP/1.1\r\n") as sock:
        started, closed = time.monotonic(), False
        while not closed and time.monotonic() - started < 5:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
            _, closed = _read_all(sock, time.monotonic() + 0.2)
        assert time.monotonic() - started < READ_TIMEOUT + 2
    # A body trickling in: 408 with JSON, then the connection ends.
    head = (b"POST /v1/models/accresnet:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n{\"instances\": [")
    with _raw(port, head) as sock:
        started, response, closed = time.monotonic(), b"", False
        while not closed and time.monotonic() - started < 5:
            try:
                sock.sendall(b"1,")
            except OSError:
                break
            data, closed = _read_all(sock, time.monotonic() + 0.2)
            response += data
        assert time.monotonic() - started < READ_TIMEOUT + 2
        status, body = _status_and_json(response)
        assert status == 408 and "did not arrive" in body["error"]
    assert served.http("/v1/models/accresnet")[0] == 200


def test_accept_errors_are_logged_once_not_per_attempt(served, caplog):
    """Out of descriptors, asyncio retries accept() every second; each failure used to
    log a traceback."""
    port = served.server.rest_port
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    clients = []
    while len(clients) < 8 or clients[-1].fileno() < top:  # every descriptor up to the last one taken
        clients.append(socket.socket())
    try:
        with caplog.at_level(logging.INFO):
            # Room for one accepted connection, no more.
            resource.setrlimit(resource.RLIMIT_NOFILE, (clients[-1].fileno() + 2, hard))
            for sock in clients[-8:]:
                sock.settimeout(5)
                sock.connect(("127.0.0.1", port))
            time.sleep(2.6)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for sock in clients:
            sock.close()
    about_accept = [r for r in caplog.records if "accept" in r.getMessage()]
    assert len(about_accept) == 1, [r.getMessage() for r in about_accept]
    assert about_accept[0].exc_info is None and "Too many open files" in about_accept[0].getMessage()
    assert served.http("/v1/models/accresnet")[0] == 200


# --- point 3: the address the log prints; TLS as gRPC's -----------------------------------------------------


def test_rest_binds_the_address_it_logs(model_root, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="serving.server"):
        server = start_server(tmp_path, {"accresnet": model_root / "accresnet"}, "--rest_api_bind_address=127.0.0.1")
    try:
        assert server.rest_server.address == ("127.0.0.1", server.rest_port)
        assert f"Exporting HTTP/REST API at:127.0.0.1:{server.rest_port} ..." in caplog.messages
        assert Clients(server).http("/v1/models/accresnet")[0] == 200
        other = _an_address_that_is_not_loopback()
        if other is not None:
            with pytest.raises(OSError):
                socket.create_connection((other, server.rest_port), timeout=2).close()
    finally:
        server.stop(grace=1)


def _an_address_that_is_not_loopback():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # no packet is sent: it only picks an interface
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_default_bind_is_every_interface_and_the_log_says_so(model_root, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="serving.server"):
        server = start_server(tmp_path, {"accresnet": model_root / "accresnet"})
    try:
        assert server.rest_server.address == ("0.0.0.0", server.rest_port)
        assert f"Exporting HTTP/REST API at:0.0.0.0:{server.rest_port} ..." in caplog.messages
    finally:
        server.stop(grace=1)


def _certificates(folder):
    """A CA, a server certificate for localhost, a client certificate from the same CA and
    one from another CA; returns the paths and an SSLConfig text maker."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(text):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def certificate(subject, issuer, key, signing_key, ca, dns=None):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if dns:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    def pem(item):
        if isinstance(item, x509.Certificate):
            return item.public_bytes(serialization.Encoding.PEM).decode()
        return item.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()).decode()

    keys = {role: ec.generate_private_key(ec.SECP256R1()) for role in ("ca", "other_ca", "server", "client", "rogue")}
    ca = certificate(name("test CA"), name("test CA"), keys["ca"], keys["ca"], True)
    files = {"ca": pem(ca),
             "server": pem(certificate(name("localhost"), name("test CA"), keys["server"], keys["ca"], False,
                                       "localhost")),
             "client": pem(certificate(name("client"), name("test CA"), keys["client"], keys["ca"], False)),
             "rogue": pem(certificate(name("rogue"), name("other CA"), keys["rogue"], keys["other_ca"], False))}
    files.update({f"{role}_key": pem(keys[role]) for role in ("server", "client", "rogue")})
    paths = {}
    for role, text in files.items():
        paths[role] = folder / f"{role}.pem"
        paths[role].write_text(text)

    def ssl_config(client_verify):
        path = folder / f"ssl-{client_verify}.config"
        path.write_text(f"server_key: {json.dumps(files['server_key'])}\nserver_cert: {json.dumps(files['server'])}\n"
                        f"custom_ca: {json.dumps(files['ca'])}\nclient_verify: {str(client_verify).lower()}\n")
        return path

    return paths, ssl_config


def _https_get(port, paths, client=None):
    context = ssl.create_default_context(cafile=str(paths["ca"]))
    if client:
        context.load_cert_chain(paths[client], paths[f"{client}_key"])
    with urllib.request.urlopen(f"https://localhost:{port}/v1/models/accresnet", context=context, timeout=10) as reply:
        return reply.status


def _plain_get_fails(port):
    try:
        with urllib.request.urlopen(f"http://localhost:{port}/v1/models/accresnet", timeout=10) as reply:
            return reply.status != 200
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError):
        return True


@pytest.mark.parametrize("client_verify", [True, False])
def test_rest_serves_tls_like_grpc(model_root, tmp_path, client_verify):
    paths, ssl_config = _certificates(tmp_path)
    server = start_server(tmp_path, {"accresnet": model_root / "accresnet"},
                          f"--ssl_config_file={ssl_config(client_verify)}")
    try:
        port = server.rest_port
        assert _https_get(port, paths, client="client") == 200
        assert _plain_get_fails(port), "plain HTTP beside TLS gRPC"
        if client_verify:  # mutual TLS: no certificate, or one from another CA, gets no answer
            for client in (None, "rogue"):
                with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                    _https_get(port, paths, client=client)
        else:
            assert _https_get(port, paths) == 200
    finally:
        server.stop(grace=1)


# --- point 12: a port in use -----------------------------------------------------------------------------------


def test_a_rest_port_in_use_stops_the_start(served, tmp_path, capsys):
    """Another server (ours, or anything with SO_REUSEPORT) on the port: exit status 1, not a shared port."""
    from helpers import free_ports

    busy = socket.socket()
    busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    busy.bind(("0.0.0.0", 0))
    busy.listen()
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        for port in (served.server.rest_port, busy.getsockname()[1]):
            grpc_port, = free_ports(1)
            args = build_parser().parse_args([f"--model_base_path={tmp_path}", "--model_name=m",
                                              f"--port={grpc_port}", f"--rest_api_port={port}"])
            assert serve(args) == 1
            error = capsys.readouterr().err
            assert "cannot start the REST API" in error and "in use" in error, error
            # What started before REST was stopped: the gRPC port is free again.
            with socket.socket() as probe:
                probe.bind(("0.0.0.0", grpc_port))
    finally:
        busy.close()
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert served.http("/v1/models/accresnet")[0] == 200


# --- point 7: abandoned requests never run ---------------------------------------------------------------


def test_a_request_answered_504_never_runs_and_frees_its_thread(model_root, tmp_path):
    # One REST thread, a 3-second batching window and a 0.5-second REST timeout.
    server = start_server(tmp_path, {"accresnet": model_root / "accresnet"}, _window_batching(tmp_path),
                          "--rest_api_timeout_in_ms=500", "--rest_api_num_threads=1", "--enable_model_warmup=false")
    try:
        clients = Clients(server)
        before = server.batcher.batches_run
        started = time.monotonic()
        status, answer = clients.json("/v1/models/accresnet:predict",
                                      {"instances": np.zeros((1, 32, 32, 3), int).tolist()})
        assert status == 504 and answer == {"error": "Request timed out"}
        # The one REST thread is free again at once, not when the window closes.
        asked = time.monotonic()
        assert clients.http("/v1/models/accresnet")[0] == 200
        assert time.monotonic() - asked < 1.0 and time.monotonic() - started < 2.5
        time.sleep(max(0.0, started + 3.8 - time.monotonic()))
        assert server.batcher.batches_run == before, "the timed-out request ran"
    finally:
        server.stop(grace=1)


@pytest.fixture(scope="module")
def slow(model_root, tmp_path_factory):
    """A 3-second batching window, one REST thread, a long REST timeout, 4 connections at most,
    a 1-second drain; the last test here stops it."""
    folder = tmp_path_factory.mktemp("slow")
    server = start_server(folder, {"accresnet": model_root / "accresnet"}, _window_batching(folder),
                          "--rest_api_timeout_in_ms=20000", "--rest_api_num_threads=1",
                          "--enable_model_warmup=false", "--rest_api_max_connections=4",
                          "--rest_api_read_timeout_seconds=60", "--drain_timeout_seconds=1")
    yield server
    server.stop(grace=1)


def test_a_request_whose_client_left_never_runs(slow):
    clients = Clients(slow)
    before = slow.batcher.batches_run
    body = json.dumps({"instances": np.zeros((1, 32, 32, 3), int).tolist()}).encode()
    started = time.monotonic()
    sock = _raw(slow.rest_port, b"POST /v1/models/accresnet:predict HTTP/1.1\r\nHost: x\r\n"
                                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    time.sleep(0.3)
    sock.close()
    asked = time.monotonic()
    assert clients.http("/v1/models/accresnet")[0] == 200
    assert time.monotonic() - asked < 1.5, "the REST thread waited for the batch of a client that left"
    time.sleep(max(0.0, started + 3.8 - time.monotonic()))
    assert slow.batcher.batches_run == before, "the abandoned request ran"


def test_connections_beyond_the_cap_get_503_and_are_closed(slow):
    port = slow.rest_port
    held = [_raw(port, b"") for _ in range(4)]
    try:
        time.sleep(0.3)
        with _raw(port, b"GET /v1/models/accresnet HTTP/1.1\r\nHost: x\r\n\r\n") as extra:
            response, closed = _read_all(extra, time.monotonic() + 2)
        assert closed
        status, body = _status_and_json(response)
        assert status == 503 and "too many connections" in body["error"]
        held.pop().close()  # room again
        time.sleep(0.3)
        assert Clients(slow).http("/v1/models/accresnet")[0] == 200
    finally:
        for sock in held:
            sock.close()


def test_stop_is_bounded_by_the_drain_timeout(slow, caplog):
    """Open connections (a body half sent, an idle one) never hold shutdown past
    --drain_timeout_seconds (1 s here); the read timeout is 60 s. Cut off, they log no traceback."""
    half = _raw(slow.rest_port, b"POST /v1/models/accresnet:predict HTTP/1.1\r\nHost: x\r\n"
                                b"Content-Length: 1000\r\n\r\n{\"instances\": [")
    idle = _raw(slow.rest_port, b"")
    time.sleep(0.3)
    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        slow.stop()  # what SIGTERM calls
    assert time.monotonic() - started < 3.5
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    for sock in (half, idle):
        _, closed = _read_all(sock, time.monotonic() + 1)
        assert closed
        sock.close()
