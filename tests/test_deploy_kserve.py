"""The KServe overlay: an InferenceService that serves the training Job's export
from the shared volume with KServe's TF Serving runtime and the same batching
and monitoring as the raw Deployment.

kubernetes-validate knows only built-in kinds, so the InferenceService is
checked in two parts: KServe's own fields against the v1beta1 API
(kserve/kserve pkg/apis/serving/v1beta1), and everything else in the predictor
as what KServe turns it into, a v1 Pod, validated strictly.
"""

import copy

import kubernetes_validate

from manifests import (KSERVE_MODEL_FIELDS, KSERVE_PREDICTOR_FIELDS, KSERVE_SPEC_FIELDS,
                       KUBERNETES_VERSION, ROOT, objects, one, predictor_pod_spec)
from serving import deployment

# Flags that only mean something with a model config file (KServe's runtime passes a base path instead).
MODEL_CONFIG_FLAGS = (deployment.MODEL_CONFIG_FLAG, "--model_config_file_poll_wait_seconds",
                      "--allow_version_labels_for_unavailable_models")

OVERLAY = "overlays/kserve"
# KServe's ClusterServingRuntime kserve-tensorflow-serving (config/runtimes in
# kserve/kserve) starts tensorflow_model_server with these; the InferenceService's
# args are appended to them.
RUNTIME = "kserve-tensorflow-serving"
RUNTIME_FLAGS = ("--model_name={{.Name}}", "--port=9000", "--rest_api_port=8080", "--model_base_path=/mnt/models")
RUNTIME_GRPC_PORT, RUNTIME_REST_PORT = 9000, 8080
# Where KServe mounts a storageUri's folder in the model container.
MODEL_MOUNT = "/mnt/models"
RAW_SERVING = [("Deployment", "accresnet-serving"), ("Service", "accresnet-serving"),
               ("HorizontalPodAutoscaler", "accresnet-serving"), ("PodDisruptionBudget", "accresnet-serving")]


def inference_service() -> dict:
    (service,) = objects(OVERLAY, "InferenceService")
    return service


def model_container() -> dict:
    (container,) = predictor_pod_spec(inference_service())["containers"]
    return container


def flag_name(flag: str) -> str:
    return flag.split("=", 1)[0]


def test_the_inference_service_replaces_the_raw_server_and_keeps_the_jobs():
    service = inference_service()
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    names = {(doc["kind"], doc["metadata"]["name"]) for doc in objects(OVERLAY)}
    assert not names & set(RAW_SERVING), names & set(RAW_SERVING)
    for job in ("accresnet-prepare-data", "accresnet-train", "accresnet-classify"):
        assert ("Job", job) in names
    # The Jobs are the base's, except where the client connects.
    for job in ("accresnet-prepare-data", "accresnet-train"):
        assert one(OVERLAY, "Job", job)["spec"] == one("base", "Job", job)["spec"]


def test_it_serves_the_training_exports_on_the_shared_volume_with_tf_serving():
    service = inference_service()
    # The runtime names the model after the InferenceService: what the client asks for.
    assert service["metadata"]["name"] == deployment.MODEL_NAME
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "tensorflow" and model["runtime"] == RUNTIME
    # pvc://<claim>/<folder>: the folder the release Job pushes to, on the claim it mounts.
    release = one("overlays/kserve", "Job", "accresnet-release")["spec"]["template"]["spec"]
    (export_base,) = [a.split("=", 1)[1] for a in release["containers"][0]["args"] if a.startswith("--export-base=")]
    mount = next(m for m in release["containers"][0]["volumeMounts"] if export_base.startswith(m["mountPath"] + "/"))
    claim = next(v for v in release["volumes"] if v["name"] == mount["name"])["persistentVolumeClaim"]["claimName"]
    folder = "/".join(filter(None, [mount.get("subPath"), export_base[len(mount["mountPath"]) + 1:]]))
    assert model["storageUri"] == f"pvc://{claim}/{folder}" == "pvc://accresnet-data/models/accresnet"
    # The project's serving image: the official TF Serving with our config files in /config.
    assert model["image"].rsplit(":", 1)[0] == "accresnet-serving"
    assert model["image"] == one("base", "Deployment", "accresnet-serving")["spec"]["template"]["spec"][
        "containers"][0]["image"]
    dockerfile = (ROOT / "Dockerfile").read_text().split(" AS serving", 1)[1]
    assert "serving/config/batching.config" in dockerfile and "serving/config/monitoring.config" in dockerfile


def test_its_tf_serving_args_are_the_deployed_flags_the_runtime_does_not_set():
    args = model_container()["args"]
    runtime_set = {flag_name(f) for f in RUNTIME_FLAGS} | set(MODEL_CONFIG_FLAGS)
    expected = [f for f in deployment.DEPLOYED_FLAGS if flag_name(f) not in runtime_set]
    assert args == expected
    for flag in ("--enable_batching", "--batching_parameters_file", "--monitoring_config_file"):
        assert [f for f in args if flag_name(f) == flag] == [f for f in deployment.DEPLOYED_FLAGS
                                                              if flag_name(f) == flag], flag
    # Appended after the runtime's flags, a port or model flag would override them
    # and move the server away from where KServe's Service and probes look.
    assert not {flag_name(f) for f in args} & runtime_set


def test_the_predictor_validates_strictly_as_the_pod_kserve_runs():
    service = inference_service()
    predictor = service["spec"]["predictor"]
    spec = copy.deepcopy(predictor_pod_spec(service))
    # What KServe adds for a pvc:// storageUri: the claim's folder, read-only, at /mnt/models.
    claim, folder = predictor["model"]["storageUri"].removeprefix("pvc://").split("/", 1)
    spec["volumes"].append({"name": "kserve-pvc-source",
                            "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
    spec["containers"][0]["volumeMounts"].append({"name": "kserve-pvc-source", "mountPath": MODEL_MOUNT,
                                                  "subPath": folder, "readOnly": True})
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "accresnet-predictor", "namespace": service["metadata"]["namespace"],
                        "labels": predictor["labels"], "annotations": predictor["annotations"]},
           "spec": spec}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    # The check can fail: a misspelt container field is refused.
    broken = copy.deepcopy(pod)
    broken["spec"]["containers"][0]["imagePullPolicie"] = "Always"
    try:
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError:
        pass
    else:
        raise AssertionError("strict validation accepted an unknown container field")


def test_kserves_own_fields_follow_its_v1beta1_api():
    service = inference_service()
    assert set(service) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(service["spec"]) <= KSERVE_SPEC_FIELDS and "predictor" in service["spec"]
    predictor = service["spec"]["predictor"]
    # model is the one predictor form here (no framework shorthand next to it).
    assert not (KSERVE_PREDICTOR_FIELDS & set(predictor)) - {
        "model", "minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "labels", "annotations"}
    model = predictor["model"]
    assert set(model["modelFormat"]) <= {"name", "version"} and isinstance(model["modelFormat"]["version"], str)
    assert {"modelFormat", "storageUri", "runtime"} <= set(model) and set(model) & KSERVE_MODEL_FIELDS == {
        "modelFormat", "storageUri", "runtime"}
    # KServe's HPA, like the raw one: cpu utilisation between 1 and 100, min <= max.
    raw_hpa = one("base", "HorizontalPodAutoscaler", "accresnet-serving")["spec"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (raw_hpa["minReplicas"], raw_hpa["maxReplicas"])
    assert predictor["scaleMetric"] == raw_hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert predictor["scaleTarget"] == raw_hpa["metrics"][0]["resource"]["target"]["averageUtilization"]
    assert 1 <= predictor["scaleTarget"] <= 100
    annotations = service["metadata"]["annotations"]
    # A Deployment and a Service with both ports: Knative would expose only one.
    assert annotations["serving.kserve.io/deploymentMode"] in ("RawDeployment", "Standard")
    assert annotations["serving.kserve.io/autoscalerClass"] == "hpa"
    # KServe's scraping annotations would point Prometheus at a port TF Serving lacks.
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "false"
    assert service["metadata"]["labels"]["networking.kserve.io/visibility"] == "cluster-local"


def test_ports_probes_and_metrics_are_the_runtimes():
    container = model_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": RUNTIME_REST_PORT, "grpc": RUNTIME_GRPC_PORT}
    # KServe's Service: the first port as port 80, the others under their own number.
    assert container["ports"][0]["name"] == "http"
    assert container["readinessProbe"]["httpGet"] == {"path": f"/v1/models/{deployment.MODEL_NAME}/metadata",
                                                      "port": RUNTIME_REST_PORT}
    assert container["livenessProbe"]["tcpSocket"]["port"] == RUNTIME_GRPC_PORT
    annotations = inference_service()["spec"]["predictor"]["annotations"]
    raw = one("base", "Deployment", "accresnet-serving")["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {**raw, "prometheus.io/port": str(RUNTIME_REST_PORT)}


def policy_peers(overlay):
    (rule,) = one(overlay, "NetworkPolicy", "accresnet-serving-clients")["spec"]["ingress"]
    return rule["from"]


def test_the_client_job_reaches_the_predictors_grpc_port_through_the_network_policy():
    service = inference_service()
    client = one(OVERLAY, "Job", "accresnet-classify")["spec"]["template"]
    args = client["spec"]["containers"][0]["args"]
    # KServe names the predictor's Service <InferenceService>-predictor.
    assert args[1] == f"--server={service['metadata']['name']}-predictor:{RUNTIME_GRPC_PORT}"
    assert f"--model={deployment.MODEL_NAME}" in args
    base_args = one("base", "Job", "accresnet-classify")["spec"]["template"]["spec"]["containers"][0]["args"]
    # Otherwise as in the base, but without a version label: KServe's runtime reads no model config.
    assert args[:1] + args[2:] == [a for a in base_args[:1] + base_args[2:] if not a.startswith("--label=")]
    release = one(OVERLAY, "Job", "accresnet-release")["spec"]["template"]
    validate_args, push_args = release["spec"]["initContainers"][1]["args"], release["spec"]["containers"][0]["args"]
    assert f"--current-server={service['metadata']['name']}-predictor:{RUNTIME_GRPC_PORT}" in validate_args
    assert not [a for a in validate_args + push_args if "label" in a or "model-config" in a]
    assert all(release["metadata"]["labels"].get(k) == v
               for peer in policy_peers(OVERLAY) for k, v in peer["podSelector"]["matchLabels"].items())
    pod_labels = service["spec"]["predictor"]["labels"]
    policy = one(OVERLAY, "NetworkPolicy", "accresnet-serving-clients")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    (rule,) = policy["ingress"]
    assert all(client["metadata"]["labels"].get(k) == v
               for peer in rule["from"] for k, v in peer["podSelector"]["matchLabels"].items())
    assert {p["port"] for p in rule["ports"]} == {RUNTIME_GRPC_PORT, RUNTIME_REST_PORT}
    metrics = one(OVERLAY, "NetworkPolicy", "accresnet-serving-metrics")["spec"]
    assert metrics["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert [p["port"] for r in metrics["ingress"] for p in r["ports"]] == [RUNTIME_REST_PORT]
