import json

import pytest

from helpers import accresnet, free_ports
from pipeline.rundir import RunDir


@pytest.mark.slow
def test_two_workers_train_together_with_identical_weights(tmp_path):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    args = ["train", "--depth", "8", "--dataset", "synthetic:600", "--batch-size", "32", "--epochs", "2",
            "--model-dir", tmp_path / "run", "--no-progress"]
    workers = [
        accresnet(*args, env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
        for i in range(2)
    ]
    outputs = [worker.communicate(timeout=400)[0] for worker in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output
    run = RunDir(tmp_path / "run")
    summary = run.read_summary()
    assert summary.settings.workers == 2 and summary.settings.replicas == 2 and summary.settings.global_batch == 64
    assert summary.epochs_completed == 2
    # Synchronous training: both workers end with the same weights, bit for bit.
    records = run.read_worker_records()
    assert [(r.task_type, r.task_id, r.steps_completed) for r in records] == [
        ("worker", 0, summary.steps_completed), ("worker", 1, summary.steps_completed)]
    assert records[0].weights_sha256 == records[1].weights_sha256
    # Only the chief keeps files; the other worker's scratch checkpoints are gone.
    assert not (tmp_path / "run" / ".workers" / "worker-1").exists()
    assert sorted(p.name for p in (tmp_path / "run" / "logs").iterdir()) == ["train", "validation"]
