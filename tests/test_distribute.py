import json

import pytest

from pipeline.distribute import Cluster, ClusterConfigError


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
