"""The benchmark scripts' own logic: the collapse ablation's variants and table, the GPU estimate's counts."""

import json
import pathlib
import sys

import keras
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import collapse_ablation  # noqa: E402
import flops  # noqa: E402
import gpu_estimate  # noqa: E402
from pipeline.model import architecture  # noqa: E402
from pipeline.settings import recipes
from pipeline.model.network import build_model  # noqa: E402
from pipeline.train.rundir import RunSettings  # noqa: E402


def test_a_variant_is_a_recipe_of_its_own_and_changes_nothing_shared():
    before = dict(recipes.RECIPES)
    bn_l2 = collapse_ablation.VARIANTS["bn-l2"]
    assert bn_l2.recipe_for_run().name == "cpu-small-bn-l2"
    model = build_model(bn_l2.model_config(8, 10))
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(n.gamma_regularizer is not None and n.gamma_regularizer.l2 == 1e-4 for n in norms)
    zero_gamma = build_model(collapse_ablation.VARIANTS["zero-gamma"].model_config(8, 10))
    assert not zero_gamma.get_layer("stage1_block1").branch.bn2.gamma.numpy().any()
    assert build_model(collapse_ablation.VARIANTS["baseline"].model_config(8, 10)).get_layer(
        "stage1_block1").branch.bn2.gamma.numpy().all()
    classifier = build_model(collapse_ablation.VARIANTS["classifier-init"].model_config(8, 10)).get_layer(
        "probabilities")
    # U(+-1/sqrt(64)): nothing beyond 0.125, where he_normal's std alone is 0.18.
    assert abs(classifier.kernel.numpy()).max() <= 0.125
    warmup = collapse_ablation.VARIANTS["warmup"].recipe_for_run()
    assert warmup.learning_rate == 0.01 and warmup.factors == (10.0, 1.0, 0.1)
    assert warmup.boundaries == (0.25, 0.5, 0.75) and warmup.momentum == 0.9
    assert recipes.RECIPES == before and collapse_ablation.VARIANTS["baseline"].recipe_for_run() is before["cpu-small"]


def test_the_run_records_every_model_setting_and_rebuilds_the_same_network():
    model = collapse_ablation.VARIANTS["padding-classifier-init"].model_config(8, 10)
    settings = RunSettings(**RunSettings.model_settings(model), dataset="synthetic", class_names=tuple("abcdefghij"),
                           seed=0, recipe="r", replicas=1, workers=1, per_replica_batch=8, global_batch=8,
                           learning_rate=0.1, total_steps=1, steps_per_epoch=1, epochs=1, mixed_precision=False,
                           jit=False)
    assert settings.model_config() == model
    assert RunSettings.from_json(json.loads(json.dumps(settings.to_json()))).model_config() == model


def test_table_lists_every_seed_and_the_mean():
    row = {"initial_feature_rms": 2.6, "initial_loss": 2.5, "first_epoch_loss": 3.0, "first_epoch_accuracy": 0.1,
           "epoch1_val_loss": 7.0, "final_val_accuracy": 0.1}
    other = {**row, "first_epoch_loss": 2.0, "final_val_accuracy": 0.3}
    table = collapse_ablation.table({"baseline": {0: row, 1: other}})
    assert "| `baseline` |" in table and "| 0, 1 |" in table
    assert "3.00 / 2.00 (mean 2.50)" in table and "0.100 / 0.300 (mean 0.200)" in table


def test_resnet32_training_flops_are_three_forward_passes_of_he_et_als_count():
    flops = gpu_estimate.training_flops_per_image("resnet", 32)
    # 68.9M multiply-adds forward: He et al.'s "0.07 GFLOPs"-class ResNet-32.
    assert flops == pytest.approx(3 * 2 * 68.86e6, rel=1e-3)


def test_estimate_reads_measured_rates(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"runs": [{"arch": "resnet", "train_images_per_sec": 40.0},
                                            {"arch": "accumulated", "train_images_per_sec": 30.0}]}))
    assert gpu_estimate.main(["--results", str(results)]) == 0
    output = capsys.readouterr().out
    assert "median 40.0 images/s over 1 runs" in output and "| V100 (SXM2) | 15.7 |" in output


def test_the_bench_reports_shares_of_the_peak_the_precision_gain_and_the_step_cost():
    import train_throughput as bench

    best = {bench.BASELINE: 400.0, bench.FP32: 500.0, bench.MIXED: 800.0, "trainer --jit": 200.0,
            bench.PLAIN_FP32: 540.0, bench.PLAIN_MIXED: 840.0, bench.INPUT: 50_000.0,
            bench.PEAK_FP32: 250.0, bench.PEAK_BF16: 500.0}
    figures = bench.shares(best, 32)
    per_image = flops.training_flops_per_image(architecture.ModelConfig("accumulated", 32))
    assert figures[f"{bench.FP32}: share of peak"] == pytest.approx(500 * per_image / 1e9 / 250)
    assert figures[f"{bench.MIXED}: share of peak"] == pytest.approx(800 * per_image / 1e9 / 500)
    assert figures["mixed precision over float32, accumulated"] == pytest.approx(1.6)
    assert figures["accumulated step cost, float32"] == pytest.approx(1.08)
    text = bench.report(best, 32)
    assert "| trainer float32 | 500 | 1.25x baseline | 207 | 83% |" in text
    assert "| input pipeline alone (augmentation on) | 50000 | 100.00x trainer |" in text
    assert "mixed precision over float32: accumulated 1.60x, plain 1.56x" in text
    assert "project" not in text  # no row for the opt-in kernels, no line about them
    best[bench.MIXED_PROJECT] = 860.0
    text = bench.report(best, 32)
    assert bench.shares(best, 32)[bench.PROJECT_KERNELS_GAIN] == 1.72
    assert "mixed precision over float32, accumulated 1.72x, 1.075x TensorFlow's kernels' rate" in text


def test_the_bench_shows_each_target_round_by_round_and_how_many_rounds_met_it():
    import train_throughput as bench

    quiet = {bench.BASELINE: 400.0, bench.FP32: 500.0, bench.MIXED: 800.0, bench.PLAIN_FP32: 540.0,
             bench.PLAIN_MIXED: 840.0, bench.PEAK_FP32: 250.0, bench.PEAK_BF16: 500.0}
    # A disturbed round: mixed precision slowed, the float32 peak measured high.
    disturbed = {**quiet, bench.MIXED: 700.0, bench.PEAK_FP32: 300.0}
    table = bench.round_by_round([quiet, disturbed], 32).splitlines()
    assert table[0] == "| target | round 1 | round 2 | rounds meeting it |"
    rows = {row.split(" | ")[0].lstrip("| "): row for row in table[2:]}
    assert len(rows) == len(bench.TARGETS) == 6
    assert rows["mixed precision over float32, accumulated ≥ 1.50x"].endswith("| 1.60x | 1.40x | 1 of 2 |")
    assert rows["accumulated step cost, float32 ≤ 1.100"].endswith("| 1.080 | 1.080 | 2 of 2 |")
    assert rows["accumulated step cost, mixed precision ≤ 1.100"].endswith("| 1.050 | 1.200 | 1 of 2 |")
    per_image = flops.training_flops_per_image(architecture.ModelConfig("accumulated", 32))
    first, second = (f"{500 * per_image / 1e9 / peak:.1%}" for peak in (250, 300))
    assert rows["trainer float32, share of its precision's peak ≥ 75.0%"].endswith(f"| {first} | {second} | 1 of 2 |")


def test_the_step_profile_sorts_kernels_into_classes_and_counts_their_flops():
    import step_profile

    classes = {
        ("gradient_tape/m_1/stage1_block1_1/branch_1/conv1_1/convolution/Conv2DBackpropFilter",
         "_MklNativeConv2DBackpropFilter"): "conv grad kernel",
        ("m_1/stage1_block1_1/branch_1/conv1_1/convolution", "_MklNativeConv2D"): "conv forward",
        ("m_1/stage1_block1_1/branch_1/bn1_1/FusedBatchNormV3", "_MklNativeFusedBatchNormEx"): "BN forward",
        ("gradient_tape/m_1/stage1_block1_1/branch_1/bn1_1/FusedBatchNormGradV3",
         "_MklNativeFusedBatchNormGradV3"): "BN backward",
        ("m_1/stage1_block2_1/add", "AddV2"): "residual and accumulator adds",
        ("m_1/standardize_1/Cast", "Cast"): "casts",
        ("IteratorGetNext", "IteratorGetNext"): "input pipeline (IteratorGetNext)",
        ("SGD/AssignVariableOp", "AssignVariableOp"): "optimizer update",
    }
    for (name, op_type), label in classes.items():
        assert step_profile.op_class(name, op_type) == label
    events = [(name, op_type, 0.002) for name, op_type in classes] * 2  # two traced steps
    totals = step_profile.classify(events, {"stage1_block1/branch/conv1": 10**9}, steps=2)
    assert totals["conv grad kernel"].flops == 10**9 and totals["conv forward"].flops == 10**9
    assert totals["conv forward"].count == 1 and totals["conv forward"].seconds == pytest.approx(0.002)
    assert totals["BN forward"].flops == 0


def test_the_memory_bound_kernels_timed_alone_are_the_ones_the_graph_runs():
    import step_profile
    import tensorflow as tf

    a = tf.constant([[[[-1.0, 2.0]]], [[[3.0, -4.0]]]])
    b = tf.constant([[[[1.0, -1.0]]], [[[1.0, 1.0]]]])
    results = {name: kernel(a, b).numpy() for name, (kernel, _) in step_profile.MEMORY_OPS.items()}
    assert results["AddV2"].ravel().tolist() == results["AddN of 2 (gradients)"].ravel().tolist() == [0, 1, 4, -3]
    assert results["Relu"].ravel().tolist() == [0, 2, 3, 0]
    assert results["ReluGrad"].ravel().tolist() == [-1, 0, 3, -4]
    normalized = results["FusedBatchNormV3 (training)"]
    assert normalized.mean(axis=(0, 1, 2)) == pytest.approx([0, 0], abs=1e-6)
    assert results["FusedBatchNormGradV3"].shape == a.shape
    for kernel, _ in step_profile.MEMORY_OPS.values():  # every one also takes bfloat16, as under mixed precision
        assert kernel(tf.cast(a, tf.bfloat16), tf.cast(b, tf.bfloat16)).dtype == tf.bfloat16


@pytest.mark.slow  # exports a model and starts a server
def test_classify_concurrency_bench_runs_and_reports_a_ratio_per_setting():
    import subprocess

    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "classify_concurrency.py"), "--images", "40",
                             "--depth", "8", "--batch-size", "8", "--concurrency", "1,3", "--rounds", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "--concurrency 1:" in result.stdout and "x --concurrency 1)" in result.stdout
    figures = json.loads(result.stdout.splitlines()[-1])
    assert figures["images"] == 40 and set(figures["images_per_sec"]) == {"1", "3"}
    assert all(rate > 0 for rate in figures["images_per_sec"].values())
