"""`accresnet validate`: may a candidate export be served?

A candidate is a SavedModel written outside the served base path (`accresnet
export --export-base STAGING`): its folder, or the staging base path, whose
latest version is then the candidate. It is blessed only if

0. its graph uses no operation outside those an export of this project uses
   (pipeline/release/op_gate.py: no file, process or network access); a graph that
   does is refused before any server runs it;
1. it loads and answers in a model server started exactly as the Kubernetes
   Deployment starts one (deployed flags, shipped configs, batching and
   warm-up on): in the release pod, TF Serving itself, the serving image run
   as a sidecar on the candidate's base path (--candidate-server); on one
   machine, one started for the check (`tensorflow_model_server` where it is
   on PATH, else `accresnet serve`). Over gRPC and over REST (the same
   answers), with a median batch-1 latency within the budget;
2. its accuracy on the evaluation set, measured through that server, is at
   least the minimum (better than chance by default);
3. it is not worse than the version now served by more than the allowed
   drop, measured over gRPC from that server (TF Serving or `accresnet
   serve`), on the same images. Only a server that answers it has no version
   of the model (NOT_FOUND), or a served base path (--export-base) that holds
   no version yet, means there is nothing to compare with; a server that
   cannot be reached while versions are served refuses the candidate, since
   its quality relative to them is unknown.

The confusion matrices go to `confusion.png` in the candidate's folder; then
the verdict, every check, both models' metrics (accuracy, loss, per-class
accuracy, confusion matrix), the thresholds, the evaluation data, the graph's
op types and the project's version go to `blessing.json` beside it, bound to
a digest of every file of the candidate (pipeline/release/blessing.py). `accresnet
push` publishes only what that record blesses, unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import pathlib
import shutil
import statistics
import tempfile
import time
import uuid

import grpc
import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from tensorflow.core.protobuf import saved_model_pb2

from pipeline.data import datasets
from pipeline.export import model_card
from pipeline.export.provenance import project, tensorflow_version
from pipeline.export.saved_model import existing_versions
from pipeline.release import blessing
from pipeline.release.blessing import BLESSING_FILE, Blessing, Metrics, copy_candidate
from pipeline.release.configs import ValidateConfig, ValidationError
from pipeline.release.op_gate import read_saved_model, refusal, saved_model_ops
from serving.availability import NotAvailable, Servers, wait_until_available
from serving.client import Classifier, ClientError
from serving.rest_client import RestClassifier
from serving.contract import IMAGE_SIZE, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, SERVING_BYTES, SERVING_DEFAULT, version_number
from serving.deployment import serving_locally

log = logging.getLogger(__name__)

CONFUSION_FILE = "confusion.png"
LATENCY_REQUESTS = 20
SERVING_TIMEOUT = 300  # seconds for the candidate to load and warm up
SAMPLE_IMAGES = 8


def candidate_folder(path: str | pathlib.Path) -> pathlib.Path:
    """The SavedModel folder `path` names: itself, or the latest version under a staging base path."""
    path = pathlib.Path(path)
    if (path / "saved_model.pb").exists():
        return path
    versions = existing_versions(path)
    if versions and (path / str(versions[-1]) / "saved_model.pb").exists():
        return path / str(versions[-1])
    raise ValidationError(f"{path} is neither a SavedModel folder (no saved_model.pb) nor a base path whose "
                          "latest numbered version is one")


def evaluate_over_grpc(address: str, model: str, images: np.ndarray, labels: np.ndarray,
                       label: str | None = None, batch_size: int = 64, version: int | None = None) -> Metrics:
    """The metrics of a served model (any TF Serving) on the images, through gRPC Predict."""
    with Classifier(address, model, version=version, label=label) as classifier:
        probabilities = np.concatenate([classifier.predict(images[i:i + batch_size])
                                        for i in range(0, len(images), batch_size)])
    return Metrics.of(probabilities, labels)


def evaluation_set(config: ValidateConfig) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    data = datasets.load(config.data)
    split = data.test if data.test is not None else data.validation
    if split is None:
        raise ValidationError(f"{config.data.spec} has neither a test nor a validation split to evaluate on")
    pick = np.sort(np.random.default_rng(0).permutation(len(split))[:config.eval_images])
    return split.images[pick], split.labels[pick], data.class_names


# --- infra validation -------------------------------------------------------------------------------


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def check_answers(address: str, rest_address: str, model: str, images: np.ndarray,
                  version: int | None = None) -> dict:
    """gRPC and REST answer, alike; and the median batch-1 gRPC latency."""
    with Classifier(address, model, version=version) as classifier:
        over_grpc = classifier.predict(images)
        latencies = []
        for i in range(LATENCY_REQUESTS):
            started = time.perf_counter()
            classifier.predict(images[i % len(images)][None])
            latencies.append(1000 * (time.perf_counter() - started))
    # serving_bytes over REST, on the images as PNG files.
    with RestClassifier(rest_address, model, signature=SERVING_BYTES, version=version) as client:
        over_rest = client.predict([_png(image) for image in images])
    return {"grpc_rows": int(over_grpc.shape[0]), "rest_rows": int(over_rest.shape[0]),
            "grpc_rest_max_difference": float(np.max(np.abs(over_grpc - over_rest))),
            "rows_sum_to_one": bool(np.allclose(over_grpc.sum(axis=1), 1.0, atol=1e-3)),
            "latency_ms_p50": round(statistics.median(latencies), 2),
            "latency_ms_max": round(max(latencies), 2)}


# --- the verdict --------------------------------------------------------------------------------------


def verdict(config: ValidateConfig, infra: dict, candidate: Metrics | None, current: Metrics | None,
            chance: float) -> dict[str, str | None]:
    """Each check that ran, with why it refuses the candidate (None: passed)."""
    if "error" in infra:
        return {"serving": f"it does not load or answer in a model server: {infra['error']}"}
    checks: dict[str, str | None] = {"serving": None}
    checks["grpc_rest_agree"] = (
        f"gRPC and REST disagree (max difference {infra['grpc_rest_max_difference']:.3g})"
        if infra["grpc_rows"] != infra["rest_rows"] or infra["grpc_rest_max_difference"] > 1e-3 else None)
    checks["probabilities"] = None if infra["rows_sum_to_one"] else "its probabilities do not sum to one"
    checks["latency"] = (f"median latency {infra['latency_ms_p50']:.1f} ms is above the budget of "
                         f"{config.latency_budget_ms:.0f} ms" if infra["latency_ms_p50"] > config.latency_budget_ms
                         else None)
    checks["accuracy"] = None
    if config.min_accuracy is None and candidate.accuracy <= chance:
        checks["accuracy"] = f"accuracy {candidate.accuracy:.4f} is no better than chance ({chance:.4f})"
    elif config.min_accuracy is not None and candidate.accuracy < config.min_accuracy:
        checks["accuracy"] = f"accuracy {candidate.accuracy:.4f} is below the minimum {config.min_accuracy:.4f}"
    if current is not None:
        checks["comparison"] = (f"accuracy {candidate.accuracy:.4f} is below the served version's "
                                f"{current.accuracy:.4f} by more than {config.max_accuracy_drop}"
                                if candidate.accuracy < current.accuracy - config.max_accuracy_drop else None)
    return checks


def declared_image_size(saved_model: saved_model_pb2.SavedModel) -> int:
    """The side S of the [-1, S, S, 3] pixels the candidate's serving_default takes, read from
    its graph without loading it; IMAGE_SIZE where it declares none (the serving checks then
    refuse it)."""
    for meta_graph in saved_model.meta_graphs:
        signature = meta_graph.signature_def.get(SERVING_DEFAULT)
        inputs = list(signature.inputs.values()) if signature is not None else []
        if len(inputs) == 1:
            dims = [dim.size for dim in inputs[0].tensor_shape.dim]
            if len(dims) == 4 and dims[1] == dims[2] and MIN_IMAGE_SIZE <= dims[1] <= MAX_IMAGE_SIZE:
                return dims[1]
    return IMAGE_SIZE


def operations_check(saved_model: saved_model_pb2.SavedModel) -> tuple[list[str], str | None]:
    """The graph's op types, and why they refuse the candidate (None: all are an export's, and
    its saver is a SavedModel's)."""
    ops = saved_model_ops(saved_model)
    return sorted(ops.all), refusal(ops)


def validate(config: ValidateConfig, announce=print) -> Blessing:
    """Check the candidate, write confusion.png and blessing.json into it; returns the record."""
    candidate_dir = candidate_folder(config.candidate)
    # Regular files and folders only, before anything reads or copies it: a link to /dev/zero,
    # a FIFO or a name that is not UTF-8 is refused in one line (exit status 3).
    blessing.entries(candidate_dir)
    announce(f"candidate: {candidate_dir}")
    # One parse of its graph for the size and the operations: both checks read the same bytes.
    saved_model = read_saved_model(candidate_dir)
    # The evaluation images at the size the candidate takes.
    config = dataclasses.replace(config, data=dataclasses.replace(
        config.data, image_size=declared_image_size(saved_model)))
    images, labels, class_names = evaluation_set(config)
    chance = 1 / len(class_names)
    candidate = current = None
    ops, ops_refusal = operations_check(saved_model)
    if ops_refusal:  # never served, not even for the check: it would run
        announce(f"refused before serving it: {ops_refusal}")
        checks = {"operations": ops_refusal}
        infra = {"skipped": "the operations check refused the graph"}
    else:
        infra, candidate = _serve_and_evaluate(config, candidate_dir, images, labels, announce)
        unreachable = None
        if config.current_server:
            current, unreachable = _served_metrics(config, images, labels, announce)
        checks = {"operations": None, **verdict(config, infra, candidate, current, chance)}
        if unreachable:
            checks["comparison"] = unreachable
    reasons = [reason for reason in checks.values() if reason]
    outcome = "refused" if reasons else "blessed"
    data = {"spec": config.data.spec, "data_dir": config.data.data_dir, "images": int(len(labels)),
            "digest": _arrays_digest(images, labels)}
    thresholds = {"min_accuracy": config.min_accuracy if config.min_accuracy is not None else chance,
                  "max_accuracy_drop": config.max_accuracy_drop, "latency_budget_ms": config.latency_budget_ms}
    # The card and the confusion matrix first: the blessing binds them too.
    if candidate is not None:
        plot_confusion(candidate_dir / CONFUSION_FILE, class_names, candidate, current)
    model_card.add_validation(candidate_dir, {
        "verdict": outcome, "reasons": reasons, "data": data, "thresholds": thresholds,
        "accuracy": candidate.accuracy if candidate else None, "loss": candidate.loss if candidate else None,
        "latency_ms_p50": infra.get("latency_ms_p50"),
        "served": {"label": config.current_label, "accuracy": current.accuracy} if current else None})
    return blessing.write(candidate_dir, blessing.Blessing(
        candidate=str(candidate_dir.resolve()), verdict=outcome, reasons=tuple(reasons),
        checks={name: reason or "passed" for name, reason in checks.items()},
        time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        dataset=config.data.spec, class_names=tuple(class_names), data=data, thresholds=thresholds,
        ops=tuple(ops), infra=infra, candidate_metrics=candidate,
        current=blessing.Served(config.current_server, config.current_label, current),
        project=project(), tensorflow=tensorflow_version()))


def _serve_and_evaluate(config: ValidateConfig, candidate_dir: pathlib.Path, images: np.ndarray,
                        labels: np.ndarray, announce) -> tuple[dict, Metrics | None]:
    """Serve the candidate as deployed, check its answers and evaluate it: (infra, metrics);
    infra holds the error when it does not load or answer."""
    if config.candidate_server:
        return _evaluate_on_candidate_server(config, candidate_dir, images, labels, announce)
    with tempfile.TemporaryDirectory(prefix="accresnet-validate-") as scratch:
        scratch = pathlib.Path(scratch)
        # The candidate as version 1 of the model on a volume of its own.
        copy_candidate(candidate_dir, scratch / "models" / config.model / "1",
                       ignore=shutil.ignore_patterns(BLESSING_FILE, CONFUSION_FILE))
        announce(f"starting a model server on the candidate {candidate_dir}")
        try:
            with serving_locally(scratch / "models", scratch / "config", scratch / "server.log",
                                 SERVING_TIMEOUT) as server:
                infra = check_answers(server.grpc_address, f"127.0.0.1:{server.server.rest_port}", config.model,
                                      images[:SAMPLE_IMAGES])
                announce(f"it answers over gRPC and REST; median latency {infra['latency_ms_p50']} ms")
                return infra, evaluate_over_grpc(server.grpc_address, config.model, images, labels)
        except Exception as error:  # a server that never comes up, a refused request: the candidate's fault
            log_tail = (scratch / "server.log").read_text()[-2000:] if (scratch / "server.log").exists() else ""
            return {"error": f"{type(error).__name__}: {error}", "server_log_tail": log_tail}, None


def _evaluate_on_candidate_server(config: ValidateConfig, candidate_dir: pathlib.Path, images: np.ndarray,
                                  labels: np.ndarray, announce) -> tuple[dict, Metrics | None]:
    """The same checks on a server that already serves the candidate's base path (the release
    pod's TF Serving sidecar, started with the deployed flags): every request names the
    candidate's version, once the server reports it AVAILABLE."""
    version = version_number(candidate_dir.name)
    if version is None:
        return {"error": f"{candidate_dir.name} is not a version folder the server at {config.candidate_server} "
                         "could serve"}, None
    if config.candidate_server_base:
        _hand_over(candidate_dir, pathlib.Path(config.candidate_server_base) / str(version))
    announce(f"checking version {version} on {config.candidate_server} (REST {config.candidate_rest_server})")
    try:
        wait_until_available(Servers((config.candidate_rest_server,), timeout_seconds=SERVING_TIMEOUT,
                                     confirmations=1), config.model, [version], announce)
        infra = check_answers(config.candidate_server, config.candidate_rest_server, config.model,
                              images[:SAMPLE_IMAGES], version)
        announce(f"it answers over gRPC and REST; median latency {infra['latency_ms_p50']} ms")
        return infra, evaluate_over_grpc(config.candidate_server, config.model, images, labels, version=version)
    except NotAvailable as error:
        return {"error": str(error)}, None
    except Exception as error:  # a refused request: the candidate's fault
        return {"error": f"{type(error).__name__}: {error}"}, None


def _hand_over(candidate_dir: pathlib.Path, target: pathlib.Path) -> None:
    """Copy the candidate to `target` whole (a hidden copy renamed into place), as exports appear."""
    scratch = target.with_name(f".{target.name}-{uuid.uuid4().hex}")
    copy_candidate(candidate_dir, scratch, ignore=shutil.ignore_patterns(BLESSING_FILE, CONFUSION_FILE))
    if target.exists():
        shutil.rmtree(target)
    scratch.rename(target)


def _arrays_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of the evaluation images and labels, as evaluated."""
    digest = hashlib.sha256()
    for array in (images, labels):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _served_metrics(config: ValidateConfig, images: np.ndarray, labels: np.ndarray, announce
                    ) -> tuple[Metrics | None, str | None]:
    """The served version's metrics, or None; and why the candidate cannot be compared, if it cannot."""
    try:
        return evaluate_over_grpc(config.current_server, config.model, images, labels, config.current_label), None
    except ClientError as error:
        status, details = error.code, str(error)
    except Exception as error:  # it answers, but not comparably (other classes, other outputs)
        return None, f"the served version could not be compared with: {type(error).__name__}: {error}"
    if status == grpc.StatusCode.NOT_FOUND:
        announce(f"no served version to compare with ({details})")
        return None, None
    if config.export_base is not None and not existing_versions(config.export_base):
        announce(f"no answer ({details}), and {config.export_base} holds no version yet: the first release, "
                 "nothing to compare with")
        return None, None
    return None, f"the served version could not be compared with: {details}"


def plot_confusion(path: pathlib.Path, class_names: tuple[str, ...], candidate: Metrics,
                   current: Metrics | None) -> None:
    panels = [("candidate", candidate)] + ([("served", current)] if current else [])
    figure = Figure(figsize=(5.5 * len(panels), 5))  # not pyplot's: no backend or global state involved
    axes = figure.subplots(1, len(panels), squeeze=False)
    for axis, (title, metrics) in zip(axes[0], panels):
        confusion = np.array(metrics.confusion)
        axis.imshow(confusion, cmap="Blues")
        axis.set_title(f"{title}: accuracy {metrics.accuracy:.3f}")
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        ticks = range(len(class_names))
        axis.set_xticks(ticks, class_names, rotation=90, fontsize=7)
        axis.set_yticks(ticks, class_names, fontsize=7)
        for (row, column), count in np.ndenumerate(confusion):
            if count:
                axis.text(column, row, str(count), ha="center", va="center", fontsize=6,
                          color="white" if count > confusion.max() / 2 else "black")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
