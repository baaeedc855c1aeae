"""docs/deployment.md against the manifests it describes: the overlays' table, the
PodMonitor and the TensorBoard pod, and every docs/ path the manifests cite."""

import re

import kubernetes_validate
import pytest
import yaml

from manifests import KUBERNETES_VERSION, ROOT, one, objects

GUIDE = ROOT / "docs" / "deployment.md"


def overlay_row(name: str) -> str:
    (row,) = [line for line in GUIDE.read_text().splitlines() if line.startswith(f"| `{name}` |")]
    return row


def number(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    assert match, f"the guide no longer says {pattern!r}: {text[:200]}"
    return int(match.group(1))


def trainer(overlay: str) -> tuple[int, dict]:
    """The training workers and the container of one, in an overlay (Indexed Job or TFJob)."""
    (job,) = [o for o in objects(overlay) if o["metadata"]["name"] == "accresnet-train"]
    if job["kind"] == "TFJob":
        worker = job["spec"]["tfReplicaSpecs"]["Worker"]
        return worker["replicas"], worker["template"]["spec"]["containers"][0]
    return job["spec"]["completions"], job["spec"]["template"]["spec"]["containers"][0]


def flag(container: dict, name: str) -> str | None:
    values = [arg.split("=", 1)[1] for arg in container["args"] if arg.startswith(f"--{name}=")]
    return values[0] if values else None


def test_the_base_row():
    row = overlay_row("k8s/base")
    workers, container = trainer("base")
    assert number(r"(\d+) training workers", row) == workers
    assert re.search(r"recipe `([\w-]+)`", row).group(1) == flag(container, "recipe")
    autoscaler = one("base", "HorizontalPodAutoscaler", "accresnet-serving")["spec"]
    assert number(r"(\d+) to \d+ TF Serving replicas", row) == autoscaler["minReplicas"]
    assert number(r"\d+ to (\d+) TF Serving replicas", row) == autoscaler["maxReplicas"]
    claim = one("base", "PersistentVolumeClaim", "accresnet-data")["spec"]
    assert f"{claim['resources']['requests']['storage'][:-2]} Gi `{claim['accessModes'][0]}`" in row


def test_the_local_row():
    row = overlay_row("k8s/overlays/local")
    workers, container = trainer("overlays/local")
    assert number(r"(\d+) training workers", row) == workers
    assert number(r"ResNet-(\d+)", row) == int(flag(container, "depth"))
    images = number(r"on (\d+) synthetic images", row)
    assert f"synthetic:{images}" == flag(container, "dataset")
    assert re.search(r"`([\w-]+)` recipe", row).group(1) == flag(container, "recipe")
    assert number(r"global batch (\d+)", row) == workers * int(flag(container, "batch-size"))


def test_the_gpu_row():
    row = overlay_row("k8s/overlays/gpu")
    workers, container = trainer("overlays/gpu")
    assert number(r"(\d+) training workers", row) == workers
    assert number(r"(\d+) GPUs? each", row) == container["resources"]["limits"]["nvidia.com/gpu"]
    assert re.search(r"`--recipe=([\w-]+)", row).group(1) == flag(container, "recipe")
    assert number(r"--batch-size=(\d+)", row) == int(flag(container, "batch-size"))
    assert number(r"global batch of (\d+)", row) == workers * int(flag(container, "batch-size"))
    # "float32 ... (no --mixed-precision)"
    assert "no `--mixed-precision`" in row and "--mixed-precision" not in container["args"]
    server = one("overlays/gpu", "Deployment", "accresnet-serving")["spec"]["template"]["spec"]["containers"][0]
    assert number(r"(\d+) GPUs? per model server", row) == server["resources"]["limits"]["nvidia.com/gpu"]


def test_the_tfjob_row():
    workers, _ = trainer("overlays/tfjob")
    assert number(r"`accresnet-train` \((\d+) workers\)", overlay_row("k8s/overlays/tfjob")) == workers


def _yaml_blocks(kind: str) -> list[dict]:
    blocks = re.findall(r"```yaml\n(.*?)```", GUIDE.read_text(), re.S)
    return [doc for block in blocks for doc in [yaml.safe_load(block)] if isinstance(doc, dict) and doc.get("kind") == kind]


def test_the_pod_monitor_selects_the_serving_pods_port_and_path():
    (monitor,) = objects("overlays/prometheus", "PodMonitor")
    template = one("overlays/prometheus", "Deployment", "accresnet-serving")["spec"]["template"]
    assert monitor["metadata"]["namespace"] == "accresnet"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    container = template["spec"]["containers"][0]
    assert endpoint["port"] in {port["name"] for port in container["ports"]}
    assert endpoint["path"] == template["metadata"]["annotations"]["prometheus.io/path"]
    # The port it scrapes is the one the metrics policy opens.
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == endpoint["port"])
    (rule,) = one("overlays/prometheus", "NetworkPolicy", "accresnet-serving-metrics")["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": port}]
    # The guide shows the manifest, not a copy of it.
    assert not _yaml_blocks("PodMonitor")
    assert "k8s/components/prometheus-operator/podmonitor.yaml" in GUIDE.read_text()


def test_the_guide_shows_the_adapter_rule_the_component_ships():
    values = yaml.safe_load((ROOT / "k8s" / "components" / "request-rate" / "prometheus-adapter-values.yaml").read_text())
    blocks = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", GUIDE.read_text(), re.S)]
    assert [block for block in blocks if isinstance(block, dict) and "rules" in block] == [{"rules": values["rules"]}]


def test_the_tensorboard_pod_is_valid_restricted_and_reads_the_runs():
    (pod,) = _yaml_blocks("Pod")
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] and spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    claim = one("base", "PersistentVolumeClaim", "accresnet-data")["metadata"]["name"]
    (data,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert data["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}
    _, training = trainer("base")
    model_dir = flag(training, "model-dir")
    assert model_dir.startswith(container["args"][0].removeprefix("--logdir=") + "/")  # the runs are under it
    assert container["image"].split(":")[0] == training["image"].split(":")[0]


@pytest.mark.parametrize("path", sorted((ROOT / "k8s").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_docs_a_manifest_cites_exist(path):
    for cited in re.findall(r"docs/[\w./-]+\.md", path.read_text()):
        assert (ROOT / cited).exists(), f"{path.relative_to(ROOT)} cites {cited}, which does not exist"
