"""The benchmark scripts' own logic: the collapse ablation's variants and table, the GPU estimate's counts."""

import json
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import collapse_ablation  # noqa: E402
import gpu_estimate  # noqa: E402
from pipeline import architecture  # noqa: E402
from pipeline import recipes  # noqa: E402
from pipeline import model as model_module  # noqa: E402
from pipeline import train as train_module  # noqa: E402


def test_a_variant_changes_its_settings_for_its_run_only():
    build = train_module.build_model
    with collapse_ablation._applied(collapse_ablation.VARIANTS["bn-l2"]) as recipe:
        assert model_module.BN_WEIGHT_DECAY == 1e-4 and recipe == "cpu-small"
    assert model_module.BN_WEIGHT_DECAY == 0.0
    with collapse_ablation._applied(collapse_ablation.VARIANTS["zero-gamma"]):
        model = train_module.build_model(architecture.ModelConfig("resnet", 8))
        assert not model.get_layer("stage1_block1").branch.bn2.gamma.numpy().any()
    assert train_module.build_model is build
    with collapse_ablation._applied(collapse_ablation.VARIANTS["warmup"]) as recipe:
        warmup = recipes.get_recipe(recipe)
    assert warmup.learning_rate == 0.01 and warmup.factors == (10.0, 1.0, 0.1)
    assert warmup.boundaries == (0.25, 0.5, 0.75) and warmup.momentum == 0.9


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
