"""`make docker-test`: the Dockerfile's two images built here, and the local overlay's five apply
steps run in containers of them (tests/docker_chain.py).

Not part of `make test`: pytest collects it only when named on the command
line (its name is not test_*.py). It installs and starts Docker when it is
missing (Debian's docker.io, as root), makes the base images that cannot be
pulled (tests/docker_engine.py, printed as stand-ins), builds both targets with
the Dockerfile header's command lines, then runs the chain; at the end it prints
the images' sizes and every step's time.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import time

import pytest

from docker_chain import HELP_COMMAND, OVERLAY, DockerCluster, guide_line, tag_commands
from docker_engine import (DOCKER_ENV, Timings, apt_install, build, build_command, docker, documented_builds,
                           ensure_engine, image_size, serving_base, trainer_base)
from local_cluster import check_classified, check_first_release, dockerfile_images
from manifests import one
from serving.deployment import DEPLOYED_FLAGS

TIMINGS = Timings()
SIZES: dict[str, int] = {}
TRAINER, SERVING = "accresnet-trainer", "accresnet-serving"
USER = "10001:10001"  # the Dockerfile's, the manifests' runAsUser:runAsGroup


@pytest.fixture(scope="module")
def images():
    """Both images, built as the Dockerfile's header says, on stand-in bases where the real ones are missing."""
    started = time.monotonic()
    apt_install([] if shutil.which("kubectl") else ["kubectl"])  # renders the overlay
    ensure_engine(TIMINGS)
    builds = documented_builds()
    trainer_args = trainer_base(TIMINGS)
    build(build_command(builds[TRAINER], trainer_args), "build: trainer image", TIMINGS)
    # The serving target's build runs the trainer stage too: same args, so it comes from the cache.
    serving_args = trainer_args + serving_base(TRAINER, TIMINGS)
    build(build_command(builds[SERVING], serving_args), "build: serving image", TIMINGS)
    for command in tag_commands():
        print(f"$ {shlex.join(command)}")
        docker(*command[1:])
    stand_ins = [arg.split("=", 1)[1] for arg in trainer_args if arg.startswith("TRAINER_BASE=")]
    stand_ins += [f"tensorflow/serving:{arg.split('=', 1)[1]}" for arg in serving_args
                  if arg.startswith("TF_SERVING_TAG=")]
    for image in (TRAINER, SERVING, *stand_ins):
        SIZES[image] = image_size(image)
    TIMINGS.record("images ready (engine, bases, builds)", started)
    yield
    print("\nimage sizes:")
    for name, size in SIZES.items():
        print(f"  {name:<50} {size / 1e9:.2f} GB")
    print("times (on " + cpu_model() + "):\n" + TIMINGS.table())


def cpu_model() -> str:
    found = re.search(r"^Model name:\s*(.+)$", subprocess.run(["lscpu"], capture_output=True, text=True).stdout,
                      re.MULTILINE)
    return f"{found.group(1) if found else 'an unknown CPU'}, {os.cpu_count()} cores"


def test_the_trainer_image_answers_help_without_tensorflow(images):
    started = time.monotonic()
    result = subprocess.run(HELP_COMMAND, env=DOCKER_ENV, capture_output=True, text=True, timeout=120)
    seconds = TIMINGS.record(f"{shlex.join(HELP_COMMAND)}", started)
    assert result.returncode == 0 and result.stdout.startswith("usage: accresnet"), result.stdout + result.stderr
    # Python lists every module it imports; --help must load none of TensorFlow's.
    profiled = subprocess.run([*HELP_COMMAND[:3], "-e", "PYTHONPROFILEIMPORTTIME=1", *HELP_COMMAND[3:]],
                              env=DOCKER_ENV, capture_output=True, text=True, timeout=120)
    imported = re.findall(r"\|\s+(\S+)$", profiled.stderr, re.MULTILINE)
    assert imported and not [m for m in imported if m.split(".")[0] == "tensorflow"], profiled.stderr[-2000:]
    assert seconds < 10, f"--help took {seconds:.1f} s"


# In the trainer image, as its user: neither the opt-in bfloat16 kernels nor what would build them
# (they are built only with --build-arg BFLOAT16_KERNELS=yes), and training does not ask for them.
NO_KERNELS_IN_THE_IMAGE = """
import os, pathlib, shutil, tensorflow as tf
from pipeline.kernels import bfloat16
folder = pathlib.Path(os.environ[bfloat16.PREBUILT])
print("files:", sorted(path.name for path in folder.iterdir()) if folder.exists() else None)
print("compiler:", shutil.which("g++"), shutil.which("gcc"), shutil.which("ld"))
print("headers:", pathlib.Path(tf.sysconfig.get_include()).exists())
"""


def test_the_trainer_image_has_no_compiler_and_no_custom_kernels_by_default(images):
    started = time.monotonic()
    result = docker("run", "--rm", "--read-only", "--tmpfs", "/tmp", "--entrypoint", "python3", TRAINER, "-c",
                    NO_KERNELS_IN_THE_IMAGE, check=False)
    TIMINGS.record("trainer image: no compiler, no custom kernels", started)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    print("\n".join(f"  {key}: {value}" for key, value in lines.items()))
    assert lines == {"files": "None", "compiler": "None None None", "headers": "False"}, lines


def test_the_images_run_as_user_10001(images):
    for image in (TRAINER, SERVING):
        assert docker("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip() == USER, image
        identity = docker("run", "--rm", "--read-only", "--entrypoint", "id", image).stdout
        assert identity.startswith("uid=10001") and "gid=10001" in identity, (image, identity)


def test_the_serving_image_starts_the_deployed_server(images):
    """The image's own ENTRYPOINT and CMD are the Deployment's: the chain runs the CMD, not the manifest's copy."""
    (container,) = one(OVERLAY, "Deployment", "accresnet-serving")["spec"]["template"]["spec"]["containers"]
    inspected = docker("image", "inspect", "--format", "{{json .Config.Entrypoint}} {{json .Config.Cmd}}", SERVING)
    entrypoint, cmd = inspected.stdout.split(" ", 1)
    image = dockerfile_images()[SERVING]
    assert json.loads(entrypoint) == image.entrypoint == ["/usr/bin/tensorflow_model_server"]
    assert json.loads(cmd) == image.cmd == container["args"] == list(DEPLOYED_FLAGS)


def test_the_local_overlay_runs_in_containers(images, tmp_path):
    cluster = DockerCluster(OVERLAY, tmp_path, TIMINGS)
    try:
        pods = cluster.apply_in_guide_order({"accresnet-prepare-data": 300, "accresnet-train": 900,
                                             "accresnet-release": 600, "accresnet-serving": 300,
                                             "accresnet-classify": 300})
        seconds = cluster.container_seconds()
    finally:
        cluster.stop()
        print("mappings:\n" + "\n".join(f"  {m}" for m in cluster.mappings))
    print("containers (engine's start to exit):\n" + "\n".join(f"  {n:<32} {s:6.1f} s" for n, s in seconds.items()))
    assert list(pods) == ["accresnet-prepare-data", "accresnet-train", "accresnet-release", "accresnet-serving",
                          "accresnet-classify"]
    assert len(pods["accresnet-train"]) == 2
    # What ran is what docs/deployment.md shows.
    assert [guide_line(cluster.in_guide_terms(c)) for c in cluster.commands] == \
        [guide_line(cluster.in_guide_terms(c)) for c in cluster.run_commands()]
    volume = cluster.claims["accresnet-data"]
    (release,) = pods["accresnet-release"]
    check_first_release(volume, release, "/data/staging/accresnet/1",
                        cluster.empty_dir("accresnet-release-0", "candidate"))
    # Written by the pods' user, through the fsGroup the volume was given.
    version = volume / "models" / "accresnet" / "1"
    assert (version.stat().st_uid, version.stat().st_gid) == (10001, 10001)
    (client,) = pods["accresnet-classify"]
    print(check_classified(volume / "images", client.output()))
    described = [m.what for m in cluster.mappings]
    assert "Service accresnet-serving" in described
    # validate reached the release pod's TF Serving sidecar on the pod's localhost.
    assert "native sidecar accresnet-release-0-tf-serving" in described
    assert "pod accresnet-release-0's network namespace (localhost)" in described
    assert any("headless Service accresnet-workers" in what for what in described)
