"""Labels in the servers' model config: the moves push, promote and rollback make,
TF Serving's rule for them, and concurrent writers that neither crash nor lose a write."""

import json
import subprocess
import sys

import pytest

from helpers import REPO, run_accresnet
from serving import labels
from serving.deployment import MODEL_CONFIG_TEMPLATE

MODEL_CONFIG = ('model_config_list { config { name: "m" base_path: "/models/m" model_platform: "tensorflow" '
                "model_version_policy { latest { num_versions: 1 } } } }")


def anything_available(versions):
    """The servers have every version (a test of the file alone)."""


def nothing_available(versions):
    raise AssertionError(f"no label that exists should move here, yet versions {versions} were asked for")


def policy(path):
    return sorted(labels.read(path).model_config_list.config[0].model_version_policy.specific.versions)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "models.config"
    path.write_text(MODEL_CONFIG)
    return path


def test_labels_move_as_push_promote_and_rollback_say(config):
    labels.add_version(config, "m", 1, served=[])
    assert policy(config) == [1] and labels.labels(config, "m") == {}
    # New labels: TF Serving (with the deployed flag) takes them before the version loads.
    assert labels.label_canary(config, "m", 1, served=None, available=nothing_available) == {"stable": 1, "canary": 1}
    assert labels.promote(config, "m", nothing_available) == {"stable": 1}  # nothing moves
    labels.add_version(config, "m", 2, served=[1])
    assert policy(config) == [1, 2] and labels.labels(config, "m") == {"stable": 1}  # phase 1 moves nothing
    assert labels.label_canary(config, "m", 2, served=1, available=nothing_available) == {"stable": 1, "canary": 2}
    asked = []
    assert labels.promote(config, "m", asked.append) == {"stable": 2, "rollback": 1}
    assert asked == [{2}]  # stable moved: to a version the servers must have
    assert policy(config) == [1, 2]  # both stay loaded
    assert labels.rollback(config, "m", asked.append) == {"stable": 1} and asked[-1] == {1}
    assert policy(config) == [1]  # the demoted one is dropped
    with pytest.raises(labels.LabelError, match="no rollback version"):
        labels.rollback(config, "m", anything_available)
    with pytest.raises(labels.LabelError, match="no canary"):
        labels.promote(config, "m", anything_available)


def test_a_second_push_moves_canary_only_once_the_servers_have_the_version(config):
    labels.add_version(config, "m", 1, served=[])
    labels.label_canary(config, "m", 1, served=None, available=nothing_available)
    labels.add_version(config, "m", 2, served=[1])
    asked = []
    assert labels.label_canary(config, "m", 2, served=1, available=asked.append) == {"stable": 1, "canary": 2}
    assert asked == [{2}]

    def refuse(versions):
        raise labels.LabelError(f"not available: {sorted(versions)}")

    labels.add_version(config, "m", 3, served=[1, 2])
    with pytest.raises(labels.LabelError, match=r"not available: \[3\]"):
        labels.label_canary(config, "m", 3, served=2, available=refuse)
    assert labels.labels(config, "m") == {"stable": 1, "canary": 2}  # nothing written
    assert policy(config) == [1, 2, 3]  # phase 1 stays: the servers go on loading 3
    labels.label_canary(config, "m", 3, served=2, available=anything_available)
    with pytest.raises(labels.LabelError, match="already on version 3, newer than 2"):
        labels.label_canary(config, "m", 2, served=1, available=anything_available)  # a late push never goes back


def test_a_push_in_flight_keeps_its_version_through_other_label_moves(config):
    labels.add_version(config, "m", 1, served=[])
    labels.label_canary(config, "m", 1, served=None, available=nothing_available)
    labels.add_version(config, "m", 2, served=[1])
    labels.label_canary(config, "m", 2, served=1, available=anything_available)
    labels.add_version(config, "m", 3, served=[1, 2])  # a push waiting for its servers
    labels.promote(config, "m", anything_available)
    assert policy(config) == [1, 2, 3]
    labels.rollback(config, "m", anything_available)
    assert policy(config) == [1, 3]  # 2 demoted and dropped; 3 still on its way


def test_push_writes_the_base_path_it_was_given_and_refuses_another(tmp_path):
    path = tmp_path / "volume" / "models.config"
    assert labels.prepare(path, "accresnet", "/srv/models/accresnet", MODEL_CONFIG_TEMPLATE)
    assert labels.read(path).model_config_list.config[0].base_path == "/srv/models/accresnet"
    assert not labels.prepare(path, "accresnet", "/srv/models/accresnet", MODEL_CONFIG_TEMPLATE)
    with pytest.raises(labels.LabelError) as refused:
        labels.prepare(path, "accresnet", "/elsewhere/accresnet", MODEL_CONFIG_TEMPLATE)
    assert "from /srv/models/accresnet, not from /elsewhere/accresnet" in str(refused.value)


@pytest.mark.slow  # a process per verb
@pytest.mark.parametrize("verb,setup,message", [
    ("promote", "", "has no canary to promote"),
    ("rollback", "", "has no rollback version"),
    ("promote", "canary", "needs the servers to have them AVAILABLE first"),
    ("promote", "torn", "is not a model config TF Serving can parse"),
    ("rollback", "missing", "cannot read the model config"),
])
def test_release_verbs_refuse_in_one_line_with_exit_status_2(tmp_path, verb, setup, message):
    path = tmp_path / "models.config"
    path.write_text(MODEL_CONFIG.replace('"/models/m"', '"/models/m" version_labels { key: "stable" value: 1 } '
                                         'version_labels { key: "canary" value: 2 }') if setup == "canary" else
                    'model_config_list { config { name: ' if setup == "torn" else MODEL_CONFIG)
    if setup == "missing":
        path.unlink()
    code, output = run_accresnet(verb, "--model-config-file", path, "--model", "m")
    assert code == 2, output
    assert output.strip().count("\n") == 0 and message in output and "Traceback" not in output, output


WRITER = """
import json, pathlib, sys
from serving import labels
path, index, writes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
report = {"errors": [], "refusals": [], "empty_reads": 0, "last": None}
for j in range(writes):
    try:
        if index < 3:  # pushes' phase 1: each adds a version of its own
            labels.add_version(path, "m", 1000 + 100 * index + j, served=[])
        elif j % 3 == 0:  # phase 2, promote and rollback: labels move among low versions
            report["last"] = labels.label_canary(path, "m", j + 1, served=None, available=lambda versions: None)
        elif j % 3 == 1:
            report["last"] = labels.promote(path, "m", lambda versions: None)
        else:
            report["last"] = labels.rollback(path, "m", lambda versions: None)
    except labels.LabelError as error:
        report["refusals"].append(str(error))
    except Exception as error:
        report["errors"].append(f"{type(error).__name__}: {error}")
    if not pathlib.Path(path).read_text().strip():
        report["empty_reads"] += 1
print(json.dumps(report))
"""


@pytest.mark.slow  # starts 4 processes
def test_concurrent_writers_neither_crash_nor_lose_a_write(config):
    """4 processes x 50 writes to one model config with the code push, promote and rollback use."""
    processes = [subprocess.Popen([sys.executable, "-c", WRITER, str(config), str(index), "50"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={"PYTHONPATH": REPO, "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"})
                 for index in range(4)]
    reports = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["errors"] for r in reports] == [[]] * 4
    assert sum(r["empty_reads"] for r in reports) == 0
    # Every refusal is a one-line reason, and only for a move the labels did not allow then.
    refusals = [reason for r in reports for reason in r["refusals"]]
    assert all("\n" not in reason and ("no rollback version" in reason or "no canary" in reason)
               for reason in refusals), refusals
    # Every write's effect holds: each added version, and the last label move.
    added = {1000 + 100 * index + j for index in range(3) for j in range(50)}
    assert added <= set(policy(config))
    assert labels.labels(config, "m") == reports[3]["last"]
    assert not list(config.parent.glob(".models.config.*.tmp"))  # no scratch file left behind
