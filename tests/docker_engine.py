"""Docker on this machine: the engine, the base images the Dockerfile starts FROM, and its two builds.

Used by `make docker-test` (tests/docker_checks.py). No registry image can be
pulled here, so a base image the Dockerfile names that is not on the machine is
made locally and printed as a STAND-IN:

- TRAINER_BASE (`python:3.11-slim-bookworm`): a Debian 12 root with Python 3.11
  made by debootstrap from the mirror the machine's apt sources name, with the
  host's CA bundle and the pip settings the host reaches the package registry
  with, imported as `accresnet-stand-in/python:3.11-slim-bookworm`.
- `tensorflow/serving:TAG`: the trainer image with a
  /usr/bin/tensorflow_model_server that runs `accresnet serve` with the same
  arguments, tagged `tensorflow/serving:TAG-stand-in` (and chosen with the
  build arg TF_SERVING_TAG), so that a real image of the official name is never
  shadowed. The serving stage's own lines then run for real.

A stand-in is made again only when its recipe changes: the recipe's hash is
the image's label `accresnet.recipe`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

from manifests import ROOT

# The legacy builder: BuildKit would first pull the Dockerfile's `# syntax=` frontend image, which
# cannot be had here, and Debian's docker.io ships no buildx.
DOCKER_ENV = {**os.environ, "DOCKER_BUILDKIT": "0"}
DOCKERD_LOG = pathlib.Path("/var/log/accresnet-dockerd.log")
RECIPE_LABEL = "accresnet.recipe"
STAND_IN_LABEL = "accresnet.stand-in"
TRAINER_STAND_IN = "accresnet-stand-in/python:3.11-slim-bookworm"
STAND_IN_SUFFIX = "-stand-in"
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-pip", "python3-venv", "ca-certificates")
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# pip settings that say how the registry is reached; the rest (local wheel folders, constraint
# files) name paths of the host that a build cannot see.
PIP_NETWORK_SETTINGS = ("index-url", "extra-index-url", "trusted-host", "cert", "client-cert", "proxy",
                        "timeout", "default-timeout", "retries")
# What `docker build` needs on this machine beyond the documented command lines, in
# `build_command`'s order: pip reaches the registry from the host's network only.
MACHINE_BUILD_FLAGS = ("--network", "host")


class EngineError(RuntimeError):
    """Docker cannot be had or used here; the message says what to do."""


@dataclasses.dataclass
class Timings:
    """Seconds per step, printed at the end of `make docker-test`."""

    steps: list[tuple[str, float]] = dataclasses.field(default_factory=list)

    def record(self, what: str, started: float) -> float:
        seconds = time.monotonic() - started
        self.steps.append((what, seconds))
        return seconds

    def table(self) -> str:
        width = max(len(what) for what, _ in self.steps)
        return "\n".join(f"  {what:<{width}}  {seconds:7.1f} s" for what, seconds in self.steps)


def docker(*args: str, check: bool = True, capture: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], env=DOCKER_ENV, text=True, capture_output=capture, **kwargs)
    if check and result.returncode != 0:
        raise EngineError(f"docker {' '.join(args[:3])} ... failed ({result.returncode}):\n"
                          f"{(result.stderr or '')[-3000:]}")
    return result


def image_label(image: str, label: str) -> str | None:
    """The image's label, "" if it has none, None if there is no such image."""
    result = docker("image", "inspect", "--format", "{{json .Config.Labels}}", image, check=False)
    if result.returncode != 0:
        return None
    return (json.loads(result.stdout) or {}).get(label, "")


def stand_in_base(image: str) -> str | None:
    """The stand-in `image` was built on, as `NAME (what it is)`; None when its base is not ours.
    Derived images keep their base's labels, so the serving image tells which base it has."""
    label = image_label(image, STAND_IN_LABEL)
    if not label:
        return None
    official = label.rsplit(" ", 1)[-1]  # "accresnet serve in place of tensorflow/serving:TAG"
    return f"{official}{STAND_IN_SUFFIX}: {label}"


def image_size(image: str) -> int:
    return int(docker("image", "inspect", "--format", "{{.Size}}", image).stdout)


# --- the engine ----------------------------------------------------------------------------------------


def _engine_answers() -> bool:
    return shutil.which("docker") is not None and docker("info", check=False).returncode == 0


_apt_updated: list[bool] = []  # once per run: the package lists do not change within minutes


def apt_install(packages: list[str], announce=print) -> None:
    if not packages:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise EngineError(f"{', '.join(packages)} missing: install them (Debian: apt-get install {' '.join(packages)}) "
                          "or run `make docker-test` as root on Debian, which installs them")
    announce(f"installing {' '.join(packages)} (apt-get)")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    commands = [["apt-get", "install", "-y", "-qq", *packages]]
    if not _apt_updated:
        commands.insert(0, ["apt-get", "update", "-qq"])
    for command in commands:
        result = subprocess.run(command, env=environment, capture_output=True, text=True)
        if result.returncode != 0:
            raise EngineError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    _apt_updated.append(True)


def ensure_engine(timings: Timings, announce=print) -> None:
    """A Docker engine that answers: the running one, else Debian's docker.io installed if missing and
    dockerd started in the background (its log in DOCKERD_LOG)."""
    if _engine_answers():
        announce("docker engine: running")
        return
    if not (shutil.which("dockerd") and shutil.which("docker")):
        started = time.monotonic()
        apt_install(["docker.io"], announce)
        timings.record("engine: install docker.io", started)
    if os.geteuid() != 0:
        raise EngineError("Docker does not answer, and starting dockerd takes root: start it (`sudo systemctl "
                          "start docker` or `sudo dockerd &`) and let your user reach it (the docker group)")
    started = time.monotonic()
    with DOCKERD_LOG.open("a") as log:
        subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True)
    while not _engine_answers():
        if time.monotonic() > started + 60:
            raise EngineError(f"dockerd did not answer within 60 s; its log, {DOCKERD_LOG}, ends:\n"
                              + DOCKERD_LOG.read_text()[-3000:])
        time.sleep(0.5)
    announce(f"docker engine: dockerd started (log: {DOCKERD_LOG})")
    timings.record("engine: start dockerd", started)


# --- the trainer's stand-in base -------------------------------------------------------------------------


def debian_mirror(sources: pathlib.Path = pathlib.Path("/etc/apt")) -> str:
    """The first Debian mirror the machine's apt sources name for the suite (not its security archive)."""
    for path in sorted(sources.glob("sources.list.d/*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.MULTILINE))
            if DEBIAN_SUITE in fields.get("Suites", "").split() and "deb" in fields.get("Types", "").split():
                return fields["URIs"].split()[0]
    for path in [sources / "sources.list", *sorted(sources.glob("sources.list.d/*.list"))]:
        if path.exists():
            match = re.search(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{DEBIAN_SUITE}\s", path.read_text(), re.MULTILINE)
            if match:
                return match.group(1)
    raise EngineError(f"no Debian {DEBIAN_SUITE} mirror in /etc/apt/sources.list*: the trainer's stand-in base is "
                      "made with debootstrap from the mirror apt uses; add one there")


def host_pip_settings() -> dict[str, str]:
    """The host pip's settings that say how it reaches the registry (config files and PIP_* variables)."""
    result = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    settings = {}
    for scope, key, value in re.findall(r"^([\w:]*)\.([\w-]+)='(.*)'$", result.stdout, re.MULTILINE):
        if key not in PIP_NETWORK_SETTINGS:
            continue
        if key.endswith("index-url"):
            # Only registries: file:// indexes are folders of the host.
            value = " ".join(url for url in value.split() if url.startswith(("http://", "https://")))
        if value and (key not in settings or scope == ":env:"):  # the environment wins, as in pip
            settings[key] = value
    return settings


def _pip_conf(settings: dict[str, str]) -> str:
    return "[global]\n" + "".join(f"{key} = {value}\n" for key, value in sorted(settings.items()))


def _sha256(path: str) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def _recipe(*parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _stand_in(image: str, recipe: str, what: str, make, timings: Timings, announce) -> None:
    """`make(recipe)` builds `image` labelled with `recipe`, unless an image of that recipe is there."""
    started = time.monotonic()
    if image_label(image, RECIPE_LABEL) == recipe:
        announce(f"  {image}: kept from an earlier run (same recipe {recipe})")
        timings.record(f"{what}: stand-in kept (same recipe)", started)
        return
    make(recipe)
    seconds = timings.record(f"{what}: stand-in made", started)
    announce(f"  {image}: made in {seconds:.0f} s, {image_size(image) / 1e6:.0f} MB (recipe {recipe})")


def trainer_base(timings: Timings, announce=print) -> list[str]:
    """Build args for the trainer stage: none when TRAINER_BASE's default is on the machine, else the
    stand-in's (made, or kept from an earlier run of the same recipe)."""
    default = re.search(r"^ARG TRAINER_BASE=(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE).group(1)
    if image_label(default, STAND_IN_LABEL) is not None:
        announce(f"trainer base: {default} (on this machine)")
        return []
    mirror = debian_mirror()
    settings = host_pip_settings()
    certificates = sorted({CA_BUNDLE, *(settings[k] for k in ("cert", "client-cert") if k in settings)})
    debootstrap = ["debootstrap", "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}", DEBIAN_SUITE]
    changes = ["ENV PIP_BREAK_SYSTEM_PACKAGES=1", 'CMD ["python3"]']
    announce(f"STAND-IN: {default} (the Dockerfile's TRAINER_BASE) cannot be pulled here; the trainer is built on "
             f"{TRAINER_STAND_IN}: Debian 12 made by debootstrap ({', '.join(DEBIAN_PACKAGES)}; mirror {mirror}), "
             f"the host's CA bundle, pip settings {settings or '(none)'}")

    def make(recipe: str) -> None:
        apt_install([] if shutil.which("debootstrap") else ["debootstrap"], announce)
        with tempfile.TemporaryDirectory(prefix="accresnet-base-", dir="/var/tmp") as scratch:
            root = pathlib.Path(scratch) / "root"
            result = subprocess.run([*debootstrap, str(root), mirror], capture_output=True, text=True)
            if result.returncode != 0:
                raise EngineError(f"debootstrap failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
            for path in certificates:
                (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, root / path.lstrip("/"))
            (root / "etc" / "pip.conf").write_text(_pip_conf(settings))
            # As in the python image; what a container needs not, goes.
            (root / "usr" / "local" / "bin" / "python").symlink_to("/usr/bin/python3")
            for leftover in [*root.glob("var/cache/apt/archives/*.deb"), *root.glob("var/lib/apt/lists/*"),
                             root / "etc" / "hostname"]:
                if leftover.is_file():
                    leftover.unlink()
            (root / "etc" / "resolv.conf").write_text("")  # the engine writes each container's own
            tar = subprocess.Popen(["tar", "-C", str(root), "--exclude=./dev/*", "--exclude=./proc/*",
                                    "--exclude=./sys/*", "-c", "."], stdout=subprocess.PIPE)
            flags = [flag for change in [*changes, f"LABEL {RECIPE_LABEL}={recipe}"] for flag in ("-c", change)]
            docker("import", *flags, "-", TRAINER_STAND_IN, stdin=tar.stdout)
            if tar.wait() != 0:
                raise EngineError(f"tar of {root} failed")

    recipe = _recipe(debootstrap, mirror, _pip_conf(settings), changes,
                     {path: _sha256(path) for path in certificates})
    _stand_in(TRAINER_STAND_IN, recipe, "trainer base (debootstrap, import)", make, timings, announce)
    return ["--build-arg", f"TRAINER_BASE={TRAINER_STAND_IN}"]


# --- the serving stage's stand-in base ----------------------------------------------------------------------

STAND_IN_SERVER = """#!/bin/sh
# STAND-IN for TF Serving's tensorflow_model_server (made by tests/docker_engine.py): the project's
# compatible server, which takes the same flags.
exec accresnet serve "$@"
"""


def serving_base(trainer_image: str, timings: Timings, announce=print) -> list[str]:
    """Build args for the serving stage: none when tensorflow/serving:TAG is on the machine (and is not
    ours), else the stand-in's, made from `trainer_image`."""
    tag = re.search(r"^ARG TF_SERVING_TAG=(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE).group(1)
    official = f"tensorflow/serving:{tag}"
    if image_label(official, STAND_IN_LABEL) == "":
        announce(f"serving base: {official} (on this machine)")
        return []
    stand_in = f"{official}{STAND_IN_SUFFIX}"
    dockerfile = "\n".join([
        f"FROM {trainer_image}",
        "USER root",  # as the official image: the serving stage's own USER line must make it non-root
        "WORKDIR /",
        "COPY tensorflow_model_server /usr/bin/tensorflow_model_server",
        "EXPOSE 8500 8501",
        'ENTRYPOINT ["/usr/bin/tensorflow_model_server"]',
        "CMD []",
    ])
    announce(f"STAND-IN: {official} (the serving stage's base) cannot be pulled, and no tensorflow_model_server "
             f"exists here; the serving image is built on {stand_in}: {trainer_image} with "
             f"/usr/bin/tensorflow_model_server running `accresnet serve` with the same arguments")

    def make(recipe: str) -> None:
        with tempfile.TemporaryDirectory(prefix="accresnet-serving-base-") as context:
            server = pathlib.Path(context) / "tensorflow_model_server"
            server.write_text(STAND_IN_SERVER)
            server.chmod(0o755)
            labels = f'LABEL {RECIPE_LABEL}="{recipe}" {STAND_IN_LABEL}="accresnet serve in place of {official}"'
            (pathlib.Path(context) / "Dockerfile").write_text(f"{dockerfile}\n{labels}\n")
            docker("build", "-t", stand_in, context)

    trainer_id = docker("image", "inspect", "--format", "{{.Id}}", trainer_image).stdout.strip()
    _stand_in(stand_in, _recipe(dockerfile, STAND_IN_SERVER, trainer_id), "serving base (from the trainer image)",
              make, timings, announce)
    return ["--build-arg", f"TF_SERVING_TAG={tag}{STAND_IN_SUFFIX}"]


# --- the documented builds ---------------------------------------------------------------------------------


def documented_builds(path: pathlib.Path = ROOT / "Dockerfile") -> dict[str, list[str]]:
    """Image name -> the Dockerfile header's build command for it (the CPU images; the GPU ones
    need GPU base images that cannot be had here)."""
    builds = re.findall(r"^#\s+(docker build --target \w+ -t (accresnet-\w+) \.)", path.read_text(), re.MULTILINE)
    return {name: line.split() for line, name in builds}


def build_command(documented: list[str], build_args: list[str]) -> list[str]:
    """The documented `docker build` with what this machine adds: the host network and the bases' build args."""
    assert documented[:2] == ["docker", "build"], documented
    return [*documented[:2], *MACHINE_BUILD_FLAGS, *build_args, *documented[2:]]


def build(command: list[str], what: str, timings: Timings, announce=print) -> None:
    announce(f"$ {' '.join(command)}")
    started = time.monotonic()
    result = subprocess.run(command, env=DOCKER_ENV, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise EngineError(f"{' '.join(command)} failed:\n{result.stdout[-4000:]}{result.stderr[-2000:]}")
    timings.record(what, started)
