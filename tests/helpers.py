"""Helpers shared by tests: the `accresnet` command in subprocesses, deployed servers, waiting,
a process's memory."""

import os
import subprocess
import sys
import time

from serving.deployment import free_ports  # noqa: F401 (the tests' port helper)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def accresnet(*args, env=None, **kwargs):
    """Start `accresnet ARGS` as a subprocess (the module, so no install is needed)."""
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    environment["PYTHONPATH"] = REPO + os.pathsep + environment.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def run_accresnet(*args, timeout=300, **kwargs):
    process = accresnet(*args, **kwargs)
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def deployed_server(models_dir, scratch, **flags):
    """An in-process `accresnet serve` started with the flags and config files of the
    Kubernetes serving Deployment (serving.deployment), the model volume at
    `models_dir`; keyword arguments append or replace flags (e.g. poll seconds)."""
    from serving.deployment import local_deployed_server
    from serving.server.main import RunningServer, build_parser
    from serving.server.options import options_from_args

    grpc_port, rest_port = free_ports(2)
    local = local_deployed_server(models_dir, scratch, grpc_port, rest_port)
    extra = [f"--{name}={value}" for name, value in flags.items()]
    args = build_parser().parse_args([*local.flags, *extra])
    return RunningServer(options_from_args(args))


def worker_records(run):
    """The records each worker of a run wrote at its end (RunDir.write_worker_record), by task."""
    import json

    from pipeline.train.rundir import WorkerRecord

    return [WorkerRecord(**json.loads(path.read_text())) for path in sorted((run.path / "workers").glob("*.json"))]


def wait_until(condition, timeout=60.0):
    """Poll `condition` every 0.2 s until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def rss_mib(pid: int | str = "self") -> float:
    """A process's resident set size in MiB (Linux /proc); this process's by default."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024
