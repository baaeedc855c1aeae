"""The protos of tensorflow-serving-api the client sends and reads, without TensorFlow's runtime."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import threading
import types

import numpy as np

_APIS: types.SimpleNamespace | None = None
_APIS_LOCK = threading.Lock()
_API_MODULES = ("tensorflow_serving.apis.predict_pb2", "tensorflow_serving.apis.get_model_metadata_pb2",
                "tensorflow_serving.apis.prediction_service_pb2_grpc", "tensorflow.core.framework.tensor_pb2",
                "tensorflow.core.framework.types_pb2")


def serving_apis() -> types.SimpleNamespace:
    """The generated modules of tensorflow-serving-api the client uses, and TensorFlow's
    TensorProto and DataType, loaded without TensorFlow's runtime.

    Those modules are plain protobuf code, but they import TensorFlow's own
    (`from tensorflow.core.framework import tensor_pb2`), and importing anything under
    `tensorflow` first runs tensorflow/__init__.py, which loads the whole runtime: 3-4 s
    and 700 MB for a client that only needs to build one message. So, unless TensorFlow
    is already imported, `tensorflow` is a bare package while they load (its folder
    only: the generated modules and the empty __init__.py of tensorflow/core/... are
    all that run), and afterwards the bare package and every tensorflow.* module are
    taken out of sys.modules again: the client keeps its references, and an
    `import tensorflow` later in the process loads TensorFlow as usual (its generated
    modules register the same descriptors again, which protobuf allows).
    This relies only on Python's documented import system (a package is a module with
    __path__) and on TensorFlow keeping its generated protos in plain packages, as every
    release has done."""
    global _APIS
    with _APIS_LOCK:
        if _APIS is None:
            _APIS = _load_serving_apis()
        return _APIS


def _load_serving_apis() -> types.SimpleNamespace:
    def load() -> types.SimpleNamespace:
        return types.SimpleNamespace(**{name.rsplit(".", 1)[1]: importlib.import_module(name)
                                        for name in _API_MODULES})

    spec = None if "tensorflow" in sys.modules else importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        return load()  # TensorFlow is already loaded (or missing: the import names what is)
    bare_spec = importlib.machinery.ModuleSpec("tensorflow", None, origin=spec.origin, is_package=True)
    bare_spec.submodule_search_locations = list(spec.submodule_search_locations)
    sys.modules["tensorflow"] = importlib.util.module_from_spec(bare_spec)
    try:
        return load()
    finally:
        for name in [name for name in sys.modules if name == "tensorflow" or name.startswith("tensorflow.")]:
            del sys.modules[name]


def request_tensor(batch, takes_bytes: bool):
    """A TensorProto of uint8 pixels [n, height, width, 3] or of encoded files [n], laid out
    as tf.make_tensor_proto lays them out (raw bytes in tensor_content; strings in string_val)."""
    apis = serving_apis()
    proto = apis.tensor_pb2.TensorProto()
    if takes_bytes:
        items = list(batch)
        if not all(isinstance(item, bytes) for item in items):
            raise ValueError("a string signature takes the files' own bytes")
        proto.dtype = apis.types_pb2.DT_STRING
        proto.tensor_shape.dim.add(size=len(items))
        proto.string_val.extend(items)
        return proto
    pixels = np.asarray(batch)
    if pixels.dtype != np.uint8 or pixels.ndim != 4:
        raise ValueError(f"pixels must be uint8 [n, height, width, 3], not {pixels.dtype} {list(pixels.shape)}")
    proto.dtype = apis.types_pb2.DT_UINT8
    for size in pixels.shape:
        proto.tensor_shape.dim.add(size=size)
    proto.tensor_content = np.ascontiguousarray(pixels).tobytes()
    return proto
