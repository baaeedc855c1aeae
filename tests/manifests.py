"""The Kubernetes manifests as kubectl renders them, for the tests that read them."""

import functools
import pathlib
import shutil
import subprocess

import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).parents[1]
OVERLAYS = ["base", "overlays/local", "overlays/gpu", "overlays/tfjob", "overlays/gcs"]
BUILT_IN_GROUPS = ("v1", "apps/v1", "batch/v1", "autoscaling/v2", "policy/v1", "networking.k8s.io/v1")
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


def pod_specs(overlay: str):
    """(object, pod spec) for every workload, TFJob replicas included."""
    for doc in objects(overlay):
        spec = doc.get("spec", {})
        if doc["kind"] in ("Deployment", "Job"):
            yield doc, spec["template"]["spec"]
        elif doc["kind"] == "TFJob":
            for replica in spec["tfReplicaSpecs"].values():
                yield doc, replica["template"]["spec"]
