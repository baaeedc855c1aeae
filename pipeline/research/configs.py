"""What the research verbs are told: `accresnet experiment`, `report` and `compare`.

Their flags come from these dataclasses (pipeline/flags.py). Nothing here imports
TensorFlow or numpy, so `accresnet --help` builds every verb's flags without them.
"""

from __future__ import annotations

import dataclasses
import pathlib

from pipeline import flags
from pipeline.errors import ConfigError
from pipeline.flags import nested, setting
from pipeline.model.architecture import ARCHES
from pipeline.settings.config import TrainConfig


# Settings an existing output folder must agree with (arches and seeds may grow).
FIXED_SETTINGS = ("depth", "recipe", "dataset", "data_dir", "epochs", "batch_size", "width", "cardinality",
                  "train_images", "mixed_precision", "shortcut", "zero_init_residual", "learning_rate", "momentum",
                  "weight_decay", "optimizer", "set")
# Of those, the ones records written before them lack, with the value they had then.
ADDED_SETTINGS = {"learning_rate": None, "momentum": None, "weight_decay": None, "optimizer": None, "set": ""}


def with_added_settings(experiment: dict) -> dict:
    """An experiment's settings as written, with each setting added since at the value it had then."""
    return {**ADDED_SETTINGS, **experiment}


# The errors (top-1, %) a report and a comparison compute per run, by name and as a reader says them.
METRIC_NAMES = {"min_val_error": "minimum validation error", "mean_val_error": "average validation error",
                "final_val_error": "final validation error", "final_test_error": "final test error"}
PRIMARY_HELP = ("the metric a plan decided on before the runs, stated and listed first (the paper's Table 1 "
                "leads with min_val_error); final_test_error is the one number no choice made while training "
                "has seen")
# The settings of the runs that `accresnet experiment` takes as flags.
RUN_FLAGS = ("depth", "width", "cardinality", "shortcut", "zero_init_residual", "recipe", "learning_rate",
             "momentum", "weight_decay", "optimizer", "set", "dataset", "data_dir", "train_images", "epochs",
             "batch_size", "devices", "mixed_precision")


def parse_arches(text: str) -> tuple[str, ...]:
    arches = tuple(a.strip() for a in text.split(",") if a.strip())
    unknown = [a for a in arches if a not in ARCHES]
    if unknown:
        raise ConfigError(f"unknown arch {', '.join(unknown)}; choose from {', '.join(ARCHES)}")
    return arches


def parse_seeds(text: str) -> tuple[int, ...]:
    """"3" means seeds 0, 1, 2; "0,4,7" means those seeds."""
    try:
        if "," in text:
            seeds = tuple(int(s) for s in text.split(","))
        else:
            count = int(text)
            if count < 1:
                raise ConfigError(f"--seeds needs at least one seed; got {count}")
            return tuple(range(count))
    except ValueError:
        raise ConfigError(f"--seeds takes a count (3) or a list (0,4,7); got {text!r}") from None
    if any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds lists each seed once, none negative; got {text!r}")
    return seeds


def show_list(values: tuple) -> str:
    return ",".join(str(v) for v in values)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Every (arch, seed) run of `run`, a TrainConfig whose arch, seed and model_dir vary."""

    out_dir: str = setting(flag="--out", help="the experiment's working folder: runs/ (checkpoints, logs)")
    records_dir: str | None = setting(
        None, flag="--records",
        help="where each finished run's record goes (<arch>-seed<N>.json: settings, per-epoch history, final and "
             "test metrics), a folder to commit; results.json, table.md and the figures go into the folder "
             "that holds it. Recorded runs are not run again", unset="OUT/records")
    arches: tuple[str, ...] = setting(("resnet", "accumulated"), parse=parse_arches, show=show_list,
                                      help=f"comma-separated, from {', '.join(ARCHES)}")
    seeds: tuple[int, ...] = setting((0, 1, 2), parse=parse_seeds, show=show_list,
                                     help="a count (3: seeds 0, 1, 2) or a list (0,4,7)")
    run: TrainConfig = nested(TrainConfig, recipe="paper50", dataset="cifar10", progress=False)
    primary_metric: str = setting("final_test_error", choices=tuple(METRIC_NAMES), help=PRIMARY_HELP)

    def __post_init__(self):
        if not self.arches or not self.seeds:
            raise ConfigError("an experiment needs at least one arch and one seed")
        for arch in self.arches:
            dataclasses.replace(self.run.net, arch=arch)  # checks the depth and widths for every arch

    def run_dir(self, arch: str, seed: int) -> pathlib.Path:
        return pathlib.Path(self.out_dir) / "runs" / f"{arch}-seed{seed}"

    @property
    def records(self) -> pathlib.Path:
        return pathlib.Path(self.records_dir) if self.records_dir else pathlib.Path(self.out_dir) / "records"

    def fixed_settings(self) -> dict:
        """The settings every run of the experiment shares, by name, as its records hold them."""
        values = flags.values(self)
        return {k: values[k] for k in FIXED_SETTINGS}

    def train_config(self, arch: str, seed: int) -> TrainConfig:
        return dataclasses.replace(self.run, model_dir=str(self.run_dir(arch, seed)),
                                   net=dataclasses.replace(self.run.net, arch=arch), seed=seed)


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """`accresnet report`: the report of an experiment, from its records alone."""

    records_dir: str = setting(flag="--records", help="the experiment's records folder (<arch>-seed<N>.json)")
    out_dir: str | None = setting(None, flag="--out", help="where results.json, table.md and the figures go",
                                  unset="the folder that holds the records folder")
    primary_metric: str = setting("final_test_error", choices=tuple(METRIC_NAMES), help=PRIMARY_HELP)

    @property
    def report_dir(self) -> pathlib.Path:
        return pathlib.Path(self.out_dir) if self.out_dir else pathlib.Path(self.records_dir).resolve().parent


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """`accresnet compare`: an arch of one records folder minus an arch of another, paired by seed."""

    records_dir: str = setting(flag="--records", help="the records folder of the side compared")
    baseline_records_dir: str = setting(flag="--baseline-records", help="the records folder of the baseline")
    arch: str = setting("accumulated", help="the architecture compared")
    baseline_arch: str = setting("resnet", help="the baseline's architecture")
    seeds: tuple[int, ...] | None = setting(
        None, parse=parse_seeds, show=show_list,
        help="the seeds to pair, as `accresnet experiment` takes them: a count (3: seeds 0, 1, 2) or a list "
             "(3,4,5)", unset="every seed both sides have")
    out: str | None = setting(None, help="write the comparison as JSON here", unset="print it only")
    primary_metric: str = setting("final_test_error", choices=tuple(METRIC_NAMES), help=PRIMARY_HELP)
