"""`accresnet push`, `promote` and `rollback`: publish a blessed candidate, move its labels.

push copies a candidate that `accresnet validate` blessed to the served base
path as the next version (whole, as exports appear), blessing record and
confusion matrix included, so every served version carries why it was let
in. With --model-config-file it also labels the new version `canary` there
(serving/labels.py), and the servers that re-read that file move with it.
"""

from __future__ import annotations

import dataclasses
import pathlib

from pipeline.config import UserError
from pipeline.flags import setting
from pipeline.validate import MODEL_NAME, REFUSED, candidate_folder, read_blessing


class PushRefused(UserError, RuntimeError):
    """The candidate was not blessed by `accresnet validate`."""

    exit_status = REFUSED


@dataclasses.dataclass(frozen=True)
class PushConfig:
    candidate: str = setting(help="the candidate SavedModel folder that `accresnet validate` blessed, or its "
                                  "staging base path (the latest version)")
    export_base: str = setting(help="the model's served base path (numbered versions)")
    model_config_file: str | None = setting(
        None, help="the servers' model config file: label the new version canary there (stable stays)",
        unset="no labels")
    model: str = setting(MODEL_NAME, help="the model's name in the model config file")
    force: bool = setting(False, help="push even what validate did not bless")


def push(config: PushConfig) -> tuple[str, dict[str, int] | None]:
    """The new version's path, and the model's labels afterwards (None without a model config file)."""
    from pipeline.export import existing_versions, publish_as_next_version

    candidate = candidate_folder(config.candidate)
    blessing = read_blessing(candidate)
    if not config.force:
        if blessing is None:
            raise PushRefused(f"{candidate} has no blessing record: run `accresnet validate` on it first "
                              "(or push --force)")
        if blessing["verdict"] != "blessed":
            raise PushRefused(f"{candidate} was refused by validate: {'; '.join(blessing['reasons'])}")
    served = (existing_versions(config.export_base) or [None])[-1]
    path = publish_as_next_version(candidate, config.export_base)
    if config.model_config_file is None:
        return path, None
    from serving import labels

    version = int(pathlib.PurePath(path).name)
    return path, labels.label_canary(config.model_config_file, config.model, version, served)
