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

import json
import pathlib
import time

from pipeline.provenance import project, tensorflow_version
from pipeline.rundir import RunDir
from serving.atomic import write_atomically

CARD_FILE = "model_card.json"
FORMAT = 1


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def from_run(run: RunDir) -> dict:
    """The card of an export of the run's latest checkpoint."""
    settings, summary = run.read_settings(), run.read_summary()
    return {
        "format": FORMAT,
        "model": {"architecture": settings.arch, "depth": settings.depth, "width": settings.width,
                  "cardinality": settings.cardinality, "shortcut": settings.shortcut,
                  "zero_init_residual": settings.zero_init_residual, "classes": list(settings.class_names)},
        "training": {"recipe": settings.recipe, "seed": settings.seed, "epochs": settings.epochs,
                     "epochs_completed": summary.epochs_completed if summary else None,
                     "global_batch": settings.global_batch, "learning_rate": settings.learning_rate,
                     "workers": settings.workers, "replicas": settings.replicas,
                     "mixed_precision": settings.mixed_precision,
                     # The last session's: a resumed run's earlier sessions are not counted.
                     "wall_time_sec": summary.wall_time_sec if summary else None},
        "data": {"spec": settings.dataset, "digest": settings.data_digest},
        # The last epoch's metrics, and test_loss and test_accuracy where the data has a test split.
        "metrics": dict(summary.final) if summary else None,
        "made": {"exported": _now(), "project": project(), "tensorflow": tensorflow_version()},
    }


def read(folder: pathlib.Path) -> dict | None:
    path = folder / CARD_FILE
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except ValueError:  # not a card validate can extend: replaced by one that says so
        return {"format": FORMAT, "note": f"the {CARD_FILE} found here could not be read"}


def write(folder: pathlib.Path, card: dict) -> None:
    write_atomically(folder / CARD_FILE, json.dumps(card, indent=2) + "\n")


def add_validation(folder: pathlib.Path, validation: dict) -> dict:
    """The folder's card with validate's measurements in it (a card of their own if it had none)."""
    card = read(folder) or {"format": FORMAT}
    card["validation"] = {"time": _now(), **validation}
    write(folder, card)
    return card
