import json
import threading
import time

import pytest

from helpers import accresnet, free_ports, worker_records
from pipeline.train.rundir import RunDir

pytestmark = pytest.mark.slow  # every test here trains or starts processes


@pytest.mark.slow
def test_two_workers_train_together_with_identical_weights(tmp_path):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    args = ["train", "--depth", "8", "--dataset", "synthetic:600", "--batch-size", "32", "--epochs", "2",
            "--model-dir", tmp_path / "run", "--export-base", tmp_path / "models", "--no-progress"]
    workers = [
        accresnet(*args, env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
        for i in range(2)
    ]
    outputs, exited = [""] * 2, [0.0] * 2

    def wait(index):
        outputs[index] = workers[index].communicate(timeout=400)[0]
        exited[index] = time.time()
    waiters = [threading.Thread(target=wait, args=(i,)) for i in range(2)]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join()
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output
        # The other worker waits while the chief exports, so no one is reported lost at the end.
        assert "unhealthy" not in output and "crashed" not in output, output
    assert outputs[0].strip().splitlines()[-1] == str(tmp_path / "models" / "1"), outputs[0]
    assert not (tmp_path / "models" / "2").exists()  # only the chief exports
    exported = (tmp_path / "models").stat().st_mtime  # the version renamed into place
    assert exited[1] >= exported, f"worker 1 exited {exported - exited[1]:.1f} s before the export was in place"
    run = RunDir(tmp_path / "run")
    summary = run.read_summary()
    assert summary.settings.workers == 2 and summary.settings.replicas == 2 and summary.settings.global_batch == 64
    assert summary.epochs_completed == 2
    # Synchronous training: both workers end with the same weights, bit for bit.
    records = worker_records(run)
    assert [(r.task_type, r.task_id, r.steps_completed) for r in records] == [
        ("worker", 0, summary.steps_completed), ("worker", 1, summary.steps_completed)]
    assert records[0].weights_sha256 == records[1].weights_sha256
    # Only the chief keeps files; the other worker's scratch checkpoints are gone.
    assert not (tmp_path / "run" / ".workers" / "worker-1").exists()
    logs = sorted((tmp_path / "run" / "logs").iterdir())
    assert [p.name for p in logs if p.is_dir()] == ["train", "validation"]
    # The chief's one events file of the run's hparams; the other worker writes no logs.
    assert len([p for p in logs if p.name.startswith("events.out.tfevents.")]) == len(logs) - 2 == 1
