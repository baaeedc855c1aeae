"""TF Serving's REST JSON <-> arrays and protos: the row and columnar predict formats,
{"b64": ...} strings, and tf.Example features for classify and regress."""

from __future__ import annotations

import base64
import json

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import input_pb2

from serving.server.errors import invalid
from serving.server.servable import Signature

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def preview(value) -> str:
    """The start of a JSON value for an error message, without serializing all of it."""

    def shorten(item, depth=0):
        if isinstance(item, np.ndarray):  # a row rest_json made an array
            item = item[:4].tolist() if item.ndim else item.item()
        if isinstance(item, list):
            return [shorten(element, depth + 1) for element in item[:4]] if depth < 4 else "..."
        if isinstance(item, dict):
            return {key[:20]: shorten(element, depth + 1) for key, element in list(item.items())[:4]} \
                if depth < 4 else "..."
        return item[:80] if isinstance(item, str) else item

    return json.dumps(shorten(value))[:80]


def _is_b64(value) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _decode_strings(value):
    if _is_b64(value):
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (ValueError, TypeError) as error:
            raise invalid(f"invalid base64 value: {error}") from None
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, list):
        return [_decode_strings(item) for item in value]
    raise invalid(f"expected a string or {{\"b64\": ...}} for a DT_STRING input; got {preview(value)}")


def json_to_array(value, dtype: tf.DType, alias: str) -> np.ndarray:
    """A JSON value (nested lists) as an array of the signature input's dtype."""
    if dtype == tf.string:
        decoded = _decode_strings(value)
        array = np.array(decoded, dtype=object)
        if array.dtype != object or (array.ndim and any(isinstance(v, list) for v in array.ravel())):
            raise invalid(f"input '{alias}': the nested lists are ragged")
        return array
    array = _numbers(value, dtype, alias)
    target = np.dtype(dtype.as_numpy_dtype)
    if target.kind in "iu":
        if array.dtype.kind == "f" and array.size and not np.all(np.equal(np.mod(array, 1), 0)):
            raise invalid(f"input '{alias}': expects {dtype.name} but got fractional numbers")
        info = np.iinfo(target)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise invalid(f"input '{alias}': values outside the range of {dtype.name} [{info.min}, {info.max}]")
    elif target.kind == "b" and array.dtype.kind != "b":
        raise invalid(f"input '{alias}': expects booleans")
    return array.astype(target)


def _numbers(value, dtype: tf.DType, alias: str) -> np.ndarray:
    """np.array(value), converted one row at a time: one NumPy call on a large body
    would hold the GIL, and stall the REST event loop, for as long as it takes."""

    def refuse():
        return invalid(f"input '{alias}': expects {dtype.name} numbers; got {preview(value)}")

    try:
        if isinstance(value, list) and len(value) > 1:
            rows = [np.asarray(row) for row in value]  # rest_json may have made them arrays already
            if any(row.dtype == object or row.dtype.kind in "US" for row in rows):
                raise refuse()
            array = np.stack(rows)
        else:
            array = np.array(value)
    except (ValueError, TypeError):
        raise invalid(f"input '{alias}': the nested lists are ragged") from None
    if array.dtype == object or array.dtype.kind in "US":
        raise refuse()
    return array


def _string_out(value: bytes, alias: str):
    if alias.endswith("_bytes"):
        return {"b64": base64.b64encode(value).decode("ascii")}
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(value).decode("ascii")}


def array_to_json(array: np.ndarray, alias: str):
    if array.dtype == object or array.dtype.kind == "S":
        return np.vectorize(lambda v: _string_out(v, alias), otypes=[object])(array).tolist() if array.ndim \
            else _string_out(array.item(), alias)
    return array.tolist()


def parse_predict_body(body: dict, signature: Signature) -> tuple[dict[str, np.ndarray], bool]:
    """Inputs of a predict request and whether it used the row ("instances") format."""
    if "instances" in body and "inputs" in body:
        raise invalid("JSON request has both 'instances' and 'inputs'; use one")
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list):
            raise invalid("'instances' must be a list")
        if not instances:
            raise invalid("'instances' is an empty list: an empty batch")
        named = all(isinstance(item, dict) and not _is_b64(item) for item in instances)
        if named:
            names = set(instances[0])
            if any(set(item) != names for item in instances):
                raise invalid("every instance must name the same inputs")
            columns = {name: [item[name] for item in instances] for name in names}
        else:
            if len(signature.inputs) != 1:
                raise invalid(f"the signature has {len(signature.inputs)} inputs "
                              f"({', '.join(sorted(signature.inputs))}); name them in each instance")
            columns = {next(iter(signature.inputs)): instances}
        return _convert(columns, signature), True
    if "inputs" in body:
        inputs = body["inputs"]
        if isinstance(inputs, dict) and not _is_b64(inputs):
            columns = inputs
        else:
            if len(signature.inputs) != 1:
                raise invalid(f"the signature has {len(signature.inputs)} inputs; name them in 'inputs'")
            columns = {next(iter(signature.inputs)): inputs}
        return _convert(columns, signature), False
    raise invalid("JSON request needs 'instances' (row format) or 'inputs' (columnar format)")


def _convert(columns: dict, signature: Signature) -> dict[str, np.ndarray]:
    arrays = {}
    for alias, value in columns.items():
        info = signature.inputs.get(alias)
        if info is None:
            raise invalid(f"input tensor alias not found in signature: {alias}. Inputs expected to be in the "
                          f"set {{{','.join(sorted(signature.inputs))}}}.")
        arrays[alias] = json_to_array(value, info.dtype, alias)
    return arrays


def predict_body(outputs: dict[str, np.ndarray], row_format: bool) -> dict:
    if not row_format:
        if len(outputs) == 1:
            (alias, value), = outputs.items()
            return {"outputs": array_to_json(value, alias)}
        return {"outputs": {alias: array_to_json(value, alias) for alias, value in outputs.items()}}
    rows = {value.shape[0] if value.ndim else None for value in outputs.values()}
    if len(rows) != 1 or None in rows:
        raise invalid("the outputs do not share a batch dimension; use the columnar 'inputs' format")
    if len(outputs) == 1:
        (alias, value), = outputs.items()
        return {"predictions": array_to_json(value, alias)}
    columns = {alias: array_to_json(value, alias) for alias, value in outputs.items()}
    return {"predictions": [{alias: column[i] for alias, column in columns.items()} for i in range(rows.pop())]}


def _feature(value) -> "tf.train.Feature":
    values = value if isinstance(value, list) else [value]
    if all(isinstance(v, bool) for v in values) or all(isinstance(v, int) and not isinstance(v, bool)
                                                      for v in values):
        if any(not INT64_MIN <= v <= INT64_MAX for v in values):
            raise invalid(f"an integer feature must fit in int64 [{INT64_MIN}, {INT64_MAX}]; got {preview(value)}")
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        try:
            return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))
        except OverflowError:
            raise invalid(f"a number of a float feature is beyond float range; got {preview(value)}") from None
    if all(isinstance(v, str) or _is_b64(v) for v in values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[_decode_strings(v) for v in values]))
    raise invalid(f"a feature must be numbers, strings or {{\"b64\": ...}} values, all of one kind; "
                  f"got {preview(value)}")


def _example(features: dict) -> tf.train.Example:
    if not isinstance(features, dict):
        raise invalid("each example must be a JSON object of features")
    return tf.train.Example(features=tf.train.Features(feature={k: _feature(v) for k, v in features.items()}))


def examples_input(body: dict) -> input_pb2.Input:
    examples = body.get("examples")
    if not isinstance(examples, list) or not examples:
        raise invalid("'examples' must be a non-empty list")
    request_input = input_pb2.Input()
    if "context" in body:
        target = request_input.example_list_with_context
        target.context.CopyFrom(_example(body["context"]))
    else:
        target = request_input.example_list
    target.examples.extend(_example(e) for e in examples)
    return request_input




def json_bytes(value) -> bytes:
    return json.dumps(value, indent=1).encode()
