"""TF Serving's PredictionService and ModelService semantics, independent of transport.

The gRPC servicers pass protos straight through; the REST app converts its
JSON to arrays and calls the same functions, so both APIs check requests and
fail in the same way (TF Serving's status codes and, mostly, its messages).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    input_pb2,
    model_management_pb2,
    model_pb2,
    predict_pb2,
    prediction_log_pb2,
    regression_pb2,
)
from tensorflow_serving.apis import status_pb2

from serving.contract import CLASSIFY_METHOD, EXAMPLES_INPUT, PREDICT_METHOD, REGRESS_METHOD, WARMUP_FILE
from serving.server import tensors
from serving.server.calls import NO_CALL, Call
from serving.server.errors import ServingError, invalid
from serving.server.manager import LoadRetries, ModelManager
from serving.server.options import ServerOptions
from serving.server.servable import Servable, Signature

log = logging.getLogger(__name__)

MAX_WARMUP_RECORDS = 1000  # TF Serving's limit
Runner = Callable[[Servable, Signature, dict[str, np.ndarray], list[str], Call], dict[str, np.ndarray]]


def _direct_runner(servable: Servable, signature: Signature, inputs, outputs, call: Call):
    call.check()
    return servable.run(signature, inputs, outputs, timeout=call.remaining())


class ModelServer:
    """The APIs over the ModelManager of the server's models; `runner` is where batching plugs in.

    What a request may become is bounded before it is built: --max_request_tensor_bytes
    bounds a Predict request's tensors once decoded, and a Classify or Regress
    request's examples once the context is merged into each; --max_request_rows
    bounds its rows (examples). Only with --check_input_shapes (off, as in TF
    Serving) is an input whose shape the signature does not declare refused
    before the model runs."""

    def __init__(self, options: ServerOptions, runner: Runner | None = None):
        flags = options.flags
        self.runner = runner or _direct_runner
        self.max_request_tensor_bytes = flags.max_request_tensor_bytes
        self.max_request_rows = flags.max_request_rows
        self.check_input_shapes = flags.check_input_shapes
        self.reload_roots = options.reload_roots
        self.tensor_content = flags.enable_serialization_as_tensor_content
        self.warmup_iterations = max(1, flags.num_request_iterations_for_warmup)
        # The manager loads versions only once started, so warm_up may be handed over before it exists.
        self.manager = ModelManager(
            list(options.model_configs), warm_up=self.warm_up if flags.enable_model_warmup else None,
            poll_seconds=flags.file_system_poll_wait_seconds, retries=LoadRetries.from_flags(flags),
            session_config=options.session_config, saved_model_tags=options.saved_model_tags,
            allow_version_labels_for_unavailable_models=flags.allow_version_labels_for_unavailable_models)

    # --- finding the servable ------------------------------------------------------------

    def resolve(self, spec: model_pb2.ModelSpec) -> Servable:
        if not spec.name:
            raise invalid("Missing ModelSpec")
        version = spec.version.value if spec.HasField("version") else None
        label = spec.version_label if spec.WhichOneof("version_choice") == "version_label" else None
        return self.manager.servable(spec.name, version, label)

    @staticmethod
    def _response_spec(target: model_pb2.ModelSpec, name: str, servable: Servable, signature: str = "") -> None:
        target.name = name
        target.version.value = servable.version
        target.signature_name = signature

    # --- Predict -----------------------------------------------------------------------------

    def predict_arrays(self, servable: Servable, signature_key: str, inputs: dict[str, np.ndarray],
                       output_filter: list[str], call: Call = NO_CALL) -> tuple[Signature, dict[str, np.ndarray]]:
        """Check a Predict request against the signature and run it."""
        signature = servable.signature(signature_key)
        if signature.method_name not in (PREDICT_METHOD, CLASSIFY_METHOD, REGRESS_METHOD):
            raise ServingError(grpc.StatusCode.INTERNAL,
                               f"Expected prediction signature method_name to be one of {{{PREDICT_METHOD}, "
                               f"{CLASSIFY_METHOD}, {REGRESS_METHOD}}}. Was: {signature.method_name}")
        if set(inputs) != set(signature.inputs):
            sent, expected = sorted(inputs), sorted(signature.inputs)
            raise invalid(
                f"input size does not match signature: {len(sent)}!={len(expected)} len({{{','.join(sent)}}}) != "
                f"len({{{','.join(expected)}}}). Sent extra: {{{','.join(sorted(set(sent) - set(expected)))}}}. "
                f"Missing but required: {{{','.join(sorted(set(expected) - set(sent)))}}}.")
        for alias, array in inputs.items():
            info = signature.inputs[alias]
            info.check_dtype(alias, array)
            if array.ndim and array.shape[0] == 0:
                raise invalid(f"input '{alias}' is an empty batch (0 in its first dimension)")
            if self.check_input_shapes and not info.fits(array.shape):
                raise invalid(f"input '{alias}' has shape {list(array.shape)}, the signature declares "
                              f"{info.describe()}")
            self._check_rows(array.shape[0] if array.ndim else 1, f"input '{alias}'")
        outputs = list(output_filter)
        for alias in outputs:
            if alias not in signature.outputs:
                raise invalid(f"output tensor alias not found in signature: {alias} Outputs expected to be in "
                              f"the set {{{','.join(sorted(signature.outputs))}}}.")
        if len(set(outputs)) != len(outputs):
            raise invalid(f"duplicate output tensor alias in output_filter: {outputs}")
        return signature, self.runner(servable, signature, inputs, outputs or sorted(signature.outputs), call)

    def predict(self, request: predict_pb2.PredictRequest, servable: Servable | None = None,
                call: Call = NO_CALL) -> predict_pb2.PredictResponse:
        servable = servable or self.resolve(request.model_spec)
        inputs = tensors.to_arrays(request.inputs, self.max_request_tensor_bytes, self.max_request_rows)
        signature, outputs = self.predict_arrays(servable, request.model_spec.signature_name, inputs,
                                                 list(request.output_filter), call)
        response = predict_pb2.PredictResponse()
        self._response_spec(response.model_spec, request.model_spec.name, servable, signature.key)
        for alias, value in outputs.items():
            tensors.fill_proto(response.outputs[alias], value, as_content=self.tensor_content)
        return response

    def _check_rows(self, rows: int, what: str) -> None:
        if rows > self.max_request_rows:
            raise invalid(f"{what} has {rows} rows; a request may have at most {self.max_request_rows} "
                          "(--max_request_rows)")

    # --- Classify and Regress ----------------------------------------------------------------------

    def _run_examples(self, servable: Servable, signature_key: str, method: str, kind: str,
                      examples: list[bytes], call: Call) -> tuple[Signature, dict[str, np.ndarray]]:
        """Check a classify/regress signature as TF Serving does, then run it on the examples."""
        signature = servable.signature(signature_key)
        if signature.method_name != method:
            raise invalid(f"Expected {kind} signature method_name to be {method}. Was: {signature.method_name}")
        if len(signature.inputs) != 1:
            raise invalid("Expected one input Tensor.")
        outputs_allowed = (1, 2) if method == CLASSIFY_METHOD else (1,)
        if len(signature.outputs) not in outputs_allowed:
            raise invalid(f"Expected {' or '.join(map(str, outputs_allowed))} output Tensor(s), found "
                          f"{len(signature.outputs)}")
        if EXAMPLES_INPUT not in signature.inputs:
            raise invalid(f"No {kind} inputs found in SignatureDef: the input is named "
                          f"'{next(iter(signature.inputs))}', not '{EXAMPLES_INPUT}'")
        if signature.inputs[EXAMPLES_INPUT].dtype != tf.string:
            raise invalid(f"Expected the {kind} input '{EXAMPLES_INPUT}' to be DT_STRING (serialized tf.Example); "
                          f"it is {signature.inputs[EXAMPLES_INPUT].dtype.name}")
        batch = np.array(examples, dtype=object)
        return signature, self.runner(servable, signature, {EXAMPLES_INPUT: batch}, sorted(signature.outputs), call)

    def _examples(self, request_input: input_pb2.Input) -> list[bytes]:
        """The request's examples, serialized, their count and merged size checked first."""
        count, size = merged_size(request_input)
        self._check_rows(count, "the input")
        if size > self.max_request_tensor_bytes:
            raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the {count} examples come to {size} bytes with the context merged into each, more "
                               f"than the {self.max_request_tensor_bytes} bytes a request may take "
                               "(--max_request_tensor_bytes)")
        return serialized_examples(request_input)

    def classify(self, request: classification_pb2.ClassificationRequest, servable: Servable | None = None,
                 call: Call = NO_CALL) -> classification_pb2.ClassificationResponse:
        servable = servable or self.resolve(request.model_spec)
        examples = self._examples(request.input)
        signature, outputs = self._run_examples(servable, request.model_spec.signature_name, CLASSIFY_METHOD,
                                                "classification", examples, call)
        classes, scores = outputs.get("classes"), outputs.get("scores")
        if classes is None and scores is None:
            raise invalid("Expected classification signature outputs to contain 'classes' and/or 'scores'")
        count = len(examples)
        for name, value in (("classes", classes), ("scores", scores)):
            if value is not None and (value.ndim != 2 or value.shape[0] != count):
                raise invalid(f"Expected {name} output of shape [{count}, N]; got {list(value.shape)}")
        if classes is not None and scores is not None and classes.shape != scores.shape:
            raise invalid(f"classes {list(classes.shape)} and scores {list(scores.shape)} differ in shape")
        response = classification_pb2.ClassificationResponse()
        self._response_spec(response.model_spec, request.model_spec.name, servable, signature.key)
        width = (classes if classes is not None else scores).shape[1]
        for i in range(count):
            classification = response.result.classifications.add()
            for j in range(width):
                item = classification.classes.add()
                if classes is not None:
                    label = classes[i, j]
                    item.label = label.decode("utf-8", "replace") if isinstance(label, bytes) else str(label)
                if scores is not None:
                    item.score = float(scores[i, j])
        return response

    def regress(self, request: regression_pb2.RegressionRequest, servable: Servable | None = None,
                call: Call = NO_CALL) -> regression_pb2.RegressionResponse:
        servable = servable or self.resolve(request.model_spec)
        examples = self._examples(request.input)
        signature, outputs = self._run_examples(servable, request.model_spec.signature_name, REGRESS_METHOD,
                                                "regression", examples, call)
        values = outputs.get("outputs")
        if values is None:
            raise invalid("Expected regression signature outputs to contain 'outputs'")
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1 or values.shape[0] != len(examples):
            raise invalid(f"Expected output Tensor shape to be [{len(examples)}] or [{len(examples)}, 1]; "
                          f"got {list(outputs['outputs'].shape)}")
        response = regression_pb2.RegressionResponse()
        self._response_spec(response.model_spec, request.model_spec.name, servable, signature.key)
        for value in values:
            response.result.regressions.add(value=float(value))
        return response

    # --- metadata and status --------------------------------------------------------------------

    def get_model_metadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest
                           ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        if not request.metadata_field:
            raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != "signature_def":
                raise invalid(f"Metadata field {field} is not supported")
        servable = self.resolve(request.model_spec)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        self._response_spec(response.model_spec, request.model_spec.name, servable)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, definition in servable.meta_graph.signature_def.items():
            signature_map.signature_def[key].CopyFrom(definition)
        response.metadata["signature_def"].Pack(signature_map)
        return response

    def get_model_status(self, request: get_model_status_pb2.GetModelStatusRequest
                         ) -> get_model_status_pb2.GetModelStatusResponse:
        spec = request.model_spec
        if not spec.name:
            raise invalid("Missing model name in request.")
        version = spec.version.value if spec.HasField("version") else None
        label = spec.version_label if spec.WhichOneof("version_choice") == "version_label" else None
        response = get_model_status_pb2.GetModelStatusResponse()
        for record in self.manager.status(spec.name, version, label):
            response.model_version_status.add(
                version=record.version, state=record.state,
                status=status_pb2.StatusProto(error_code=record.error_code.value[0],
                                              error_message=record.error_message))
        return response

    def reload_config(self, request: model_management_pb2.ReloadConfigRequest
                      ) -> model_management_pb2.ReloadConfigResponse:
        if self.reload_roots is None:
            raise ServingError(grpc.StatusCode.PERMISSION_DENIED,
                               "HandleReloadConfigRequest is turned off on this server; start it with "
                               "--enable_model_reload_rpc (and --model_reload_allowed_roots) to allow it")
        config = request.config
        if config.WhichOneof("config") != "model_config_list":
            raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                               "only model_config_list configurations are supported")
        models = list(config.model_config_list.config)
        for model in models:
            if not model.name or not model.base_path:
                raise invalid("every model needs a name and a base_path")
            if not under_any(model.base_path, self.reload_roots):
                raise ServingError(grpc.StatusCode.PERMISSION_DENIED,
                                   f"model {model.name}: base_path {model.base_path} is not under the allowed roots "
                                   f"({', '.join(self.reload_roots)}; --model_reload_allowed_roots)")
        self.manager.set_config(models)
        return model_management_pb2.ReloadConfigResponse(status=status_pb2.StatusProto(error_code=0))

    # --- warmup ----------------------------------------------------------------------------------------

    def warm_up(self, servable: Servable) -> None:
        """Replay the version's assets.extra warmup requests; a failing one fails the load."""
        path = tf.io.gfile.join(servable.path, WARMUP_FILE)
        if not tf.io.gfile.exists(path):
            return
        count = 0
        for record in tf.data.TFRecordDataset(path).take(MAX_WARMUP_RECORDS):
            entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            kind = entry.WhichOneof("log_type")
            for _ in range(self.warmup_iterations):  # --num_request_iterations_for_warmup
                if kind == "predict_log":
                    self.predict(entry.predict_log.request, servable)
                elif kind == "classify_log":
                    self.classify(entry.classify_log.request, servable)
                elif kind == "regress_log":
                    self.regress(entry.regress_log.request, servable)
                else:
                    raise ValueError(f"warmup record of type {kind} is not supported")
            count += 1
        log.info("%s version %d: replayed %d warmup request(s)", servable.name, servable.version, count)


def under_any(path: str, roots: tuple[str, ...]) -> bool:
    """Whether `path` lies under one of `roots`, after resolving `..` and symbolic links
    of local paths (so that /models/../proc is not under /models)."""
    def normal(value: str) -> str:
        return value.rstrip("/") if "://" in value else os.path.realpath(value)

    resolved = normal(path)
    return any(resolved == normal(root) or resolved.startswith(normal(root).rstrip("/") + "/") for root in roots)


def merged_size(request_input: input_pb2.Input) -> tuple[int, int]:
    """The examples of a Classify/Regress Input and their serialized size once the context is
    merged into each (as TF Serving merges it), computed without building any of them."""
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        examples = request_input.example_list.examples
        return len(examples), sum(example.ByteSize() for example in examples)
    if kind == "example_list_with_context":
        examples = request_input.example_list_with_context.examples
        context = request_input.example_list_with_context.context.ByteSize()
        return len(examples), sum(example.ByteSize() for example in examples) + len(examples) * context
    return 0, 0


def serialized_examples(request_input: input_pb2.Input) -> list[bytes]:
    """The examples of a Classify/Regress Input, context merged into each."""
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        examples = list(request_input.example_list.examples)
    elif kind == "example_list_with_context":
        context = request_input.example_list_with_context.context
        examples = []
        for example in request_input.example_list_with_context.examples:
            merged = type(context)()
            merged.CopyFrom(context)
            merged.MergeFrom(example)
            examples.append(merged)
    else:
        examples = []
    if not examples:
        raise invalid("Input is empty.")
    return [example.SerializeToString() for example in examples]

