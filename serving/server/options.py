"""The server's flags (serving/server/flags.py) read and checked into ServerOptions.

The configuration files the flags name are TF Serving's ASCII protos and are
read as TF Serving reads them; the checks are TF Serving's (BuildAndStart,
model_servers/server.cc), plus this server's own limits.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from serving.server import protos
from serving.server.batching import BatchingOptions
from serving.server.flags import ServerFlags

log = logging.getLogger(__name__)

# TF Serving accepts messages up to INT_MAX; responses may be as large here.
DEFAULT_GRPC_MAX_SEND = 2**31 - 1
# A gRPC message may exceed its tensors' bytes by its other fields and framing.
GRPC_MESSAGE_SLACK_BYTES = 4 << 20
# --rest_api_max_connections=0: a quarter of the open-file limit, at most this many.
REST_MAX_CONNECTIONS_CAP = 1024


class OptionsError(ValueError):
    """Flags or configuration files the server cannot start with."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerOptions:
    """What the server starts with: its flags, and what they name read and checked."""

    flags: ServerFlags
    model_configs: tuple
    # --rest_api_max_connections with 0 resolved.
    rest_api_max_connections: int
    # --saved_model_tags as tags ("serve" when the flag names none, as in TF Serving).
    saved_model_tags: tuple[str, ...]
    # The tensorflow.ConfigProto every model version's session is created with.
    session_config: object
    grpc_options: tuple[tuple[str, object], ...] = ()
    batching: BatchingOptions | None = None
    metrics_path: str | None = None
    ssl_config: object | None = None
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


def session_config(flags: ServerFlags):
    """The sessions' tensorflow.ConfigProto as TF Serving builds it (BuildAndStart, model_servers/server.cc):
    the file's, its GPU memory fraction and thread counts replaced by the flags (either the per-pool
    flags or --tensorflow_session_parallelism); then --mixed_precision as SavedModelBundleFactory
    applies it (servables/tensorflow/saved_model_bundle_factory.cc)."""
    from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2  # TensorFlow: not before the flags are read

    config = config_pb2.ConfigProto()
    if flags.tensorflow_session_config_file:
        config = _read_text_proto(flags.tensorflow_session_config_file, config, "tensorflow.ConfigProto")
    if not 0.0 <= flags.per_process_gpu_memory_fraction <= 1.0:
        raise OptionsError("--per_process_gpu_memory_fraction must lie between 0 and 1")
    config.gpu_options.per_process_gpu_memory_fraction = flags.per_process_gpu_memory_fraction
    intra, inter, both = (flags.tensorflow_intra_op_parallelism, flags.tensorflow_inter_op_parallelism,
                          flags.tensorflow_session_parallelism)
    if intra > 0 and inter > 0 and both > 0:
        raise OptionsError("give either --tensorflow_session_parallelism or --tensorflow_intra_op_parallelism "
                           "and --tensorflow_inter_op_parallelism, not all three")
    if min(intra, inter, both) < 0:
        raise OptionsError("the --tensorflow_*_parallelism flags cannot be negative")
    if intra > 0 or inter > 0:
        config.intra_op_parallelism_threads, config.inter_op_parallelism_threads = intra, inter
    else:
        config.intra_op_parallelism_threads = config.inter_op_parallelism_threads = both
    if flags.mixed_precision == "bfloat16":
        config.graph_options.rewrite_options.auto_mixed_precision_onednn_bfloat16 = \
            rewriter_config_pb2.RewriterConfig.ON
    elif flags.mixed_precision:
        log.warning("%s auto mixed precision is not supported. Valid option: bfloat16", flags.mixed_precision)
    return config


def _reload_roots(flags: ServerFlags, models: list) -> tuple[str, ...] | None:
    if not flags.enable_model_reload_rpc:
        if flags.model_reload_allowed_roots:
            raise OptionsError("--model_reload_allowed_roots needs --enable_model_reload_rpc")
        return None
    roots = [root.strip() for root in flags.model_reload_allowed_roots.split(",") if root.strip()]
    if not roots:
        roots = [model.base_path.rstrip("/").rsplit("/", 1)[0] or "/" for model in models]
    return tuple(dict.fromkeys(roots))


def _default_rest_connections() -> int:
    """A quarter of the descriptors, so that REST clients alone cannot starve gRPC and model files."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return REST_MAX_CONNECTIONS_CAP
    return max(1, min(REST_MAX_CONNECTIONS_CAP, soft // 4))


def _check_numbers(flags: ServerFlags) -> None:
    for flag in ("max_request_tensor_bytes", "max_request_rows", "rest_api_max_body_bytes",
                 "rest_api_max_json_depth", "rest_api_read_timeout_seconds", "rest_api_num_threads",
                 "grpc_max_threads"):
        if getattr(flags, flag) <= 0:
            raise OptionsError(f"--{flag} must be positive")
    if flags.rest_api_max_connections < 0 or flags.drain_timeout_seconds < 0:
        raise OptionsError("--rest_api_max_connections and --drain_timeout_seconds cannot be negative")
    # TF Serving's own checks (BuildAndStart, model_servers/server.cc).
    if flags.port == 0 and not flags.grpc_socket_path:
        raise OptionsError("--port=0 turns the gRPC port off: give another --port or a --grpc_socket_path")
    if flags.use_alts_credentials and flags.ssl_config_file:
        raise OptionsError("give --use_alts_credentials or --ssl_config_file, not both")
    if flags.batching_parameters_file and not flags.enable_batching:
        raise OptionsError("--batching_parameters_file is set without --enable_batching")
    if flags.rest_api_port and flags.rest_api_port == flags.port:
        raise OptionsError("--rest_api_port must differ from --port")


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    """The options of flags parsed by serving.server.flags.add_flags."""
    return options_from_flags(ServerFlags.from_args(args))


def options_from_flags(flags: ServerFlags) -> ServerOptions:
    """Read and check what the flags name: the model config, batching, monitoring and TLS files."""
    if flags.model_config_file:
        models = read_model_config_file(flags.model_config_file)
    elif flags.model_base_path:
        models = [model_server_config_pb2.ModelConfig(name=flags.model_name, base_path=flags.model_base_path,
                                                      model_platform="tensorflow")]
    else:
        raise OptionsError("give --model_base_path (with --model_name) or --model_config_file")
    _check_numbers(flags)
    batching = None
    if flags.enable_batching:
        parameters = protos.BatchingParameters()
        if flags.batching_parameters_file:
            parameters = _read_text_proto(flags.batching_parameters_file, parameters, "BatchingParameters")
        try:
            batching = BatchingOptions.from_proto(parameters)
        except ValueError as error:
            raise OptionsError(f"batching parameters: {error}") from None
    metrics_path = None
    if flags.monitoring_config_file:
        monitoring = _read_text_proto(flags.monitoring_config_file, protos.MonitoringConfig(), "MonitoringConfig")
        if monitoring.prometheus_config.enable:
            from serving.server.metrics import DEFAULT_PATH

            metrics_path = monitoring.prometheus_config.path or DEFAULT_PATH
            if not metrics_path.startswith("/"):
                raise OptionsError(f"prometheus_config path must start with '/': {metrics_path!r}")
    ssl_config = None
    if flags.ssl_config_file:
        ssl_config = _read_text_proto(flags.ssl_config_file, protos.SSLConfig(), "SSLConfig")
        if not ssl_config.server_key or not ssl_config.server_cert:
            raise OptionsError(f"{flags.ssl_config_file}: SSLConfig needs server_key and server_cert (PEM text)")
    # No SO_REUSEPORT: a second server on the same port must fail to start, not share the traffic.
    # Requests no larger than what their tensors may take: gRPC checks the limit after
    # decompression, so a small gzip body cannot inflate to gigabytes (TF Serving takes INT_MAX).
    grpc_options = dict([("grpc.max_receive_message_length", flags.max_request_tensor_bytes + GRPC_MESSAGE_SLACK_BYTES),
                         ("grpc.max_send_message_length", DEFAULT_GRPC_MAX_SEND), ("grpc.so_reuseport", 0)])
    grpc_options.update(_grpc_arguments(flags.grpc_channel_arguments))
    # TF Serving splits the flag on commas and loads "serve" when it names no tag.
    tags = tuple(tag for tag in flags.saved_model_tags.split(",") if tag) or ("serve",)
    return ServerOptions(
        flags=flags, model_configs=tuple(models), batching=batching, metrics_path=metrics_path,
        ssl_config=ssl_config, grpc_options=tuple(grpc_options.items()), reload_roots=_reload_roots(flags, models),
        session_config=session_config(flags), saved_model_tags=tags,
        rest_api_max_connections=flags.rest_api_max_connections or _default_rest_connections())
