import csv
import json
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, accresnet, run_accresnet
from pipeline import flags
from pipeline.settings.config import TrainConfig

pytestmark = pytest.mark.slow  # every test here trains or starts processes


def test_help_answers_without_loading_tensorflow():
    code = ("import sys; from pipeline import cli\n"
            "for verb in ['export', 'serve', 'classify', 'experiment', 'report', 'demo', 'tf-config', 'prepare-data',"
            " 'train']:\n"
            "    try:\n        cli.main([verb, '--help'])\n    except SystemExit:\n        pass\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'google', 'grpc', "
            "'numpy', 'tensorflow_serving', 'aiohttp'})\n"
            "assert not heavy, f'--help imported {heavy}'")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for flag in ("--arch", "--depth", "--dataset", "--recipe", "--devices", "--mixed-precision", "--jit",
                 "--val-split", "--seed", "--epochs", "--steps", "--batch-size", "--model-dir", "--shortcut",
                 "--zero-init-residual", "--no-zero-init-residual", "--records"):
        assert flag in result.stdout
    assert "global batch" in result.stdout and "linearly" in result.stdout
    # Every recipe's sources and deviations, in words.
    text = " ".join(result.stdout.split())
    assert "weight decay 1e-4 (Keras L2 5e-5)" in text and "BN momentum 0.99, epsilon 1e-3" in text
    assert "he2016-subset-v0: he2016-subset as the first runs used it" in text


@pytest.mark.parametrize("args, message", [
    (["--depth", "30"], r"depth must be 6n\+2"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--dataset", "folder:/no/such/place"], "no such directory"),
])
def test_bad_flags_give_one_clear_line(args, message, tmp_path):
    code, output = run_accresnet("train", "--model-dir", tmp_path, *args)
    assert code == 2
    assert "Traceback" not in output
    import re
    assert re.search(r"accresnet train: error: .*" + message, output), output


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_epoch(tmp_path):
    args = ["train", "--depth", "8", "--dataset", "synthetic:1000", "--batch-size", "32", "--epochs", "4",
            "--model-dir", tmp_path, "--no-progress"]
    process = accresnet(*args)
    deadline = time.monotonic() + 240
    while not (tmp_path / "checkpoints" / "checkpoint").exists():  # the state file, written after the data
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert not (tmp_path / "summary.json").exists()
    code, output = run_accresnet(*args)
    assert code == 0, output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["initial_epoch"] >= 1 and summary["epochs_completed"] == 4
    with open(tmp_path / "history.csv", newline="") as file:
        assert [int(row["epoch"]) for row in csv.DictReader(file)] == [1, 2, 3, 4]


def test_shortcut_flag_reaches_the_train_and_experiment_settings():
    from pipeline import cli

    parser = cli.build_parser()
    args = parser.parse_args(["train", "--model-dir", "m", "--shortcut", "padding"])
    assert flags.from_args(TrainConfig, args).net.shortcut == "padding"
    args = parser.parse_args(["train", "--model-dir", "m", "--recipe", "he2016-subset"])
    assert flags.from_args(TrainConfig, args).net.shortcut is None  # left to the recipe
    assert parser.parse_args(["experiment", "--out", "o", "--shortcut", "projection-bn"]).shortcut == "projection-bn"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--model-dir", "m", "--shortcut", "identity"])


def test_every_verb_is_registered_once_with_its_functions():
    from pipeline import cli

    assert len({verb.name for verb in cli.VERBS}) == len(cli.VERBS)
    for verb in cli.VERBS:
        assert callable(verb.add_flags) and callable(verb.run), verb.name


def test_train_experiment_and_demo_share_one_help_text_per_setting():
    from pipeline import cli

    parser = cli.build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    helps = {}
    for verb in ("train", "experiment", "demo"):
        for action in verbs[verb]._actions:
            for option in action.option_strings:
                helps.setdefault(option, set()).add(action.help.split(" (default:")[0] if action.help else "")
    shared = {option: texts for option, texts in helps.items() if option in ("--depth", "--dataset", "--epochs",
                                                                             "--batch-size", "--devices")}
    assert all(len(texts) == 1 for texts in shared.values()), shared
    # The verbs' own defaults: an experiment reproduces the paper, the demo is sized for a laptop.
    assert verbs["experiment"].parse_args(["--out", "o"]).recipe == "paper50"
    assert verbs["demo"].parse_args([]).batch_size == 64


def test_the_demo_says_why_it_fails_at_chance():
    from pipeline.demo import below_chance

    assert below_chance(0.31, 10) is None
    for accuracy in (0.1, 0.05):
        assert "not above chance (0.1000 for 10 classes)" in below_chance(accuracy, 10)
