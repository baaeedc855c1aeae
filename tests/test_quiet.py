"""TensorFlow's start-up lines reach the terminal only with `accresnet -v`."""

import os

import pytest

from helpers import run_accresnet
from pipeline.quiet import is_startup_line, startup_lines_dropped

# What TensorFlow 2.21 printed on the CPU-only machines this was written on.
STARTUP = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    "I0000 00:00:1796419736.568818     963 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results due to floating-point round-off errors from different computation orders.\n",
    "I0000 00:00:1796419736.570840     963 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
    "not be used.\n",
    "E0000 00:00:1796419742.267334     963 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed "
    "call to cuInit: UNKNOWN ERROR (303)\n",
]


def test_only_the_start_up_lines_are_dropped_from_what_reaches_file_descriptor_2(capfd):
    kept = ["E0000 00:00:1796419742.267334     963 op_kernel.cc:1830] OP_REQUIRES failed: out of memory\n",
            "UserWarning: a warning of Python's own\n"]
    with startup_lines_dropped():
        for line in STARTUP[:2] + kept[:1] + STARTUP[2:] + kept[1:]:
            os.write(2, line.encode())  # as C++ writes: below Python's sys.stderr
    assert capfd.readouterr().err == "".join(kept)
    assert all(map(is_startup_line, STARTUP)) and not any(map(is_startup_line, kept))


@pytest.mark.slow  # trains twice in subprocesses
def test_a_verb_prints_tensorflows_start_up_lines_only_with_verbose(tmp_path):
    args = ["train", "--dataset", "synthetic:256", "--steps", "1", "--depth", "8", "--no-progress"]
    code, quiet = run_accresnet(*args, "--model-dir", tmp_path / "quiet")
    assert code == 0, quiet
    assert not [line for line in quiet.splitlines(keepends=True) if is_startup_line(line)], quiet
    assert "1 epoch(s)" in quiet
    code, verbose = run_accresnet("-v", *args, "--model-dir", tmp_path / "verbose")
    assert code == 0, verbose
    assert "oneDNN custom operations are on" in verbose or "Could not find cuda drivers" in verbose, verbose
