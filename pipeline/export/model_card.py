"""model_card.json: where a version came from and how it did.

`accresnet export` writes it into every version it makes: the architecture
and depth, the recipe, the dataset spec and a digest of its files, the seed,
the epochs, the final and test metrics and the wall time of the training run,
the project's version and commit, and TensorFlow's version. `accresnet
validate` adds what it measured ("validation"), before the blessing binds the
folder's files, so push publishes the card with the version and the servers'
volume holds, beside every version, what made it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

from pipeline.export.provenance import project, tensorflow_version
from pipeline.train.rundir import RunDir
from serving.atomic import write_atomically
from serving.contract import IMAGE_SIZE

CARD_FILE = "model_card.json"
FORMAT = 1


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclasses.dataclass(frozen=True)
class ModelSection:
    architecture: str
    depth: int
    width: int | None
    cardinality: int | None
    shortcut: str
    zero_init_residual: bool
    classes: tuple[str, ...]
    image_size: int = IMAGE_SIZE  # the side of the square images it takes


@dataclasses.dataclass(frozen=True)
class TrainingSection:
    recipe: str
    seed: int
    epochs: int | None
    epochs_completed: int | None
    global_batch: int
    learning_rate: float
    workers: int
    replicas: int
    mixed_precision: bool
    # The last session's: a resumed run's earlier sessions are not counted.
    wall_time_sec: float | None
    # What the command line changed of the recipe (--learning-rate, --set ...), by recipe field.
    overrides: dict[str, Any] | None = None
    # The epoch whose weights this version holds (the best validation epoch's under --export-best),
    # its history row, and how the run chose and ended.
    exported_epoch: int | None = None
    exported_epoch_metrics: dict[str, float] | None = None
    export_best: bool = False
    early_stopping: int | None = None
    stopped_early: bool = False


@dataclasses.dataclass(frozen=True)
class DataSection:
    spec: str
    digest: str | None  # SHA-256 over the files the spec read; None for generated data


@dataclasses.dataclass(frozen=True)
class Made:
    exported: str
    project: dict[str, Any]  # version and commit
    tensorflow: str


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """What made a version (written at export) and how it did (added by validate)."""

    model: ModelSection | None = None
    training: TrainingSection | None = None
    data: DataSection | None = None
    # The last epoch's metrics, and test_loss and test_accuracy where the data has a test split.
    metrics: dict[str, float] | None = None
    made: Made | None = None
    validation: dict[str, Any] | None = None  # validate's verdict and measurements, with its time
    note: str | None = None  # why the card says less than it should
    format: int = FORMAT

    def to_json(self) -> dict:
        card = dataclasses.asdict(self)
        optional = ("validation", "note")  # written only when there is something to say
        return {"format": card.pop("format"),
                **{name: value for name, value in card.items() if value is not None or name not in optional}}

    @classmethod
    def from_json(cls, card: dict) -> ModelCard:
        """The card read back; KeyError or TypeError when it is not one export writes."""
        def section(kind, name):
            value = card.get(name)
            return kind(**value) if value is not None else None

        model = card.get("model")
        return cls(model=ModelSection(**{**model, "classes": tuple(model["classes"])}) if model is not None else None,
                   training=section(TrainingSection, "training"), data=section(DataSection, "data"),
                   metrics=card.get("metrics"), made=section(Made, "made"), validation=card.get("validation"),
                   note=card.get("note"), format=card.get("format", FORMAT))


def from_run(run: RunDir, exported_epoch: int | None = None) -> ModelCard:
    """The card of an export of the run's checkpoint of `exported_epoch` (None: not known).
    `metrics` are the run's last epoch's (and its test split's) whichever epoch is exported."""
    settings, summary = run.read_settings(), run.read_summary()
    exported_row = next((row for row in run.read_history() if row.epoch == exported_epoch), None)
    return ModelCard(
        model=ModelSection(settings.arch, settings.depth, settings.width, settings.cardinality, settings.shortcut,
                           settings.zero_init_residual, tuple(settings.class_names), settings.image_size),
        training=TrainingSection(settings.recipe, settings.seed, settings.epochs,
                                 summary.epochs_completed if summary else None, settings.global_batch,
                                 settings.learning_rate, settings.workers, settings.replicas,
                                 settings.mixed_precision, summary.wall_time_sec if summary else None,
                                 settings.overrides, exported_epoch,
                                 exported_row.metrics() if exported_row else None, settings.export_best,
                                 settings.early_stopping, bool(summary and summary.stopped_early)),
        data=DataSection(settings.dataset, settings.data_digest),
        metrics=dict(summary.final) if summary else None,
        made=Made(_now(), project(), tensorflow_version()))


def read(folder: pathlib.Path) -> ModelCard | None:
    path = folder / CARD_FILE
    if not path.exists():
        return None
    try:
        return ModelCard.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError):  # not a card validate can extend: replaced by one that says so
        return ModelCard(note=f"the {CARD_FILE} found here could not be read")


def write(folder: pathlib.Path, card: ModelCard) -> None:
    write_atomically(folder / CARD_FILE, json.dumps(card.to_json(), indent=2) + "\n")


def add_validation(folder: pathlib.Path, validation: dict) -> ModelCard:
    """The folder's card with validate's measurements in it (a card of their own if it had none)."""
    card = dataclasses.replace(read(folder) or ModelCard(), validation={"time": _now(), **validation})
    write(folder, card)
    return card
