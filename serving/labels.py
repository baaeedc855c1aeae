"""Version labels in a TF Serving model config file: canary, stable, rollback.

`tensorflow_model_server --model_config_file=F --model_config_file_poll_wait_seconds=N`
(and `accresnet serve`) re-read F every N seconds; clients ask for a label
(`ModelSpec.version_label`, REST `/v1/models/NAME/labels/LABEL`) and get the
version it names. The model's version policy is kept to the labelled versions,
so every labelled version stays loaded and moving a label is instant:

    push      the new version becomes `canary`; `stable` stays where it is (or,
              the first time, goes to the version served until then)
    promote   `stable` moves to the canary, `rollback` keeps the old stable
    rollback  `stable` moves back to `rollback`'s version; the demoted one is dropped

A label may name a version only once it is loaded, as TF Serving checks, except
a new label with `--allow_version_labels_for_unavailable_models` (which the
deployed flags set, for a canary that is still loading). Files are replaced
whole, never half written.
"""

from __future__ import annotations

import os
import pathlib

from serving.atomic import write_atomically

CANARY, STABLE, ROLLBACK = "canary", "stable", "rollback"


class LabelError(ValueError):
    """A label move the model config cannot make."""


def _read(path: pathlib.Path):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    return text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())


def _write(path: pathlib.Path, config) -> None:
    from google.protobuf import text_format

    write_atomically(path, text_format.MessageToString(config))


def _model(config, name: str):
    for model in config.model_config_list.config:
        if model.name == name:
            return model
    raise LabelError(f"the model config has no model {name!r}")


def labels(path: str | os.PathLike, name: str) -> dict[str, int]:
    return dict(_model(_read(pathlib.Path(path)), name).version_labels)


def _set(path: str | os.PathLike, name: str, new_labels: dict[str, int]) -> dict[str, int]:
    path = pathlib.Path(path)
    config = _read(path)
    model = _model(config, name)
    model.version_labels.clear()
    model.version_labels.update(new_labels)
    # Exactly the labelled versions stay loaded.
    model.model_version_policy.Clear()
    model.model_version_policy.specific.versions.extend(sorted(set(new_labels.values())))
    _write(path, config)
    return new_labels


def label_canary(path: str | os.PathLike, name: str, version: int, served: int | None) -> dict[str, int]:
    """`version` (just pushed) becomes the canary; stable stays, or starts on `served`. A model
    volume without a model config gets the shipped one first."""
    from serving.deployment import ensure_model_config

    ensure_model_config(path)
    current = labels(path, name)
    stable = current.get(STABLE, served if served is not None else version)
    return _set(path, name, {**{k: v for k, v in current.items() if k != CANARY}, STABLE: stable, CANARY: version})


def promote(path: str | os.PathLike, name: str) -> dict[str, int]:
    current = labels(path, name)
    if CANARY not in current:
        raise LabelError(f"model {name} has no canary to promote (labels: {current or 'none'})")
    new = {STABLE: current[CANARY]}
    if STABLE in current and current[STABLE] != current[CANARY]:
        new[ROLLBACK] = current[STABLE]
    return _set(path, name, new)


def rollback(path: str | os.PathLike, name: str) -> dict[str, int]:
    current = labels(path, name)
    if ROLLBACK not in current:
        raise LabelError(f"model {name} has no rollback version (labels: {current or 'none'}); "
                         "only a promotion leaves one")
    return _set(path, name, {STABLE: current[ROLLBACK]})
