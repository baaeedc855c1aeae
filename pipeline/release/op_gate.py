"""Which TensorFlow operations a candidate's graph may use.

TF Serving runs a SavedModel's graph as it is, with the server's rights: an
operation that reads or writes files (ReadFile, WriteFile, ...), runs a
process or talks to the network does so for every request that reaches it,
and at load time when it hangs off the model's init op. So validate lists
the op types of the whole graph (its functions included) and refuses any
outside MODEL_OPS, those an export of this project uses (every architecture
and shortcut, tests/test_op_gate.py keeps the list honest). The SavedModel's
own saver reads and writes checkpoints; checkpoint ops are allowed only in
the saver's own part, and that part must have exactly a saver's structure,
since TF Serving runs its restore op when it loads a version:

- what a signature, the init op or any other node needs is the model's part,
  even where the saver's tensors reach it too, so nothing the model runs can
  hide behind the saver;
- the restore op's part holds only RESTORE_OPS (read the checkpoint, assign
  the variables: nothing written), and every RestoreV2 reads the prefix the
  loader feeds (the SaverDef's filename tensor, through function arguments),
  so a candidate restores its own variables, not a checkpoint elsewhere;
- the save op's part holds only SAVE_OPS, and its checkpoint writes go under
  that prefix too (joined with relative constant suffixes, as TensorFlow's
  savers join "_temp/part"), although no loader runs it;
- the filename tensor is a placeholder (or a constant the loader feeds over).

This checks op types, not what the allowed ones compute: see docs/serving.md
for what the gate does and does not promise. Nothing here imports TensorFlow
beyond its protos.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

from tensorflow.core.protobuf import saved_model_pb2

# The op types of this project's exports (serving_default, serving_bytes, classify, the init op),
# TensorFlow 2.21: the network, image decoding and checks in the graph, and the call machinery
# (Round: exports made before the resize rounded half up with Floor).
MODEL_OPS = frozenset({
    "Abs", "AddV2", "All", "ArgMax", "Assert", "AssignVariableOp", "BiasAdd", "BitwiseAnd", "BroadcastTo",
    "Case", "Cast", "Ceil", "ConcatV2", "Const", "Conv2D", "Cumsum", "DecodeImage", "DecodeJpeg",
    "DecodePaddedRaw", "DecodeRaw", "DenseBincount", "Equal", "ExpandDims", "ExtractJpegShape", "Fill",
    "Floor", "FloorDiv", "FloorMod", "FusedBatchNormV3", "GatherV2", "Greater", "GreaterEqual", "Identity", "If",
    "LeftShift", "Less", "LessEqual", "Log", "LogicalAnd", "LogicalNot", "LogicalOr", "MatMul", "Max",
    "Maximum", "Mean", "Minimum", "Mul", "NoOp", "NotEqual", "Pack", "Pad", "ParseExampleV2", "Placeholder",
    "Prod", "Range", "Rank", "ReadVariableOp", "RealDiv", "Relu", "Reshape", "ReverseV2", "Round",
    "ScaleAndTranslate", "SelectV2", "Shape", "Size", "Softmax", "Squeeze", "StatefulPartitionedCall",
    "StatelessCase", "StatelessIf", "StatelessWhile", "StaticRegexFullMatch", "StridedSlice", "StringLength",
    "StringSplitV2", "Sub", "Substr", "Sum", "TensorListFromTensor", "TensorListGetItem", "TensorListReserve",
    "TensorListSetItem", "TensorListStack", "TopKV2", "Transpose", "VarHandleOp", "VarIsInitializedOp", "Where",
    "While"
})
# The checkpoint ops of TensorFlow's savers: tf.saved_model.save's traced save and restore
# functions, and the TF1 Saver's save/ scope.
RESTORE_OPS = frozenset({"Assign", "AssignVariableOp", "Const", "Identity", "NoOp", "PartitionedCall",
                         "Placeholder", "PlaceholderWithDefault", "RestoreV2", "StatefulPartitionedCall",
                         "VarHandleOp", "VariableV2"})
SAVE_OPS = frozenset({"Const", "DisableCopyOnRead", "Identity", "MergeV2Checkpoints", "NoOp", "Pack",
                      "PartitionedCall", "Placeholder", "PlaceholderWithDefault", "ReadVariableOp", "SaveV2", "Select",
                      "ShardedFilename", "StatefulPartitionedCall", "StaticRegexFullMatch", "StringJoin",
                      "VarHandleOp", "VariableV2"})
SAVER_OPS = (RESTORE_OPS | SAVE_OPS) - MODEL_OPS
_CALLS = frozenset({"StatefulPartitionedCall", "PartitionedCall"})
# Ops through which a save path is derived from the prefix (the savers' "_temp/part" shards).
_PATH_OPS = frozenset({"Identity", "StringJoin", "ShardedFilename", "Select", "StaticRegexFullMatch", "Pack", "Const"})


@dataclasses.dataclass(frozen=True)
class GraphOps:
    model: frozenset[str]  # op types of everything but the saver's part: signatures, init op, any other node
    restore: frozenset[str] = frozenset()  # op types only the restore op reaches
    save: frozenset[str] = frozenset()  # op types only the save op reaches
    # Where the saver's part departs from a saver's structure, one line each.
    saver_problems: tuple[str, ...] = ()

    @property
    def saver(self) -> frozenset[str]:
        return (self.restore | self.save) - self.model

    @property
    def all(self) -> frozenset[str]:
        return self.model | self.restore | self.save


def read_saved_model(saved_model_dir: str | pathlib.Path) -> saved_model_pb2.SavedModel:
    """A SavedModel's graph, parsed without loading it: what every check reads, from one read."""
    return saved_model_pb2.SavedModel.FromString((pathlib.Path(saved_model_dir) / "saved_model.pb").read_bytes())


def graph_ops(saved_model_dir: str | pathlib.Path) -> GraphOps:
    return saved_model_ops(read_saved_model(saved_model_dir))


def saved_model_ops(saved_model: saved_model_pb2.SavedModel) -> GraphOps:
    """The op types of a SavedModel's graph and function library, split by who runs them, and
    how its saver departs from a saver's structure."""
    model, restore, save, problems = set(), set(), set(), []
    for meta_graph in saved_model.meta_graphs:
        parts = _Parts(meta_graph)
        model |= parts.ops(parts.model)
        restore |= parts.ops(parts.restore)
        save |= parts.ops(parts.save)
        problems += parts.problems()
    return GraphOps(frozenset(model), frozenset(restore - model), frozenset(save - model - restore),
                    tuple(dict.fromkeys(problems)))


def refused_ops(ops: GraphOps) -> list[str]:
    """The op types the gate refuses, sorted; empty when every part uses only its own."""
    return sorted((ops.model - MODEL_OPS) | (ops.restore - RESTORE_OPS) | (ops.save - SAVE_OPS))


def refusal(ops: GraphOps) -> str | None:
    """Why the gate refuses the graph, in one line; None when it passes."""
    reasons = []
    if refused := refused_ops(ops):
        reasons.append("its graph uses operations no export of this project uses (file, process or network "
                       f"access, or unknown): {', '.join(refused)}")
    if ops.saver_problems:
        reasons.append(f"its saver is not a SavedModel saver: {'; '.join(ops.saver_problems)}")
    return "; ".join(reasons) or None


class _Parts:
    """One MetaGraph split into the model's part, the restore op's and the save op's."""

    def __init__(self, meta_graph):
        graph = meta_graph.graph_def
        self.nodes = {node.name: node for node in graph.node}
        self.functions = {function.signature.name: function for function in graph.library.function}
        saver = meta_graph.saver_def
        self.filename = _node_name(saver.filename_tensor_name) if saver.filename_tensor_name else None
        self.restore_op = _node_name(saver.restore_op_name) if saver.restore_op_name else None
        self.save_op = _node_name(saver.save_tensor_name) if saver.save_tensor_name else None
        saver_reach = _reachable([n for n in (self.filename, self.restore_op, self.save_op) if n], self.nodes)
        # Everything a signature, a collection (init and main ops, assets) or a node outside the
        # saver's reach needs is the model's, wherever else it is reachable from.
        roots = [name for name in self.nodes if name not in saver_reach]
        for signature in meta_graph.signature_def.values():
            roots += [info.name for info in (*signature.inputs.values(), *signature.outputs.values()) if info.name]
        for collection in meta_graph.collection_def.values():
            roots += list(collection.node_list.value)
        roots += [asset.tensor_info.name for asset in meta_graph.asset_file_def if asset.tensor_info.name]
        model_nodes = _reachable(roots, self.nodes)
        restore_nodes = _reachable([self.restore_op] if self.restore_op else [], self.nodes) - model_nodes
        save_nodes = saver_reach - model_nodes - restore_nodes
        self.model_functions = _functions([self.nodes[n] for n in model_nodes], self.functions)
        restore_functions = _functions([self.nodes[n] for n in restore_nodes], self.functions) - self.model_functions
        save_functions = (_functions([self.nodes[n] for n in save_nodes], self.functions) - self.model_functions
                          - restore_functions)
        # A function no node calls is counted with the model: nothing vouches for it.
        self.model_functions |= set(self.functions) - restore_functions - save_functions
        self.model = (model_nodes, self.model_functions)
        self.restore = (restore_nodes, restore_functions)
        self.save = (save_nodes, save_functions)

    def ops(self, part) -> set[str]:
        nodes, functions = part
        return {self.nodes[n].op for n in nodes} | _function_ops(functions, self.functions)

    def problems(self) -> list[str]:
        if not (self.filename or self.restore_op or self.save_op):
            return []  # no saver: nothing is restored
        found = []
        if self.filename is None or self.filename not in self.nodes:
            return ["its SaverDef names no filename tensor in the graph"]
        upstream = _reachable([self.filename], self.nodes)
        if (self.nodes[self.filename].op not in ("Placeholder", "PlaceholderWithDefault", "Const")
                or any(self.nodes[n].op not in ("Const", "PlaceholderWithDefault") for n in upstream - {self.filename})):
            found.append(f"its filename tensor {self.filename} is not a placeholder the loader feeds")
        if self.filename in self.model[0]:
            found.append(f"its filename tensor {self.filename} is used by the model")
        if self.restore_op and self.restore_op not in self.nodes:
            found.append(f"its restore op {self.restore_op} is not in the graph")
        prefixes = _Prefixes(self.nodes, self.functions, self.filename)
        for where, node, body in self._checkpoint_ops():
            if node.op == "RestoreV2" and not prefixes.is_prefix(node.input[0], body):
                found.append(f"{where}{node.name} restores from another prefix than the loader's "
                             f"({node.input[0]})")
            elif node.op == "SaveV2" and not prefixes.derives(node.input[0], body) or (
                    node.op == "MergeV2Checkpoints" and not (prefixes.derives(node.input[0], body)
                                                             and prefixes.is_prefix(node.input[1], body))):
                found.append(f"{where}{node.name} writes elsewhere than under the loader's prefix")
        return found

    def _checkpoint_ops(self):
        """(where, node, function body or None) for every checkpoint op of the saver's part."""
        for part in (self.restore, self.save):
            nodes, functions = part
            for name in sorted(nodes):
                yield "", self.nodes[name], None
            for function in sorted(functions):
                for node in self.functions[function].node_def:
                    yield f"{function}/", node, function


class _Prefixes:
    """Which tensors hold the loader's checkpoint prefix: the filename tensor, and the
    arguments of the functions every caller passes it to."""

    def __init__(self, nodes: dict, functions: dict, filename: str):
        self.nodes, self.functions, self.filename = nodes, functions, filename
        self._arguments: dict[str, set[int]] | None = None

    def is_prefix(self, tensor: str, body: str | None) -> bool:
        """The tensor is the prefix itself, through Identity ops."""
        kind, value = self._resolve(tensor, body, through=("Identity",))
        return (kind == "node" and value == self.filename) or (kind == "arg" and value in self.arguments(body))

    def derives(self, tensor: str, body: str | None) -> bool:
        """The tensor is made from the prefix and relative constant suffixes only (a save path
        of TensorFlow's savers), and from the prefix at least once."""
        return self._path(tensor, body, 0) == "prefix"

    def _path(self, tensor: str, body: str | None, depth: int) -> str | None:
        """"prefix" for a path made from the prefix, "constant" for constants only, None otherwise."""
        if self.is_prefix(tensor, body):
            return "prefix"
        kind, value = self._resolve(tensor, body, through=())
        if kind != "node" or depth > 32:
            return None
        node = self.nodes[value] if body is None else self._body_nodes(body)[value]
        if node.op == "Const":
            strings = [s.decode("utf-8", "replace") for s in node.attr["value"].tensor.string_val]
            return "constant" if all(not s.startswith("/") and ".." not in s for s in strings) else None
        if node.op not in _PATH_OPS:
            return None
        sources = [self._path(source, body, depth + 1) for source in _data_inputs(node)]
        if node.op == "StaticRegexFullMatch":  # a bool: which constant suffix a Select takes
            return "constant" if None not in sources else None
        if node.op == "Select":
            sources = sources[1:] if sources and sources[0] is not None else [None]
        if not sources or None in sources:
            return None
        return "prefix" if "prefix" in sources else "constant"

    def arguments(self, body: str | None) -> set[int]:
        """Indexes of the function's arguments that every call passes the prefix."""
        if body is None:
            return set()
        if self._arguments is None:
            self._arguments = self._bind()
        return self._arguments.get(body, set())

    def _bind(self) -> dict[str, set[int]]:
        calls: dict[str, list[tuple[str | None, list[str]]]] = {}
        for caller, node in [(None, n) for n in self.nodes.values()] + [
                (name, n) for name, f in self.functions.items() for n in f.node_def]:
            callee = node.attr["f"].func.name if node.op in _CALLS and "f" in node.attr else None
            if callee in self.functions:
                calls.setdefault(callee, []).append((caller, _data_inputs(node)))
        bound: dict[str, set[int]] = {}
        self._arguments = bound
        for _ in range(8):  # nested calls, a few levels deep
            changed = False
            for callee, sites in calls.items():
                arity = len(self.functions[callee].signature.input_arg)
                indexes = {i for i in range(arity) if all(
                    i < len(inputs) and self.is_prefix(inputs[i], caller) for caller, inputs in sites)}
                if indexes != bound.get(callee, set()):
                    bound[callee], changed = indexes, True
            if not changed:
                break
        return bound

    @functools.cache
    def _body_nodes(self, body: str) -> dict:
        return {node.name: node for node in self.functions[body].node_def}

    def _resolve(self, tensor: str, body: str | None, through: tuple[str, ...]) -> tuple[str, str | int | None]:
        """("node", name) or ("arg", index) that the tensor comes from, past the `through` ops."""
        for _ in range(64):
            name = _node_name(tensor)
            if body is None:
                node = self.nodes.get(name)
            else:
                args = [arg.name for arg in self.functions[body].signature.input_arg]
                if name in args:
                    return "arg", args.index(name)
                node = self._body_nodes(body).get(name)
            if node is None:
                return "missing", None
            if node.op not in through or not _data_inputs(node):
                return "node", name
            tensor = _data_inputs(node)[0]
        return "missing", None


def _data_inputs(node) -> list[str]:
    return [i for i in node.input if not i.startswith("^")]


def _node_name(tensor: str) -> str:
    return tensor.lstrip("^").split(":", 1)[0]


def _reachable(roots: list[str], nodes: dict) -> set[str]:
    """Main-graph nodes that the roots (tensor or op names) depend on, through inputs."""
    seen, stack = set(), [_node_name(root) for root in roots]
    while stack:
        name = stack.pop()
        if name in seen or name not in nodes:
            continue
        seen.add(name)
        stack.extend(_node_name(i) for i in nodes[name].input)
    return seen


def _called(node_defs, functions: dict) -> set[str]:
    """Functions named in the nodes' attributes (calls, loop and branch bodies, ...)."""
    names = set()
    for node in node_defs:
        for value in node.attr.values():
            if value.HasField("func"):
                names.add(value.func.name)
            names.update(f.name for f in value.list.func)
    return names & set(functions)


def _functions(node_defs, functions: dict) -> set[str]:
    """The functions the nodes call, and those these call, transitively."""
    found, stack = set(), list(_called(node_defs, functions))
    while stack:
        name = stack.pop()
        if name not in found:
            found.add(name)
            stack.extend(_called(functions[name].node_def, functions))
    return found


def _function_ops(names: set[str], functions: dict) -> set[str]:
    return {node.op for name in names for node in functions[name].node_def}
