"""Which TensorFlow operations a candidate's graph may use.

TF Serving runs a SavedModel's graph as it is, with the server's rights: an
operation that reads or writes files (ReadFile, WriteFile, ...), runs a
process or talks to the network does so for every request that reaches it,
and at load time when it hangs off the model's init op. So validate lists
the op types of the whole graph (its functions included) and refuses any
outside MODEL_OPS, those an export of this project uses (every architecture
and shortcut, tests/test_op_gate.py keeps the list honest). The SavedModel's
own saver reads and writes checkpoints with SAVER_OPS; those are allowed only
in the part of the graph the saver's tensors reach (SaverDef), never in what
a signature or the init op runs.

This checks op types, not what the allowed ones compute: see docs/serving.md
for what the gate does and does not promise. Nothing here imports TensorFlow
beyond its protos.
"""

from __future__ import annotations

import dataclasses
import pathlib

# The op types of this project's exports (serving_default, serving_bytes, classify, the init op),
# TensorFlow 2.21: the network, image decoding and checks in the graph, and the call machinery.
MODEL_OPS = frozenset({
    "Abs", "AddV2", "All", "ArgMax", "Assert", "AssignVariableOp", "BiasAdd", "BitwiseAnd", "BroadcastTo",
    "Case", "Cast", "Ceil", "ConcatV2", "Const", "Conv2D", "Cumsum", "DecodeImage", "DecodeJpeg",
    "DecodePaddedRaw", "DecodeRaw", "DenseBincount", "Equal", "ExpandDims", "ExtractJpegShape", "Fill",
    "FloorDiv", "FloorMod", "FusedBatchNormV3", "GatherV2", "Greater", "GreaterEqual", "Identity", "If",
    "LeftShift", "Less", "LessEqual", "Log", "LogicalAnd", "LogicalNot", "LogicalOr", "MatMul", "Max",
    "Maximum", "Mean", "Minimum", "Mul", "NoOp", "NotEqual", "Pack", "Pad", "ParseExampleV2", "Placeholder",
    "Prod", "Range", "Rank", "ReadVariableOp", "RealDiv", "Relu", "Reshape", "ReverseV2", "Round",
    "ScaleAndTranslate", "SelectV2", "Shape", "Size", "Softmax", "Squeeze", "StatefulPartitionedCall",
    "StatelessCase", "StatelessIf", "StatelessWhile", "StaticRegexFullMatch", "StridedSlice", "StringLength",
    "StringSplitV2", "Sub", "Substr", "Sum", "TensorListFromTensor", "TensorListGetItem", "TensorListReserve",
    "TensorListSetItem", "TensorListStack", "TopKV2", "Transpose", "VarHandleOp", "VarIsInitializedOp", "Where",
    "While"
})
# The checkpoint ops of tf.saved_model.save's saver (its save and restore functions).
SAVER_OPS = frozenset({"DisableCopyOnRead", "MergeV2Checkpoints", "RestoreV2", "SaveV2", "Select", "ShardedFilename",
                       "StringJoin"})


@dataclasses.dataclass(frozen=True)
class GraphOps:
    model: frozenset[str]  # op types of everything but the saver's part: signatures, init op, any other node
    saver: frozenset[str]  # op types only the saver's tensors reach

    @property
    def all(self) -> frozenset[str]:
        return self.model | self.saver


def graph_ops(saved_model_dir: str | pathlib.Path) -> GraphOps:
    """The op types of a SavedModel's graph and function library, split by who runs them."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel.FromString((pathlib.Path(saved_model_dir) / "saved_model.pb").read_bytes())
    model, saver = set(), set()
    for meta_graph in saved_model.meta_graphs:
        graph = meta_graph.graph_def
        nodes = {node.name: node for node in graph.node}
        functions = {function.signature.name: function for function in graph.library.function}
        saver_def = meta_graph.saver_def
        saver_roots = [name for name in (saver_def.filename_tensor_name, saver_def.save_tensor_name,
                                         saver_def.restore_op_name) if name]
        saver_nodes = _reachable(saver_roots, nodes)
        model_nodes = set(nodes) - saver_nodes
        model_functions = _functions([nodes[n] for n in model_nodes], functions)
        saver_functions = _functions([nodes[n] for n in saver_nodes], functions) - model_functions
        # A function no node calls is counted with the model: nothing vouches for it.
        model_functions |= set(functions) - saver_functions
        model |= {nodes[n].op for n in model_nodes} | _function_ops(model_functions, functions)
        saver |= {nodes[n].op for n in saver_nodes} | _function_ops(saver_functions, functions)
    return GraphOps(frozenset(model), frozenset(saver - model))


def refused_ops(ops: GraphOps) -> list[str]:
    """The op types the gate refuses, sorted; empty when the graph passes."""
    return sorted((ops.model - MODEL_OPS) | (ops.saver - MODEL_OPS - SAVER_OPS))


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
