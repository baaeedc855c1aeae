"""Every signature of a real export, fuzzed the way TF Serving runs it (a TF1 session on the
SavedModel, inputs fed as they arrive), in subprocesses with oneDNN on and off: the
kernels differ between the two (and between AVX2 and AVX-512 CPUs), and a kernel's
CHECK failure kills the process instead of returning a status."""

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO

CASES = 150
ALLOWED = {"OK", "InvalidArgumentError", "status with undecodable message"}


@pytest.mark.slow
@pytest.mark.parametrize("onednn", ["1", "0"])
def test_every_signature_answers_any_input_with_a_status(exported_model, onednn):
    # A clean environment: nothing earlier tests of this process left behind reaches the fuzzer.
    environment = {"PATH": os.environ["PATH"], "TF_ENABLE_ONEDNN_OPTS": onednn, "TF_CPP_MIN_LOG_LEVEL": "3",
                   "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
    process = subprocess.run([sys.executable, os.path.join(REPO, "tests", "model_fuzz.py"), str(exported_model),
                              onednn, str(CASES)], env=environment, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, f"the process died (status {process.returncode}):\n{process.stderr[-3000:]}"
    report = json.loads(process.stdout.strip().splitlines()[-1])
    assert set(report["outcomes"]) == {"serving_default", "serving_bytes", "classify"}
    for signature, counts in report["outcomes"].items():
        assert sum(counts.values()) == CASES
        assert set(counts) <= ALLOWED, (signature, counts)
        assert counts.get("OK", 0) > 0 and counts.get("InvalidArgumentError", 0) > 0, (signature, counts)
    # The inputs include files that would decode to 2.7 GB (PNG) and 12 GB (JPEG): none was decoded.
    assert report["peak_rss_mib"] - report["baseline_rss_mib"] < 1024, report
