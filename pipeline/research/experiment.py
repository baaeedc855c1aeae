"""`accresnet experiment`: every (arch, seed) run, its record, then the table and the figures.

Runs go seed by seed, each arch in turn, so an interrupted experiment has its
finished runs in pairs. A run is an ordinary training run in
`<out>/runs/<arch>-seed<seed>`: one seed gives every arch the same data order
and augmentation. As each run finishes, its record (pipeline/research/records.py) goes
into the records folder, which is meant to be committed while `<out>` (the
checkpoints) is not. Started again, on this machine or on another from a
fresh clone, the experiment skips recorded runs, records finished ones, lets
unfinished ones resume from their last checkpoint in `<out>` when it is
there, and rebuilds the report from the records alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time

from pipeline import flags
from pipeline.model.architecture import ARCHES
from pipeline.settings.config import TrainConfig
from pipeline.errors import ConfigError
from pipeline.flags import nested, setting
from pipeline.research.records import portable_settings, read_record, record_path, record_run, write_record
from pipeline.train.rundir import RunDir

log = logging.getLogger(__name__)

# Settings an existing output folder must agree with (arches and seeds may grow).
FIXED_SETTINGS = ("depth", "recipe", "dataset", "data_dir", "epochs", "batch_size", "width", "cardinality",
                  "train_images", "mixed_precision", "shortcut", "zero_init_residual", "learning_rate", "momentum",
                  "weight_decay", "optimizer", "set")
# Of those, the ones records written before them lack, with the value they had then.
ADDED_SETTINGS = {"learning_rate": None, "momentum": None, "weight_decay": None, "optimizer": None, "set": ""}
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


def _check_folders(config: ExperimentConfig) -> None:
    """Refuse to mix runs of other settings into the output folder or the records."""
    fixed = config.fixed_settings()
    out = pathlib.Path(config.out_dir)
    marker = out / "experiment.json"
    if marker.exists():
        previous = json.loads(marker.read_text())
        differing = [k for k in FIXED_SETTINGS if previous.get(k, ADDED_SETTINGS.get(k)) != fixed[k]]
        if differing:
            raise ConfigError(f"{out} holds an experiment with other settings ({', '.join(differing)}); "
                              "use the same flags or another --out")
    recorded_form = portable_settings(fixed)  # records keep no paths: compared as they keep them
    for path in sorted(config.records.glob("*-seed*.json")):
        recorded = portable_settings(read_record(path).experiment)
        differing = [k for k in FIXED_SETTINGS if recorded.get(k, ADDED_SETTINGS.get(k)) != recorded_form[k]]
        if differing:
            raise ConfigError(f"{path} records a run with other settings ({', '.join(differing)}); "
                              "use the same flags or other --records")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(flags.values(config), indent=2) + "\n")


def run_experiment(config: ExperimentConfig, announce=print) -> dict:
    """Train and record what is missing, then write results.json, table.md and the figures
    from the records; returns the results."""
    from pipeline.research.report import ReportConfig, report

    _check_folders(config)
    plan = [(arch, seed) for seed in config.seeds for arch in config.arches]
    for number, (arch, seed) in enumerate(plan, start=1):
        _run_and_record(config, arch, seed, f"[{number}/{len(plan)}] {arch} seed {seed}", announce)
    report_config = ReportConfig(str(config.records))
    results = report(report_config)
    announce(f"wrote {report_config.report_dir}/results.json, table.md and figures 3-6 from the records in "
             f"{config.records}")
    return results


def _run_and_record(config: ExperimentConfig, arch: str, seed: int, prefix: str, announce) -> None:
    """Leave a record of the run: kept if there is one, else from a finished run, else after training."""
    record = record_path(config.records, arch, seed)
    if record.exists():
        announce(f"{prefix}: recorded earlier in {record}, kept")
        return
    run = RunDir(config.run_dir(arch, seed))
    if run.is_finished():
        announce(f"{prefix}: finished earlier in {run.path}")
    else:
        from pipeline.train import loop

        announce(f"{prefix}: training in {run.path}")
        started = time.monotonic()
        summary = loop.train(config.train_config(arch, seed))
        announce(f"{prefix}: {summary.epochs_completed} epochs in {time.monotonic() - started:.0f}s, "
                 f"val error {100 * (1 - summary.final.get('val_accuracy', float('nan'))):.2f}%, "
                 f"{summary.train_images_per_sec or 0:.0f} images/s")
    write_record(record, record_run(run, config.fixed_settings(), config.run.recipe))
    announce(f"{prefix}: recorded in {record}")
