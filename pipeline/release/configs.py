"""What the release verbs are told: `accresnet validate`, `push`, `promote` and `rollback`.

Their flags come from these dataclasses (pipeline/flags.py). Nothing here imports
TensorFlow, numpy or gRPC, so `accresnet --help` builds every verb's flags without them.
"""

from __future__ import annotations

import dataclasses

from pipeline.data.specs import DataConfig
from pipeline.errors import UserError
from pipeline.flags import nested, setting
from serving.contract import MODEL_NAME


class ValidationError(UserError, ValueError):
    """The candidate cannot be validated at all (no SavedModel, no evaluation data)."""


@dataclasses.dataclass(frozen=True)
class ValidateConfig:
    candidate: str = setting(help="the candidate SavedModel folder, written outside the served base path")
    data: DataConfig = nested(DataConfig, dataset="synthetic")
    eval_images: int = setting(1000, help="images of the evaluation set's test split (else its validation split)")
    current_server: str | None = setting(
        None, help="gRPC address HOST:PORT of the server now serving the model, to compare with",
        unset="no comparison")
    current_label: str | None = setting(None, help="the served version to compare with, by label (e.g. stable)",
                                        unset="the latest available")
    export_base: str | None = setting(
        None, help="the model's served base path, as push publishes to it: while it holds no version, an "
                   "unreachable --current-server is no reason to refuse (the first release)",
        unset="an unreachable server refuses", aliases=("--served-base",))
    candidate_server: str | None = setting(
        None, help="gRPC HOST:PORT of a model server that already serves the candidate's base path (in the "
                   "release pod, TF Serving started with the deployed flags, as a sidecar): the checks run there, "
                   "on the candidate's version", unset="a server of its own, as deployed")
    candidate_rest_server: str | None = setting(None, help="that server's REST HOST:PORT",
                                                unset="needed with --candidate-server")
    candidate_server_base: str | None = setting(
        None, help="the base path that server polls (empty at first): validate puts the candidate there as its "
                   "version only once its graph has passed the operations check, so the server never loads a "
                   "graph the check refuses", unset="the server already serves the candidate")
    model: str = setting(MODEL_NAME, help="the model's name on the servers")
    min_accuracy: float | None = setting(None, help="refuse a candidate whose accuracy is below this",
                                         unset="better than chance")
    max_accuracy_drop: float = setting(
        0.01, help="refuse a candidate whose accuracy is below the served version's by more than this")
    latency_budget_ms: float = setting(1000.0, help="refuse a candidate whose median batch-1 gRPC latency is "
                                                    "above this, in milliseconds")

    def __post_init__(self):
        if bool(self.candidate_server) != bool(self.candidate_rest_server):
            raise ValidationError("--candidate-server and --candidate-rest-server go together: the checks ask the "
                                  "same server over gRPC and REST")


def _rest_servers_setting():
    return setting(None, metavar="HOST:PORT[,HOST:PORT...]",
                   help="REST addresses of the model servers, or of their Service: a label that exists moves to a "
                        "version only once they report it AVAILABLE, as TF Serving refuses the whole config "
                        "otherwise", unset="no label that exists may move")


def _available_timeout_setting():
    return setting(600.0, help="seconds to wait for the servers to report a version AVAILABLE, every request "
                               "to them included")


def _lock_timeout_setting():
    return setting(60.0, help="seconds to wait for the model config's lock while another push, promote or "
                              "rollback holds it (then nothing is written)")


@dataclasses.dataclass(frozen=True)
class LabelConfig:
    """Where the labels are and which servers must have a version before a label moves to it."""

    model_config_file: str = setting(help="the servers' model config file")
    model: str = setting(MODEL_NAME, help="the model's name in the model config file")
    rest_servers: str | None = _rest_servers_setting()
    available_timeout: float = _available_timeout_setting()
    lock_timeout: float = _lock_timeout_setting()


@dataclasses.dataclass(frozen=True)
class PushConfig:
    candidate: str = setting(help="the candidate SavedModel folder that `accresnet validate` blessed, or its "
                                  "staging base path (the latest version)")
    export_base: str = setting(help="the model's served base path (numbered versions), as the servers read it",
                               aliases=("--served-base",))
    model_config_file: str | None = setting(
        None, help="the servers' model config file: label the new version canary there (stable stays); written "
                   "from the shipped one with --export-base as the model's base path if there is none",
        unset="no labels")
    model: str = setting(MODEL_NAME, help="the model's name in the model config file")
    rest_servers: str | None = _rest_servers_setting()
    available_timeout: float = _available_timeout_setting()
    lock_timeout: float = _lock_timeout_setting()
    force: bool = setting(False, help="push even what validate did not bless")

    def labels(self) -> LabelConfig:
        return LabelConfig(self.model_config_file, self.model, self.rest_servers, self.available_timeout,
                           self.lock_timeout)
