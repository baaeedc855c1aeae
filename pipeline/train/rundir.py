"""A training run's directory: its layout, and typed records written and read only here.

    run.json       RunSettings: what the run is; a resume must find the same
    history.csv    one HistoryRow per finished epoch
    summary.json   RunSummary: the settings, where the run started, final metrics, images/s
    checkpoints/   model, optimizer and epoch after every epoch (TensorFlow's format);
                   checkpoints/best/ the best validation epoch's, under --export-best
    logs/          TensorBoard summaries (train/, validation/)
    workers/       one WorkerRecord per worker of a multi-worker run: its final weights' digest
    .workers/      each non-chief worker's scratch checkpoints, removed once written

Under several workers only the chief writes the run's files; saving a
checkpoint is collective, so the others save to their scratch folders.
Files are replaced whole (written beside, then renamed), never left half
written. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import pathlib
from typing import Any

from pipeline.model.architecture import ModelConfig, NetworkSettings

from pipeline.errors import UserError
from serving.contract import IMAGE_SIZE
from serving.atomic import write_atomically

HISTORY_FIELDS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr")
# Settings that must match for a model directory to be resumed: everything that changes what the
# run computes (not how: --jit, the devices where the global batch stays).
RESUME_KEYS = ("arch", "depth", "width", "cardinality", "dataset", "num_classes", "seed", "recipe", "shortcut",
               "zero_init_residual", "weight_decay", "batch_norm_momentum", "batch_norm_epsilon",
               "classifier_initializer", "projection_initializer", "batch_norm_weight_decay", "fused_batch_norm",
               "augmentation", "global_batch", "learning_rate", "total_steps", "steps_per_epoch", "mixed_precision",
               "data_digest", "recipe_settings", "export_best", "early_stopping", "image_size")
# Settings runs recorded before they existed lack (None there): a resume and a comparison skip them.
RECORDED_LATER = ("data_digest", "recipe_settings", "overrides")


def settings_differ(name: str, a: Any, b: Any) -> bool:
    """Whether two runs' values of setting `name` differ: a RECORDED_LATER setting that one
    of them lacks (None) does not count as a difference."""
    return a != b and not (name in RECORDED_LATER and None in (a, b))


class ResumeMismatch(UserError, ValueError):
    """The model directory holds a run with other settings."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSettings(NetworkSettings):
    """run.json: the run as it was resolved, model, data, recipe and devices. Runs recorded
    before the network settings or the next ones existed had the defaults given."""

    arch: str
    depth: int
    width: int | None
    cardinality: int | None
    image_size: int = IMAGE_SIZE
    augmentation: str | None = "pad-crop"  # None: --no-augment (runs from before: not recorded)
    dataset: str
    # SHA-256 over the files the dataset spec read (datasets.files_digest); None: generated, or not recorded.
    data_digest: str | None = None
    num_classes: int
    class_names: tuple[str, ...]
    seed: int
    recipe: str
    replicas: int
    workers: int
    per_replica_batch: int
    global_batch: int
    learning_rate: float
    total_steps: int
    steps_per_epoch: int
    epochs: int
    mixed_precision: bool
    jit: bool
    # The recipe's fields as the run uses them (recipes.recipe_settings), and what the flags changed
    # of the named recipe; None in runs recorded before.
    recipe_settings: dict[str, Any] | None = None
    overrides: dict[str, Any] | None = None
    # --export-best keeps the best validation epoch's checkpoint; --early-stopping's patience in epochs.
    export_best: bool = False
    early_stopping: int | None = None

    def model_config(self) -> ModelConfig:
        """The network the run trains: every ModelConfig field is a setting of the run."""
        return ModelConfig(**{field.name: getattr(self, field.name) for field in dataclasses.fields(ModelConfig)})

    @staticmethod
    def model_settings(model: ModelConfig) -> dict[str, Any]:
        """ModelConfig's fields as RunSettings keeps them (the inverse of model_config)."""
        return dataclasses.asdict(model)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "class_names": list(self.class_names)}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> RunSettings:
        known = {field.name for field in dataclasses.fields(cls)}
        values = {k: v for k, v in record.items() if k in known}
        return cls(**{**values, "class_names": tuple(values["class_names"])})


@dataclasses.dataclass(frozen=True, kw_only=True)
class HistoryRow:
    """One finished epoch: training metrics, validation metrics (when there is a
    validation split) and the learning rate at its end."""

    epoch: int
    loss: float
    accuracy: float
    val_loss: float | None = None
    val_accuracy: float | None = None
    lr: float

    def metrics(self) -> dict[str, float]:
        """The measured values by name, in the history's order."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "epoch" and v is not None}

    @classmethod
    def from_csv(cls, row: dict[str, str]) -> HistoryRow:
        return cls(epoch=int(row["epoch"]),
                   **{k: float(row[k]) if row.get(k) else None for k in HISTORY_FIELDS if k != "epoch"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSummary:
    """summary.json: the settings, where this session of the run started and
    what it ended with. `final` holds the last epoch's metrics, and test_loss
    and test_accuracy where the data has a test split."""

    settings: RunSettings
    initial_epoch: int
    initial_step: int = 0  # the global step this session started at (mid-epoch after a SIGTERM)
    epochs_completed: int
    steps_completed: int
    final: dict[str, float]
    wall_time_sec: float
    train_images_per_sec: float | None
    timed_steps: int
    parameters: int
    model_dir: str
    is_chief: bool
    # Ended by --early-stopping before its last epoch: finished all the same.
    stopped_early: bool = False
    # The epoch of the best validation accuracy so far, and that accuracy (None without validation).
    best_epoch: int | None = None
    best_val_accuracy: float | None = None

    @property
    def is_finished(self) -> bool:
        return self.epochs_completed >= self.settings.epochs or self.stopped_early

    def to_json(self) -> dict[str, Any]:
        # One flat object, as scripts read it: the settings, then what happened.
        rest = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "settings"}
        return {**self.settings.to_json(), **rest}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> RunSummary:
        own = {f.name for f in dataclasses.fields(cls)} - {"settings"}
        return cls(settings=RunSettings.from_json(record), **{k: record[k] for k in own if k in record})


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerRecord:
    """What one worker ended with: in a synchronous run, the same weights on every worker."""

    task_type: str
    task_id: int
    steps_completed: int
    weights_sha256: str


@dataclasses.dataclass(frozen=True)
class RunDir:
    path: pathlib.Path

    def __post_init__(self):
        object.__setattr__(self, "path", pathlib.Path(self.path))

    @property
    def checkpoints(self) -> pathlib.Path:
        return self.path / "checkpoints"

    @property
    def logs(self) -> pathlib.Path:
        return self.path / "logs"

    @property
    def best_checkpoints(self) -> pathlib.Path:
        """--export-best's checkpoint of the best validation epoch, numbered by that epoch."""
        return self.checkpoints / "best"

    def scratch(self, task_id: int) -> pathlib.Path:
        """A non-chief worker's own folder, removed after each checkpoint."""
        return self.path / ".workers" / f"worker-{task_id}"

    def checkpoints_of(self, is_chief: bool, task_id: int) -> pathlib.Path:
        """Where a worker saves checkpoints (every worker saves: saving is collective)."""
        return self.checkpoints if is_chief else self.scratch(task_id) / "checkpoints"

    # --- run.json ---

    @property
    def _settings_file(self) -> pathlib.Path:
        return self.path / "run.json"

    def read_settings(self) -> RunSettings | None:
        if not self._settings_file.exists():
            return None
        return RunSettings.from_json(json.loads(self._settings_file.read_text()))

    def write_settings(self, settings: RunSettings) -> None:
        _write_json(self._settings_file, settings.to_json())

    def check_resumable(self, settings: RunSettings) -> None:
        """Refuse to resume a model directory that holds a run with other settings."""
        previous = self.read_settings()
        if previous is None:
            return
        differing = {k: (getattr(previous, k), getattr(settings, k)) for k in RESUME_KEYS
                     if settings_differ(k, getattr(previous, k), getattr(settings, k))}
        if "recipe_settings" in differing:  # name the recipe's fields that differ, not the whole dict
            old, new = differing.pop("recipe_settings")
            differing.update({k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
                              if old.get(k) != new.get(k) and k not in differing})
        if differing:
            detail = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in differing.items())
            raise ResumeMismatch(f"{self.path} holds a run with other settings ({detail}); "
                                 "resume with the same flags or choose a new --model-dir")

    # --- history.csv ---

    @property
    def _history_file(self) -> pathlib.Path:
        return self.path / "history.csv"

    def read_history(self) -> list[HistoryRow]:
        if not self._history_file.exists():
            return []
        with self._history_file.open(newline="") as file:
            return [HistoryRow.from_csv(row) for row in csv.DictReader(file)]

    def write_history(self, rows: list[HistoryRow]) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in dataclasses.asdict(row).items()})
        write_atomically(self._history_file, text.getvalue())

    # --- summary.json ---

    @property
    def _summary_file(self) -> pathlib.Path:
        return self.path / "summary.json"

    def read_summary(self) -> RunSummary | None:
        if not self._summary_file.exists():
            return None
        return RunSummary.from_json(json.loads(self._summary_file.read_text()))

    def write_summary(self, summary: RunSummary) -> None:
        _write_json(self._summary_file, summary.to_json())

    def is_finished(self) -> bool:
        """A summary says every epoch of the run is done."""
        summary = self.read_summary()
        return summary is not None and summary.is_finished

    # --- workers/ ---

    def write_worker_record(self, record: WorkerRecord) -> None:
        folder = self.path / "workers"
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / f"{record.task_type}-{record.task_id}.json", dataclasses.asdict(record))


def _write_json(path: pathlib.Path, value: dict) -> None:
    write_atomically(path, json.dumps(value, indent=2) + "\n")


def best_row(rows: list[HistoryRow]) -> HistoryRow | None:
    """The first epoch with the highest validation accuracy; None where none was measured."""
    measured = [row for row in rows if row.val_accuracy is not None]
    return max(measured, key=lambda row: row.val_accuracy) if measured else None
