"""The local overlay's five apply steps run in containers, as Kubernetes would run them.

`DockerCluster` is tests/local_cluster.py's `LocalCluster` (the same rendered
manifests, the same guide order, Jobs and Deployments, waits and timeouts)
with every container started by `docker run` from the images the Dockerfile
builds, instead of as a process of this checkout. Each container keeps its
image, command, args, env, user and group, read-only root, capabilities and
CPU and memory limits, and mounts the pod's volumes where the pod does. What
Docker does otherwise than Kubernetes is mapped, and every mapping recorded
(and printed):

- the namespace is an internal Docker network (`accresnet`), which has no
  way out of the machine; the pods find each other by name on it: a Service
  that selects a pod is a network alias of its container, and an Indexed
  Job's pod is `<pod>.<subdomain>` (its headless Service), so each training
  worker derives its TF_CONFIG itself, as on Kubernetes;
- a pod's containers share its network namespace, as in Kubernetes: when
  the pod has a native sidecar (an init container with restartPolicy
  Always), the sidecar is started first, on the network, and the pod's
  later containers join it (`--network container:<sidecar>`), so that
  localhost:PORT in their args is the sidecar; it is stopped once the pod's
  container has exited, as the kubelet stops it;
- the PersistentVolumeClaim is a folder of this machine, bind-mounted
  (subPath and read-only honoured), group-owned by the pods' fsGroup as the
  kubelet makes it; an emptyDir that several containers of the pod mount (the
  sidecar's base path, which validate fills) is a folder too, made as the
  kubelet makes one (mode 2777, the fsGroup's); one that a single container
  mounts is a tmpfs;
- the kubelet's readiness probe is sent from a probe container on the network;
- NetworkPolicies, requests and restart policies have no Docker counterpart.

The `docker run` lines are docs/deployment.md's "The same steps in Docker"
(tests/test_docker_lines.py keeps the two the same).
"""

from __future__ import annotations

import datetime
import os
import pathlib
import shlex
import subprocess
import time

from docker_engine import DOCKER_ENV, Timings, docker, stand_in_base
from local_cluster import LocalCluster, Pod, is_sidecar
from manifests import one, pod_specs
from serving.deployment import Mapping

OVERLAY = "overlays/local"
NETWORK = "accresnet"  # the namespace
NETWORK_CREATE = ["docker", "network", "create", "--internal", NETWORK]
TRAINER = "accresnet-trainer"
HELP_COMMAND = ["docker", "run", "--rm", TRAINER, "--help"]  # the README's
PROBE_NAME = "accresnet-readiness-probe"
# The kubelet's HTTP readiness probe, from a container on the pods' network: GET until 200 or the deadline.
PROBE = """import sys, time, urllib.request
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while True:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                sys.exit(0)
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"not ready: {url}")
    time.sleep(1)
"""


def tag_commands(overlay: str = OVERLAY) -> list[list[str]]:
    """`docker tag` of each built image to the tag the overlay runs (accresnet-trainer -> accresnet-trainer:dev)."""
    images = sorted({container["image"] for doc, spec in pod_specs(overlay)
                     for container in [*spec["containers"], *spec.get("initContainers", [])]})
    return [["docker", "tag", image.rsplit(":", 1)[0], image] for image in images]


def guide_line(command: list[str]) -> str:
    """A command as the guide prints it: shell variables in double quotes, so that they expand."""
    return " ".join(f'"{arg}"' if "$" in arg else shlex.quote(arg) for arg in command)


def shell_variable(name: str) -> str:
    """How the guide names a shared folder: accresnet-data -> $ACCRESNET_DATA (a claim's),
    accresnet-release-0-candidate -> $ACCRESNET_RELEASE_0_CANDIDATE (a pod's emptyDir)."""
    return "$" + name.upper().replace("-", "_")


def docker_cpus(quantity: str) -> str:
    """A Kubernetes CPU quantity ("2", "250m") as `docker run --cpus`."""
    return str(int(quantity[:-1]) / 1000) if quantity.endswith("m") else quantity


def docker_memory(quantity: str) -> str:
    """A Kubernetes memory quantity as `docker run --memory` (whose k, m, g are binary)."""
    for suffix, unit in (("Ki", "k"), ("Mi", "m"), ("Gi", "g")):
        if quantity.endswith(suffix):
            return quantity[:-2] + unit
    for suffix, factor in (("k", 10**3), ("M", 10**6), ("G", 10**9)):
        if quantity.endswith(suffix):
            return f"{int(quantity[:-1]) * factor}b"
    return f"{int(quantity)}b"


class Container:
    """A detached container with the part of Popen's interface LocalCluster uses: `docker wait`
    tells when it ends and its status, `docker logs -f` copies its output to the pod's log."""

    def __init__(self, name: str, log: pathlib.Path):
        self.name = name
        self.returncode: int | None = None
        with log.open("w") as output:
            self._logs = subprocess.Popen(["docker", "logs", "-f", name], env=DOCKER_ENV, stdout=output,
                                          stderr=subprocess.STDOUT)
        self._wait = subprocess.Popen(["docker", "wait", name], env=DOCKER_ENV, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)

    def _finish(self) -> int:
        answer = self._wait.stdout.read().strip()
        self._logs.wait(timeout=30)  # ends with the container, once its output is copied
        self.returncode = int(answer) if answer.isdigit() else -1
        return self.returncode

    def poll(self) -> int | None:
        if self.returncode is None and self._wait.poll() is not None:
            self._finish()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._wait.wait(timeout)  # subprocess.TimeoutExpired, as Popen.wait
        return self.returncode if self.returncode is not None else self._finish()

    def terminate(self) -> None:
        docker("kill", "--signal", "SIGTERM", self.name, check=False)

    def kill(self) -> None:
        docker("kill", self.name, check=False)


class DockerCluster(LocalCluster):
    def __init__(self, overlay: str, root: pathlib.Path, timings: Timings | None = None, announce=print):
        super().__init__(overlay, root, announce)
        self.timings = timings or Timings()
        self.commands: list[list[str]] = []  # every `docker run` started, in order
        self.claims: dict[str, pathlib.Path] = {}  # claim name -> its folder here
        self.claim_groups: dict[str, set[int]] = {}  # claim name -> the fsGroups of the pods mounting it
        self.claim_sub_paths: dict[str, set[str]] = {}  # claim name -> the subPaths pods mount
        # "<pod>-<volume>" -> (its folder here, the pod's fsGroup): emptyDirs shared by a pod's containers
        self.shared_empty_dirs: dict[str, tuple[pathlib.Path, int | None]] = {}
        self._images_of: dict[str, str] = {}  # container name -> its image
        self.names: list[str] = []  # containers started
        self._deployment_started: dict[str, float] = {}

    # --- a container as `docker run` --------------------------------------------------------

    def _container(self, pod_name: str, template: dict, container: dict, extra_env: dict[str, str] | None,
                   pod_ports: dict[int, int], name: str | None = None) -> Pod:
        # localhost needs no mapping here (pod_ports): the pod's containers share one network namespace.
        spec, name = template["spec"], name or pod_name
        image = self.images[container["image"].rsplit(":", 1)[0]]
        self._images_of[name] = container["image"]
        run = ["docker", "run", "-d", "--name", name]
        holder = _network_holder(spec, container)
        if holder is not None:
            joined = _container_name(pod_name, spec, holder)
            run += ["--network", f"container:{joined}"]
            self._map(Mapping(f"pod {pod_name}'s network namespace (localhost)", "shared by the pod's containers",
                              f"{joined}'s, which the containers started after it join (--network container:{joined})"))
        else:
            run += ["--hostname", pod_name, "--network", NETWORK]
            # The pod's names belong to the container whose network its main container runs in.
            if container["name"] == _pod_network_container(spec):
                run += [flag for alias in self._aliases(pod_name, template, container)
                        for flag in ("--network-alias", alias)]
        run += self._security(name, spec, container)
        limits = container.get("resources", {}).get("limits", {})
        if "cpu" in limits:
            run += ["--cpus", docker_cpus(limits["cpu"])]
        if "memory" in limits:
            run += ["--memory", docker_memory(limits["memory"])]
        run += self._volumes(pod_name, name, spec, container)
        for key, value in {**{e["name"]: e["value"] for e in container.get("env", [])}, **(extra_env or {})}.items():
            run += ["-e", f"{key}={value}"]
        command, args = container.get("command", []), container.get("args", [])
        if command:
            run += ["--entrypoint", command[0]]
        elif args and args == image.cmd:
            self._map(Mapping(f"{container['image']} args", "the image's CMD, repeated", "left to the image's CMD"))
            args = []
        run += [container["image"], *command[1:], *args]
        ports = {str(p.get("name", p["containerPort"])): p["containerPort"] for p in container.get("ports", [])}
        return Pod(name, run, {}, ports)

    def _aliases(self, pod_name: str, template: dict, container: dict) -> list[str]:
        """The names other pods reach this one by: its hostname in its headless Service, and every
        Service that selects it (Docker aliases cannot change ports, so a Service must not either)."""
        aliases = []
        subdomain = template["spec"].get("subdomain")
        if subdomain:
            aliases.append(f"{pod_name}.{subdomain}")
            self._map(Mapping(f"pod {pod_name} in headless Service {subdomain}", f"{pod_name}.{subdomain}",
                              "its network alias"))
        # Every port of the pod, whichever of its containers declares it.
        spec = template["spec"]
        declared = {str(p.get("name", p["containerPort"])): p["containerPort"]
                    for c in [*spec.get("initContainers", []), *spec["containers"]] for p in c.get("ports", [])}
        for service in self.services_selecting(template["metadata"].get("labels", {})):
            name = service["metadata"]["name"]
            if service["spec"].get("clusterIP") == "None":
                continue  # a headless Service is reached through its pods' names (above)
            for port in service["spec"]["ports"]:
                target = declared.get(str(port.get("targetPort", port["port"])))
                if target != port["port"]:
                    raise ValueError(f"Service {name} maps port {port['port']} to {target}: a Docker network alias "
                                     "keeps ports as they are, so give the Service the container's port")
            aliases.append(name)
            self._map(Mapping(f"Service {name}", f"{name}:{','.join(str(p['port']) for p in service['spec']['ports'])}",
                              f"network alias of {pod_name}"))
        return aliases

    def _security(self, name: str, spec: dict, container: dict) -> list[str]:
        pod, own = spec.get("securityContext", {}), container.get("securityContext", {})
        merged = {**pod, **own}  # the container's settings win, as in Kubernetes
        flags = []
        if "runAsUser" in merged:
            group = merged.get("runAsGroup")
            flags += ["--user", f"{merged['runAsUser']}:{group}" if group is not None else str(merged["runAsUser"])]
        if merged.get("runAsNonRoot") and merged.get("runAsUser", 0) == 0:
            raise ValueError(f"{name}: runAsNonRoot with no non-zero runAsUser; the harness does not read image users")
        if "fsGroup" in pod:
            flags += ["--group-add", str(pod["fsGroup"])]
        if merged.get("readOnlyRootFilesystem"):
            flags.append("--read-only")
        for capability in own.get("capabilities", {}).get("drop", []):
            flags += ["--cap-drop", capability]
        for capability in own.get("capabilities", {}).get("add", []):
            flags += ["--cap-add", capability]
        if merged.get("allowPrivilegeEscalation") is False:
            flags += ["--security-opt", "no-new-privileges"]
        seccomp = merged.get("seccompProfile", {}).get("type")
        if seccomp == "RuntimeDefault":
            self._map(Mapping("seccompProfile", "RuntimeDefault", "Docker's default seccomp profile"))
        elif seccomp is not None:
            raise ValueError(f"{name}: seccompProfile {seccomp} is not mapped onto Docker")
        return flags

    def _volumes(self, pod_name: str, name: str, spec: dict, container: dict) -> list[str]:
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        mounted_by = {}  # volume -> how many of the pod's containers mount it
        for other in [*spec.get("initContainers", []), *spec["containers"]]:
            for volume in {mount["name"] for mount in other.get("volumeMounts", [])}:
                mounted_by[volume] = mounted_by.get(volume, 0) + 1
        flags = []
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]
                folder = self.claims.setdefault(claim["claimName"], self.root / "volumes" / claim["claimName"])
                if "fsGroup" in spec.get("securityContext", {}):
                    self.claim_groups.setdefault(claim["claimName"], set()).add(spec["securityContext"]["fsGroup"])
                if mount.get("subPath"):
                    self.claim_sub_paths.setdefault(claim["claimName"], set()).add(mount["subPath"])
                source = folder / mount["subPath"] if mount.get("subPath") else folder
                read_only = mount.get("readOnly") or claim.get("readOnly")
                flags += ["-v", f"{source}:{mount['mountPath']}{':ro' if read_only else ''}"]
                self._map(Mapping(f"PersistentVolumeClaim {claim['claimName']}", "the cluster's volume",
                                  f"{folder} (bind mounts)"))
            elif "emptyDir" in volume and mounted_by[mount["name"]] > 1:
                # Several containers of the pod see the same files (validate hands the candidate to the sidecar).
                key = f"{pod_name}-{mount['name']}"
                folder = self.empty_dir(pod_name, mount["name"])
                group = spec.get("securityContext", {}).get("fsGroup")
                self.shared_empty_dirs[key] = (folder, group)
                source = folder / mount["subPath"] if mount.get("subPath") else folder
                flags += ["-v", f"{source}:{mount['mountPath']}{':ro' if mount.get('readOnly') else ''}"]
                made = f"mode 2777, group {group}" if group is not None else "mode 0777"
                self._map(Mapping(f"emptyDir {mount['name']} of pod {pod_name}", "a folder per pod, shared by "
                                  "the containers that mount it", f"{folder} (bind mounts; {made}, as the kubelet "
                                  "makes it)"))
            elif "emptyDir" in volume:
                flags += ["--tmpfs", mount["mountPath"]]
                self._map(Mapping("emptyDir mounted by one container", "a folder per pod", "a tmpfs"))
            else:
                raise ValueError(f"{name}: volume {volume['name']} is of a kind the harness does not map")
        return flags

    def _indexed_pod_env(self, spec: dict, count: int) -> list[dict[str, str]]:
        # Only what Kubernetes sets: each worker derives its TF_CONFIG from it, by the pods' names.
        return [{"JOB_COMPLETION_INDEX": str(index)} for index in range(count)]

    # --- running ---------------------------------------------------------------------------

    def _launch(self, pod: Pod) -> Container:
        if pod.sidecar:
            image = self._images_of[pod.name]
            stand_in = stand_in_base(image)
            self._map(Mapping(f"native sidecar {pod.name}", "an init container with restartPolicy Always: up "
                              "before the next init container, stopped once the pod's container has exited",
                              f"a container of {image}" + (f" (its base: STAND-IN {stand_in})" if stand_in else "")
                              + " running the image's CMD (the deployed flags), started first and left running; "
                              "stopped with SIGTERM once the pod's container has exited"))
        result = subprocess.run(pod.command, env=DOCKER_ENV, capture_output=True, text=True)
        self.commands.append(pod.command)
        if result.returncode != 0:
            raise AssertionError(f"{shlex.join(pod.command)} failed:\n{result.stderr[-3000:]}")
        self.names.append(pod.name)
        return Container(pod.name, pod.log)

    def run_commands(self) -> list[list[str]]:
        """Every `docker run` of the chain, in the order the guide's steps start them."""
        commands = []
        for _, _, chosen in self.guide_steps():
            for doc in chosen:
                name = doc["metadata"]["name"]
                pods = self.job_pods(name) if doc["kind"] == "Job" else [
                    self.pod(f"{name}-0", doc["spec"]["template"])]
                commands += [command for pod in pods for command in (*(i.command for i in pod.init), pod.command)]
        return commands

    def shared_folders(self) -> dict[str, pathlib.Path]:
        """Shell variable -> folder of this machine: each claim's, and each emptyDir a pod's containers share."""
        folders = {shell_variable(claim): folder for claim, folder in self.claims.items()}
        folders.update({shell_variable(key): folder for key, (folder, _) in self.shared_empty_dirs.items()})
        return folders

    def in_guide_terms(self, command: list[str]) -> list[str]:
        """`command` as the guide writes it: each shared folder as a shell variable."""
        text = shlex.join(command)
        # Longest first: no folder's variable may eat the start of another's path.
        for variable, folder in sorted(self.shared_folders().items(), key=lambda item: -len(str(item[1]))):
            text = text.replace(str(folder), variable)
        return shlex.split(text)

    def prepare(self) -> None:
        """What the cluster has before the first step: the namespace's network and the claims' folders."""
        self.cleanup()
        docker(*NETWORK_CREATE[1:])
        self._map(Mapping(f"namespace {NETWORK}", "the cluster's network", "an internal Docker network "
                          "(no way out of the machine); NetworkPolicies are not enforced on it"))
        self._map(Mapping("requests, restartPolicy, backoffLimit", "scheduling and retries",
                          "not applied: a failed container fails the run"))
        self.run_commands()  # finds the claims, the shared emptyDirs and the fsGroups of the pods that mount them
        for claim, folder in self.claims.items():
            folder.mkdir(parents=True, exist_ok=True)
            groups = self.claim_groups.get(claim, set())
            if len(groups) > 1:
                raise ValueError(f"the pods mounting {claim} ask for different fsGroups {sorted(groups)}")
            for group in groups:
                # What the kubelet does for an fsGroup: the volume's group, group-writable, setgid.
                os.chown(folder, -1, group)
                folder.chmod(0o2775)
                self._map(Mapping(f"fsGroup {group}", f"claim {claim}", f"{folder}: group {group}, mode 2775"))
            for sub_path in sorted(self.claim_sub_paths.get(claim, ())):
                # The kubelet makes a missing subPath with the volume's mode (SafeMakeDir), where Docker
                # would make root's 755, which the pods' user could not write.
                (folder / sub_path).mkdir(parents=True, exist_ok=True)
                for group in groups:
                    os.chown(folder / sub_path, -1, group)
                (folder / sub_path).chmod(folder.stat().st_mode & 0o7777)
                self._map(Mapping(f"subPath {sub_path} of claim {claim}", "made by the kubelet with the volume's mode",
                                  f"{folder / sub_path}: mode {folder.stat().st_mode & 0o7777:o}"))
        for folder, group in self.shared_empty_dirs.values():
            # As the kubelet makes an emptyDir: anyone may write (0777); with an fsGroup, its group, setgid.
            folder.mkdir(parents=True, exist_ok=True)
            if group is not None:
                os.chown(folder, -1, group)
            folder.chmod(0o2777 if group is not None else 0o777)

    def apply_in_guide_order(self, timeouts: dict[str, float]) -> dict[str, Pod | list[Pod]]:
        self.prepare()
        return super().apply_in_guide_order(timeouts)

    def run_job(self, name: str, timeout: float) -> list[Pod]:
        started = time.monotonic()
        pods = super().run_job(name, timeout)
        self.timings.record(f"chain: Job {name}", started)
        return pods

    def start_deployment(self, name: str) -> Pod:
        self._deployment_started[name] = time.monotonic()
        return super().start_deployment(name)

    def wait_ready(self, pod: Pod, deployment: str, timeout: float) -> None:
        """Until the Deployment's readiness probe (an HTTP GET) answers 200, sent as the kubelet would
        send it, to the pod, by a container on the pods' network."""
        (container,) = one(self.overlay, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
        probe = container["readinessProbe"]["httpGet"]
        url = f"http://{pod.name}:{pod.ports[str(probe['port'])]}{probe['path']}"
        command = ["docker", "run", "--rm", "--name", PROBE_NAME, "--network", NETWORK, "--user", "10001:10001",
                   "--read-only", "--cap-drop", "ALL", "--entrypoint", "python3", f"{TRAINER}:dev", "-c", PROBE,
                   url, str(timeout)]
        self._map(Mapping(f"{deployment} readinessProbe", f"the kubelet's GET {probe['path']}",
                          f"python3 in a {TRAINER}:dev container on the network, GET {url} every second"))
        prober = subprocess.Popen(command, env=DOCKER_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while prober.poll() is None:
            if pod.process.poll() is not None:
                prober.kill()
                raise AssertionError(f"{pod.name} exited with status {pod.process.returncode}:\n{pod.output()[-3000:]}")
            time.sleep(1)
        assert prober.returncode == 0, f"{prober.stdout.read()}\n{pod.name}:\n{pod.output()[-3000:]}"
        seconds = self.timings.record(f"chain: Deployment {deployment} ready",
                                      self._deployment_started.get(deployment, time.monotonic()))
        self.announce(f"{pod.name} ready after {seconds:.0f}s")

    def stop(self) -> None:
        super().stop()
        self.cleanup()

    def container_seconds(self) -> dict[str, float]:
        """Each container's run time, as the engine measured it (start to exit)."""
        seconds = {}
        for name in self.names:
            result = docker("inspect", "--format", "{{.State.StartedAt}} {{.State.FinishedAt}}", name, check=False)
            if result.returncode == 0:
                started, finished = (datetime.datetime.fromisoformat(s[:26].rstrip("Z")) for s in result.stdout.split())
                if finished.year > 1:
                    seconds[name] = (finished - started).total_seconds()
        return seconds

    def cleanup(self) -> None:
        """Removes this chain's containers and network, also those an interrupted run left."""
        listed = docker("ps", "--all", "--quiet", "--filter", f"network={NETWORK}", check=False).stdout.split()
        # Containers that joined a sidecar's network are not on NETWORK themselves: by name.
        joined = [command[command.index("--name") + 1] for command in self.run_commands()
                  if any(arg.startswith("container:") for arg in command)]
        leftovers = set(listed) | set(self.names) | set(joined) | {PROBE_NAME}
        docker("rm", "--force", *sorted(leftovers), check=False)
        docker("network", "rm", NETWORK, check=False)


def _container_name(pod_name: str, spec: dict, container_name: str) -> str:
    """The Docker name of a container of the pod: the pod's own for its container, `<pod>-<name>`
    for an init container (as LocalCluster names them)."""
    return pod_name if container_name == spec["containers"][0]["name"] else f"{pod_name}-{container_name}"


def _pod_network_container(spec: dict) -> str:
    """The container that holds the pod's network: its first native sidecar, which starts before and
    stops after the containers that need it, else its (only) container."""
    sidecars = [c["name"] for c in spec.get("initContainers", []) if is_sidecar(c)]
    return sidecars[0] if sidecars else spec["containers"][0]["name"]


def _network_holder(spec: dict, container: dict) -> str | None:
    """The container whose network namespace `container` joins: the pod's first native sidecar when
    it starts before `container` (the kubelet's order), else None (it is on the network itself;
    an init container that runs before any sidecar shares localhost with nothing)."""
    order = [c["name"] for c in [*spec.get("initContainers", []), *spec["containers"]]]
    holder = _pod_network_container(spec)
    if holder == container["name"] or holder == spec["containers"][0]["name"]:
        return None
    return holder if order.index(holder) < order.index(container["name"]) else None
