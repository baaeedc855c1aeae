"""Training that survives preemption: two workers on loopback, a tiny model.

SIGTERM to one worker mid-epoch makes both save at the same step and exit
with the preemption status; started again, they resume at that step and end
with the weights of an uninterrupted run. A worker that stops answering, or
dies, makes the other exit with one line and the lost-peer status.
"""

import json
import signal
import time

import numpy as np
import pytest
import tensorflow as tf

from helpers import accresnet, free_ports, worker_records
from pipeline.train.rundir import RunDir
from pipeline.train.preemption import EXIT_PEER_LOST, EXIT_PREEMPTED

pytestmark = pytest.mark.slow  # every test here trains or starts processes

STEPS_PER_EPOCH = 8  # 540 training images of synthetic:600 at a global batch of 64


def start_workers(model_dir, epochs=2):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    args = ["train", "--depth", "8", "--dataset", "synthetic:600", "--batch-size", "32", "--epochs", epochs,
            "--model-dir", model_dir, "--no-progress", "--deterministic"]
    return [accresnet(*args, env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
            for i in range(2)]


def finish(workers, timeout=400):
    outputs = [worker.communicate(timeout=timeout)[0] for worker in workers]
    return [worker.returncode for worker in workers], outputs


def wait_for_checkpoint(model_dir, workers, deadline=240):
    limit = time.monotonic() + deadline
    while not (model_dir / "checkpoints" / "checkpoint").exists():  # the state file, written after the data
        assert all(worker.poll() is None for worker in workers), finish(workers)[1]
        assert time.monotonic() < limit, "no checkpoint"
        time.sleep(0.05)


def checkpoint_values(model_dir):
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(model_dir / "checkpoints"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith(("model/", "optimizer/"))}


@pytest.mark.slow
def test_sigterm_mid_epoch_loses_no_step_and_ends_with_the_uninterrupted_weights(tmp_path):
    codes, outputs = finish(start_workers(tmp_path / "reference"))
    assert codes == [0, 0], outputs

    run_dir = tmp_path / "run"
    workers = start_workers(run_dir)
    wait_for_checkpoint(run_dir, workers)  # the end of epoch 1: the signal lands early in epoch 2
    workers[1].send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    codes, outputs = finish(workers, timeout=120)
    print(f"both workers stopped {time.monotonic() - signalled:.1f} s after SIGTERM")
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], outputs
    assert all("stopped by SIGTERM after step" in output for output in outputs), outputs
    saved = int(tf.train.latest_checkpoint(run_dir / "checkpoints").rsplit("-", 1)[1])
    assert saved % STEPS_PER_EPOCH != 0, saved  # a mid-epoch checkpoint: the steps since epoch 1 are kept
    assert [row.epoch for row in RunDir(run_dir).read_history()] == [1]

    codes, outputs = finish(start_workers(run_dir))
    assert codes == [0, 0], outputs
    run, reference = RunDir(run_dir), RunDir(tmp_path / "reference")
    summary = run.read_summary()
    assert summary.initial_step == saved and summary.steps_completed == 2 * STEPS_PER_EPOCH
    assert [row.epoch for row in run.read_history()] == [1, 2]  # none twice, none missing
    # The resumed epoch's training metrics cover all its steps: they were checkpointed.
    for row, expected in zip(run.read_history(), reference.read_history()):
        assert row.loss == pytest.approx(expected.loss, rel=1e-5) and row.accuracy == expected.accuracy

    # Same data order, same optimizer state: trainable weights and optimizer slots are
    # bit-identical. BN moving statistics were averaged over the workers once more (at the
    # stop); a moving average is linear, so they agree up to float32 rounding.
    resumed, uninterrupted = checkpoint_values(run_dir), checkpoint_values(tmp_path / "reference")
    assert resumed.keys() == uninterrupted.keys()
    for name, value in resumed.items():
        if "moving_mean" in name or "moving_variance" in name:
            np.testing.assert_allclose(value, uninterrupted[name], rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(value, uninterrupted[name], err_msg=name)
    records = worker_records(run)
    assert records[0].weights_sha256 == records[1].weights_sha256


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGSTOP, signal.SIGKILL], ids=["silent-peer", "dead-peer"])
def test_a_lost_peer_stops_the_survivor_with_one_line_and_a_retriable_status(tmp_path, how):
    workers = start_workers(tmp_path / "run", epochs=4)
    wait_for_checkpoint(tmp_path / "run", workers)
    workers[1].send_signal(how)
    lost = time.monotonic()
    try:
        output, _ = workers[0].communicate(timeout=90)
        seconds = time.monotonic() - lost
    finally:
        workers[1].kill()
        workers[1].communicate()
    print(f"worker 0 exited {seconds:.1f} s after its peer got {how.name}")
    assert workers[0].returncode == EXIT_PEER_LOST, output
    assert seconds < 60
    last = output.strip().splitlines()[-1]
    assert last.startswith("accresnet train: error: lost another worker") and "Traceback" not in output, output
    assert tf.train.latest_checkpoint(tmp_path / "run" / "checkpoints")  # kept
