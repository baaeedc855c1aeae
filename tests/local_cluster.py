"""Run a kustomization's workloads as local processes, as the manifests write them.

`LocalCluster` renders an overlay with kubectl and starts each workload's
containers with their own command, args and env. Only what a single machine
forces is mapped, and every mapping is recorded (and printed by the tests):

- images: each image name is a stage of the Dockerfile (its header says
  `docker build --target STAGE -t NAME`); the stage's ENTRYPOINT and ENV are
  used. `accresnet` is this checkout's `python -m pipeline.cli`;
  `tensorflow_model_server` is the binary when it is on PATH, else
  `accresnet serve` in its place, flag for flag (the serving Deployment's and
  the release Job's TF Serving sidecar alike). Folders and files the stage
  COPYs (the serving image's /config and /models/models.config) map to the
  checkout's, unless a volume is mounted over them.
- volumes: the PersistentVolumeClaim is one folder that every pod shares
  (subPath honoured), an emptyDir a folder per pod; absolute paths in args,
  env and the model server's model config map accordingly.
- the network: each container port becomes a free loopback port; Service
  names in args (`accresnet-serving:8500`) become the loopback port of the
  process behind them, and `localhost:PORT` the one of the container of the
  same pod that declares PORT (a native sidecar's); init containers run in
  order, a native sidecar (restartPolicy Always) beside the rest until the
  pod's container has finished; an Indexed Job's pods get JOB_COMPLETION_INDEX as
  Kubernetes sets it, and the TF_CONFIG that `accresnet tf-config` derives
  from the pod's env, with the headless Service's names mapped onto loopback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import time
import urllib.request

from helpers import REPO, free_ports
from manifests import ROOT, apply_slices, objects, one, selects
from serving import labels
from serving.deployment import Mapping, map_path, map_to_local

TRAINER_COMMAND = "accresnet"
MODEL_SERVER = "tensorflow_model_server"
PYTHON = "python3"


@dataclasses.dataclass(frozen=True)
class Image:
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    files: dict[str, pathlib.Path]  # folders and files baked into the image -> the checkout's


def dockerfile_images(path: pathlib.Path = ROOT / "Dockerfile") -> dict[str, Image]:
    """Image name -> its stage's entrypoint, CMD, env and copied folders."""
    text = path.read_text()
    names = dict((stage, name) for stage, name in re.findall(r"docker build --target (\S+) -t (\S+)", text))
    images = {}
    for block in re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]:
        stage = re.match(r"\S+ AS (\S+)", block).group(1)
        entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])", block, re.MULTILINE).group(1))
        cmd = re.search(r"^CMD (\[(?:.*\\\n)*.*\])", block, re.MULTILINE)
        cmd = json.loads(cmd.group(1).replace("\\\n", "")) if cmd else []
        env = {}
        for match in re.finditer(r"^ENV ((?:.*\\\n)*.*)", block, re.MULTILINE):
            for pair in re.findall(r"(\w+)=(\S+)", match.group(1)):
                env[pair[0]] = pair[1]
        files = {}
        for sources, target in re.findall(r"^COPY ((?:serving|pipeline)/\S+(?: \S+)*) (/\S+)/$", block, re.MULTILINE):
            folders = {str(pathlib.Path(source).parent) for source in sources.split()}
            if len(folders) == 1:
                files[target] = ROOT / folders.pop()
        # A single file copied to a path of its own (the serving image's /models/models.config).
        for source, target in re.findall(r"^COPY ((?:serving|pipeline)/\S+) (/\S*[^/\s])$", block, re.MULTILINE):
            files[target] = ROOT / source
        images[names[stage]] = Image(entrypoint, cmd, env, files)
    return images


@dataclasses.dataclass
class Pod:
    name: str
    command: list[str]
    env: dict[str, str]
    ports: dict[str, int]  # container port name or number -> local port
    process: subprocess.Popen | None = None
    log: pathlib.Path | None = None
    init: list[Pod] = dataclasses.field(default_factory=list)  # init containers, run to completion first
    # A native sidecar (an init container with restartPolicy Always): started, not waited for,
    # and stopped once the pod's container has finished.
    sidecar: bool = False

    def output(self) -> str:
        return self.log.read_text() if self.log and self.log.exists() else ""


class LocalCluster:
    def __init__(self, overlay: str, root: pathlib.Path, announce=print):
        self.overlay, self.root, self.announce = overlay, root, announce
        self.images = dockerfile_images()
        self.mappings: list[Mapping] = []
        self.service_ports: dict[str, int] = {}  # "service:port" -> local port
        self.pods: list[Pod] = []

    def _map(self, mapping: Mapping) -> None:
        if mapping not in self.mappings:
            self.mappings.append(mapping)
            self.announce(f"mapped {mapping}")

    # --- volumes ---------------------------------------------------------------------------

    def empty_dir(self, pod_name: str, volume: str) -> pathlib.Path:
        """The folder of this machine that holds the pod's emptyDir `volume`."""
        return self.root / "pods" / pod_name / volume

    def _mount_paths(self, pod_name: str, pod: dict, container: dict) -> dict[str, pathlib.Path]:
        volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
        paths = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                local = self.root / "volumes" / volume["persistentVolumeClaim"]["claimName"]
            elif "emptyDir" in volume:
                local = self.empty_dir(pod_name, mount["name"])
            elif "configMap" in volume:
                local = self.config_map(volume["configMap"]["name"])
            else:
                raise ValueError(f"volume kind of {volume['name']} is not mapped by the harness")
            local = local / mount.get("subPath", "")
            local.mkdir(parents=True, exist_ok=True)
            paths[mount["mountPath"]] = local
            self._map(Mapping(f"{pod_name} volume {mount['name']}", mount["mountPath"], str(local)))
        return paths

    def config_map(self, name: str) -> pathlib.Path:
        """A folder holding the ConfigMap's keys as files, as the kubelet mounts it."""
        local = self.root / "configmaps" / name
        local.mkdir(parents=True, exist_ok=True)
        for key, value in one(self.overlay, "ConfigMap", name).get("data", {}).items():
            (local / key).write_text(value)
        return local

    # --- args and env ----------------------------------------------------------------------

    def _map_value(self, value: str, paths: dict[str, pathlib.Path], what: str,
                   pod_ports: dict[int, int] | None = None) -> str:
        flag, separator, rest = value.partition("=")
        candidate = rest if separator and flag.startswith("-") else value
        host, _, port = candidate.rpartition(":")
        if host in ("localhost", "127.0.0.1") and port.isdigit() and int(port) in (pod_ports or {}):
            # Another container of the same pod: the pod's network is one loopback.
            local = pod_ports[int(port)]
            self._map(Mapping(f"{what} (in the pod)", candidate, f"127.0.0.1:{local}"))
            return value[:len(value) - len(candidate)] + f"127.0.0.1:{local}"
        if candidate.startswith("/"):
            local = map_path(candidate, paths)
            if local is not None:
                self._map(Mapping(what, candidate, str(local)))
                return value[:len(value) - len(candidate)] + str(local)
        kind, colon, path = candidate.partition(":")
        if colon and kind.isidentifier() and path.startswith("/") and not path.startswith("//"):
            # A dataset SPEC naming a folder of the pod (folder:/data/own-images).
            local = map_path(path, paths)
            if local is not None:
                self._map(Mapping(what, path, str(local)))
                return value[:len(value) - len(path)] + str(local)
        for address, port in self.service_ports.items():
            if candidate == address:
                self._map(Mapping(f"{what} (Service)", address, f"127.0.0.1:{port}"))
                return value[:len(value) - len(candidate)] + f"127.0.0.1:{port}"
        return value

    def _command(self, pod_name: str, container: dict) -> tuple[list[str], Image, bool]:
        """The container's command on this machine, its image, and whether it is the model server."""
        image_name = container["image"].rsplit(":", 1)[0]
        image = self.images[image_name]
        entrypoint = container.get("command") or image.entrypoint
        program = pathlib.Path(entrypoint[0]).name
        if program == TRAINER_COMMAND:
            command = [sys.executable, "-m", "pipeline.cli", *entrypoint[1:]]
            self._map(Mapping(f"{image_name} entrypoint", entrypoint[0], "python -m pipeline.cli (this checkout)"))
        elif program == PYTHON and container.get("command"):
            # A script the pod names (mounted from a ConfigMap): this machine's Python runs it.
            command = [sys.executable, *entrypoint[1:]]
            self._map(Mapping(f"{image_name} {program}", program, f"{sys.executable} (this checkout's)"))
        elif program == MODEL_SERVER:
            from serving.deployment import server_command

            command, stand_in = server_command(entrypoint[1:])
            if stand_in is not None:
                self._map(stand_in)
        else:
            raise ValueError(f"{pod_name}: no local stand-in for {entrypoint[0]}")
        return command, image, program == MODEL_SERVER

    def pod(self, pod_name: str, template: dict, extra_env: dict[str, str] | None = None) -> Pod:
        """The pod's container, after its init containers (run in order, as the kubelet does;
        native sidecars among them keep running beside the others).
        `template` is a pod template: its metadata (labels) and spec."""
        spec = template["spec"]
        pod_ports: dict[int, int] = {}  # container port -> local port, for localhost within the pod
        init = []
        for container in spec.get("initContainers", []):
            init.append(self._container(pod_name, template, container, extra_env, pod_ports,
                                        f"{pod_name}-{container['name']}"))
            init[-1].sidecar = is_sidecar(container)
        (container,) = spec["containers"]
        main = self._container(pod_name, template, container, extra_env, pod_ports)
        main.init = init
        return main

    def _container(self, pod_name: str, template: dict, container: dict, extra_env: dict[str, str] | None,
                   pod_ports: dict[int, int], name: str | None = None) -> Pod:
        """One container of the pod; `pod_ports` gathers the ports its containers declare, so that
        localhost:PORT in a later one's args finds the container listening on PORT."""
        command, image, is_model_server = self._command(pod_name, container)
        mounts = self._mount_paths(pod_name, template["spec"], container)
        if container.get("command"):  # its words after the program may name the pod's files
            command = [command[0], *(self._map_value(word, mounts, f"{pod_name} command", pod_ports)
                                     for word in command[1:])]
        # A volume mounted over an image's folder hides what the image has there.
        visible = {path: local for path, local in image.files.items() if map_path(path, mounts) is None}
        paths = {**visible, **mounts}
        for deployed, local in visible.items():
            self._map(Mapping(f"{container['image']} files", deployed, str(local)))
        declared = {str(p.get("name", p["containerPort"])): p["containerPort"] for p in container.get("ports", [])}
        local_ports = dict(zip(declared, free_ports(len(declared))))
        pod_ports.update({declared[port]: local_ports[port] for port in declared})
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": REPO}
        for key, value in {**image.env, **{e["name"]: e["value"] for e in container.get("env", [])},
                           **(extra_env or {})}.items():
            env[key] = self._map_value(value, paths, f"{pod_name} env {key}", pod_ports)
        args = container.get("args", [])
        if is_model_server:
            # The same mapping `make demo` uses: paths and ports, nothing else.
            by_number = {str(declared[name]): local_ports[name] for name in declared}
            local = map_to_local(args, paths, self.root / "pods" / pod_name / "config",
                                 by_number.get(_flag_value(args, "--port")),
                                 by_number.get(_flag_value(args, "--rest_api_port")))
            for mapping in local.mappings:
                self._map(Mapping(f"{pod_name} {mapping.what}", mapping.deployed, mapping.local))
            args = local.flags
        else:
            args = [self._map_value(arg, paths, f"{pod_name} arg", pod_ports) for arg in args]
        return Pod(name or pod_name, [*command, *args], env, local_ports)

    # --- workloads -------------------------------------------------------------------------

    def start(self, pod: Pod, init_timeout: float = 600) -> Pod:
        for init in pod.init:
            self.start(init)
            if not init.sidecar:
                self._wait_for(init, time.monotonic() + init_timeout)
        pod.log = self.root / "logs" / f"{pod.name}.log"
        pod.log.parent.mkdir(parents=True, exist_ok=True)
        pod.process = self._launch(pod)
        self.pods.append(pod)
        self.announce(f"started {pod.name}: {' '.join(pod.command)}")
        return pod

    def _launch(self, pod: Pod) -> subprocess.Popen:
        with pod.log.open("w") as log:
            return subprocess.Popen(pod.command, env=pod.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)

    def job_pods(self, name: str) -> list[Pod]:
        """The pods of a Job; an Indexed Job's get their index and the TF_CONFIG derived from it."""
        job = one(self.overlay, "Job", name)
        spec, template = job["spec"], job["spec"]["template"]
        if spec.get("completionMode") != "Indexed":
            return [self.pod(f"{name}-0", template)]
        count = spec["completions"]
        assert spec.get("parallelism", 1) == count, "the harness runs all indexes at once"
        return [self.pod(f"{name}-{index}", template, env)
                for index, env in enumerate(self._indexed_pod_env(template["spec"], count))]

    def _indexed_pod_env(self, spec: dict, count: int) -> list[dict[str, str]]:
        """Each index's extra env: JOB_COMPLETION_INDEX, as Kubernetes sets it in pod <index>,
        and the TF_CONFIG the pod derives from it with the workers' names mapped onto loopback."""
        worker_ports = free_ports(count)
        envs = []
        for index in range(count):
            env = {e["name"]: e["value"] for e in spec["containers"][0].get("env", [])}
            env["JOB_COMPLETION_INDEX"] = str(index)
            derived = json.loads(_derive_tf_config(env))
            workers = derived["cluster"]["worker"]
            for address, port in zip(workers, worker_ports):
                self._map(Mapping("worker address (headless Service)", address, f"127.0.0.1:{port}"))
            derived["cluster"]["worker"] = [f"127.0.0.1:{port}" for port in worker_ports]
            envs.append({"JOB_COMPLETION_INDEX": str(index), "TF_CONFIG": json.dumps(derived)})
        return envs

    def run_job(self, name: str, timeout: float) -> list[Pod]:
        """Start every pod of the Job and wait for all to succeed."""
        started = time.monotonic()
        deadline = started + timeout
        pods = [self.start(pod, init_timeout=timeout) for pod in self.job_pods(name)]
        for pod in pods:
            self._wait_for(pod, deadline)
        self.announce(f"Job {name} succeeded in {time.monotonic() - started:.0f}s")
        return pods

    def _wait_for(self, pod: Pod, deadline: float) -> None:
        """Until the pod's process ends, which it must do by `deadline` and with status 0;
        then its sidecars are stopped, as the kubelet stops them."""
        try:
            pod.process.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"{pod.name} did not finish in time:\n{pod.output()[-3000:]}") from None
        for sidecar in (init for init in pod.init if init.sidecar and init.process is not None):
            sidecar.process.terminate()
            try:
                sidecar.process.wait(timeout=60)
            except subprocess.TimeoutExpired:  # the grace period is over, as the kubelet's
                sidecar.process.kill()
        assert pod.process.returncode == 0, f"{pod.name} failed:\n{pod.output()[-3000:]}"

    def start_deployment(self, name: str) -> Pod:
        """One replica of the Deployment, reachable through every Service that selects it."""
        template = one(self.overlay, "Deployment", name)["spec"]["template"]
        pod = self.start(self.pod(f"{name}-0", template))
        for service in self.services_selecting(template["metadata"]["labels"]):
            for port in service["spec"]["ports"]:
                target = str(port.get("targetPort", port["port"]))
                self.service_ports[f"{service['metadata']['name']}:{port['port']}"] = pod.ports[target]
        return pod

    def services_selecting(self, labels: dict[str, str]) -> list[dict]:
        """The Services whose selector picks pods with these labels."""
        return [service for service in objects(self.overlay, "Service")
                if service["spec"].get("selector") and service["spec"]["selector"].items() <= labels.items()]

    def wait_ready(self, pod: Pod, deployment: str, timeout: float) -> None:
        """Until the Deployment's readiness probe (an HTTP GET) answers 200."""
        (container,) = one(self.overlay, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
        probe = container["readinessProbe"]["httpGet"]
        url = f"http://127.0.0.1:{pod.ports[str(probe['port'])]}{probe['path']}"
        started = time.monotonic()
        while time.monotonic() < started + timeout:
            assert pod.process.poll() is None, pod.output()[-3000:]
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        self.announce(f"{pod.name} ready after {time.monotonic() - started:.0f}s")
                        return
            except OSError:  # refused, or 404 while no version is loaded
                pass
            time.sleep(1)
        raise AssertionError(f"{pod.name} not ready at {url} within {timeout:.0f}s:\n{pod.output()[-3000:]}")

    def guide_steps(self) -> list[tuple[int, str, list[dict]]]:
        """k8s/deploy.sh's steps: (number, label selector, the Jobs and Deployments it applies)."""
        return [(step, selector, [doc for doc in objects(self.overlay) if doc["kind"] in ("Job", "Deployment")
                                  and selects(selector, doc["metadata"].get("labels", {}))])
                for step, selector in enumerate(apply_slices(), start=1)]

    def apply_in_guide_order(self, timeouts: dict[str, float]) -> dict[str, Pod | list[Pod]]:
        """k8s/deploy.sh's steps, in order: each step's Jobs run to completion and
        its Deployments start and become ready, as `kubectl wait` and `rollout status`
        wait for them there. Returns each workload's pods by name."""
        started = {}
        for step, selector, chosen in self.guide_steps():
            self.announce(f"step {step} ({selector}): {', '.join(d['metadata']['name'] for d in chosen)}")
            for doc in chosen:
                name = doc["metadata"]["name"]
                if doc["kind"] == "Job":
                    started[name] = self.run_job(name, timeouts[name])
                else:
                    started[name] = self.start_deployment(name)
                    self.wait_ready(started[name], name, timeouts[name])
        return started

    def stop(self) -> None:
        for pod in self.pods:
            if pod.process is not None and pod.process.poll() is None:
                pod.process.terminate()
        for pod in self.pods:
            if pod.process is not None:
                try:
                    pod.process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pod.process.kill()


# The model server's line for a version it has loaded: TF Serving's, and `accresnet serve`'s.
LOADED_VERSION = (r"Successfully loaded servable version \{{name: {model} version: {version}\}}"
                  r"|{model} version {version} is available")


def check_first_release(volume: pathlib.Path, release: Pod, candidate: str, handed_over: pathlib.Path) -> None:
    """The release Job's first run: validated on the release pod's TF Serving sidecar (nothing served
    yet to compare with), pushed whole, labelled, and the sidecar stopped once push had finished.
    `candidate` is the staged version as the release Job's pod named it; `handed_over` the folder of
    this machine behind the pod's volume that the sidecar serves (its base path)."""
    sidecar, validate = release.init
    assert sidecar.sidecar and release.process.returncode == 0
    assert sidecar.process.returncode is not None, "the sidecar was not stopped after push"
    output = validate.output()
    assert "blessed:" in output and "holds no version yet" in output, output[-2000:]
    # Checked by number on the sidecar's port (as the pod names it, or as mapped), which loaded the
    # copy validate handed over once the operations check had passed.
    port = sidecar.ports["grpc"]
    assert re.search(rf"checking version 1 on (localhost|127\.0\.0\.1):{port} ", output), output[-2000:]
    assert re.search(LOADED_VERSION.format(model="accresnet", version=1), sidecar.output()), sidecar.output()[-2000:]
    assert (handed_over / "1" / "saved_model.pb").exists()
    blessing = json.loads((volume / "models" / "accresnet" / "1" / "blessing.json").read_text())
    assert blessing["verdict"] == "blessed" and blessing["candidate"] == candidate, blessing
    assert labels.labels(volume / "models" / "models.config", "accresnet") == {"stable": 1, "canary": 1}


def check_classified(images_dir: pathlib.Path, client_output: str) -> str:
    """Every image of the held-out folder classified once (the client Job's JSON lines), better than
    chance; returns the score as a line to print. Paths are matched below the folder, so the client
    may have named it as mounted in its pod."""
    predictions = [json.loads(line) for line in client_output.splitlines() if line.startswith("{")]
    images = sorted(path.relative_to(images_dir) for path in images_dir.rglob("*.png"))
    named = sorted(pathlib.Path(*pathlib.Path(p["path"]).parts[-2:]) for p in predictions)
    assert images and named == images, f"{len(images)} images, {len(predictions)} predictions:\n{client_output[-2000:]}"
    correct = sum(p["class_name"] == pathlib.Path(p["path"]).parent.name for p in predictions)
    chance = 1 / len({path.parent for path in images})
    assert correct / len(predictions) > chance, f"accuracy {correct}/{len(predictions)} is not better than chance"
    return f"{len(predictions)} held-out images classified, {correct} correct ({correct / len(predictions):.2f}; " \
           f"chance {chance:.2f})"


def is_sidecar(container: dict) -> bool:
    """A native sidecar: an init container with restartPolicy Always (Kubernetes 1.29+)."""
    return container.get("restartPolicy") == "Always"


def _flag_value(args: list[str], name: str) -> str | None:
    for arg in args:
        flag, _, value = arg.partition("=")
        if flag == name:
            return value
    return None


def _derive_tf_config(env: dict[str, str]) -> str:
    """TF_CONFIG as the pod derives it: `accresnet tf-config` with the pod's env."""
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "tf-config"], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "PYTHONPATH": REPO, **env}, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()
