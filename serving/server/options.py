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
from serving.server.flags import (DEFAULT_DRAIN_TIMEOUT_SECONDS, DEFAULT_MAX_REQUEST_ROWS,
                                  DEFAULT_MAX_REQUEST_TENSOR_BYTES, GRPC_MESSAGE_SLACK_BYTES,
                                  DEFAULT_REST_MAX_BODY_BYTES, DEFAULT_REST_MAX_CONNECTIONS,
                                  DEFAULT_REST_MAX_JSON_DEPTH, DEFAULT_REST_READ_TIMEOUT_SECONDS)

# TF Serving accepts messages up to INT_MAX; responses may be as large here.
DEFAULT_GRPC_MAX_SEND = 2**31 - 1


class OptionsError(ValueError):
    """Flags or configuration files the server cannot start with."""


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
    # TF Serving's rule for labels on versions that are not loaded (serving/server/manager.py).
    allow_version_labels_for_unavailable_models: bool = False
    file_system_poll_wait_seconds: int = 1
    batching: BatchingOptions | None = None
    metrics_path: str | None = None
    ssl_config: object | None = None
    grpc_options: tuple[tuple[str, object], ...] = ()
    enable_model_warmup: bool = True
    grpc_max_threads: int = 32
    max_request_tensor_bytes: int = DEFAULT_MAX_REQUEST_TENSOR_BYTES
    max_request_rows: int = DEFAULT_MAX_REQUEST_ROWS
    check_input_shapes: bool = True
    grpc_bind_address: str = "0.0.0.0"
    max_num_load_retries: int = 5
    load_retry_interval_micros: int = 60_000_000
    # Roots under which HandleReloadConfigRequest may load base paths; None turns the RPC off.
    reload_roots: tuple[str, ...] | None = None
    # The tensorflow.ConfigProto every model version's session is created with; None: TensorFlow's defaults.
    session_config: object | None = None


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
    names = set()
    for model in models:
        if not model.name or not model.base_path:
            raise OptionsError(f"{path}: every model needs a name and a base_path")
        if model.name in names:  # TF Serving's ValidateModelConfigList (model_servers/server_core.cc)
            raise OptionsError(f"{path}: Illegal to list model {model.name} multiple times in config list")
        names.add(model.name)
    return models


def _grpc_arguments(text: str) -> tuple[tuple[str, object], ...]:
    arguments = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, separator, value = item.partition("=")
        if not separator:
            raise OptionsError(f"--grpc_channel_arguments: {item!r} is not key=value")
        arguments.append((key.strip(), int(value) if value.strip().lstrip("-").isdigit() else value.strip()))
    return tuple(arguments)


def session_config(args: argparse.Namespace):
    """The sessions' tensorflow.ConfigProto as TF Serving builds it: the file's, then its thread
    counts replaced by the flags (either the per-pool flags or --tensorflow_session_parallelism)."""
    from tensorflow.core.protobuf import config_pb2  # imports TensorFlow: not before the flags are read

    config = config_pb2.ConfigProto()
    if args.tensorflow_session_config_file:
        config = _read_text_proto(args.tensorflow_session_config_file, config, "tensorflow.ConfigProto")
    intra, inter, both = (args.tensorflow_intra_op_parallelism, args.tensorflow_inter_op_parallelism,
                          args.tensorflow_session_parallelism)
    if intra > 0 and inter > 0 and both > 0:
        raise OptionsError("give either --tensorflow_session_parallelism or --tensorflow_intra_op_parallelism "
                           "and --tensorflow_inter_op_parallelism, not all three")
    if min(intra, inter, both) < 0:
        raise OptionsError("the --tensorflow_*_parallelism flags cannot be negative")
    if intra > 0 or inter > 0:
        config.intra_op_parallelism_threads, config.inter_op_parallelism_threads = intra, inter
    else:
        config.intra_op_parallelism_threads = config.inter_op_parallelism_threads = both
    return config


def _reload_roots(args: argparse.Namespace, models: list) -> tuple[str, ...] | None:
    if not args.enable_model_reload_rpc:
        if args.model_reload_allowed_roots:
            raise OptionsError("--model_reload_allowed_roots needs --enable_model_reload_rpc")
        return None
    roots = [root.strip() for root in args.model_reload_allowed_roots.split(",") if root.strip()]
    if not roots:
        roots = [model.base_path.rstrip("/").rsplit("/", 1)[0] or "/" for model in models]
    return tuple(dict.fromkeys(roots))


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
    for flag in ("max_request_tensor_bytes", "max_request_rows"):
        if getattr(args, flag) < 1:
            raise OptionsError(f"--{flag} must be positive")
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
    # Requests no larger than what their tensors may take: gRPC checks the limit after
    # decompression, so a small gzip body cannot inflate to gigabytes (TF Serving takes INT_MAX).
    grpc_options = dict([("grpc.max_receive_message_length", args.max_request_tensor_bytes + GRPC_MESSAGE_SLACK_BYTES),
                         ("grpc.max_send_message_length", DEFAULT_GRPC_MAX_SEND), ("grpc.so_reuseport", 0)])
    grpc_options.update(_grpc_arguments(args.grpc_channel_arguments))
    return ServerOptions(
        port=args.port, rest_api_port=args.rest_api_port, rest_api_num_threads=args.rest_api_num_threads,
        rest_api_timeout_in_ms=args.rest_api_timeout_in_ms, model_configs=tuple(models),
        model_config_file=args.model_config_file,
        model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
        allow_version_labels_for_unavailable_models=args.allow_version_labels_for_unavailable_models,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds, batching=batching,
        metrics_path=metrics_path, ssl_config=ssl_config, grpc_options=tuple(grpc_options.items()),
        enable_model_warmup=args.enable_model_warmup, grpc_max_threads=args.grpc_max_threads,
        max_request_tensor_bytes=args.max_request_tensor_bytes, grpc_bind_address=args.grpc_bind_address,
        max_request_rows=args.max_request_rows, check_input_shapes=args.check_input_shapes,
        reload_roots=_reload_roots(args, models), max_num_load_retries=args.max_num_load_retries,
        load_retry_interval_micros=args.load_retry_interval_micros, session_config=session_config(args),
        **_rest_options(args),
    )
