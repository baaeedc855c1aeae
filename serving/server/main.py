"""Start the model server: gRPC, REST, version polling, graceful shutdown.

    python -m serving.server --port=8500 --rest_api_port=8501 \\
        --model_name=accresnet --model_base_path=/models/accresnet

SIGTERM or SIGINT stops it gracefully: it reports NOT_SERVING, stops taking
requests, lets the ones in flight finish (for at most --drain_timeout_seconds),
then exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent import futures

import grpc

from serving.server.flags import add_flags, ignored_flags_given

log = logging.getLogger("serving.server")


class RunningServer:
    """A started server; `stop()` shuts it down gracefully."""

    def __init__(self, options):
        from serving.server.batching import Batcher
        from serving.server.grpc_api import Health, add_services
        from serving.server.metrics import ServingMetrics
        from serving.server.service import ModelServer

        flags = options.flags
        self.options = options
        self.batcher = Batcher(options.batching) if options.batching else None
        self.model_server = ModelServer(options, runner=self.batcher)
        self.manager = self.model_server.manager
        self.metrics = ServingMetrics(is_configured=self.manager.knows)
        self.health = Health()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []

        self.manager.start()
        # NOT_SERVING until both APIs listen: a client told SERVING may use either.
        self.health.update(False)
        # TF Serving's --grpc_max_threads is a gRPC ResourceQuota (model_servers/server.cc): a call that
        # finds every thread busy is refused with RESOURCE_EXHAUSTED, not queued.
        self.grpc_server = grpc.server(futures.ThreadPoolExecutor(flags.grpc_max_threads),
                                       options=list(options.grpc_options),
                                       maximum_concurrent_rpcs=flags.grpc_max_threads)
        add_services(self.grpc_server, self.model_server, self.metrics, self.health)
        self.port = self._listen_grpc(options)
        self.grpc_server.start()
        self.rest_port = None
        if flags.rest_api_port:
            self._start_rest()
        self.health.update(self.manager.any_available())
        self._watch(self._health_loop, "health")
        if flags.model_config_file and flags.model_config_file_poll_wait_seconds > 0:
            self._watch(self._config_loop, "config-poller")

    def _listen_grpc(self, options) -> int | None:
        """Add the TCP port (unless --port=0) and the UNIX socket (--grpc_socket_path); the TCP port bound."""
        flags = options.flags
        if flags.use_alts_credentials:
            credentials = grpc.alts_server_credentials()
        elif options.ssl_config is not None:
            ssl = options.ssl_config
            credentials = grpc.ssl_server_credentials(
                [(ssl.server_key.encode(), ssl.server_cert.encode())],
                root_certificates=ssl.custom_ca.encode() or None, require_client_auth=ssl.client_verify)
        else:
            credentials = None
        host = flags.grpc_bind_address
        addresses = []
        if flags.port:
            addresses.append(f"[{host}]:{flags.port}" if ":" in host else f"{host}:{flags.port}")
        if flags.grpc_socket_path:
            addresses.append(f"unix:{flags.grpc_socket_path}")
        port = None
        for address in addresses:
            try:
                bound = (self.grpc_server.add_secure_port(address, credentials) if credentials is not None
                         else self.grpc_server.add_insecure_port(address))
            except RuntimeError:
                bound = 0
            if not bound:
                self.manager.stop()
                why = ("ALTS credentials work on Google Cloud only" if flags.use_alts_credentials
                       else "the port is in use or the address is not this machine's")
                raise OSError(f"cannot listen for gRPC on {address}: {why}")
            if address.startswith("unix:"):
                log.info("Running gRPC ModelServer at UNIX socket %s ...", flags.grpc_socket_path)
            else:
                port = bound
                log.info("Running gRPC ModelServer at %s ...", address.rsplit(":", 1)[0] + f":{port}")
        return port

    # --- REST on its own event loop ------------------------------------------------------------

    def _start_rest(self) -> None:
        from serving.server.rest_api import RestApi, RestLimits
        from serving.server.rest_server import RestServer, ssl_context

        options, flags = self.options, self.options.flags
        limits = RestLimits(max_body_bytes=flags.rest_api_max_body_bytes,
                            max_json_depth=flags.rest_api_max_json_depth,
                            read_timeout=flags.rest_api_read_timeout_seconds,
                            max_connections=options.rest_api_max_connections)
        self.rest = RestApi(self.model_server, self.metrics, flags.rest_api_num_threads,
                            flags.rest_api_timeout_in_ms, options.metrics_path, limits,
                            cors=flags.rest_api_enable_cors_support)
        try:
            # With TLS on gRPC, REST serves the same certificate and verifies clients as gRPC does:
            # never plain HTTP beside a mutual-TLS gRPC port.
            tls = ssl_context(options.ssl_config) if options.ssl_config is not None else None
            self.rest_server = RestServer(self.rest, tls, drain_seconds=flags.drain_timeout_seconds)
            host, self.rest_port = self.rest_server.start(flags.rest_api_bind_address, flags.rest_api_port)
        except OSError as error:  # ssl.SSLError included
            self.grpc_server.stop(0).wait(5)
            self.manager.stop()
            if self.batcher is not None:
                self.batcher.close()
            raise OSError(f"cannot start the REST API: {error}") from None
        url = f"{'https' if tls else 'http'}://{f'[{host}]' if ':' in host else host}:{self.rest_port}"
        log.info("Exporting HTTP/REST API at:%s ...", url.split("://", 1)[1])
        if options.metrics_path:
            log.info("Prometheus metrics at %s%s", url, options.metrics_path)

    # --- background duties --------------------------------------------------------------------------

    def _watch(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _health_loop(self) -> None:
        while not self._stopped.wait(0.5):
            self.health.update(self.manager.any_available())

    def _config_loop(self) -> None:
        """Re-read the model config; one that cannot be read or applied is logged and the
        last good one stays in force, as TF Serving's PollFilesystemAndReloadConfig does
        (model_servers/server.cc). A config refused by the label rule is refused whole
        (models, versions and labels) and tried again, and logged again, at every poll, as
        TF Serving's ReloadConfig is: it applies once the versions its labels move to are
        AVAILABLE. The thread never ends before the server."""
        from serving.server.options import read_model_config_file

        # Compared with what the server started with: a change made before the first poll counts too.
        path = self.options.flags.model_config_file
        previous = [m.SerializeToString() for m in self.options.model_configs]
        while not self._stopped.wait(self.options.flags.model_config_file_poll_wait_seconds):
            try:
                models = read_model_config_file(path)
                text = [m.SerializeToString() for m in models]
                if text != previous:
                    log.info("%s changed; applying it", path)
                    self.manager.set_config(models)
                previous = text
            except Exception as error:  # noqa: BLE001 - any refusal keeps the last good config
                log.error("ignoring %s, keeping the configuration in force: %s", path,
                          getattr(error, "message", None) or error)

    # --- shutdown ------------------------------------------------------------------------------------

    def stop(self, grace: float | None = None) -> None:
        """Refuse new requests, finish the ones in flight for at most `grace` seconds
        (--drain_timeout_seconds by default), then stop everything."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.shutdown()
        grace = self.options.flags.drain_timeout_seconds if grace is None else grace
        done = self.grpc_server.stop(grace)
        if getattr(self, "rest_server", None) is not None:
            self.rest_server.stop(grace)  # at most `grace`: then open connections are closed
        done.wait(grace + 5)
        self.manager.stop()
        if self.batcher is not None:
            self.batcher.close()
        log.info("server stopped")

    def wait(self) -> None:
        self._stopped.wait()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accresnet serve",
        description="A model server compatible with TF Serving: PredictionService and ModelService over gRPC, "
                    "the REST API, version polling, batching and Prometheus metrics. It takes "
                    "tensorflow_model_server's flags.")
    add_flags(parser)
    return parser


def version_text() -> str:
    """--version, in tensorflow_model_server's words (model_servers/main.cc), without importing TensorFlow."""
    from importlib import metadata

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return (f"TensorFlow ModelServer: accresnet serve {installed('accresnet')} "
            f"(TF Serving API {installed('tensorflow-serving-api')})\n"
            f"TensorFlow Library: {installed('tensorflow')}")


def serve(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT with flags parsed by `add_flags`; the exit status. Logging is the caller's."""
    if args.version:
        print(version_text())
        return 0
    for line in ignored_flags_given(args):
        log.warning("%s", line)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from serving.server.options import OptionsError, options_from_args

    try:
        options = options_from_args(args)
    except OptionsError as error:
        print(f"accresnet serve: error: {error}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: stop.set())
    from serving.server.errors import ServingError

    try:
        server = RunningServer(options)
    except ServingError as error:  # a first config TF Serving would refuse too (a label rule, say)
        print(f"accresnet serve: error: {error.message}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as error:
        print(f"accresnet serve: error: {error}", file=sys.stderr)
        return 1
    # The kernel may hand SIGTERM to any thread (gRPC's, TensorFlow's); Python then runs the handler
    # only when the main thread next runs bytecode, so the main thread must not sleep untimed.
    while not stop.wait(timeout=0.5):
        pass
    log.info("shutting down: finishing requests in flight")
    server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m serving.server`: the server alone, without the accresnet command."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return serve(build_parser().parse_args(argv))
