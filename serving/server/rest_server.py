"""The REST API's server: an event loop thread of its own, TLS when gRPC has it,
a bound on open connections (further ones get 503 and are closed), throttled
logging of accept() failures, and a drain in bounded time."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import pathlib
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable

from aiohttp import web

from serving.server.rest_api import RestApi
from serving.server.rest_codec import json_bytes

log = logging.getLogger(__name__)

# While accept() fails (EMFILE and the like) asyncio retries every second: log it once a minute.
ACCEPT_ERROR_LOG_SECONDS = 60.0
_BUSY_BODY = json_bytes({"error": "too many connections (--rest_api_max_connections); retry later"})
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class _Busy(asyncio.Protocol):
    """A connection beyond --rest_api_max_connections: told so, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(_BUSY)
        transport.close()


class _Throttle:
    """Lets a repeated message through once per interval, with how often it was held back."""

    def __init__(self, seconds: float = ACCEPT_ERROR_LOG_SECONDS):
        self.seconds, self.last, self.held = seconds, None, 0

    def __call__(self, log_it: Callable[[int], None]) -> None:
        now = time.monotonic()
        if self.last is not None and now - self.last < self.seconds:
            self.held += 1
            return
        log_it(self.held)
        self.last, self.held = now, 0


def ssl_context(config) -> ssl.SSLContext:
    """REST's TLS from the SSLConfig gRPC uses: the same certificate, the same client verification."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory() as folder:  # load_cert_chain reads files only; the folder is private
        certificate, key = pathlib.Path(folder, "cert.pem"), pathlib.Path(folder, "key.pem")
        certificate.write_text(config.server_cert)
        key.touch(mode=0o600)
        key.write_text(config.server_key)
        context.load_cert_chain(certificate, key)
    if config.client_verify:
        if not config.custom_ca:
            raise ssl.SSLError("SSLConfig has client_verify but no custom_ca to verify client certificates with")
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=config.custom_ca)
    return context


class RestServer:
    """The REST API on an event loop thread of its own."""

    def __init__(self, api: RestApi, tls: ssl.SSLContext | None, drain_seconds: float):
        self.api, self.limits, self.tls, self.drain_seconds = api, api.limits, tls, drain_seconds
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._loop_error)
        self._accept_errors, self._refusals = _Throttle(), _Throttle()
        self._thread: threading.Thread | None = None
        self._listener: asyncio.AbstractServer | None = None
        self.runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (never sharing the port with another process); the bound address."""
        try:
            sock = self._listen(host, port)
        except OSError:
            self.loop.close()
            raise
        self._thread = threading.Thread(target=self.loop.run_forever, name="rest", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(sock), self.loop).result()
        except BaseException:
            sock.close()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._join()
            raise
        self.address = sock.getsockname()[:2]
        return self.address

    def stop(self, drain_seconds: float | None = None) -> None:
        """Stop accepting, let requests in flight finish for at most `drain_seconds`, then close the rest."""
        if self._thread is None:
            return
        drain_seconds = self.drain_seconds if drain_seconds is None else drain_seconds
        try:
            asyncio.run_coroutine_threadsafe(self._stop(drain_seconds), self.loop).result(drain_seconds + 5)
        except (concurrent.futures.TimeoutError, RuntimeError):
            log.warning("the REST API did not stop in time")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._join()

    def _join(self) -> None:
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()
        self._thread = None

    @staticmethod
    def _listen(host: str, port: int) -> socket.socket:
        try:
            family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        except socket.gaierror as error:
            raise OSError(f"cannot listen for REST on {host}:{port}: {error}") from None
        sock = socket.socket(family, kind)
        try:
            # SO_REUSEADDR lets a restarted server bind past TIME_WAIT; without SO_REUSEPORT a second
            # server on a port in use fails here instead of taking a share of the traffic.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
        except OSError as error:
            sock.close()
            raise OSError(f"cannot listen for REST on {host}:{port}: {error.strerror or error}") from None
        sock.setblocking(False)
        return sock

    async def _start(self, sock: socket.socket) -> None:
        self.runner = web.AppRunner(
            self.api.app(), access_log=None, shutdown_timeout=self.drain_seconds,
            # aiohttp starts this timer with the connection and ends only an idle one: a client that
            # has not sent a whole request (line and headers) within the read timeout is dropped.
            keepalive_timeout=self.limits.read_timeout,
            # After a refusal aiohttp reads and discards the rest of a body, for at most this long.
            lingering_time=min(10.0, self.limits.read_timeout))
        await self.runner.setup()
        self._listener = await self.loop.create_server(
            self._connection, sock=sock, ssl=self.tls, backlog=128,
            ssl_handshake_timeout=self.limits.read_timeout if self.tls else None)

    def _connection(self) -> asyncio.Protocol:
        server = self.runner.server
        if len(server.connections) >= self.limits.max_connections:
            self._refusals(lambda held: log.warning(
                "REST: %d connections open, the limit (--rest_api_max_connections); refusing more "
                "(%d refusals not logged since the last message)", len(server.connections), held))
            return _Busy()
        return server()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        error = context.get("exception")
        if context.get("message", "").startswith("socket.accept()") and isinstance(error, OSError):
            # A traceback per retry would fill the disk while descriptors run out.
            self._accept_errors(lambda held: log.error(
                "REST cannot accept connections: %s (%d more such errors not logged since the last message)",
                error.strerror or error, held))
            return
        loop.default_exception_handler(context)

    async def _stop(self, drain_seconds: float) -> None:
        if self._listener is not None:
            self._listener.close()  # no new connections
        server = self.runner.server if self.runner is not None else None
        if server is None:
            return
        try:
            # aiohttp closes idle connections, then waits for the requests in flight.
            await asyncio.wait_for(self.runner.cleanup(), drain_seconds)
        except asyncio.TimeoutError:
            log.warning("REST: %d connections still open after %g s; closing them", len(server.connections),
                        drain_seconds)
            for handler in server.connections:
                handler.force_close()
        self.api.cancel_all()
