"""`tensorflow_model_server`'s flags, as `accresnet serve` takes them: one dataclass.

`ServerFlags` holds every flag the server acts on, with its default and its
help; `add_flags` derives the argparse flags from it and `ServerFlags.from_args`
reads them back, so a default is written once. The names and defaults of TF
Serving's flags are TF Serving's (the flags in
tensorflow_serving/model_servers/main.cc, their defaults in Server::Options,
model_servers/server.h), so a script or a Kubernetes manifest starts either
server with the same arguments; a few limits are this server's own.

TF Serving flags that mean nothing here (TensorFlow Lite, TPUs, its C++ thread
pools) are `IGNORED_FLAGS`: accepted, so that a copied command line starts,
and named in one log line each when given (`ignored_flags_given`).

Nothing here imports protobuf or TensorFlow, so `accresnet --help` stays fast;
serving/server/options.py turns the flags into ServerOptions.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import Any

_META = "server_flag"


def schedulable_cpus() -> int:
    """port::NumSchedulableCPUs: the CPUs this process may run on (its affinity), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _four_per_cpu() -> int:
    return 4 * schedulable_cpus()


# TF Serving's thread defaults: 4.0 * port::NumSchedulableCPUs() (Server::Options, model_servers/server.h).
_PER_CPU = "4 per schedulable CPU, as TF Serving: {} here"
_MIB = "{}, 64 MiB"


@dataclasses.dataclass(frozen=True)
class _Help:
    text: str
    own: bool  # a flag of this server's own, not TF Serving's
    default_text: str | None  # how the help shows the default, "{}" standing for it


def _flag(default: Any = dataclasses.MISSING, help: str = "", *, own: bool = False,
          factory: typing.Callable[[], Any] | None = None, default_text: str | None = None) -> Any:
    metadata = {_META: _Help(help, own, default_text)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class ServerFlags:
    """Every flag the server acts on, as given on its command line."""

    # --- TF Serving's flags (model_servers/main.cc), in its order ------------------------------------
    port: int = _flag(8500, "gRPC port; 0 turns the TCP port off (then give --grpc_socket_path)")
    grpc_socket_path: str = _flag("", "also serve gRPC on this UNIX socket (a path)")
    rest_api_port: int = _flag(0, "HTTP/REST port; 0 turns REST off; must differ from --port")
    rest_api_num_threads: int = _flag(help="threads for REST requests", factory=_four_per_cpu,
                                      default_text=_PER_CPU)
    rest_api_timeout_in_ms: int = _flag(30000, "REST call timeout, in milliseconds")
    rest_api_enable_cors_support: bool = _flag(False, "answer REST requests with TF Serving's CORS headers "
                                                      "(any origin, POST and GET, Content-Type)")
    enable_batching: bool = _flag(False, "batch concurrent requests")
    allow_version_labels_for_unavailable_models: bool = _flag(
        False, "let a label that does not exist yet name a version that is not loaded (a first canary still "
               "loading); moving an existing label still needs its new version AVAILABLE, else the whole model "
               "config is refused, as TF Serving refuses it")
    batching_parameters_file: str = _flag("", "ASCII BatchingParameters proto")
    model_config_file: str = _flag("", "ASCII ModelServerConfig proto: several models, version policies and labels")
    model_config_file_poll_wait_seconds: int = _flag(0, "re-read --model_config_file this often; 0 reads it once")
    model_name: str = _flag("default", "name of the model (ignored with --model_config_file)")
    model_base_path: str = _flag("", "folder of numbered versions (ignored with --model_config_file)")
    max_num_load_retries: int = _flag(5, "tries after a version fails to load, --load_retry_interval_micros apart; "
                                         "a version whose files change is tried again at once")
    load_retry_interval_micros: int = _flag(60_000_000, "wait between load tries, in microseconds")
    file_system_poll_wait_seconds: int = _flag(1, "look for new versions this often; 0 looks once")
    tensorflow_session_parallelism: int = _flag(0, "threads of both of TensorFlow's pools (intra-op and inter-op); "
                                                   "0 lets TensorFlow choose. Not together with both of the next two")
    tensorflow_session_config_file: str = _flag("", "ASCII tensorflow.ConfigProto for every model's session; as in "
                                                    "TF Serving, its thread counts are always those of the "
                                                    "--tensorflow_*_parallelism flags")
    tensorflow_intra_op_parallelism: int = _flag(0, "threads one op may use; 0 lets TensorFlow choose")
    tensorflow_inter_op_parallelism: int = _flag(0, "ops run at once; 0 lets TensorFlow choose")
    use_alts_credentials: bool = _flag(False, "gRPC over Google's ALTS (on Google Cloud only); not with "
                                              "--ssl_config_file")
    ssl_config_file: str = _flag("", "ASCII SSLConfig proto: gRPC over TLS")
    per_process_gpu_memory_fraction: float = _flag(0.0, "fraction of each GPU's memory the sessions take at start; "
                                                        "0 lets TensorFlow choose")
    saved_model_tags: str = _flag("", "comma-separated tags of the MetaGraph to load; empty loads 'serve'")
    grpc_channel_arguments: str = _flag("", "comma-separated gRPC server arguments, e.g. "
                                            "grpc.max_receive_message_length=1048576")
    grpc_max_threads: int = _flag(help="threads serving gRPC requests", factory=_four_per_cpu,
                                  default_text=_PER_CPU)
    enable_model_warmup: bool = _flag(True, "replay assets.extra/tf_serving_warmup_requests before a version "
                                            "goes live")
    num_request_iterations_for_warmup: int = _flag(0, "replay each warmup request this often; 0 or 1: once")
    version: bool = _flag(False, "print the server's and TensorFlow's versions and exit")
    monitoring_config_file: str = _flag("", "ASCII MonitoringConfig proto (Prometheus endpoint)")
    mixed_precision: str = _flag("", "bfloat16 rewrites every model's graph to bfloat16 where oneDNN can "
                                     "(auto_mixed_precision_onednn_bfloat16); other values are logged and "
                                     "ignored, as TF Serving does")
    enable_serialization_as_tensor_content: bool = _flag(False, "send Predict outputs (other than strings) as "
                                                                "raw bytes in tensor_content")

    # --- this server's own: where it listens and what one request or client may cost ---------------------
    grpc_bind_address: str = _flag("0.0.0.0", "address the gRPC API listens on; 0.0.0.0, as TF Serving, is "
                                              "every interface", own=True)
    rest_api_bind_address: str = _flag("0.0.0.0", "address the REST API listens on; 0.0.0.0, as TF Serving, "
                                                  "is every interface", own=True)
    # 64 MiB, some 20,000 32x32 RGB images.
    rest_api_max_body_bytes: int = _flag(64 << 20, "largest REST request body; larger ones get 413", own=True,
                                         default_text=_MIB)
    rest_api_max_json_depth: int = _flag(64, "deepest nesting of a REST request's JSON; deeper ones get 400",
                                         own=True)
    rest_api_read_timeout_seconds: float = _flag(
        30.0, "a REST connection that has not sent a request's headers within this time, or then its body "
              "within this time again, is dropped", own=True)
    rest_api_max_connections: int = _flag(0, "open REST connections beyond which new ones get 503 and are "
                                             "closed; 0: a quarter of the open-file limit, at most 1024", own=True)
    drain_timeout_seconds: float = _flag(30.0, "on SIGTERM, how long requests in flight may take to finish before "
                                               "the server closes what is still open and exits", own=True)
    enable_model_reload_rpc: bool = _flag(
        False, "allow ModelService.HandleReloadConfigRequest, which replaces the served models; off by default, "
               "since any client that reaches the port could then unload models or load any SavedModel", own=True)
    model_reload_allowed_roots: str = _flag(
        "", "with --enable_model_reload_rpc: comma-separated folders (or gs://... prefixes) under which a "
            "reloaded model's base_path must lie", own=True,
        default_text="the folders of the models configured at start")
    # The REST body limit: gRPC messages are bounded by it too (after decompression).
    max_request_tensor_bytes: int = _flag(
        64 << 20, "bytes a request's tensors may take once decoded (strings as TensorFlow expands them, "
                  "Classify and Regress examples with their context merged in), checked before any is built; "
                  "gRPC messages may be 4 MiB larger once decompressed, unless grpc.max_receive_message_length "
                  "says otherwise", own=True, default_text=_MIB)
    # What an exported model's signatures take (pipeline/export/input_contract.py).
    max_request_rows: int = _flag(1024, "rows (first dimension) of a Predict request's inputs, or examples of a "
                                        "Classify or Regress request, with or without batching", own=True)
    # Off by default: TF Serving feeds a request's tensors as they come (its quickstart feeds
    # half_plus_two a [3] where it declares [?,1]); the project's models check their inputs in
    # their own graphs (pipeline/export/input_contract.py), which protects TF Serving too.
    check_input_shapes: bool = _flag(False, "refuse an input whose shape the signature does not declare, before "
                                            "the model runs; TF Serving feeds it as it is", own=True)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerFlags:
        """The flags `add_flags` parsed (other attributes of `args` are left alone)."""
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})

    @property
    def load_retry_interval_seconds(self) -> float:
        return self.load_retry_interval_micros / 1e6


@dataclasses.dataclass(frozen=True)
class IgnoredFlag:
    """A TF Serving flag this server accepts and does not act on."""

    name: str
    kind: type
    why: str


# TF Serving's flags (model_servers/main.cc) that mean nothing here, and why.
IGNORED_FLAGS = (
    IgnoredFlag("enable_per_model_batching_parameters", bool,
                "every model batches with --batching_parameters_file; a SavedModel's batching_params.pbtxt "
                "is not read"),
    IgnoredFlag("num_load_threads", int, "versions load one at a time on the version poller, as TF Serving's "
                                         "with its default 0"),
    IgnoredFlag("num_unload_threads", int, "versions unload on the version poller, as TF Serving's with its "
                                           "default 0"),
    IgnoredFlag("flush_filesystem_caches", bool, "TensorFlow's Python file systems keep no cache of model files "
                                                 "for this server to flush"),
    IgnoredFlag("platform_config_file", str, "this server runs SavedModels with TensorFlow only; give session "
                                             "settings with --tensorflow_session_config_file and batching with "
                                             "--enable_batching and --batching_parameters_file"),
    IgnoredFlag("remove_unused_fields_from_bundle_metagraph", bool,
                "a memory saving of TF Serving's C++ bundles; this server keeps only each version's signatures "
                "and graph"),
    IgnoredFlag("prefer_tflite_model", bool, "this server runs SavedModels, not TensorFlow Lite models"),
    IgnoredFlag("num_tflite_pools", int, "this server runs SavedModels, not TensorFlow Lite models"),
    IgnoredFlag("num_tflite_interpreters_per_pool", int, "this server runs SavedModels, not TensorFlow Lite models"),
    IgnoredFlag("xla_cpu_compilation_enabled", bool, "TensorFlow's own XLA settings apply: functions marked "
                                                     "jit_compile compile, nothing else is clustered"),
    IgnoredFlag("xla_gpu_compilation_enabled", bool, "TensorFlow's own XLA settings apply: functions marked "
                                                     "jit_compile compile, nothing else is clustered"),
    IgnoredFlag("enable_profiler", bool, "this server has no profiler service"),
    IgnoredFlag("thread_pool_factory_config_file", str, "requests run on TensorFlow's own pools, sized by the "
                                                        "--tensorflow_*_parallelism flags"),
    IgnoredFlag("skip_initialize_tpu", bool, "this server does not run on TPUs"),
    IgnoredFlag("enable_signature_method_name_check", bool,
                "this server always checks a signature's method_name against the API called (TF Serving only "
                "with this flag), so that it is never friendlier than production"),
    IgnoredFlag("enable_grpc_healthcheck_service", bool, "the standard gRPC health service is always on here "
                                                         "(SERVING once a version is available)"),
)


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _kind(field: dataclasses.Field) -> type:
    return typing.get_type_hints(ServerFlags)[field.name]


def _add(parser: argparse.ArgumentParser, name: str, kind: type, default: Any, text: str) -> None:
    text = text.replace("%", "%%")
    if kind is bool:
        # TF Serving's bools: --enable_batching, --enable_batching=true or =false.
        parser.add_argument(f"--{name}", type=_bool, nargs="?", const=True, default=default, metavar="BOOL",
                            help=text)
    else:
        parser.add_argument(f"--{name}", type=kind, default=default, help=text)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Every TF Serving flag and this server's own, from ServerFlags and IGNORED_FLAGS."""
    own = parser.add_argument_group("this server's own flags (TF Serving has none of these)")
    for field in dataclasses.fields(ServerFlags):
        meta: _Help = field.metadata[_META]
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        shown = meta.default_text.format(default) if meta.default_text else default
        _add(own if meta.own else parser, field.name, _kind(field), default, f"{meta.text} (default: {shown})")
    ignored = parser.add_argument_group("TF Serving flags accepted and ignored (a log line says so when given)")
    for flag in IGNORED_FLAGS:
        _add(ignored, flag.name, flag.kind, None, f"ignored: {flag.why}")


def ignored_flags_given(args: argparse.Namespace) -> list[str]:
    """One line per ignored flag given on the command line: which, and why it changes nothing."""
    return [f"--{flag.name}={getattr(args, flag.name)} is accepted for TF Serving's command lines and ignored: "
            f"{flag.why}" for flag in IGNORED_FLAGS if getattr(args, flag.name, None) is not None]


def tf_serving_flag_names() -> list[str]:
    """TF Serving's flags as this server takes them: those it acts on, then those it ignores."""
    return [field.name for field in dataclasses.fields(ServerFlags) if not field.metadata[_META].own] + [
        flag.name for flag in IGNORED_FLAGS]
