"""Whether the model servers have versions AVAILABLE, asked over their REST API.

`GET /v1/models/NAME/versions/V` (TF Serving's model status) answers
`{"model_version_status": [{"version": "V", "state": "AVAILABLE", ...}]}`, or
404 while the server does not know the version yet. Through a Kubernetes
Service each answer is one replica's, so an address counts only after
`confirmations` AVAILABLE answers in a row; a replica that has not loaded
the version when a label moves to it keeps its old labels and applies the
move at a later poll, once it has (TF Serving retries the config each poll).

The timeout is the whole wait's: every request (connecting, sending, each
read of the answer) gets only the time left of it, so a server that trickles
its answer a byte at a time cannot stretch the wait, and an answer is read up
to MAX_ANSWER_BYTES. An answer that is not TF Serving's model status (a JSON
list, a string, a status without its state) ends the wait at once with one
line: that address is not a model server's REST port.
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import json
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterable

AVAILABLE = "AVAILABLE"
REQUEST_SECONDS = 10.0  # at most per status request, within the wait's own deadline
MAX_ANSWER_BYTES = 1 << 20  # a model status is a few hundred bytes


class NotAvailable(RuntimeError):
    """A version that did not become AVAILABLE in time, or failed to load."""


class NotAStatus(NotAvailable):
    """An answer that is not TF Serving's model status: the address is not a model server's."""


@dataclasses.dataclass(frozen=True)
class Servers:
    """Where and how long to ask."""

    addresses: tuple[str, ...]  # REST HOST:PORT of each server, or of their Service
    timeout_seconds: float = 600.0
    confirmations: int = 3
    interval_seconds: float = 1.0


def parse_addresses(text: str | None) -> tuple[str, ...]:
    """`a:8501,b:8501` -> ("a:8501", "b:8501")."""
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


class _DeadlineSocket:
    """A connected socket whose every send and receive gets only the time left until `deadline`
    (time.monotonic()): http.client reads an answer in many receives, and a per-receive
    timeout alone lets a server that trickles bytes hold the reader for ever."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock, self._deadline = sock, deadline

    def _arm(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no whole answer within the deadline")
        self._sock.settimeout(left)

    def sendall(self, data, *args):
        self._arm()
        return self._sock.sendall(data, *args)

    def recv_into(self, buffer, *args):
        self._arm()
        return self._sock.recv_into(buffer, *args)

    def makefile(self, mode="rb", *args, **kwargs):
        self._sock._io_refs += 1  # as socket.makefile: the socket closes once its files are closed too
        return io.BufferedReader(socket.SocketIO(self, "rb"))

    def _decref_socketios(self) -> None:
        self._sock._decref_socketios()

    def close(self) -> None:
        self._sock.close()

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _Connection(http.client.HTTPConnection):
    """HTTP whose connect, request and answer all end by one deadline."""

    def __init__(self, host: str, port: int | None, deadline: float):
        super().__init__(host, port, timeout=max(deadline - time.monotonic(), 0.001))
        self._deadline = deadline

    def connect(self) -> None:
        super().connect()
        self.sock = _DeadlineSocket(self.sock, self._deadline)


def _get_json(address: str, path: str, deadline: float):
    """(HTTP status, the answer parsed as JSON, or None when it is not 200): the whole request
    ends by `deadline`; TimeoutError or OSError when it does not, ValueError for an answer
    that is not JSON or larger than MAX_ANSWER_BYTES."""
    host = urllib.parse.urlsplit(f"http://{address}")
    connection = _Connection(host.hostname or address, host.port, deadline)
    try:
        connection.request("GET", path, headers={"Accept": "application/json"})
        reply = connection.getresponse()
        body = reply.read(MAX_ANSWER_BYTES + 1)
        if reply.status != 200:
            return reply.status, None
        if len(body) > MAX_ANSWER_BYTES:
            raise ValueError(f"an answer larger than {MAX_ANSWER_BYTES} bytes")
        return reply.status, json.loads(body)
    except http.client.HTTPException as error:  # a reply that is not HTTP
        raise ValueError(f"not an HTTP answer ({type(error).__name__})") from None
    finally:
        connection.close()


def _line(text: str, limit: int = 500) -> str:
    """A server's text as one printable line: whitespace collapsed, anything else escaped."""
    text = " ".join(text.split())
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit]) + ("..." if len(text) > limit else "")


def _kind(value) -> str:
    return {dict: "a JSON object", list: "a JSON list", str: "a JSON string", bool: "a JSON boolean",
            type(None): "JSON null"}.get(type(value), "a JSON number")


def version_state(address: str, model: str, version: int, timeout: float = REQUEST_SECONDS,
                  deadline: float | None = None) -> tuple[str, str]:
    """(state, error message) of one version as the server at `address` reports it;
    ("UNKNOWN", why) when it does not know the version or does not answer by the deadline
    (`timeout` seconds from now, or `deadline` if that comes first); NotAStatus for an answer
    that is not TF Serving's model status."""
    path = f"/v1/models/{model}/versions/{version}"
    deadline = min(time.monotonic() + timeout, deadline if deadline is not None else float("inf"))
    try:
        code, answer = _get_json(address, path, deadline)
    except (OSError, ValueError) as error:  # TimeoutError is an OSError
        if isinstance(error, UnicodeDecodeError) or isinstance(error, json.JSONDecodeError):
            raise NotAStatus(f"{address} answered GET {path} with something that is not JSON: it is not a model "
                             "server's REST address") from None
        if isinstance(error, ValueError):
            raise NotAStatus(f"{address} answered GET {path} with {' '.join(str(error).split())}: it is not a "
                             "model server's REST address") from None
        return "UNKNOWN", " ".join(str(getattr(error, "strerror", None) or error).split()) or type(error).__name__
    except RecursionError:
        raise NotAStatus(f"{address} answered GET {path} with JSON nested too deep: it is not a model server's "
                         "REST address") from None
    if code != 200:
        return "UNKNOWN", f"HTTP {code}"
    statuses = answer.get("model_version_status") if isinstance(answer, dict) else None
    if not (isinstance(statuses, list) and all(isinstance(status, dict) for status in statuses)):
        what = _kind(answer) if not isinstance(answer, dict) else "an object without a model_version_status list"
        raise NotAStatus(f"{address} answered GET {path} with {what}, not TF Serving's model status: it is not a "
                         "model server's REST address")
    for status in statuses:
        if str(status.get("version")) == str(version):
            detail = status.get("status", {})
            state = status.get("state")
            if not isinstance(state, str) or not isinstance(detail, dict):
                raise NotAStatus(f"{address} answered GET {path} with a status of version {version} that has no "
                                 "state or a malformed status: it is not TF Serving's model status")
            failed = detail.get("error_code", "OK") not in ("OK", 0)
            message = detail.get("error_message", "")
            return _line(state), _line(message if isinstance(message, str) else json.dumps(message)) if failed else ""
    return "UNKNOWN", "not in the answer"


def wait_until_available(servers: Servers, model: str, versions: Iterable[int],
                         announce: Callable[[str], None] = print, process: subprocess.Popen | None = None) -> None:
    """Return once every server reports every version AVAILABLE; NotAvailable after the
    timeout, at once when a version failed to load (END with an error), or when `process`,
    the server this process started, has exited."""
    pending = {(address, version) for address in servers.addresses for version in versions}
    streak = dict.fromkeys(pending, 0)
    last: dict[tuple[str, int], str] = {}
    deadline = time.monotonic() + servers.timeout_seconds
    announce(f"waiting until {', '.join(servers.addresses)} report {model} version(s) "
             f"{', '.join(map(str, sorted(set(versions))))} {AVAILABLE}")
    while pending:
        if process is not None and process.poll() is not None:
            raise NotAvailable(f"the model server exited with status {process.returncode}")
        for address, version in sorted(pending):
            state, error = version_state(address, model, version, deadline=deadline)
            if state == "END" and error:
                raise NotAvailable(f"version {version} of {model} failed to load on {address}: {error}")
            streak[address, version] = streak[address, version] + 1 if state == AVAILABLE else 0
            last[address, version] = state + (f" ({error})" if error else "")
            if streak[address, version] >= servers.confirmations:
                pending.discard((address, version))
        if pending and time.monotonic() > deadline:
            address, version = min(pending)
            raise NotAvailable(f"version {version} of {model} is not {AVAILABLE} on {address} after "
                               f"{servers.timeout_seconds:.0f} s (last answer: {last[address, version]})")
        if pending:
            time.sleep(max(0.0, min(servers.interval_seconds, deadline - time.monotonic())))
