"""One loaded version of a SavedModel: its signatures and how to run them."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from serving.server.errors import ServingError, invalid

SERVE_TAG = "serve"
DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: tf.DType
    shape: tuple[int | None, ...] | None  # None when the rank is unknown

    @classmethod
    def from_proto(cls, info: meta_graph_pb2.TensorInfo) -> TensorInfo:
        shape = None if info.tensor_shape.unknown_rank else tuple(
            None if d.size < 0 else d.size for d in info.tensor_shape.dim)
        return cls(tf.dtypes.as_dtype(info.dtype), shape)

    def describe(self) -> str:
        shape = "unknown" if self.shape is None else "[" + ",".join("?" if d is None else str(d) for d in self.shape) + "]"
        return f"{self.dtype.name} {shape}"

    def check(self, alias: str, array: np.ndarray) -> None:
        """INVALID_ARGUMENT unless `array` has this dtype and a compatible shape."""
        if array.dtype != self.dtype.as_numpy_dtype and not (self.dtype == tf.string and array.dtype == object):
            raise invalid(f"input '{alias}': expects {self.dtype.name} but got {tf.as_dtype(array.dtype).name} "
                          f"(the signature takes {self.describe()})")
        if self.shape is None:
            return
        if len(self.shape) != array.ndim or any(e is not None and e != d for e, d in zip(self.shape, array.shape)):
            raise invalid(f"input '{alias}': shape {list(array.shape)} does not fit the signature's "
                          f"{self.describe()}")


@dataclasses.dataclass(frozen=True)
class Signature:
    key: str
    method_name: str
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]
    function: object  # the loaded concrete function


def read_meta_graph(path: str) -> meta_graph_pb2.MetaGraphDef:
    """The MetaGraphDef tagged "serve" in `path`/saved_model.pb (local, gs://, ...)."""
    proto_file = tf.io.gfile.join(path, "saved_model.pb")
    if not tf.io.gfile.exists(proto_file):
        raise FileNotFoundError(f"{proto_file} does not exist")
    with tf.io.gfile.GFile(proto_file, "rb") as file:
        saved_model = saved_model_pb2.SavedModel.FromString(file.read())
    for meta_graph in saved_model.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return meta_graph
    raise ValueError(f"{path} has no MetaGraph tagged '{SERVE_TAG}'")


class Servable:
    """A version loaded with tf.saved_model.load; TF1 signatures included."""

    def __init__(self, name: str, version: int, path: str):
        self.name, self.version, self.path = name, version, str(path)
        self.meta_graph = read_meta_graph(self.path)
        self.loaded = tf.saved_model.load(self.path, tags=[SERVE_TAG])
        self.signatures: dict[str, Signature] = {}
        for key, definition in self.meta_graph.signature_def.items():
            function = self.loaded.signatures.get(key) if hasattr(self.loaded, "signatures") else None
            if function is None:
                continue  # e.g. TF2's __saved_model_init_op: described, not callable
            self.signatures[key] = Signature(
                key, definition.method_name,
                {alias: TensorInfo.from_proto(info) for alias, info in definition.inputs.items()},
                {alias: TensorInfo.from_proto(info) for alias, info in definition.outputs.items()},
                function)

    def signature(self, key: str) -> Signature:
        key = key or DEFAULT_SIGNATURE
        try:
            return self.signatures[key]
        except KeyError:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{key}" not found.') from None

    def run(self, signature: Signature, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """Run a checked signature; TensorFlow's own errors keep their status code."""
        feeds = {alias: tf.constant(value, dtype=signature.inputs[alias].dtype) for alias, value in inputs.items()}
        try:
            results = signature.function(**feeds)
        except tf.errors.OpError as error:
            raise ServingError.from_tensorflow(error) from None
        except (TypeError, ValueError) as error:
            raise invalid(f"signature '{signature.key}' could not run on these inputs: {error}") from None
        return {alias: results[alias].numpy() for alias in outputs}
