"""k8s/deploy.sh, the one command that runs the chain on a cluster, against a kubectl that
renders the overlay for real and records what it is asked (no cluster here): every step
applied in order, each workload waited for the way its kind finishes, a failed Job
stopping the chain, --from starting later. The local harnesses run the same steps
(tests/local_cluster.py reads them through tests/manifests.py)."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from local_cluster import LocalCluster
from manifests import DEPLOY_SCRIPT, OVERLAYS, ROOT, apply_slices, chain_steps, kubectl, objects, selects

TESTS = ROOT / "tests"
# How the script waits for each kind of workload (other kinds it applies and leaves).
WAITS = {"Job": "condition=complete", "TFJob": "condition=Succeeded", "Deployment": "rollout status",
         "InferenceService": "condition=Ready"}

FAKE_KUBECTL = f"""#!{sys.executable}
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_KUBECTL_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if "--dry-run=client" in args:  # the check before the first step: fails for the kind named in FAKE_KUBECTL_UNKNOWN
    unknown = os.environ.get("FAKE_KUBECTL_UNKNOWN")
    if unknown:
        sys.exit(f'error: resource mapping not found: no matches for kind "{{unknown}}"; ensure CRDs are installed first')
elif "apply" in args:  # apply -k DIR -l SELECTOR -o name: the objects it would apply, as kubectl names them
    directory = args[args.index("-k") + 1]
    cache = os.environ["FAKE_KUBECTL_LOG"] + "." + directory.replace("/", "_")  # rendered once per run
    if not os.path.exists(cache):
        with open(cache, "w") as out:
            out.write(subprocess.run([{kubectl()!r}, "kustomize", directory], capture_output=True, text=True,
                                     check=True).stdout)
    import yaml
    sys.path.insert(0, {str(TESTS)!r})
    from manifests import selects
    for doc in yaml.safe_load_all(open(cache).read()):
        if doc and selects(args[args.index("-l") + 1], doc["metadata"].get("labels", {{}})):
            group = doc["apiVersion"].rpartition("/")[0]
            print(doc["kind"].lower() + ("." + group if group else "") + "/" + doc["metadata"]["name"])
elif "wait" in args:  # the object named in FAKE_KUBECTL_FAILS has failed; every other one succeeds
    (target,) = [a for a in args[args.index("wait") + 1:] if not a.startswith("-")]
    condition = [a for a in args if a.startswith("--for=condition=")][0].rpartition("=")[2].lower()
    failing = target == os.environ.get("FAKE_KUBECTL_FAILS")
    sys.exit(0 if (condition == "failed") == failing else 1)
"""


def run(tmp_path, *args, fails=None, unknown=None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "kubectl"
    fake.write_text(FAKE_KUBECTL)
    fake.chmod(0o755)
    log = tmp_path / "kubectl.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_KUBECTL_LOG": str(log),
           "ACCRESNET_POLL": "1s", "FAKE_KUBECTL_FAILS": fails or "", "FAKE_KUBECTL_UNKNOWN": unknown or ""}
    result = subprocess.run(["bash", str(DEPLOY_SCRIPT), *args], capture_output=True, text=True, env=env,
                            timeout=300)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


def steps_taken(calls) -> list[tuple[str, list[str]]]:
    """(selector applied, the waits that followed it), in order."""
    steps = []
    for call in calls:
        if "--dry-run=client" in call:
            continue
        if "apply" in call:
            assert call[call.index("-k") + 1].startswith(str(ROOT / "k8s")), call
            steps.append((call[call.index("-l") + 1], []))
        elif "rollout" in call:
            steps[-1][1].append(f"rollout status {call[-2].split('/')[0].split('.')[0]}/{call[-2].split('/')[1]}")
        elif "wait" in call and "--timeout=0" not in call:
            target = [a for a in call[call.index("wait") + 1:] if not a.startswith("-")][0]
            condition = [a[len("--for="):] for a in call if a.startswith("--for=")][0]
            wait = f"{condition} {target.split('.')[0].split('/')[0]}/{target.split('/')[1]}"
            if wait not in steps[-1][1]:  # polled until done
                steps[-1][1].append(wait)
    return steps


def expected_waits(overlay: str, selector: str) -> list[str]:
    return [f"{WAITS[doc['kind']]} {doc['kind'].lower()}/{doc['metadata']['name']}" for doc in objects(overlay)
            if doc["kind"] in WAITS and selects(selector, doc["metadata"].get("labels", {}))]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_command_applies_every_step_in_order_and_waits_for_each(overlay, tmp_path):
    result, calls = run(tmp_path, str(ROOT / "k8s" / overlay))
    assert result.returncode == 0, result.stdout + result.stderr
    steps = steps_taken(calls)
    assert [selector for selector, _ in steps] == apply_slices()
    for selector, waits in steps:
        assert waits == expected_waits(overlay, selector), (selector, waits)
    assert all(waits for _, waits in steps)  # every step starts something it waits for
    # The client's answers end the output.
    assert calls[-1][-2:] == ["logs", "job.batch/accresnet-classify"]


def test_the_local_harness_runs_the_same_steps_with_the_same_workloads(tmp_path):
    _, calls = run(tmp_path, str(ROOT / "k8s" / "overlays/local"))
    cluster = LocalCluster("overlays/local", tmp_path / "cluster", announce=lambda _: None)
    harness = [(selector, [f"{doc['kind'].lower()}/{doc['metadata']['name']}" for doc in chosen])
               for _, selector, chosen in cluster.guide_steps()]
    script = [(selector, [wait.split(" ")[-1] for wait in waits]) for selector, waits in steps_taken(calls)]
    assert script == harness
    assert [name for name, _, _ in chain_steps()] == ["data", "training", "release", "serving", "client"]


def test_a_failed_job_stops_the_chain_and_says_how_to_go_on(tmp_path):
    overlay = str(ROOT / "k8s" / "overlays/local")
    result, calls = run(tmp_path, overlay, fails="job.batch/accresnet-train")
    assert result.returncode == 1
    assert [selector for selector, _ in steps_taken(calls)] == apply_slices()[:2]  # no release after it
    assert "job.batch/accresnet-train failed" in result.stderr
    assert f"--from training {overlay}" in result.stderr
    assert ["-n", "accresnet", "describe", "job.batch/accresnet-train"] in calls


def test_a_kind_the_cluster_lacks_stops_the_chain_before_it_starts(tmp_path):
    overlay = str(ROOT / "k8s" / "overlays/prometheus")
    result, calls = run(tmp_path, overlay, unknown="PodMonitor")
    assert result.returncode == 1 and "PodMonitor" in result.stderr and "Prerequisites" in result.stderr
    assert calls == [["apply", "-k", overlay, "--dry-run=client", "-o", "name"]]  # nothing applied


def test_from_starts_at_a_later_step(tmp_path):
    result, calls = run(tmp_path, "--from", "release", str(ROOT / "k8s" / "overlays/local"))
    assert result.returncode == 0, result.stderr
    assert [selector for selector, _ in steps_taken(calls)] == apply_slices()[2:]


@pytest.mark.parametrize("args", [["--from", "nothing"], ["/nonexistent"], ["--bogus"]])
def test_a_wrong_invocation_applies_nothing(args, tmp_path):
    result, calls = run(tmp_path, *args)
    assert result.returncode == 2 and result.stderr and not calls


def test_the_steps_are_named_and_timed_for_kubectl():
    for name, timeout, selector in chain_steps():
        assert name.isidentifier() and timeout[:-1].isdigit() and timeout[-1] in "smh", (name, timeout)
        assert yaml.safe_load(selector) == selector  # one word: no quoting needed
