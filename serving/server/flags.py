"""`tensorflow_model_server`'s flags, as `accresnet serve` takes them.

The flag names and defaults are TF Serving's (a script or a Kubernetes
manifest starts either server with the same arguments), plus a few limits of
this server's own. Nothing here imports protobuf or TensorFlow, so `accresnet
--help` stays fast; serving/server/options.py turns the parsed flags into
ServerOptions.
"""

from __future__ import annotations

import argparse

# What a request's tensors may take once decoded: 64 MiB, the REST body limit, some
# 20,000 32x32 RGB images. gRPC messages are bounded by it too (after decompression).
DEFAULT_MAX_REQUEST_TENSOR_BYTES = 64 << 20
# A gRPC message may exceed its tensors' bytes by its other fields and framing.
GRPC_MESSAGE_SLACK_BYTES = 4 << 20
# Rows (examples) of one request, with or without batching: what an exported model's
# signatures take (pipeline/input_contract.py).
DEFAULT_MAX_REQUEST_ROWS = 1024

# REST limits and drain (flags of their own: TF Serving has none of these).
DEFAULT_REST_MAX_BODY_BYTES = 64 << 20
DEFAULT_REST_MAX_JSON_DEPTH = 64
DEFAULT_REST_READ_TIMEOUT_SECONDS = 30.0
DEFAULT_REST_MAX_CONNECTIONS = 1024
DEFAULT_DRAIN_TIMEOUT_SECONDS = 30.0


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


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
    add("--allow_version_labels_for_unavailable_models", type=_bool, nargs="?", const=True, default=False,
        help="let a label that does not exist yet name a version that is not loaded (a first canary still "
             "loading); moving an existing label still needs its new version AVAILABLE, else the whole model "
             "config is refused, as TF Serving refuses it")
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
    add("--tensorflow_session_parallelism", type=int, default=0,
        help="threads of both of TensorFlow's pools (intra-op and inter-op); 0 lets TensorFlow choose. Not "
             "together with both of the next two (default: %(default)s)")
    add("--tensorflow_intra_op_parallelism", type=int, default=0,
        help="threads one op may use; 0 lets TensorFlow choose (default: %(default)s)")
    add("--tensorflow_inter_op_parallelism", type=int, default=0,
        help="ops run at once; 0 lets TensorFlow choose (default: %(default)s)")
    add("--tensorflow_session_config_file", default="",
        help="ASCII tensorflow.ConfigProto for every model's session; as in TF Serving, its thread counts "
             "are always those of the three flags above")
    add("--max_request_tensor_bytes", type=int, default=DEFAULT_MAX_REQUEST_TENSOR_BYTES,
        help="bytes a request's tensors may take once decoded (strings as TensorFlow expands them, "
             "Classify and Regress examples with their context merged in), checked before any is built; "
             "gRPC messages may be 4 MiB larger once decompressed, unless grpc.max_receive_message_length "
             "says otherwise (default: %(default)s, 64 MiB)")
    add("--max_request_rows", type=int, default=DEFAULT_MAX_REQUEST_ROWS,
        help="rows (first dimension) of a Predict request's inputs, or examples of a Classify or Regress "
             "request, with or without batching (default: %(default)s)")
    add("--check_input_shapes", type=_bool, nargs="?", const=True, default=True,
        help="refuse an input whose shape the signature does not declare, before the model runs; false feeds "
             "it as it is, as TF Serving does, for graphs that take other shapes than they declare "
             "(default: %(default)s)")


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
