"""A finished run's record: one JSON file, the part of a run an experiment commits.

A run's folder (checkpoints, TensorBoard logs) stays on the machine that
trained it. Its record carries everything the report reads: the experiment's
settings, the recipe as it was, the run's settings, every epoch's metrics, the
final and test metrics, and the time it took on which CPU. So an experiment
continues on another machine from a fresh clone (recorded runs are skipped)
and its tables and figures are rebuilt from the records alone.

    <records>/<arch>-seed<seed>.json

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

from pipeline.cpu import CpuInfo
from pipeline.errors import UserError
from pipeline.research.configs import with_added_settings

from pipeline.settings.recipes import Recipe
from pipeline.train.rundir import HistoryRow, RunDir, RunSummary
from serving.atomic import write_atomically

FORMAT = 1


class RecordError(UserError, ValueError):
    """A records folder that cannot be read or does not hold one experiment."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunRecord:
    # The experiment's settings that every run of it shares (configs.FIXED_SETTINGS), by name.
    experiment: dict[str, Any]
    # The recipe's fields as the run used them, its description included.
    recipe: dict[str, Any]
    summary: RunSummary
    history: tuple[HistoryRow, ...]
    # Where the run finished: /proc/cpuinfo's model name and the CPUs the process could use.
    cpu: str
    cpus: int | None

    @property
    def arch(self) -> str:
        return self.summary.settings.arch

    @property
    def seed(self) -> int:
        return self.summary.settings.seed

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "arch": self.arch, "seed": self.seed, "experiment": self.experiment,
                "recipe": self.recipe, "cpu": self.cpu, "cpus": self.cpus, "summary": self.summary.to_json(),
                "history": [dataclasses.asdict(row) for row in self.history]}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> RunRecord:
        # Settings added after a record was written take the value every run had before them.
        return cls(experiment=with_added_settings(record["experiment"]), recipe=record["recipe"],
                   summary=RunSummary.from_json(record["summary"]),
                   history=tuple(HistoryRow(**row) for row in record["history"]),
                   cpu=record["cpu"], cpus=record.get("cpus"))


def record_path(folder: str | os.PathLike, arch: str, seed: int) -> pathlib.Path:
    return pathlib.Path(folder) / f"{arch}-seed{seed}.json"


def portable(setting: str, value: Any) -> Any:
    """A setting as records keep it, free of this machine's paths: a folder or an archive by its
    last path component (`folder:/data/cifar10-full` -> `folder:cifar10-full`; the data digest
    says which files), a data or run directory by its name."""
    if not isinstance(value, str) or not value:
        return value
    if setting == "dataset":
        kind, colon, argument = value.partition(":")
        return f"{kind}:{pathlib.PurePath(argument).name}" if colon and kind in ("folder", "cifar-bin") else value
    if setting in ("data_dir", "model_dir"):
        return pathlib.PurePath(value).name
    return value


def portable_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {key: portable(key, value) for key, value in settings.items()}


def record_run(run: RunDir, experiment: dict[str, Any], recipe: Recipe) -> RunRecord:
    """The record of a finished run, from its folder, on this machine, without its paths."""
    summary = run.read_summary()
    if summary is None or not summary.is_finished:
        raise RecordError(f"{run.path} holds no finished run to record (summary.json says it is not done)")
    summary = dataclasses.replace(
        summary, model_dir=portable("model_dir", summary.model_dir),
        settings=dataclasses.replace(summary.settings, dataset=portable("dataset", summary.settings.dataset)))
    return RunRecord(experiment=portable_settings(experiment), recipe=dataclasses.asdict(recipe), summary=summary,
                     history=tuple(run.read_history()), cpu=cpu_description(), cpus=_usable_cpus())


def write_record(path: pathlib.Path, record: RunRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(record.to_json(), indent=2) + "\n")


def read_record(path: pathlib.Path) -> RunRecord:
    try:
        return RunRecord.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as error:
        raise RecordError(f"{path} is not a run record this version reads ({type(error).__name__}: {error})") \
            from None


def read_records(folder: str | os.PathLike) -> list[RunRecord]:
    """Every record in `folder`, by arch then seed."""
    folder = pathlib.Path(folder)
    paths = sorted(folder.glob("*-seed*.json"))
    if not paths:
        raise RecordError(f"{folder} holds no run records (<arch>-seed<N>.json); run `accresnet experiment "
                          "--records` to make them")
    return sorted((read_record(path) for path in paths), key=lambda r: (r.arch, r.seed))


def cpu_description() -> str:
    """The CPU as CpuInfo.describe() names it (model name, family and model, its AVX-512 and
    bfloat16 features), or "unknown" where there is no /proc/cpuinfo."""
    cpu = CpuInfo.read()
    return cpu.describe() if cpu is not None else "unknown"


def _usable_cpus() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
