"""`accresnet experiment`: every (arch, seed) run, then the table and the figures.

Runs go seed by seed, each arch in turn, so an interrupted experiment has its
finished runs in pairs. A run is an ordinary training run in
`<out>/runs/<arch>-seed<seed>`: one seed gives every arch the same data order
and augmentation. Started again, the experiment skips finished runs and lets
unfinished ones resume from their last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time

from pipeline import flags
from pipeline.config import ARCHES, ConfigError, TrainConfig
from pipeline.flags import nested, setting
from pipeline.rundir import RunDir

log = logging.getLogger(__name__)

# Settings an existing output folder must agree with (arches and seeds may grow).
FIXED_SETTINGS = ("depth", "recipe", "dataset", "data_dir", "epochs", "batch_size", "width", "cardinality",
                  "train_images", "mixed_precision", "shortcut", "zero_init_residual")
# The settings of the runs that `accresnet experiment` takes as flags.
RUN_FLAGS = ("depth", "width", "cardinality", "shortcut", "zero_init_residual", "recipe", "dataset", "data_dir",
             "train_images", "epochs", "batch_size", "devices", "mixed_precision")


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
            return tuple(int(s) for s in text.split(","))
        count = int(text)
    except ValueError:
        raise ConfigError(f"--seeds takes a count (3) or a list (0,4,7); got {text!r}") from None
    if count < 1:
        raise ConfigError(f"--seeds needs at least one seed; got {count}")
    return tuple(range(count))


def _show_list(values: tuple) -> str:
    return ",".join(str(v) for v in values)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Every (arch, seed) run of `run`, a TrainConfig whose arch, seed and model_dir vary."""

    out_dir: str = setting(flag="--out", help="the experiment's folder (runs/, results, table, figures)")
    arches: tuple[str, ...] = setting(("resnet", "accumulated"), parse=parse_arches, show=_show_list,
                                      help=f"comma-separated, from {', '.join(ARCHES)}")
    seeds: tuple[int, ...] = setting((0, 1, 2), parse=parse_seeds, show=_show_list,
                                     help="a count (3: seeds 0, 1, 2) or a list (0,4,7)")
    run: TrainConfig = nested(TrainConfig, recipe="paper50", dataset="cifar10", progress=False)

    def __post_init__(self):
        if not self.arches or not self.seeds:
            raise ConfigError("an experiment needs at least one arch and one seed")
        for arch in self.arches:
            dataclasses.replace(self.run.net, arch=arch)  # checks the depth and widths for every arch

    def run_dir(self, arch: str, seed: int) -> pathlib.Path:
        return pathlib.Path(self.out_dir) / "runs" / f"{arch}-seed{seed}"

    def train_config(self, arch: str, seed: int) -> TrainConfig:
        return dataclasses.replace(self.run, model_dir=str(self.run_dir(arch, seed)),
                                   net=dataclasses.replace(self.run.net, arch=arch), seed=seed)


def _check_output_folder(config: ExperimentConfig) -> None:
    out = pathlib.Path(config.out_dir)
    record = out / "experiment.json"
    settings = flags.values(config)
    if record.exists():
        previous = json.loads(record.read_text())
        differing = [k for k in FIXED_SETTINGS if previous.get(k) != settings[k]]
        if differing:
            raise ConfigError(f"{out} holds an experiment with other settings ({', '.join(differing)}); "
                              "use the same flags or another --out")
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=2) + "\n")


def run_experiment(config: ExperimentConfig, announce=print) -> dict:
    """Train what is missing, then write results.json, table.md and the figures; returns the results."""
    from pipeline import train
    from pipeline.report import Run, write_report

    _check_output_folder(config)
    plan = [(arch, seed) for seed in config.seeds for arch in config.arches]
    runs = []
    for number, (arch, seed) in enumerate(plan, start=1):
        run = RunDir(config.run_dir(arch, seed))
        prefix = f"[{number}/{len(plan)}] {arch} seed {seed}"
        if run.is_finished():
            announce(f"{prefix}: finished earlier, kept")
        else:
            announce(f"{prefix}: training in {run.path}")
            started = time.monotonic()
            summary = train.train(config.train_config(arch, seed))
            announce(f"{prefix}: {summary.epochs_completed} epochs in {time.monotonic() - started:.0f}s, "
                     f"val error {100 * (1 - summary.final.get('val_accuracy', float('nan'))):.2f}%, "
                     f"{summary.train_images_per_sec or 0:.0f} images/s")
        runs.append(Run(arch, seed, run.read_history(), run.read_summary()))
    first, run = runs[0].summary.settings, config.run
    label = ", ".join(dict.fromkeys(config.arches))
    context = {
        "title": f"{label}: depth {run.net.depth} on {run.data.spec}",
        "dataset": run.data.spec, "depth": run.net.depth, "recipe": run.recipe.name, "shortcut": first.shortcut,
        "epochs": first.epochs, "global_batch": first.global_batch, "train_images": run.data.train_images,
        "width": run.net.width, "cardinality": run.net.cardinality, "arches": list(config.arches),
        "seeds": list(config.seeds),
    }
    results = write_report(runs, context, pathlib.Path(config.out_dir))
    announce(f"wrote {config.out_dir}/results.json, table.md and figures 3-6")
    return results
