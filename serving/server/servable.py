"""One loaded version of a SavedModel: its signatures and how to run them.

As TF Serving does, a version is loaded into a graph and a session of its
own (TF1 and TF2 SavedModels alike) and a signature runs as one session
call: the request's tensors are fed to the signature's input tensors and its
output tensors fetched, with the request's deadline as the run's timeout.
Like TF Serving's C++ session, the call does not check a fed tensor against
the static shape of the placeholder it feeds (TF Serving's half_plus_two test
model takes [3] where it declares [-1, 1]); the model server does that before
only under --check_input_shapes (service.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2
from tensorflow.python.client import pywrap_tf_session as tf_session

from serving.contract import SERVING_DEFAULT as DEFAULT_SIGNATURE
from serving.server.errors import ServingError, invalid
from serving.server.calls import MAX_TIMEOUT_MS

SERVE_TAG = "serve"
INIT_OP_SIGNATURE = "__saved_model_init_op"  # TF2's initializer: described in the graph, not served


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: tf.DType
    shape: tuple[int | None, ...] | None  # None when the rank is unknown
    name: str = ""  # the graph tensor it stands for

    @classmethod
    def from_proto(cls, info: meta_graph_pb2.TensorInfo) -> TensorInfo:
        shape = None if info.tensor_shape.unknown_rank else tuple(
            None if d.size < 0 else d.size for d in info.tensor_shape.dim)
        return cls(tf.dtypes.as_dtype(info.dtype), shape, info.name)

    def describe(self) -> str:
        shape = "unknown" if self.shape is None else "[" + ",".join("?" if d is None else str(d) for d in self.shape) + "]"
        return f"{self.dtype.name} {shape}"

    @functools.cached_property
    def _numpy_dtype(self):
        """What arrays of this dtype have (object for strings), looked up once rather than per request."""
        expected = self.dtype.as_numpy_dtype
        try:
            return np.dtype(expected)
        except TypeError:
            return expected

    def check_dtype(self, alias: str, array: np.ndarray) -> None:
        """INVALID_ARGUMENT unless `array` has this dtype."""
        if array.dtype != self._numpy_dtype and not (self.dtype == tf.string and array.dtype == object):
            raise invalid(f"input '{alias}': expects {self.dtype.name} but got {tf.as_dtype(array.dtype).name} "
                          f"(the signature takes {self.describe()})")

    def fits(self, shape: tuple[int, ...]) -> bool:
        return self.shape is None or (len(self.shape) == len(shape) and all(
            expected is None or expected == size for expected, size in zip(self.shape, shape)))


@dataclasses.dataclass(frozen=True)
class Signature:
    key: str
    method_name: str
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]


class Servable:
    """A version loaded into its own graph and session; TF1 and TF2 SavedModels alike."""

    def __init__(self, name: str, version: int, path: str, session_config: config_pb2.ConfigProto | None = None,
                 tags: tuple[str, ...] = (SERVE_TAG,)):
        """Load the MetaGraph tagged with exactly `tags` (--saved_model_tags)."""
        self.name, self.version, self.path = name, version, str(path)
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph, config=session_config)
        with self.graph.as_default():
            self.meta_graph = tf.compat.v1.saved_model.loader.load(self.session, list(tags), self.path)
        self.signatures: dict[str, Signature] = {
            key: Signature(key, definition.method_name,
                           {alias: TensorInfo.from_proto(info) for alias, info in definition.inputs.items()},
                           {alias: TensorInfo.from_proto(info) for alias, info in definition.outputs.items()})
            for key, definition in self.meta_graph.signature_def.items() if key != INIT_OP_SIGNATURE}
        self._endpoints_cache: dict[tuple, tuple] = {}
        self._endpoints_lock = threading.Lock()

    def signature(self, key: str) -> Signature:
        key = key or DEFAULT_SIGNATURE
        try:
            return self.signatures[key]
        except KeyError:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{key}" not found.') from None

    def _endpoints(self, signature: Signature, inputs: tuple[str, ...], outputs: tuple[str, ...]):
        """The graph tensors a call feeds and fetches, looked up once per combination."""
        key = (signature.key, inputs, outputs)
        with self._endpoints_lock:
            endpoints = self._endpoints_cache.get(key)
            if endpoints is None:
                tensor = self.graph.get_tensor_by_name
                endpoints = self._endpoints_cache[key] = (
                    [tensor(signature.inputs[alias].name)._as_tf_output() for alias in inputs],
                    [tensor(signature.outputs[alias].name)._as_tf_output() for alias in outputs])
        return endpoints

    def run(self, signature: Signature, inputs: dict[str, np.ndarray], outputs: list[str],
            timeout: float | None = None) -> dict[str, np.ndarray]:
        """Run a signature on inputs of its dtypes; TensorFlow's own errors keep their status code.
        With a `timeout` (seconds), TensorFlow stops the run once it has passed, as TF Serving
        passes a request's deadline in RunOptions.timeout_in_ms."""
        aliases = tuple(sorted(inputs))
        feeds, fetches = self._endpoints(signature, aliases, tuple(outputs))
        options = config_pb2.RunOptions()
        if timeout is not None:
            options.timeout_in_ms = min(MAX_TIMEOUT_MS, max(1, math.ceil(timeout * 1000)))
        buffer = tf_session.TF_NewBufferFromString(options.SerializeToString())
        try:
            # The session's own call, without Session.run's Python bookkeeping (0.4 ms a call).
            results = tf_session.TF_SessionRun_wrapper(
                self.session._session, buffer, {feed: inputs[alias] for feed, alias in zip(feeds, aliases)},
                fetches, [], None)
        except tf.errors.OpError as error:
            raise self._explain(error, signature, inputs) from None
        except UnicodeDecodeError as error:
            # A status whose message quotes the request's bytes (a tf.Example that does not
            # parse, say): the binding cannot decode it; the input was at fault.
            message = error.object.decode("utf-8", "replace") if isinstance(error.object, bytes) else str(error)
            raise invalid(message) from None
        finally:
            tf_session.TF_DeleteBuffer(buffer)
        return dict(zip(outputs, results))

    @staticmethod
    def _explain(error: tf.errors.OpError, signature: Signature, inputs: dict[str, np.ndarray]) -> ServingError:
        """TensorFlow's error, with a word on inputs whose shape the signature does not declare."""
        failure = ServingError.from_tensorflow(error)
        misfits = [f"input '{alias}' has shape {list(value.shape)}, the signature declares "
                   f"{signature.inputs[alias].describe()}"
                   for alias, value in sorted(inputs.items()) if not signature.inputs[alias].fits(value.shape)]
        if misfits:
            failure = ServingError(failure.code, f"{'; '.join(misfits)}: {failure.message}")
        return failure
