"""Every wait of the release verbs ends: promote waits for a model config lock another
process holds for at most --lock-timeout, saying so; the wait for the servers ends by
--available-timeout however slowly a server answers; an answer that is not a model status
ends it in one line; and a push whose model config cannot be written (a full disk) leaves
what was there before, saying so in one line."""

import errno
import fcntl
import http.server
import json
import os
import socket
import threading
import time

import pytest

from pipeline import cli
from pipeline.release.push import ReleaseError, push
from pipeline.release.configs import PushConfig
from serving import atomic, availability, labels
from serving.availability import NotAStatus, NotAvailable, Servers, wait_until_available
from candidate_files import bless, candidate

CONFIG = """model_config_list {
  config {
    name: "accresnet"
    base_path: "%s"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 versions: 2 } }
    version_labels { key: "stable" value: 1 }
    version_labels { key: "canary" value: 2 }
  }
}
"""


def status(version, state="AVAILABLE"):
    return {"model_version_status": [{"version": str(version), "state": state,
                                      "status": {"error_code": "OK", "error_message": ""}}]}


class StatusServer:
    """A REST status endpoint on loopback that answers every GET with `answer` (bytes), whole
    or `trickle` seconds per byte."""

    def __init__(self, answer: bytes, trickle: float | None = None):
        self.answer, self.trickle = answer, trickle
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.stopped = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        self.listener.settimeout(0.2)
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection):
        with connection:
            connection.recv(65536)
            try:
                if self.trickle is None:
                    connection.sendall(self.answer)
                    return
                for byte in self.answer:
                    if self.stopped.wait(self.trickle):
                        return
                    connection.sendall(bytes([byte]))
            except OSError:
                pass

    def close(self):
        self.stopped.set()
        self.listener.close()


def http_answer(body: bytes, code: str = "200 OK") -> bytes:
    return (f"HTTP/1.1 {code}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


@pytest.fixture
def serve():
    servers = []

    def start(answer, trickle=None):
        servers.append(StatusServer(answer, trickle))
        return servers[-1].address

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "models" / "models.config"
    path.parent.mkdir()
    path.write_text(CONFIG % (tmp_path / "models" / "accresnet"))
    return path


def run(capsys, *args):
    capsys.readouterr()
    code = cli.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert "Traceback" not in output, output
    return code, output


def error_line(output, verb):
    (line,) = [line for line in output.splitlines() if line.startswith(f"accresnet {verb}: error: ")]
    return line


# --- the model config's lock ------------------------------------------------------------------


def test_promote_waits_for_a_held_lock_for_at_most_lock_timeout_saying_so(config_file, serve, capsys):
    server = serve(http_answer(json.dumps(status(2)).encode()))
    before = config_file.read_text()
    with open(config_file.with_name(".models.config.lock"), "a") as hung_writer:
        fcntl.flock(hung_writer, fcntl.LOCK_EX)  # another process that holds it and never lets go
        started = time.monotonic()
        code, output = run(capsys, "promote", "--model-config-file", config_file, "--rest-servers", server,
                           "--lock-timeout", 1)
        elapsed = time.monotonic() - started
    assert code == 2 and elapsed < 1 + 3 * 1 + 5, (elapsed, output)  # three AVAILABLE answers 1 s apart, then 1 s
    assert f"waiting for {config_file.with_name('.models.config.lock')}, held by another process, for at most 1 s" \
        in output, output
    line = error_line(output, "promote")
    assert "is still held by another process after 1 s" in line and "--lock-timeout (now 1 s)" in line, line
    assert config_file.read_text() == before


def test_promote_goes_on_once_the_lock_is_released(config_file, serve, capsys):
    server = serve(http_answer(json.dumps(status(2)).encode()))
    holder = open(config_file.with_name(".models.config.lock"), "a")
    fcntl.flock(holder, fcntl.LOCK_EX)
    threading.Timer(4.0, holder.close).start()  # after the three confirmations: promote has to wait for it
    code, output = run(capsys, "promote", "--model-config-file", config_file, "--rest-servers", server,
                       "--lock-timeout", 30)
    assert code == 0 and "held by another process, for at most 30 s" in output, output
    assert labels.labels(config_file, "accresnet") == {"stable": 2, "rollback": 1}


def test_a_lock_wait_without_timeout_still_blocks_as_before(tmp_path):
    path = tmp_path / "file"
    with atomic.locked(path), pytest.raises(atomic.LockTimeout):
        with atomic.locked(path, atomic.LockWait(0.2)):
            pass
    with atomic.locked(path, atomic.LockWait(0.2)):
        pass


# --- the wait for the servers -------------------------------------------------------------------


def test_a_server_that_trickles_its_answer_cannot_stretch_the_wait(serve, capsys, config_file):
    """One byte every 1.5 s: each read returns before any per-read timeout, and the whole answer
    would take minutes; the wait ends by --available-timeout all the same."""
    server = serve(http_answer(json.dumps(status(2)).encode()), trickle=1.5)
    started = time.monotonic()
    with pytest.raises(NotAvailable, match="is not AVAILABLE on .* after 2 s"):
        wait_until_available(Servers((server,), timeout_seconds=2.0), "accresnet", {2}, announce=lambda line: None)
    assert time.monotonic() - started < 3.0
    started = time.monotonic()
    code, output = run(capsys, "promote", "--model-config-file", config_file, "--rest-servers", server,
                       "--available-timeout", 3)
    assert code == 2 and time.monotonic() - started < 5.0, output
    assert "is not AVAILABLE" in error_line(output, "promote")
    state, why = availability.version_state(server, "accresnet", 2, timeout=0.5)
    assert state == "UNKNOWN" and ("deadline" in why or "timed out" in why), why


@pytest.mark.parametrize("answer,what", [
    (http_answer(b"[1, 2]"), "with a JSON list, not TF Serving's model status"),
    (http_answer(b'"AVAILABLE"'), "with a JSON string, not TF Serving's model status"),
    (http_answer(b"{}"), "with an object without a model_version_status list"),
    (http_answer(b'{"model_version_status": "AVAILABLE"}'), "with an object without a model_version_status list"),
    (http_answer(b'{"model_version_status": [{"version": "2"}]}'), "a status of version 2 that has no state"),
    (http_answer(b'{"model_version_status": [{"version": "2", "state": "AVAILABLE", "status": 7}]}'),
     "malformed status"),
    (http_answer(b"[" * 100_000 + b"]" * 100_000), "with JSON nested too deep"),
    (http_answer(b"\xff\xfe not json"), "with something that is not JSON"),
    (b"SSH-2.0-OpenSSH_9.6\r\n", "not an HTTP answer"),
])
def test_an_answer_that_is_not_a_model_status_ends_the_wait_in_one_line(serve, capsys, config_file, answer, what):
    server = serve(answer)
    started = time.monotonic()
    code, output = run(capsys, "promote", "--model-config-file", config_file, "--rest-servers", server)
    line = error_line(output, "promote")
    assert code == 2 and what in line, output
    assert "not a model server's REST address" in line or "not TF Serving's model status" in line, line
    assert time.monotonic() - started < 5.0


def test_a_load_error_from_the_server_is_shown_on_one_line(serve):
    body = {"model_version_status": [{"version": "2", "state": "END",
                                      "status": {"error_code": "NOT_FOUND", "error_message": "no\nfile\x1b[2J"}}]}
    server = serve(http_answer(json.dumps(body).encode()))
    with pytest.raises(NotAvailable) as error:
        wait_until_available(Servers((server,), timeout_seconds=5), "accresnet", {2}, announce=lambda line: None)
    assert "failed to load" in str(error.value) and "\n" not in str(error.value) and "\x1b" not in str(error.value)
    assert not isinstance(error.value, NotAStatus)


# --- a full disk under the model config ----------------------------------------------------------


@pytest.fixture
def released(tmp_path):
    """Version 1 published and in the model config (written by push), candidate 2 blessed."""
    first, second = candidate(tmp_path / "one"), candidate(tmp_path / "two")
    (second / "assets" / "labels.txt").write_text("c\nd\n")
    bless(first), bless(second)
    config = tmp_path / "models" / "models.config"
    push(PushConfig(candidate=str(first), export_base=str(tmp_path / "models" / "accresnet"),
                    model_config_file=str(config)), announce=lambda line: None)
    return second, config


def full_disk_at(path):
    write = atomic.write_atomically

    def write_atomically(target, text):
        if os.path.abspath(target) == os.path.abspath(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        return write(target, text)

    return write_atomically


def test_a_full_disk_at_the_model_config_takes_the_version_back_out(released, monkeypatch, capsys):
    second, config = released
    base = config.parent / "accresnet"
    before = config.read_text()
    monkeypatch.setattr(labels, "write_atomically", full_disk_at(config))
    code, output = run(capsys, "push", "--candidate", second, "--export-base", base, "--model-config-file", config,
                       "--rest-servers", "127.0.0.1:9")  # never asked: the config write fails first
    line = error_line(output, "push")
    assert code == 2 and "cannot write the model config" in line and "No space left on device" in line, output
    assert "Version 2 was taken back out of" in line and "nothing is published" in line, line
    assert sorted(os.listdir(base)) == ["1"] and config.read_text() == before


def test_where_the_version_cannot_be_taken_back_push_says_what_is_left(released, monkeypatch, capsys):
    second, config = released
    base = config.parent / "accresnet"
    monkeypatch.setattr(labels, "write_atomically", full_disk_at(config))
    rename = os.rename

    def no_rename_back(source, target):
        if ".withdrawn-" in str(target):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(source))
        return rename(source, target)

    monkeypatch.setattr(os, "rename", no_rename_back)
    code, output = run(capsys, "push", "--candidate", second, "--export-base", base, "--model-config-file", config,
                       "--rest-servers", "127.0.0.1:9")  # never asked: the config write fails first
    line = error_line(output, "push")
    assert code == 2 and f"Version 2 is left published at {base / '2'} but is not in the version policy" in line
    assert "remove that folder, or add 2" in line, line


def test_a_full_disk_during_the_copy_or_the_first_config_publishes_nothing(tmp_path, monkeypatch, capsys):
    from pipeline.release import blessing

    folder = candidate(tmp_path)
    bless(folder)
    config = tmp_path / "models" / "models.config"
    monkeypatch.setattr(labels, "write_atomically", full_disk_at(config))
    code, output = run(capsys, "push", "--candidate", folder, "--export-base", tmp_path / "models" / "accresnet",
                       "--model-config-file", config)
    assert code == 2 and "cannot write the model config" in error_line(output, "push"), output
    assert not config.exists() and not (tmp_path / "models" / "accresnet").exists()
    monkeypatch.undo()

    def no_space(source, destination):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), destination)

    monkeypatch.setattr(blessing, "copy_regular", no_space)
    with pytest.raises(ReleaseError, match=r"cannot publish .* No space left on device.* nothing was published"):
        push(PushConfig(candidate=str(folder), export_base=str(tmp_path / "models" / "accresnet")))
    assert os.listdir(tmp_path / "models" / "accresnet") == []
