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

import json
import logging
import pathlib
import time

from pipeline import flags
from pipeline.errors import ConfigError
from pipeline.research.configs import FIXED_SETTINGS, ExperimentConfig, ReportConfig, with_added_settings
from pipeline.research.health import start_health
from pipeline.research.records import portable_settings, read_record, record_path, record_run, write_record
from pipeline.research.report import report
from pipeline.train import loop
from pipeline.train.rundir import RunDir
from serving.atomic import write_atomically

log = logging.getLogger(__name__)


def _check_folders(config: ExperimentConfig) -> None:
    """Refuse to mix runs of other settings into the output folder or the records."""
    fixed = config.fixed_settings()
    out = pathlib.Path(config.out_dir)
    marker = out / "experiment.json"
    if marker.exists():
        previous = with_added_settings(json.loads(marker.read_text()))
        differing = [k for k in FIXED_SETTINGS if previous.get(k) != fixed[k]]
        if differing:
            raise ConfigError(f"{out} holds an experiment with other settings ({', '.join(differing)}); "
                              "use the same flags or another --out")
    recorded_form = portable_settings(fixed)  # records keep no paths: compared as they keep them
    for path in sorted(config.records.glob("*-seed*.json")):
        recorded = portable_settings(read_record(path).experiment)
        differing = [k for k in FIXED_SETTINGS if recorded.get(k) != recorded_form[k]]
        if differing:
            raise ConfigError(f"{path} records a run with other settings ({', '.join(differing)}); "
                              "use the same flags or other --records")
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(marker, json.dumps(flags.values(config), indent=2) + "\n")


def run_experiment(config: ExperimentConfig, announce=print) -> dict:
    """Train and record what is missing, then write results.json, table.md and the figures
    from the records; returns the results."""
    _check_folders(config)
    plan = [(arch, seed) for seed in config.seeds for arch in config.arches]
    for number, (arch, seed) in enumerate(plan, start=1):
        _run_and_record(config, arch, seed, f"[{number}/{len(plan)}] {arch} seed {seed}", announce)
    report_config = ReportConfig(str(config.records), primary_metric=config.primary_metric)
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
        announce(f"{prefix}: training in {run.path}")
        started = time.monotonic()
        summary = loop.train(config.train_config(arch, seed))
        announce(f"{prefix}: {summary.epochs_completed} epochs in {time.monotonic() - started:.0f}s, "
                 f"val error {100 * (1 - summary.final.get('val_accuracy', float('nan'))):.2f}%, "
                 f"{summary.train_images_per_sec or 0:.0f} images/s")
    made = record_run(run, config.fixed_settings(), config.run.recipe)
    write_record(record, made)
    health = start_health(made.history, made.summary.settings.num_classes)
    gate = "passes" if health.passed else "fails: " + "; ".join(health.reasons())
    announce(f"{prefix}: recorded in {record}; start-up gate {gate}")
