"""`accresnet experiment`: every (arch, seed) run, then the table and the figures.

Runs go seed by seed, each arch in turn, so an interrupted experiment has its
finished runs in pairs. A run is an ordinary training run in
`<out>/runs/<arch>-seed<seed>`: one seed gives every arch the same data order
and augmentation. Started again, the experiment skips finished runs and lets
unfinished ones resume from their last checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import pathlib
import time

from pipeline.config import ConfigError, DataConfig, TrainConfig, check_architecture

log = logging.getLogger(__name__)

# Settings an existing output folder must agree with (arches and seeds may grow).
FIXED_SETTINGS = ("depth", "recipe", "dataset", "data_dir", "epochs", "batch_size", "width", "cardinality",
                  "train_images", "mixed_precision", "shortcut")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    out_dir: str
    arches: tuple[str, ...] = ("resnet", "accumulated")
    depth: int = 32
    seeds: tuple[int, ...] = (0, 1, 2)
    recipe: str = "paper50"
    dataset: str = "cifar10"
    data_dir: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    width: int | None = None
    cardinality: int | None = None
    train_images: int | None = None
    devices: int | None = None
    mixed_precision: bool = False
    shortcut: str | None = None  # None: the recipe's

    def __post_init__(self):
        if not self.arches or not self.seeds:
            raise ConfigError("an experiment needs at least one arch and one seed")
        for arch in self.arches:
            check_architecture(arch, self.depth, self.width, self.cardinality)

    def run_dir(self, arch: str, seed: int) -> pathlib.Path:
        return pathlib.Path(self.out_dir) / "runs" / f"{arch}-seed{seed}"

    def train_config(self, arch: str, seed: int) -> TrainConfig:
        return TrainConfig(
            model_dir=str(self.run_dir(arch, seed)), arch=arch, depth=self.depth,
            data=DataConfig(self.dataset, data_dir=self.data_dir, train_images=self.train_images),
            recipe=self.recipe, epochs=self.epochs, batch_size=self.batch_size, shortcut=self.shortcut,
            seed=seed, devices=self.devices,
            mixed_precision=self.mixed_precision, width=self.width, cardinality=self.cardinality, progress=False)


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


def is_finished(run_dir: pathlib.Path) -> bool:
    summary_file = run_dir / "summary.json"
    if not summary_file.exists():
        return False
    summary = json.loads(summary_file.read_text())
    return summary["epochs_completed"] >= summary["epochs"]


def _check_output_folder(config: ExperimentConfig) -> None:
    out = pathlib.Path(config.out_dir)
    record = out / "experiment.json"
    settings = dataclasses.asdict(config)
    if record.exists():
        previous = json.loads(record.read_text())
        differing = [k for k in FIXED_SETTINGS if previous.get(k) != settings[k]]
        if differing:
            raise ConfigError(f"{out} holds an experiment with other settings ({', '.join(differing)}); "
                              "use the same flags or another --out")
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=2) + "\n")


def load_run(arch: str, seed: int, run_dir: pathlib.Path):
    from pipeline.report import Run

    with open(run_dir / "history.csv", newline="") as file:
        history = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(file)]
    return Run(arch, seed, history, json.loads((run_dir / "summary.json").read_text()))


def run_experiment(config: ExperimentConfig, announce=print) -> dict:
    """Train what is missing, then write results.json, table.md and the figures; returns the results."""
    from pipeline import train
    from pipeline.report import write_report

    _check_output_folder(config)
    plan = [(arch, seed) for seed in config.seeds for arch in config.arches]
    runs = []
    for number, (arch, seed) in enumerate(plan, start=1):
        run_dir = config.run_dir(arch, seed)
        prefix = f"[{number}/{len(plan)}] {arch} seed {seed}"
        if is_finished(run_dir):
            announce(f"{prefix}: finished earlier, kept")
        else:
            announce(f"{prefix}: training in {run_dir}")
            started = time.monotonic()
            summary = train.train(config.train_config(arch, seed))
            final = summary["final"]
            announce(f"{prefix}: {summary['epochs_completed']} epochs in {time.monotonic() - started:.0f}s, "
                     f"val error {100 * (1 - final.get('val_accuracy', float('nan'))):.2f}%, "
                     f"{summary['train_images_per_sec'] or 0:.0f} images/s")
        runs.append(load_run(arch, seed, run_dir))
    first = runs[0].summary
    label = ", ".join(dict.fromkeys(config.arches))
    context = {
        "title": f"{label}: depth {config.depth} on {config.dataset}",
        "dataset": config.dataset, "depth": config.depth, "recipe": config.recipe,
        "shortcut": first.get("shortcut", "projection"),
        "epochs": first["epochs"], "global_batch": first["global_batch"], "train_images": config.train_images,
        "width": config.width, "cardinality": config.cardinality, "arches": list(config.arches),
        "seeds": list(config.seeds),
    }
    results = write_report(runs, context, pathlib.Path(config.out_dir))
    announce(f"wrote {config.out_dir}/results.json, table.md and figures 3-6")
    return results
