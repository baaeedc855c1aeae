"""The operations check keeps to what this project exports: every architecture and
shortcut passes, and checkpoint writes outside the saver's own part are refused."""

import pytest

from pipeline import export
from pipeline.architecture import ARCHES, SHORTCUTS, ModelConfig
from pipeline.model import build_model
from pipeline.op_gate import MODEL_OPS, SAVER_OPS, GraphOps, graph_ops, refused_ops

# The smallest depth of each family, and every shortcut on the paper's two nets.
VARIANTS = [(arch, {"resnet": 8, "wrn": 10, "resnext": 11}[arch.removeprefix("accumulated-").replace(
    "accumulated", "resnet")], "projection") for arch in ARCHES] + [
    (arch, 8, shortcut) for arch in ("resnet", "accumulated") for shortcut in SHORTCUTS if shortcut != "projection"]


@pytest.mark.slow  # builds and exports a model per variant
@pytest.mark.parametrize("arch,depth,shortcut", VARIANTS)
def test_every_export_of_the_project_passes(arch, depth, shortcut, tmp_path):
    model = build_model(ModelConfig(arch, depth, 3, shortcut=shortcut))
    path = export.export_saved_model(model, ["a", "b", "c"], tmp_path / "base", top_k=2)
    ops = graph_ops(path)
    assert refused_ops(ops) == [], (arch, shortcut)
    # The saver's checkpoint ops are the saver's alone: no signature runs them.
    assert {"SaveV2", "RestoreV2"} <= ops.saver and not ops.model & {"SaveV2", "RestoreV2", "MergeV2Checkpoints"}


def test_checkpoint_and_file_ops_outside_the_saver_are_refused():
    assert refused_ops(GraphOps(frozenset({"Conv2D", "SaveV2"}), frozenset())) == ["SaveV2"]
    assert refused_ops(GraphOps(frozenset({"Conv2D"}), frozenset({"RestoreV2", "WriteFile"}))) == ["WriteFile"]
    assert not {"ReadFile", "WriteFile", "MatchingFiles", "PyFunc", "EagerPyFunc"} & (MODEL_OPS | SAVER_OPS)
