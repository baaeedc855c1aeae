"""The README's guarded path, run command for command on one machine with tiny settings:
a first release (nothing served yet), the server started on the config push wrote, then a
second model through the same commands, whose canary goes live under TF Serving's label
rule, and promote and rollback."""

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, free_ports

README = os.path.join(REPO, "README.md")


def guarded_path() -> list[list[str]]:
    """The commands of the README's guarded-path block, one argv each (continuations joined,
    comments and a trailing & dropped)."""
    text = open(README).read()
    block = re.search(r"The guarded path lets a version in.*?```sh\n(.*?)```", text, re.DOTALL).group(1)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        command = line.split("#", 1)[0].strip().removesuffix("&").strip()
        if command:
            commands.append(shlex.split(command))
    return commands


def tiny(argv: list[str], grpc_port: int, rest_port: int, model_dir: str) -> list[str]:
    """The same command on small data and free ports; nothing else changes."""
    text = " ".join(argv)
    replacements = {"--depth 32": "--depth 8 --epochs 3 --batch-size 32", "--dataset synthetic":
                    "--dataset synthetic:1200", "localhost:8500": f"localhost:{grpc_port}",
                    "localhost:8501": f"localhost:{rest_port}", "--port=8500": f"--port={grpc_port}",
                    "--rest_api_port=8501": f"--rest_api_port={rest_port}",
                    "--model_config_file_poll_wait_seconds=30": "--model_config_file_poll_wait_seconds=1",
                    "runs/acc32": model_dir}
    for old, new in replacements.items():
        text = text.replace(old, new)
    if argv[1] == "validate":
        text += " --eval-images 200"
    return shlex.split(text)


def run(argv, cwd):
    assert argv[0] == "accresnet"
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv[1:]], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(argv)}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_the_readme_guarded_path_works_as_written(tmp_path):
    commands = guarded_path()
    verbs = [argv[1] for argv in commands]
    assert verbs == ["train", "export", "validate", "push", "serve", "classify", "promote", "rollback"]
    (tmp_path / "photos").mkdir()
    for i, pixels in enumerate(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)):
        Image.fromarray(pixels).save(tmp_path / "photos" / f"{i}.png")
    grpc_port, rest_port = free_ports(2)
    server = None
    try:
        # The first release: everything up to the first classify.
        for argv in commands[:verbs.index("classify") + 1]:
            argv = tiny(argv, grpc_port, rest_port, "runs/acc32")
            if argv[1] == "serve":
                server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *argv[1:]], cwd=tmp_path,
                                          env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.STDOUT)
                wait_ready(rest_port, server)  # as a user waits for the server to say it is up
                continue
            output = run(argv, tmp_path)
            if argv[1] == "push":
                assert output.strip().endswith("(labels: canary -> 1, stable -> 1)"), output
        # A second model through the same commands; the server keeps running.
        for argv in commands:
            if argv[1] == "serve":
                continue
            argv = tiny(argv, grpc_port, rest_port, "runs/acc32-2")
            output = run(argv, tmp_path)
            if argv[1] == "push":
                assert output.strip().endswith("(labels: canary -> 2, stable -> 1)"), output
                time.sleep(2)  # the server applies the moved label at its next poll of the config
                assert canary_version(rest_port) == 2
            if argv[1] == "promote":
                assert output.strip().endswith("rollback -> 1, stable -> 2"), output
            if argv[1] == "rollback":
                assert output.strip().endswith("stable -> 1"), output
        config = (tmp_path / "runs" / "models" / "models.config").read_text()
        assert f'base_path: "{tmp_path / "runs" / "models" / "accresnet"}"' in config  # absolute, as given
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)


def wait_ready(rest_port, server, timeout=120):
    """Until the model's metadata answers (the Deployment's readiness probe)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, "the server exited"
        try:
            with urllib.request.urlopen(f"http://localhost:{rest_port}/v1/models/accresnet/metadata", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the server did not come up within {timeout} s")


def canary_version(rest_port):
    """The version the server answers `canary` with (REST predict names none: ask its metadata)."""
    url = f"http://localhost:{rest_port}/v1/models/accresnet/labels/canary/metadata"
    with urllib.request.urlopen(url, timeout=30) as reply:
        return int(json.loads(reply.read())["model_spec"]["version"])
