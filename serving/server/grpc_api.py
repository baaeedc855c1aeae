"""The gRPC services: tensorflow.serving.PredictionService, ModelService and grpc.health.v1."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from serving.server.calls import Call
from serving.server.errors import ServingError
from serving.server.metrics import ServingMetrics
from serving.server.service import ModelServer

log = logging.getLogger(__name__)

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"


class _Handler:
    def __init__(self, server: ModelServer, metrics: ServingMetrics):
        self.server, self.metrics = server, metrics

    def _call(self, api: str, request, context: grpc.ServicerContext, method: Callable):
        started, status = time.perf_counter(), "OK"
        try:
            return method(request)
        except ServingError as error:
            status = error.code.name
            context.abort(error.code, error.message)
        except Exception as error:  # a bug must cost one request, never the server
            status = "INTERNAL"
            log.exception("%s failed", api)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
        finally:
            spec = getattr(request, "model_spec", None)  # ReloadConfigRequest has none
            self.metrics.record(spec.name if spec is not None else "", api, "GRPC", status,
                                time.perf_counter() - started)


class PredictionServicer(_Handler, prediction_service_pb2_grpc.PredictionServiceServicer):
    def Predict(self, request, context):
        return self._call("predict", request, context,
                          lambda r: self.server.predict(r, call=Call.from_grpc(context)))

    def Classify(self, request, context):
        return self._call("classify", request, context,
                          lambda r: self.server.classify(r, call=Call.from_grpc(context)))

    def Regress(self, request, context):
        return self._call("regress", request, context,
                          lambda r: self.server.regress(r, call=Call.from_grpc(context)))

    def GetModelMetadata(self, request, context):
        return self._call("GetModelMetadata", request, context, self.server.get_model_metadata)

    def MultiInference(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "MultiInference is not supported by this server")


class ModelServicer(_Handler, model_service_pb2_grpc.ModelServiceServicer):
    def GetModelStatus(self, request, context):
        return self._call("GetModelStatus", request, context, self.server.get_model_status)

    def HandleReloadConfigRequest(self, request, context):
        return self._call("HandleReloadConfigRequest", request, context, self.server.reload_config)


class Health:
    """The standard health service: SERVING once any model version is available."""

    def __init__(self):
        self.servicer = health.HealthServicer()

    def update(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", PREDICTION_SERVICE, MODEL_SERVICE):
            self.servicer.set(service, status)

    def shutdown(self) -> None:
        self.servicer.enter_graceful_shutdown()


def add_services(grpc_server: grpc.Server, server: ModelServer, metrics: ServingMetrics, health_: Health) -> None:
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(server, metrics),
                                                                       grpc_server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(server, metrics), grpc_server)
    health_pb2_grpc.add_HealthServicer_to_server(health_.servicer, grpc_server)
