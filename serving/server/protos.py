"""TF Serving configuration messages that the tensorflow-serving-api wheel lacks.

The wheel ships the model server config (model_server_config.proto) but not
MonitoringConfig, SSLConfig or BatchingParameters, which the server's flag
files hold as text protos. They are declared here with TF Serving's package,
names and field numbers (monitoring_config.proto, ssl_config.proto,
session_bundle_config.proto), so the same files parse the same way.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf import wrappers_pb2  # noqa: F401  (registers Int64Value for BatchingParameters)

_PACKAGE = "tensorflow.serving"
_T = descriptor_pb2.FieldDescriptorProto


def _field(name: str, number: int, kind: int, type_name: str | None = None, repeated: bool = False):
    field = _T(name=name, number=number, type=kind,
               label=_T.LABEL_REPEATED if repeated else _T.LABEL_OPTIONAL)
    if type_name:
        field.type_name = type_name
    return field


_MESSAGES = {
    "PrometheusConfig": [_field("enable", 1, _T.TYPE_BOOL), _field("path", 2, _T.TYPE_STRING)],
    "MonitoringConfig": [_field("prometheus_config", 1, _T.TYPE_MESSAGE, f".{_PACKAGE}.PrometheusConfig")],
    "SSLConfig": [_field("server_key", 1, _T.TYPE_STRING), _field("server_cert", 2, _T.TYPE_STRING),
                  _field("custom_ca", 3, _T.TYPE_STRING), _field("client_verify", 4, _T.TYPE_BOOL)],
    "BatchingParameters": [
        _field("max_batch_size", 1, _T.TYPE_MESSAGE, ".google.protobuf.Int64Value"),
        _field("batch_timeout_micros", 2, _T.TYPE_MESSAGE, ".google.protobuf.Int64Value"),
        _field("max_enqueued_batches", 3, _T.TYPE_MESSAGE, ".google.protobuf.Int64Value"),
        _field("num_batch_threads", 4, _T.TYPE_MESSAGE, ".google.protobuf.Int64Value"),
        _field("thread_pool_name", 5, _T.TYPE_MESSAGE, ".google.protobuf.StringValue"),
        _field("allowed_batch_sizes", 6, _T.TYPE_INT64, repeated=True),
        _field("pad_variable_length_inputs", 7, _T.TYPE_BOOL),
    ],
}


def _message_classes() -> dict[str, type]:
    pool = descriptor_pool.Default()
    missing = []
    for name in _MESSAGES:
        try:
            pool.FindMessageTypeByName(f"{_PACKAGE}.{name}")
        except KeyError:
            missing.append(name)
    if missing:
        file = descriptor_pb2.FileDescriptorProto(
            name="accresnet/serving/tf_serving_config_extra.proto", package=_PACKAGE, syntax="proto3",
            dependency=["google/protobuf/wrappers.proto"])
        for name in missing:
            file.message_type.add(name=name, field=_MESSAGES[name])
        pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
            for name in _MESSAGES}


_CLASSES = _message_classes()
MonitoringConfig = _CLASSES["MonitoringConfig"]
SSLConfig = _CLASSES["SSLConfig"]
BatchingParameters = _CLASSES["BatchingParameters"]
