"""`tensorflow_model_server`'s flags and configuration files.

The flag names, defaults and file formats (ASCII protos) are TF Serving's, so
a script or a Kubernetes manifest can start either server with the same
arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from serving.server import protos
from serving.server.batching import BatchingOptions

DEFAULT_GRPC_MAX_MESSAGE = 2**31 - 1  # TF Serving accepts messages up to INT_MAX
# What a request's tensors may declare once decoded: 256 MiB, some 80,000 32x32 RGB images.
DEFAULT_MAX_REQUEST_TENSOR_BYTES = 256 << 20


class OptionsError(ValueError):
    """Flags or configuration files the server cannot start with."""


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


# REST limits and drain (flags of their own: TF Serving has none of these).
DEFAULT_REST_MAX_BODY_BYTES = 64 << 20
DEFAULT_REST_MAX_JSON_DEPTH = 64
DEFAULT_REST_READ_TIMEOUT_SECONDS = 30.0
DEFAULT_REST_MAX_CONNECTIONS = 1024
DEFAULT_DRAIN_TIMEOUT_SECONDS = 30.0


def add_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--port", type=int, default=8500, help="gRPC port (default: %(default)s)")
    add("--rest_api_port", type=int, default=0, help="HTTP/REST port; 0 turns REST off (default: %(default)s)")
    add("--rest_api_num_threads", type=int, default=16, help="threads for REST requests (default: %(default)s)")
    add("--rest_api_timeout_in_ms", type=int, default=30000, help="REST call timeout (default: %(default)s)")
    _add_rest_flags(add)
    add("--model_name", default="default", help="name of the model (ignored with --model_config_file)")
    add("--model_base_path", default="", help="folder of numbered versions (ignored with --model_config_file)")
    add("--model_config_file", default="", help="ASCII ModelServerConfig proto: several models, version policies "
                                                 "and labels")
    add("--model_config_file_poll_wait_seconds", type=int, default=0,
        help="re-read --model_config_file this often; 0 reads it once (default: %(default)s)")
    add("--file_system_poll_wait_seconds", type=int, default=1,
        help="look for new versions this often; 0 looks once (default: %(default)s)")
    add("--enable_batching", type=_bool, nargs="?", const=True, default=False, help="batch concurrent requests")
    add("--batching_parameters_file", default="", help="ASCII BatchingParameters proto")
    add("--monitoring_config_file", default="", help="ASCII MonitoringConfig proto (Prometheus endpoint)")
    add("--ssl_config_file", default="", help="ASCII SSLConfig proto: gRPC over TLS")
    add("--grpc_channel_arguments", default="",
        help="comma-separated gRPC server arguments, e.g. grpc.max_receive_message_length=1048576")
    add("--enable_model_warmup", type=_bool, nargs="?", const=True, default=True,
        help="replay assets.extra/tf_serving_warmup_requests before a version goes live (default: true)")
    add("--grpc_max_threads", type=int, default=32, help="threads serving gRPC requests (default: %(default)s)")
    add("--max_num_load_retries", type=int, default=5,
        help="tries after a version fails to load, --load_retry_interval_micros apart; a version whose files "
             "change is tried again at once (default: %(default)s)")
    add("--load_retry_interval_micros", type=int, default=60_000_000,
        help="wait between load tries, in microseconds (default: %(default)s)")
    add("--grpc_bind_address", default="0.0.0.0",
        help="address the gRPC API listens on; 0.0.0.0, as TF Serving, is every interface (default: %(default)s)")
    add("--enable_model_reload_rpc", type=_bool, nargs="?", const=True, default=False,
        help="allow ModelService.HandleReloadConfigRequest, which replaces the served models; off by default, "
             "since any client that reaches the port could then unload models or load any SavedModel")
    add("--model_reload_allowed_roots", default="",
        help="with --enable_model_reload_rpc: comma-separated folders (or gs://... prefixes) under which a "
             "reloaded model's base_path must lie (default: the folders of the models configured at start)")
    add("--max_request_tensor_bytes", type=int, default=DEFAULT_MAX_REQUEST_TENSOR_BYTES,
        help="bytes a Predict request's tensors may declare once decoded, checked before they are "
             "(default: %(default)s, 256 MiB)")


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    port: int = 8500
    rest_api_port: int = 0
    rest_api_num_threads: int = 16
    rest_api_timeout_in_ms: int = 30000
    # REST hardening (not TF Serving flags): where REST listens and what one client may cost.
    rest_api_bind_address: str = "0.0.0.0"
    rest_api_max_body_bytes: int = DEFAULT_REST_MAX_BODY_BYTES
    rest_api_max_json_depth: int = DEFAULT_REST_MAX_JSON_DEPTH
    rest_api_read_timeout_seconds: float = DEFAULT_REST_READ_TIMEOUT_SECONDS
    rest_api_max_connections: int = DEFAULT_REST_MAX_CONNECTIONS
    drain_timeout_seconds: float = DEFAULT_DRAIN_TIMEOUT_SECONDS
    model_configs: tuple = ()
    model_config_file: str = ""
    model_config_file_poll_wait_seconds: int = 0
    file_system_poll_wait_seconds: int = 1
    batching: BatchingOptions | None = None
    metrics_path: str | None = None
    ssl_config: object | None = None
    grpc_options: tuple[tuple[str, object], ...] = ()
    enable_model_warmup: bool = True
    grpc_max_threads: int = 32
    max_request_tensor_bytes: int = DEFAULT_MAX_REQUEST_TENSOR_BYTES
    grpc_bind_address: str = "0.0.0.0"
    max_num_load_retries: int = 5
    load_retry_interval_micros: int = 60_000_000
    # Roots under which HandleReloadConfigRequest may load base paths; None turns the RPC off.
    reload_roots: tuple[str, ...] | None = None


def _read_text_proto(path: str, message, what: str):
    try:
        text = pathlib.Path(path).read_text()
    except OSError as error:
        raise OptionsError(f"cannot read the {what} {path}: {error}") from None
    try:
        return text_format.Parse(text, message)
    except text_format.ParseError as error:
        raise OptionsError(f"{path} is not a valid {what}: {error}") from None


def read_model_config_file(path: str) -> list:
    config = _read_text_proto(path, model_server_config_pb2.ModelServerConfig(), "ModelServerConfig")
    if config.WhichOneof("config") != "model_config_list":
        raise OptionsError(f"{path}: only model_config_list configurations are supported")
    models = list(config.model_config_list.config)
    for model in models:
        if not model.name or not model.base_path:
            raise OptionsError(f"{path}: every model needs a name and a base_path")
    return models


def _grpc_arguments(text: str) -> tuple[tuple[str, object], ...]:
    arguments = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, separator, value = item.partition("=")
        if not separator:
            raise OptionsError(f"--grpc_channel_arguments: {item!r} is not key=value")
        arguments.append((key.strip(), int(value) if value.strip().lstrip("-").isdigit() else value.strip()))
    return tuple(arguments)


def _reload_roots(args: argparse.Namespace, models: list) -> tuple[str, ...] | None:
    if not args.enable_model_reload_rpc:
        if args.model_reload_allowed_roots:
            raise OptionsError("--model_reload_allowed_roots needs --enable_model_reload_rpc")
        return None
    roots = [root.strip() for root in args.model_reload_allowed_roots.split(",") if root.strip()]
    if not roots:
        roots = [model.base_path.rstrip("/").rsplit("/", 1)[0] or "/" for model in models]
    return tuple(dict.fromkeys(roots))


# --- REST limits, bind address and drain -------------------------------------------------------------

def _add_rest_flags(add) -> None:
    add("--rest_api_bind_address", default="0.0.0.0",
        help="address the REST API listens on; 0.0.0.0, as TF Serving, is every interface (default: %(default)s)")
    add("--rest_api_max_body_bytes", type=int, default=DEFAULT_REST_MAX_BODY_BYTES,
        help="largest REST request body; larger ones get 413 (default: %(default)s, 64 MiB)")
    add("--rest_api_max_json_depth", type=int, default=DEFAULT_REST_MAX_JSON_DEPTH,
        help="deepest nesting of a REST request's JSON; deeper ones get 400 (default: %(default)s)")
    add("--rest_api_read_timeout_seconds", type=float, default=DEFAULT_REST_READ_TIMEOUT_SECONDS,
        help="a REST connection that has not sent a request's headers within this time, or then its body "
             "within this time again, is dropped (default: %(default)s)")
    add("--rest_api_max_connections", type=int, default=0,
        help="open REST connections beyond which new ones get 503 and are closed; 0: a quarter of the "
             f"open-file limit, at most {DEFAULT_REST_MAX_CONNECTIONS} (default: %(default)s)")
    add("--drain_timeout_seconds", type=float, default=DEFAULT_DRAIN_TIMEOUT_SECONDS,
        help="on SIGTERM, how long requests in flight may take to finish before the server closes what is "
             "still open and exits (default: %(default)s)")


def _default_rest_connections() -> int:
    """A quarter of the descriptors, so that REST clients alone cannot starve gRPC and model files."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DEFAULT_REST_MAX_CONNECTIONS
    return max(1, min(DEFAULT_REST_MAX_CONNECTIONS, soft // 4))


def _rest_options(args: argparse.Namespace) -> dict:
    for flag in ("rest_api_max_body_bytes", "rest_api_max_json_depth", "rest_api_read_timeout_seconds"):
        if getattr(args, flag) <= 0:
            raise OptionsError(f"--{flag} must be positive")
    if args.rest_api_max_connections < 0 or args.drain_timeout_seconds < 0:
        raise OptionsError("--rest_api_max_connections and --drain_timeout_seconds cannot be negative")
    return dict(rest_api_bind_address=args.rest_api_bind_address,
                rest_api_max_body_bytes=args.rest_api_max_body_bytes,
                rest_api_max_json_depth=args.rest_api_max_json_depth,
                rest_api_read_timeout_seconds=args.rest_api_read_timeout_seconds,
                rest_api_max_connections=args.rest_api_max_connections or _default_rest_connections(),
                drain_timeout_seconds=args.drain_timeout_seconds)


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    if args.model_config_file:
        models = read_model_config_file(args.model_config_file)
    elif args.model_base_path:
        models = [model_server_config_pb2.ModelConfig(name=args.model_name, base_path=args.model_base_path,
                                                      model_platform="tensorflow")]
    else:
        raise OptionsError("give --model_base_path (with --model_name) or --model_config_file")
    if args.rest_api_port and args.rest_api_port == args.port:
        raise OptionsError("--rest_api_port must differ from --port")
    batching = None
    if args.enable_batching:
        parameters = protos.BatchingParameters()
        if args.batching_parameters_file:
            parameters = _read_text_proto(args.batching_parameters_file, parameters, "BatchingParameters")
        try:
            batching = BatchingOptions.from_proto(parameters)
        except ValueError as error:
            raise OptionsError(f"batching parameters: {error}") from None
    metrics_path = None
    if args.monitoring_config_file:
        monitoring = _read_text_proto(args.monitoring_config_file, protos.MonitoringConfig(), "MonitoringConfig")
        if monitoring.prometheus_config.enable:
            from serving.server.metrics import DEFAULT_PATH

            metrics_path = monitoring.prometheus_config.path or DEFAULT_PATH
            if not metrics_path.startswith("/"):
                raise OptionsError(f"prometheus_config path must start with '/': {metrics_path!r}")
    ssl_config = None
    if args.ssl_config_file:
        ssl_config = _read_text_proto(args.ssl_config_file, protos.SSLConfig(), "SSLConfig")
        if not ssl_config.server_key or not ssl_config.server_cert:
            raise OptionsError(f"{args.ssl_config_file}: SSLConfig needs server_key and server_cert (PEM text)")
    # No SO_REUSEPORT: a second server on the same port must fail to start, not share the traffic.
    grpc_options = dict([("grpc.max_receive_message_length", DEFAULT_GRPC_MAX_MESSAGE),
                         ("grpc.max_send_message_length", DEFAULT_GRPC_MAX_MESSAGE), ("grpc.so_reuseport", 0)])
    grpc_options.update(_grpc_arguments(args.grpc_channel_arguments))
    return ServerOptions(
        port=args.port, rest_api_port=args.rest_api_port, rest_api_num_threads=args.rest_api_num_threads,
        rest_api_timeout_in_ms=args.rest_api_timeout_in_ms, model_configs=tuple(models),
        model_config_file=args.model_config_file,
        model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds, batching=batching,
        metrics_path=metrics_path, ssl_config=ssl_config, grpc_options=tuple(grpc_options.items()),
        enable_model_warmup=args.enable_model_warmup, grpc_max_threads=args.grpc_max_threads,
        max_request_tensor_bytes=args.max_request_tensor_bytes, grpc_bind_address=args.grpc_bind_address,
        reload_roots=_reload_roots(args, models), max_num_load_retries=args.max_num_load_retries,
        load_retry_interval_micros=args.load_retry_interval_micros,
        **_rest_options(args),
    )
