"""The Kubernetes manifests as kubectl renders them, for the tests that read them."""

import functools
import pathlib
import re
import shutil
import subprocess

import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).parents[1]
OVERLAYS = ["base", "overlays/local", "overlays/gpu", "overlays/tfjob", "overlays/gcs", "overlays/kserve",
            "overlays/prometheus", "overlays/own-images"]
BUILT_IN_GROUPS = ("v1", "apps/v1", "batch/v1", "autoscaling/v2", "policy/v1", "networking.k8s.io/v1")
# Custom resources, each only in the overlay made for its operator.
CUSTOM_KINDS = {"overlays/tfjob": {"TFJob"}, "overlays/kserve": {"InferenceService"},
                "overlays/prometheus": {"PodMonitor"}}

# KServe's InferenceService (serving.kserve.io/v1beta1, pkg/apis/serving/v1beta1 in
# kserve/kserve): spec.predictor holds a PodSpec's fields inline next to these,
# and predictor.model a Container's fields inline next to its own. Whatever is
# not listed here must therefore be a Pod or Container field, which a strict v1
# Pod validation checks.
KSERVE_SPEC_FIELDS = {"predictor", "transformer", "explainer"}
KSERVE_PREDICTOR_FIELDS = {
    "name", "model", "storageUris", "storageContainerName", "workerSpec",
    # the framework shorthands, instead of model
    "sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface", "pmml", "lightgbm", "paddle",
    # ComponentExtensionSpec
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType", "autoScaling",
    "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
    "deploymentStrategy",
}
KSERVE_MODEL_FIELDS = {"modelFormat", "runtime", "storageUri", "runtimeVersion", "protocolVersion", "storage",
                       "confidential"}
# The name KServe gives the model's container.
KSERVE_CONTAINER = "kserve-container"
KUBERNETES_VERSION = kubernetes_validate.utils.latest_version()


def kubectl() -> str:
    path = shutil.which("kubectl")
    assert path, "kubectl is needed to render the kustomizations (.ci/run installs Debian's package)"
    return path


@functools.cache
def rendered(overlay: str) -> tuple[str, list[dict]]:
    result = subprocess.run([kubectl(), "kustomize", str(ROOT / "k8s" / overlay)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout, [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def objects(overlay: str, kind: str | None = None) -> list[dict]:
    return [doc for doc in rendered(overlay)[1] if kind is None or doc["kind"] == kind]


def one(overlay: str, kind: str, name: str) -> dict:
    (found,) = [doc for doc in objects(overlay, kind) if doc["metadata"]["name"] == name]
    return found


def predictor_pod_spec(service: dict) -> dict:
    """An InferenceService's predictor as the Pod spec KServe makes of it: the
    predictor's PodSpec fields, with the model's Container fields as the first
    container (before the runtime's own fields are merged in)."""
    predictor = service["spec"]["predictor"]
    pod = {k: v for k, v in predictor.items() if k not in KSERVE_PREDICTOR_FIELDS}
    container = {k: v for k, v in predictor["model"].items() if k not in KSERVE_MODEL_FIELDS}
    pod["containers"] = [{"name": KSERVE_CONTAINER, **container}, *pod.get("containers", [])]
    return pod


def pod_specs(overlay: str):
    """(object, pod spec) for every workload, TFJob replicas and InferenceService predictors included."""
    for doc in objects(overlay):
        spec = doc.get("spec", {})
        if doc["kind"] in ("Deployment", "Job"):
            yield doc, spec["template"]["spec"]
        elif doc["kind"] == "TFJob":
            for replica in spec["tfReplicaSpecs"].values():
                yield doc, replica["template"]["spec"]
        elif doc["kind"] == "InferenceService":
            yield doc, predictor_pod_spec(doc)


DEPLOY_SCRIPT = ROOT / "k8s" / "deploy.sh"


def chain_steps() -> list[tuple[str, str, str]]:
    """k8s/deploy.sh's steps, in order: (name, timeout, label selector of what it applies)."""
    block = re.search(r"^STEPS=\(\n(.*?)^\)", DEPLOY_SCRIPT.read_text(), re.MULTILINE | re.DOTALL)
    assert block, f"{DEPLOY_SCRIPT} has no STEPS=( ... ) list"
    return [tuple(line.strip().strip('"').split()) for line in block.group(1).splitlines() if line.strip()]


def apply_slices() -> list[str]:
    """The label selectors of k8s/deploy.sh's steps (`kubectl apply -k OVERLAY -l ...`), in order."""
    return [selector for _, _, selector in chain_steps()]


def selects(selector: str, labels: dict) -> bool:
    """kubectl's equality selectors: k=v needs the label; k!=v also takes objects without it."""
    for requirement in selector.split(","):
        negated = "!=" in requirement
        key, value = requirement.split("!=" if negated else "=")
        if (labels.get(key) == value) == negated:
            return False
    return True
