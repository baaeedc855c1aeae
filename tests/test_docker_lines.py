"""The docker command lines of the README and docs/deployment.md are the ones `make docker-test`
runs (tests/docker_checks.py, tests/docker_chain.py): a manifest, the Dockerfile or the chain
that changes without the guides fails here, without Docker."""

import re
import shlex

import pytest

from docker_chain import HELP_COMMAND, NETWORK_CREATE, OVERLAY, DockerCluster, tag_commands
from docker_engine import MACHINE_BUILD_FLAGS, build_command, documented_builds
from manifests import ROOT

GUIDES = ("README.md", "docs/deployment.md")
DOCKER_SECTION = "## The same steps in Docker"


def docker_lines(text: str) -> list[list[str]]:
    """Every `docker ...` command of the text's shell blocks, as argv (continuations joined, comments dropped)."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["docker"]:
                lines.append(words)
    return lines


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    return DockerCluster(OVERLAY, tmp_path_factory.mktemp("docker-lines"), announce=lambda _: None)


def test_the_guide_runs_the_chain_with_the_docker_lines_the_test_runs(cluster):
    section = (ROOT / "docs" / "deployment.md").read_text().split(DOCKER_SECTION, 1)[1].split("\n## ", 1)[0]
    documented = [line for line in docker_lines(section) if line[:2] == ["docker", "run"]]
    expected = [cluster.in_guide_terms(command) for command in cluster.run_commands()]
    assert len(documented) == len(expected), [shlex.join(line) for line in documented]
    for shown, run in zip(documented, expected):
        assert shown == run, f"docs/deployment.md shows\n  {shlex.join(shown)}\nthe chain runs\n  {shlex.join(run)}"


@pytest.mark.parametrize("guide", GUIDES)
def test_every_docker_line_of_the_guides_is_one_the_test_runs(guide, cluster):
    containers = {command[command.index("--name") + 1] for command in cluster.run_commands()}
    builds = list(documented_builds().values())
    runs = [cluster.in_guide_terms(command) for command in cluster.run_commands()]
    lines = docker_lines((ROOT / guide).read_text())
    assert lines, f"{guide} shows no docker command"
    for line in lines:
        verb = line[1]
        if verb == "build" and "-gpu" in line[-2]:
            # The GPU images need GPU base images, which cannot be had here: they are the Dockerfile's lines.
            gpu = re.findall(r"^#\s+(docker build .*-gpu \.)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
            assert shlex.join(line) in gpu, shlex.join(line)
        elif verb == "build":
            assert line in builds, f"{shlex.join(line)} is not one of the Dockerfile header's builds {builds}"
        elif verb == "tag":
            assert line in tag_commands(), shlex.join(line)
        elif verb == "network":
            assert line in (NETWORK_CREATE, ["docker", "network", "rm", NETWORK_CREATE[-1]]), shlex.join(line)
        elif verb == "run":
            assert line == HELP_COMMAND or line in runs, f"{guide}: {shlex.join(line)} is not run by the test"
        elif verb in ("wait", "logs", "rm", "stop"):
            named = [word for word in line[2:] if not word.startswith("-")]
            assert named and set(named) <= containers, f"{guide}: {shlex.join(line)} names other containers"
        else:
            raise AssertionError(f"{guide}: `docker {verb}` is not a command the test runs: {shlex.join(line)}")


def test_the_test_builds_with_the_documented_lines_and_only_this_machines_additions():
    builds = documented_builds()
    assert set(builds) == {"accresnet-trainer", "accresnet-serving"}
    for line in builds.values():
        assert line in docker_lines((ROOT / "docs" / "deployment.md").read_text())
        assert line in docker_lines((ROOT / "README.md").read_text())
        extra = ["--build-arg", "TRAINER_BASE=base"]
        assert build_command(line, extra) == [*line[:2], *MACHINE_BUILD_FLAGS, *extra, *line[2:]]
