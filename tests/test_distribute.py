import json

import pytest

from pipeline.train.distribute import Cluster, ClusterConfigError, tf_config_from_environment


def tf_config(cluster, task_type="worker", index=0):
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


def test_no_tf_config_is_one_chief_worker():
    cluster = Cluster.from_tf_config(None)
    assert (cluster.num_workers, cluster.is_chief, cluster.is_multi_worker) == (1, True, False)


def test_one_worker_cluster_is_not_multi_worker():
    cluster = Cluster.from_tf_config(tf_config({"worker": ["a:1"]}))
    assert not cluster.is_multi_worker and cluster.is_chief


@pytest.mark.parametrize("index, chief", [(0, True), (1, False), (2, False)])
def test_worker_zero_is_chief_without_a_chief_task(index, chief):
    cluster = Cluster.from_tf_config(tf_config({"worker": ["a:1", "b:1", "c:1"]}, index=index))
    assert cluster.num_workers == 3 and cluster.task_id == index and cluster.is_chief is chief


def test_a_chief_task_is_the_chief():
    spec = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    assert Cluster.from_tf_config(tf_config(spec, "chief", 0)).is_chief
    worker0 = Cluster.from_tf_config(tf_config(spec, "worker", 0))
    assert worker0.num_workers == 3 and not worker0.is_chief


@pytest.mark.parametrize("value, message", [
    ("not json", "not a JSON object"),
    (tf_config({"worker": ["a:1", "b:1"]}, index=2), "not one of the cluster's 2 workers"),
    (tf_config({"worker": ["a:1", "b:1"]}, task_type="ps"), "not one of"),
    (tf_config({"chief": ["a:1", "b:1"]}, task_type="chief"), "2 chiefs"),
])
def test_bad_tf_config_is_explained(value, message):
    with pytest.raises(ClusterConfigError, match=message):
        Cluster.from_tf_config(value)


JOB = {"JOB_COMPLETION_INDEX": "0", "ACCRESNET_NUM_WORKERS": "4", "ACCRESNET_JOB_NAME": "accresnet-train",
       "ACCRESNET_WORKER_SERVICE": "accresnet-workers"}


@pytest.mark.parametrize("index", range(4))
def test_indexed_job_tf_config_for_every_index(index):
    environ = {**JOB, "JOB_COMPLETION_INDEX": str(index)}
    config = json.loads(tf_config_from_environment(environ))
    assert config == {
        "cluster": {"worker": [f"accresnet-train-{i}.accresnet-workers:2222" for i in range(4)]},
        "task": {"type": "worker", "index": index},
    }
    cluster = Cluster.from_environment(environ)
    assert cluster.num_workers == 4 and cluster.task_id == index and cluster.is_chief is (index == 0)


def test_explicit_tf_config_wins_and_port_is_configurable():
    explicit = tf_config({"worker": ["a:1", "b:1"]}, index=1)
    assert tf_config_from_environment({**JOB, "TF_CONFIG": explicit}) == explicit
    config = json.loads(tf_config_from_environment({**JOB, "ACCRESNET_WORKER_PORT": "5000"}))
    assert config["cluster"]["worker"][3] == "accresnet-train-3.accresnet-workers:5000"
    assert tf_config_from_environment({}) is None


@pytest.mark.parametrize("change, message", [
    ({"JOB_COMPLETION_INDEX": "4"}, "outside the 4 workers"),
    ({"ACCRESNET_NUM_WORKERS": "zero"}, "must be integers"),
    ({"ACCRESNET_NUM_WORKERS": "0"}, "at least 1"),
    ({"ACCRESNET_WORKER_SERVICE": ""}, "must name the Job and its Service"),
])
def test_bad_indexed_job_variables(change, message):
    with pytest.raises(ClusterConfigError, match=message):
        tf_config_from_environment({**JOB, **change})


def test_worker_index_puts_the_chief_first():
    workers = {"worker": ["a:1", "b:1"]}
    with_chief = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    index = lambda cluster, task: Cluster.from_tf_config(json.dumps({"cluster": cluster, "task": task})).worker_index  # noqa: E731
    assert [index(workers, {"type": "worker", "index": i}) for i in (0, 1)] == [0, 1]
    assert index(with_chief, {"type": "chief", "index": 0}) == 0
    assert [index(with_chief, {"type": "worker", "index": i}) for i in (0, 1)] == [1, 2]


def test_an_indexed_job_pod_without_a_worker_count_is_refused():
    environ = {key: value for key, value in JOB.items() if key != "ACCRESNET_NUM_WORKERS"}
    with pytest.raises(ClusterConfigError, match="ACCRESNET_NUM_WORKERS is not"):
        tf_config_from_environment(environ)


@pytest.mark.parametrize("environ, message", [
    ({"TF_CONFIG": "{not json"}, "not a JSON object"),
    ({"TF_CONFIG": tf_config({"worker": ["a:1", "b:1"]}, index=5)}, "not one of the cluster's 2 workers"),
    ({"JOB_COMPLETION_INDEX": "1"}, "ACCRESNET_NUM_WORKERS is not"),
])
def test_tf_config_verb_refuses_what_train_refuses(environ, message):
    import os
    import subprocess
    import sys

    from helpers import REPO

    clean = {k: v for k, v in os.environ.items() if k != "TF_CONFIG" and not k.startswith(("JOB_", "ACCRESNET_"))}
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "tf-config"], cwd=REPO, capture_output=True,
                            text=True, timeout=60, env={**clean, **environ})
    assert result.returncode == 2 and result.stdout == "", result
    assert result.stderr.startswith("accresnet tf-config: error:") and message in result.stderr, result.stderr
