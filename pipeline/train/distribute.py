"""Choosing the distribution strategy: the cluster from TF_CONFIG and the local devices.

TF_CONFIG comes from the environment, or is derived for a pod of a
Kubernetes Indexed Job from JOB_COMPLETION_INDEX and the ACCRESNET_*
variables the manifests set (see `indexed_job_tf_config`).

One worker: MirroredStrategy over all local GPUs, else over the CPU, which
`--devices N` splits into N logical devices so that N replicas run on a
GPU-less machine. Several workers named in TF_CONFIG:
MultiWorkerMirroredStrategy, with the chief (task "chief", or worker 0 when
there is none) the only one that writes summaries and exports.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping

from pipeline.errors import UserError

# TensorFlow is imported only where a strategy is made or a worker leaves: `accresnet tf-config`
# reads and checks TF_CONFIG here, in every training pod, without it.

log = logging.getLogger(__name__)


class ClusterConfigError(UserError, ValueError):
    """TF_CONFIG that does not describe a usable cluster."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """This process's place in the training cluster."""

    num_workers: int = 1
    task_type: str = "worker"
    task_id: int = 0
    has_chief_task: bool = False

    @property
    def is_multi_worker(self) -> bool:
        return self.num_workers > 1

    @property
    def worker_index(self) -> int:
        """This process's place among all workers, the chief (when there is one) first."""
        if self.task_type == "chief":
            return 0
        return self.task_id + (1 if self.has_chief_task else 0)

    @property
    def is_chief(self) -> bool:
        if self.has_chief_task:
            return self.task_type == "chief"
        return self.task_type == "worker" and self.task_id == 0

    @classmethod
    def from_tf_config(cls, tf_config: str | None) -> Cluster:
        """Parse TF_CONFIG; no TF_CONFIG (or a one-worker cluster) is a single worker."""
        if not tf_config:
            return cls()
        try:
            config = json.loads(tf_config)
            cluster = config.get("cluster", {})
            task = config.get("task", {})
        except (json.JSONDecodeError, AttributeError) as error:
            raise ClusterConfigError(f"TF_CONFIG is not a JSON object with 'cluster' and 'task': {error}") from None
        workers = list(cluster.get("worker", []))
        chiefs = list(cluster.get("chief", []))
        if len(chiefs) > 1:
            raise ClusterConfigError(f"TF_CONFIG names {len(chiefs)} chiefs; at most one is allowed")
        num_workers = len(workers) + len(chiefs)
        if num_workers <= 1:
            return cls(num_workers=1, has_chief_task=bool(chiefs), task_type="chief" if chiefs else "worker")
        task_type, task_id = task.get("type"), task.get("index", 0)
        members = {"worker": workers, "chief": chiefs}.get(task_type)
        if members is None or not isinstance(task_id, int) or not 0 <= task_id < len(members):
            raise ClusterConfigError(
                f"TF_CONFIG task {task!r} is not one of the cluster's {len(workers)} workers"
                + (" and 1 chief" if chiefs else "")
            )
        return cls(num_workers=num_workers, task_type=task_type, task_id=task_id, has_chief_task=bool(chiefs))

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Cluster:
        return cls.from_tf_config(tf_config_from_environment(environ))


# Kubernetes: an Indexed Job sets JOB_COMPLETION_INDEX in each pod; the
# manifests add the worker count and where the workers are found.
INDEX_VARIABLE = "JOB_COMPLETION_INDEX"
WORKERS_VARIABLE = "ACCRESNET_NUM_WORKERS"
JOB_NAME_VARIABLE = "ACCRESNET_JOB_NAME"
SERVICE_VARIABLE = "ACCRESNET_WORKER_SERVICE"
PORT_VARIABLE = "ACCRESNET_WORKER_PORT"
DEFAULT_WORKER_PORT = 2222


def indexed_job_tf_config(index: int, num_workers: int, job_name: str, service: str,
                          port: int = DEFAULT_WORKER_PORT) -> dict:
    """TF_CONFIG for pod `index` of an Indexed Job whose pods are reachable through a
    headless Service: pod i is `<job_name>-<i>.<service>` (its hostname and subdomain)."""
    if num_workers < 1:
        raise ClusterConfigError(f"{WORKERS_VARIABLE} must be at least 1; got {num_workers}")
    if not 0 <= index < num_workers:
        raise ClusterConfigError(f"{INDEX_VARIABLE}={index} is outside the {num_workers} workers")
    if not job_name or not service:
        raise ClusterConfigError(f"{JOB_NAME_VARIABLE} and {SERVICE_VARIABLE} must name the Job and its Service")
    workers = [f"{job_name}-{i}.{service}:{port}" for i in range(num_workers)]
    return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}


def tf_config_from_environment(environ: Mapping[str, str] = os.environ) -> str | None:
    """TF_CONFIG as set (by hand, or by Kubeflow's TFJob), else derived for an Indexed Job, else None."""
    if environ.get("TF_CONFIG"):
        return environ["TF_CONFIG"]
    if INDEX_VARIABLE not in environ:
        return None
    if WORKERS_VARIABLE not in environ:
        # A pod of an Indexed Job that says nothing of its peers: guessing one worker would
        # train N separate models where N were meant to train one.
        raise ClusterConfigError(f"{INDEX_VARIABLE} is set (a pod of an Indexed Job) but {WORKERS_VARIABLE} is "
                                 f"not: set it to the Job's completions ({WORKERS_VARIABLE}=1 for one worker)")
    try:
        index, workers = int(environ[INDEX_VARIABLE]), int(environ[WORKERS_VARIABLE])
        port = int(environ.get(PORT_VARIABLE, DEFAULT_WORKER_PORT))
    except ValueError as error:
        raise ClusterConfigError(f"the Indexed Job's variables must be integers: {error}") from None
    config = indexed_job_tf_config(index, workers, environ.get(JOB_NAME_VARIABLE, ""),
                                   environ.get(SERVICE_VARIABLE, ""), port)
    return json.dumps(config)


def configure_devices(count: int | None) -> list[str]:
    """Device names for MirroredStrategy; splits the CPU into `count` logical devices
    when there is no GPU. Must run before TensorFlow initializes its devices."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if count is not None and count > len(gpus):
            raise ClusterConfigError(f"--devices {count}: this machine has {len(gpus)} GPU(s)")
        return [f"/gpu:{i}" for i in range(count or len(gpus))]
    count = count or 1
    if count > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
        except RuntimeError:
            pass  # already initialized: enough if an earlier split made as many devices
        available = len(tf.config.list_logical_devices("CPU"))
        if available < count:
            raise ClusterConfigError(
                f"--devices {count}: TensorFlow already started with {available} CPU device(s); "
                "the split must happen before any TensorFlow operation runs"
            )
    return [f"/cpu:{i}" for i in range(count)]


def make_strategy(cluster: Cluster, devices: int | None):
    """MultiWorkerMirroredStrategy for a multi-worker cluster, else MirroredStrategy."""
    import tensorflow as tf

    if cluster.is_multi_worker:
        # MultiWorkerMirroredStrategy reads the cluster from TF_CONFIG itself.
        os.environ["TF_CONFIG"] = tf_config_from_environment(os.environ)
        if devices is not None and not tf.config.list_physical_devices("GPU"):
            log.warning("--devices is ignored with several workers: each worker trains on its CPU")
        return tf.distribute.MultiWorkerMirroredStrategy()
    names = configure_devices(devices)
    if names[0].startswith("/cpu"):
        # Logical CPUs share memory, so reducing on one device costs little,
        # and unlike collective ops (the default) it keeps no per-process
        # state that a second strategy in the same process could clash with.
        return tf.distribute.MirroredStrategy(names, cross_device_ops=tf.distribute.ReductionToOneDevice())
    return tf.distribute.MirroredStrategy(names)


def leave_together(barrier: str, timeout_seconds: float = 3600.0) -> None:
    """Wait until every worker of the cluster reaches `barrier`. A worker that exits while
    the chief still works (exporting, after training) stops sending heartbeats, and
    TensorFlow's coordination service then reports it crashed and aborts the chief's
    collectives; leaving together ends a multi-worker run cleanly."""
    from tensorflow.python.eager import context

    context.context().wait_at_barrier(barrier, int(timeout_seconds * 1000))
