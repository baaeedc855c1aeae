"""The manifests as users operate them: the storage class set in one place, a
data Job that fills the volume, Prometheus through the NetworkPolicy, the
autoscaler alone owning the replica count, and GPU images that cannot pass for
CPU ones."""

import re
import shutil
import subprocess

import pytest
import yaml
from google.protobuf import text_format

from manifests import OVERLAYS, ROOT, apply_slices, kubectl, objects, one, pod_specs, selects
from pipeline.cli import build_parser
from serving import deployment
from serving.server import metrics, protos

STORAGE_CLASS_FILE = ROOT / "k8s" / "base" / "storage-class.yaml"
PROMETHEUS_FILE = ROOT / "k8s" / "base" / "prometheus.yaml"
ADAPTER_VALUES = ROOT / "k8s" / "components" / "request-rate" / "prometheus-adapter-values.yaml"
# The KServe overlay replaces the serving Deployment (tests/test_deploy_kserve.py checks its scraping).
SERVING_DEPLOYMENT_OVERLAYS = [o for o in OVERLAYS if o != "overlays/kserve"]
GPU_IMAGES = {"accresnet-trainer-gpu", "accresnet-serving-gpu"}


def storage_class_setting() -> str:
    return yaml.safe_load(STORAGE_CLASS_FILE.read_text())["data"]["storageClassName"]


def image_name(image: str) -> str:
    return image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image


# --- the storage class -----------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlays_volume_takes_the_one_storage_class_setting(overlay):
    (claim,) = objects(overlay, "PersistentVolumeClaim")
    assert claim["spec"]["storageClassName"] == storage_class_setting()
    # The setting is read by kustomize and never applied.
    assert not [d for d in objects(overlay, "ConfigMap") if d["metadata"]["name"] == "accresnet-storage-class"]


def test_no_other_manifest_sets_a_storage_class():
    setters = [p.relative_to(ROOT) for p in (ROOT / "k8s").rglob("*.yaml")
               if re.search(r"^\s*storageClassName:", p.read_text(), re.MULTILINE)]
    assert setters == [STORAGE_CLASS_FILE.relative_to(ROOT)]


def test_changing_the_setting_changes_the_volume_of_every_overlay(tmp_path):
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    setting = tmp_path / "k8s" / "base" / "storage-class.yaml"
    text = setting.read_text()
    changed = re.sub(r"(?m)^(\s*storageClassName:).*$", r"\1 nfs-client", text)
    assert changed != text
    setting.write_text(changed)
    for overlay in OVERLAYS:
        result = subprocess.run([kubectl(), "kustomize", str(tmp_path / "k8s" / overlay)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        (claim,) = [d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "PersistentVolumeClaim"]
        assert claim["spec"]["storageClassName"] == "nfs-client", overlay


# --- the data Job ----------------------------------------------------------------------------

def data_job(overlay):
    return one(overlay, "Job", "accresnet-prepare-data")


def container_of(job):
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def flag_value(args, flag):
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
    return value


def test_the_data_job_prepares_cifar10_and_the_client_images_on_the_volume():
    job = data_job("base")
    pod = job["spec"]["template"]["spec"]
    container = container_of(job)
    trainer = container_of(one("base", "Job", "accresnet-train"))
    assert container["image"] == trainer["image"]
    # The project's own CLI accepts the args, and they mean what the other Jobs expect.
    args = build_parser().parse_args(container["args"])
    assert args.verb == "prepare-data" and args.dataset == "cifar10" and args.images == 100
    assert args.data_dir == flag_value(trainer["args"], "--data-dir") == "/data/tensorflow_datasets"
    client = container_of(one("base", "Job", "accresnet-classify"))
    assert args.images_dir == client["args"][-1] == "/data/images"
    # It writes where they read: the same claim, mounted read-write at /data.
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/data")
    assert not mount.get("readOnly")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == "accresnet-data"
    assert job["spec"].get("completions", 1) == 1 and pod["restartPolicy"] in ("OnFailure", "Never")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_data_job_may_reach_the_internet(overlay):
    """tfds downloads CIFAR-10: no NetworkPolicy may restrict the data Job's egress."""
    labels = data_job(overlay)["spec"]["template"]["metadata"]["labels"]
    for policy in objects(overlay, "NetworkPolicy"):
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        if selector.items() <= labels.items():
            assert "Egress" not in policy["spec"].get("policyTypes", []), policy["metadata"]["name"]


def test_the_local_overlay_loads_the_synthetic_data_it_trains_on():
    container = container_of(data_job("overlays/local"))
    args = build_parser().parse_args(container["args"])
    assert args.dataset == "synthetic"
    trainer = container_of(one("overlays/local", "Job", "accresnet-train"))
    assert flag_value(trainer["args"], "--dataset").split(":", 1)[0] == args.dataset
    # Only the dataset changes; the folders stay the base's.
    base = container_of(data_job("base"))["args"]
    assert [a for a in container["args"] if not a.startswith("--dataset=")] == [
        a for a in base if not a.startswith("--dataset=")]


# --- Prometheus ------------------------------------------------------------------------------

def metrics_path() -> str:
    config = text_format.Parse((deployment.SHIPPED_CONFIG_DIR / "monitoring.config").read_text(),
                               protos.MonitoringConfig())
    assert config.prometheus_config.enable
    return config.prometheus_config.path


@pytest.mark.parametrize("overlay", SERVING_DEPLOYMENT_OVERLAYS)
def test_prometheus_may_scrape_the_model_servers_through_the_network_policy(overlay):
    template = one(overlay, "Deployment", "accresnet-serving")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    rest_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
    assert f"--rest_api_port={rest_port}" in container["args"]
    annotations = template["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(rest_port),
                           "prometheus.io/path": metrics_path()}
    policy = one(overlay, "NetworkPolicy", "accresnet-serving-metrics")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": rest_port}]
    # One peer with both selectors: Prometheus pods in Prometheus's namespace (the setting), not
    # every pod there nor every Prometheus anywhere.
    (peer,) = rule["from"]
    setting = prometheus_setting()
    assert peer == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": setting["namespace"]}},
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": setting["podName"]}}}
    # The clients' policy still admits only the clients.
    (client_rule,) = one(overlay, "NetworkPolicy", "accresnet-serving-clients")["spec"]["ingress"]
    assert client_rule["from"] == [{"podSelector": {"matchLabels": {"accresnet-client": "true"}}}]


def prometheus_setting() -> dict:
    return yaml.safe_load(PROMETHEUS_FILE.read_text())["data"]


def test_the_policy_and_its_setting_say_which_prometheus_it_admits():
    assert prometheus_setting() == {"namespace": "monitoring", "podName": "prometheus"}
    text = (ROOT / "k8s" / "base" / "serving-metrics-networkpolicy.yaml").read_text()
    assert "prometheus.yaml" in text
    setting = PROMETHEUS_FILE.read_text()
    assert "app.kubernetes.io/name=prometheus" in setting  # what prometheus-operator's pods carry


def test_changing_the_prometheus_setting_changes_the_policy_of_every_overlay(tmp_path):
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    setting = tmp_path / "k8s" / "base" / "prometheus.yaml"
    text = setting.read_text()
    changed = re.sub(r"(?m)^(\s*namespace:).*$", r"\1 observability", text)
    changed = re.sub(r"(?m)^(\s*podName:).*$", r"\1 prometheus-k8s", changed)
    assert changed.count("observability") == changed.count("prometheus-k8s") == 1
    setting.write_text(changed)
    for overlay in OVERLAYS:
        result = subprocess.run([kubectl(), "kustomize", str(tmp_path / "k8s" / overlay)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        (policy,) = [d for d in yaml.safe_load_all(result.stdout)
                     if d and d["metadata"]["name"] == "accresnet-serving-metrics"]
        (peer,) = policy["spec"]["ingress"][0]["from"]
        assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "observability"}, overlay
        assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus-k8s"}, overlay
        # Read by kustomize, never applied.
        assert "accresnet-prometheus" not in result.stdout


# --- replicas and the autoscaler -------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_autoscaler_alone_owns_the_replica_count(overlay):
    for hpa in objects(overlay, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        deployment_ = one(overlay, target["kind"], target["name"])
        # A replicas field would reset the autoscaler's count on every `kubectl apply`.
        assert "replicas" not in deployment_["spec"], overlay
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_the_local_overlay_sets_one_server_through_the_autoscaler():
    assert one("overlays/local", "HorizontalPodAutoscaler", "accresnet-serving")["spec"]["minReplicas"] == 1
    assert one("base", "HorizontalPodAutoscaler", "accresnet-serving")["spec"]["minReplicas"] >= 2


def test_the_autoscaler_scales_on_cpu_and_where_an_adapter_serves_it_on_request_rate():
    (cpu_only,) = one("base", "HorizontalPodAutoscaler", "accresnet-serving")["spec"]["metrics"]
    cpu, rate = one("overlays/prometheus", "HorizontalPodAutoscaler", "accresnet-serving")["spec"]["metrics"]
    assert cpu == cpu_only and cpu["resource"]["name"] == "cpu"
    assert rate["type"] == "Pods" and rate["pods"]["target"]["type"] == "AverageValue"
    # The metric is the one the adapter's rule serves, made of the counter the servers export
    # (TF Serving's name, which the stand-in server keeps), per pod as the PodMonitor labels it.
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert rate["pods"]["metric"]["name"] == rule["name"]["as"]
    assert f'__name__="{metrics.REQUEST_COUNT}"' in rule["seriesQuery"]
    assert re.fullmatch(rule["name"]["matches"], metrics.REQUEST_COUNT)
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "sum(rate(<<.Series>>{<<.LabelMatchers>>}[" in rule["metricsQuery"]
    assert rule["metricsQuery"].endswith("by (<<.GroupBy>>)")


def test_the_prometheus_components_add_to_another_overlay(tmp_path):
    """kustomize components: the PodMonitor and the request-rate metric on the local overlay."""
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    mine = tmp_path / "k8s" / "overlays" / "mine"
    mine.mkdir()
    (mine / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": ["../local"],
        "components": ["../../components/prometheus-operator", "../../components/request-rate"]}))
    result = subprocess.run([kubectl(), "kustomize", str(mine)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    (hpa,) = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource", "Pods"] and hpa["spec"]["minReplicas"] == 1
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "PodMonitor"] == ["accresnet-serving"]


# --- GPU images ------------------------------------------------------------------------------

def images(overlay) -> set[str]:
    return {image_name(c["image"]) for _, pod in pod_specs(overlay)
            for c in pod.get("initContainers", []) + pod["containers"]}


def test_the_gpu_overlay_runs_only_gpu_images():
    assert images("overlays/gpu") == GPU_IMAGES


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o != "overlays/gpu"])
def test_no_other_overlay_runs_a_gpu_image(overlay):
    found = images(overlay)
    assert found and not [i for i in found if i.endswith("-gpu")], found


def test_the_dockerfile_says_how_to_build_the_gpu_images_under_their_names():
    builds = re.findall(r"^#\s+docker build --target (\w+) (.*?)-t (\S+) \.", (ROOT / "Dockerfile").read_text(),
                        re.MULTILINE)
    gpu = {name: (target, options) for target, options, name in builds if name.endswith("-gpu")}
    assert set(gpu) == GPU_IMAGES
    for name, (target, options) in gpu.items():
        assert name == f"accresnet-{target}-gpu"
        assert re.search(r"--build-arg \w+=\S+-gpu\b", options), name  # a GPU base image
    cpu = {name for _, options, name in builds if not name.endswith("-gpu")}
    assert cpu == {"accresnet-trainer", "accresnet-serving"}


# --- the guide's apply order -----------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_guides_apply_steps_take_every_object_once_in_dependency_order(overlay):
    slices = apply_slices()
    assert len(slices) == 5, slices
    step = {}
    for doc in objects(overlay):
        key = (doc["kind"], doc["metadata"]["name"])
        hits = [i for i, selector in enumerate(slices) if selects(selector, doc["metadata"].get("labels", {}))]
        assert len(hits) == 1, (key, hits)
        step[key] = hits[0]
    # 1 data (with what everything needs first), 2 training, 3 release, 4 serving, 5 client.
    assert step[("Namespace", "accresnet")] == step[("PersistentVolumeClaim", "accresnet-data")] == 0
    assert step[("Job", "accresnet-prepare-data")] == 0
    assert all(step[k] == 0 for k in step if k[0] == "NetworkPolicy")  # guards up before the pods
    assert {step[k] for k in step if k[1] in ("accresnet-train", "accresnet-workers")} == {1}
    assert step[("Job", "accresnet-release")] == 2
    serving = [k for k in step if k in (("Deployment", "accresnet-serving"), ("InferenceService", "accresnet"))]
    assert len(serving) == 1 and step[serving[0]] == 3
    assert all(step[k] == 3 for k in step if k[0] in ("HorizontalPodAutoscaler", "PodDisruptionBudget"))
    assert step[("Job", "accresnet-classify")] == 4
