"""`accresnet serve` takes every flag of TF Serving's tensorflow_model_server, with TF Serving's
defaults, from one dataclass; the flags it implements change what the server does, the others
are named in one log line each."""

import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2, prediction_service_pb2_grpc

from helpers import REPO, free_ports
from serving.server.flags import IGNORED_FLAGS, ServerFlags, ignored_flags_given, schedulable_cpus, \
    tf_serving_flag_names
from serving.server.main import RunningServer, build_parser
from serving.server.options import OptionsError, options_from_args
from tf1_model import build_tf1_saved_model

# Every tensorflow::Flag of tensorflow_serving/model_servers/main.cc (TF Serving at 9d981c5c), in its order.
TF_SERVING_FLAGS = [
    "port", "grpc_socket_path", "rest_api_port", "rest_api_num_threads", "rest_api_timeout_in_ms",
    "rest_api_enable_cors_support", "enable_batching", "allow_version_labels_for_unavailable_models",
    "batching_parameters_file", "enable_per_model_batching_parameters", "model_config_file",
    "model_config_file_poll_wait_seconds", "model_name", "model_base_path", "num_load_threads",
    "num_unload_threads", "max_num_load_retries", "load_retry_interval_micros", "file_system_poll_wait_seconds",
    "flush_filesystem_caches", "tensorflow_session_parallelism", "tensorflow_session_config_file",
    "tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism", "use_alts_credentials",
    "ssl_config_file", "platform_config_file", "per_process_gpu_memory_fraction", "saved_model_tags",
    "grpc_channel_arguments", "grpc_max_threads", "enable_model_warmup", "num_request_iterations_for_warmup",
    "version", "monitoring_config_file", "remove_unused_fields_from_bundle_metagraph", "prefer_tflite_model",
    "num_tflite_pools", "num_tflite_interpreters_per_pool", "enable_signature_method_name_check",
    "xla_cpu_compilation_enabled", "xla_gpu_compilation_enabled", "enable_profiler",
    "thread_pool_factory_config_file", "mixed_precision", "skip_initialize_tpu", "enable_grpc_healthcheck_service",
    "enable_serialization_as_tensor_content",
]


def parse(*flags):
    return build_parser().parse_args(list(flags))


def options(*flags):
    return options_from_args(parse("--model_base_path=/m", *flags))


# --- the flags themselves (no server) -------------------------------------------------------------


def test_every_tf_serving_flag_is_taken_and_no_other_is_passed_off_as_one():
    assert sorted(tf_serving_flag_names()) == sorted(TF_SERVING_FLAGS)
    actions = {action.dest: action for action in build_parser()._actions}
    for name in TF_SERVING_FLAGS:  # a copied command line: --name=value for each
        value = {"int": "1", "float": "0.5", "str": "x"}.get(getattr(actions[name].type, "__name__", ""), "true")
        assert getattr(parse(f"--{name}={value}"), name) is not None, name


def test_defaults_are_the_dataclass_ones_and_tf_servings_thread_counts():
    assert ServerFlags.from_args(parse()) == ServerFlags()
    # Server::Options (model_servers/server.h): 4.0 * port::NumSchedulableCPUs() for both.
    assert ServerFlags().grpc_max_threads == ServerFlags().rest_api_num_threads == 4 * schedulable_cpus()
    help_text = " ".join(build_parser().format_help().split())
    assert f"(default: 4 per schedulable CPU, as TF Serving: {4 * schedulable_cpus()} here)" in help_text


def test_ignored_flags_are_named_once_each_only_when_given():
    assert ignored_flags_given(parse()) == []
    lines = ignored_flags_given(parse("--enable_profiler=false", "--num_load_threads=4", "--saved_model_tags=serve"))
    assert len(lines) == 2
    assert lines[0].startswith("--num_load_threads=4 is accepted for TF Serving's command lines and ignored: ")
    assert lines[1].startswith("--enable_profiler=False is accepted") and "no profiler service" in lines[1]
    assert all(flag.why for flag in IGNORED_FLAGS)


@pytest.mark.parametrize("flags, message", [
    (["--port=0"], "--port=0 turns the gRPC port off"),
    (["--use_alts_credentials", "--ssl_config_file=/tls.config"], "--use_alts_credentials or --ssl_config_file"),
    (["--batching_parameters_file=/b.config"], "without --enable_batching"),
    (["--per_process_gpu_memory_fraction=1.5"], "between 0 and 1"),
    (["--grpc_max_threads=0"], "--grpc_max_threads must be positive"),
])
def test_tf_servings_start_up_checks(flags, message):
    with pytest.raises(OptionsError, match=message):
        options(*flags)


def test_session_and_loading_flags_reach_the_options(caplog):
    chosen = options("--per_process_gpu_memory_fraction=0.25", "--mixed_precision=bfloat16",
                     "--saved_model_tags=serve,gpu")
    assert chosen.session_config.gpu_options.per_process_gpu_memory_fraction == 0.25
    from tensorflow.core.protobuf import rewriter_config_pb2

    assert chosen.session_config.graph_options.rewrite_options.auto_mixed_precision_onednn_bfloat16 == \
        rewriter_config_pb2.RewriterConfig.ON
    assert chosen.saved_model_tags == ("serve", "gpu")
    assert options().saved_model_tags == ("serve",)
    options("--mixed_precision=fp16")  # TF Serving warns and goes on
    assert "fp16 auto mixed precision is not supported. Valid option: bfloat16" in caplog.text


@pytest.mark.slow  # starts a process
def test_version_answers_without_tensorflow():
    code = ("import sys; from pipeline import cli\n"
            "status = cli.main(['serve', '--version'])\n"
            "assert status == 0 and 'tensorflow' not in sys.modules, sorted(sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("TensorFlow ModelServer: accresnet serve ")
    assert f"TensorFlow Library: {tf.__version__}" in result.stdout


# --- what the implemented flags do ------------------------------------------------------------------


def _warm_up_records(path, count):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tf1"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.ones((1, 2), np.float32)))
    (path / "assets.extra").mkdir(parents=True)
    with tf.io.TFRecordWriter(str(path / "assets.extra" / "tf_serving_warmup_requests")) as writer:
        for _ in range(count):
            entry = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(entry.SerializeToString())


def test_warmup_iterations_and_tensor_content(tmp_path):
    from serving.server.servable import Servable
    from serving.server.service import ModelServer, _direct_runner

    build_tf1_saved_model(str(tmp_path / "tf1" / "1"))
    _warm_up_records(tmp_path / "tf1" / "1", 2)
    runs = []

    def counting(*args):
        runs.append(args[1].key)
        return _direct_runner(*args)

    flags = [f"--model_base_path={tmp_path / 'tf1'}", "--model_name=tf1"]
    servable = Servable("tf1", 1, str(tmp_path / "tf1" / "1"))
    ModelServer(options_from_args(parse(*flags, "--num_request_iterations_for_warmup=3")), counting).warm_up(servable)
    assert runs == ["serving_default"] * 6  # 2 records, 3 times each
    request = predict_pb2.PredictRequest()
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([[1.0, 2.0]], np.float32)))
    plain = ModelServer(options_from_args(parse(*flags))).predict(request, servable).outputs["y"]
    packed = ModelServer(options_from_args(parse(*flags, "--enable_serialization_as_tensor_content"))
                         ).predict(request, servable).outputs["y"]
    assert list(plain.float_val) == [0.5] and not plain.tensor_content  # y = 2 * 1 - 2 + 0.5
    assert packed.tensor_content and not packed.float_val
    np.testing.assert_array_equal(tf.make_ndarray(packed), tf.make_ndarray(plain))


@pytest.mark.slow  # starts servers
def test_socket_cors_and_tags_on_a_running_server(tmp_path):
    build_tf1_saved_model(str(tmp_path / "tf1" / "1"))
    socket = tmp_path / "grpc.sock"
    rest_port, = free_ports(1)
    server = RunningServer(options(f"--model_base_path={tmp_path / 'tf1'}", "--model_name=tf1", "--port=0",
                                   f"--grpc_socket_path={socket}", f"--rest_api_port={rest_port}",
                                   "--rest_api_enable_cors_support"))
    try:
        assert server.port is None  # --port=0: no TCP port, as in TF Serving
        with grpc.insecure_channel(f"unix:{socket}") as channel:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "tf1"
            request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 2), np.float32)))
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
            np.testing.assert_allclose(tf.make_ndarray(response.outputs["y"]), [[0.5]])
        url = f"http://localhost:{rest_port}/v1/models/tf1"
        with urllib.request.urlopen(url, timeout=30) as reply:
            assert reply.headers["Access-Control-Allow-Origin"] == "*"
            assert reply.headers["Access-Control-Allow-Methods"] == "POST, GET"
        preflight = urllib.request.Request(url + ":predict", method="OPTIONS", headers={"Origin": "http://a.example"})
        with urllib.request.urlopen(preflight, timeout=30) as reply:
            assert reply.status == 200 and reply.headers["Access-Control-Allow-Headers"] == "Content-Type"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, method="OPTIONS"), timeout=30)
        assert refused.value.code == 400 and b"Origin header is missing" in refused.value.read()
    finally:
        server.stop(grace=1)
    # A MetaGraph tagged otherwise is not there: the version fails to load, with TensorFlow's reason.
    grpc_port, = free_ports(1)
    server = RunningServer(options(f"--model_base_path={tmp_path / 'tf1'}", "--model_name=tf1",
                                   f"--port={grpc_port}", "--saved_model_tags=serve,gpu",
                                   "--file_system_poll_wait_seconds=0", "--max_num_load_retries=0"))
    try:
        record, = server.manager.status("tf1")
        assert record.error_message and "gpu" in record.error_message
    finally:
        server.stop(grace=1)
