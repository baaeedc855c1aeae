"""The operations check keeps to what this project exports: every architecture and
shortcut passes, and checkpoint writes outside the saver's own part are refused."""

import pathlib
import shutil

import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

import hostile_savers
from pipeline.export import saved_model
from pipeline.model.architecture import ARCHES, SHORTCUTS, ModelConfig
from pipeline.model.network import build_model
from pipeline.release.op_gate import MODEL_OPS, SAVER_OPS, GraphOps, graph_ops, refusal, refused_ops

# The smallest depth of each family, and every shortcut on the paper's two nets.
VARIANTS = [(arch, {"resnet": 8, "wrn": 10, "resnext": 11}[arch.removeprefix("accumulated-").replace(
    "accumulated", "resnet")], "projection") for arch in ARCHES] + [
    (arch, 8, shortcut) for arch in ("resnet", "accumulated") for shortcut in SHORTCUTS if shortcut != "projection"]


@pytest.mark.slow  # builds and exports a model per variant
@pytest.mark.parametrize("arch,depth,shortcut", VARIANTS)
def test_every_export_of_the_project_passes(arch, depth, shortcut, tmp_path):
    model = build_model(ModelConfig(arch, depth, 3, shortcut=shortcut))
    path = saved_model.export_saved_model(model, ["a", "b", "c"], tmp_path / "base", top_k=2)
    ops = graph_ops(path)
    assert refused_ops(ops) == [], (arch, shortcut)
    # The saver's checkpoint ops are the saver's alone: no signature runs them.
    assert {"SaveV2", "RestoreV2"} <= ops.saver and not ops.model & {"SaveV2", "RestoreV2", "MergeV2Checkpoints"}


def test_checkpoint_and_file_ops_outside_the_saver_are_refused():
    assert refused_ops(GraphOps(frozenset({"Conv2D", "SaveV2"}), frozenset())) == ["SaveV2"]
    assert refused_ops(GraphOps(frozenset({"Conv2D"}), restore=frozenset({"RestoreV2", "WriteFile"}))) == ["WriteFile"]
    assert refused_ops(GraphOps(frozenset({"Conv2D"}), restore=frozenset({"RestoreV2", "SaveV2"}))) == ["SaveV2"]
    assert not {"ReadFile", "WriteFile", "MatchingFiles", "PyFunc", "EagerPyFunc"} & (MODEL_OPS | SAVER_OPS)


# --- the saver's part has a saver's structure, nothing hung on it ----------------------------------


@pytest.fixture(scope="module")
def clean_export(tmp_path_factory):
    model = build_model(ModelConfig("resnet", 8, 3))
    return saved_model.export_saved_model(model, ["a", "b", "c"], tmp_path_factory.mktemp("clean") / "base", top_k=2)


@pytest.fixture
def candidate(clean_export, tmp_path):
    copy = tmp_path / "candidate" / "1"
    shutil.copytree(clean_export, copy)
    return copy


def _load_as_tf_serving_does(folder):
    """The TF1 loader TF Serving's C++ mirrors: restore op fed with the variables prefix."""
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        tf.compat.v1.saved_model.loader.load(session, ["serve"], str(folder))


def test_a_clean_export_and_tf_servings_own_models_have_a_savers_structure(clean_export):
    assert graph_ops(clean_export).saver_problems == ()
    testdata = pathlib.Path(__file__).parent / "data" / "tf_serving"
    for name in ("saved_model_half_plus_two_cpu", "saved_model_half_plus_two_tf2_cpu"):
        assert graph_ops(testdata / name / "00000123").saver_problems == (), name


def test_a_checkpoint_write_hung_on_the_restore_op_runs_at_load_and_is_refused(candidate, tmp_path):
    target = tmp_path / "written-at-load"
    hostile_savers.save_on_restore(candidate, target)
    _load_as_tf_serving_does(candidate)
    assert pathlib.Path(f"{target}.index").exists()  # the graft is real: loading wrote it
    ops = graph_ops(candidate)
    assert "SaveV2" in refused_ops(ops) and "uses operations" in refusal(ops)


def test_a_write_of_every_request_hung_on_restore_and_signature_is_the_models_and_refused(candidate, tmp_path):
    hostile_savers.save_requests_on_restore(candidate, tmp_path / "requests")
    ops = graph_ops(candidate)
    assert "SaveV2" in ops.model and "SaveV2" in refused_ops(ops)


def test_a_merge_that_moves_another_versions_variables_at_load_is_refused(candidate, clean_export, tmp_path):
    victim = tmp_path / "victim"
    shutil.copytree(pathlib.Path(clean_export) / "variables", victim)
    hostile_savers.merge_on_restore(candidate, victim / "variables", tmp_path / "moved" / "variables")
    _load_as_tf_serving_does(candidate)
    assert not (victim / "variables.index").exists() and (tmp_path / "moved" / "variables.index").exists()
    assert "MergeV2Checkpoints" in refused_ops(graph_ops(candidate))


@pytest.mark.parametrize("graft", [hostile_savers.restore_from_elsewhere,
                                   hostile_savers.restore_from_elsewhere_in_the_function])
def test_a_restore_from_a_checkpoint_outside_the_candidate_is_refused(candidate, tmp_path, graft):
    shutil.copytree(candidate / "variables", tmp_path / "elsewhere")
    graft(candidate, tmp_path / "elsewhere" / "variables")
    _load_as_tf_serving_does(candidate)
    shutil.rmtree(tmp_path / "elsewhere")
    with pytest.raises(Exception):  # the graft is real: loading needs that checkpoint, not its own
        _load_as_tf_serving_does(candidate)
    ops = graph_ops(candidate)
    assert refused_ops(ops) == [] and ops.saver_problems, ops  # only its structure gives it away
    assert "restores from another prefix than the loader's" in refusal(ops)


def test_a_write_elsewhere_hung_on_the_save_op_is_refused(candidate, tmp_path):
    hostile_savers.save_on_save(candidate, tmp_path / "elsewhere")
    ops = graph_ops(candidate)
    assert any("writes elsewhere than under the loader's prefix" in p for p in ops.saver_problems), ops


def test_a_suffix_that_climbs_out_of_the_prefix_is_not_a_savers_path(candidate):
    saved_model = saved_model_pb2.SavedModel.FromString((candidate / "saved_model.pb").read_bytes())
    for function in saved_model.meta_graphs[0].graph_def.library.function:
        for node in function.node_def:
            if node.op == "Const" and node.attr["value"].tensor.string_val == [b"_temp/part"]:
                node.attr["value"].tensor.string_val[0] = b"/../../1/variables/variables"
    (candidate / "saved_model.pb").write_bytes(saved_model.SerializeToString())
    assert graph_ops(candidate).saver_problems
