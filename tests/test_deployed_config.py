"""One source of truth for the model server's configuration.

serving.deployment.DEPLOYED_FLAGS are what the Kubernetes serving Deployment,
the serving image and `make demo` start the server with. These tests fail when
a manifest or the Dockerfile drifts from them, and check the local mapping
that `make demo` and the end-to-end tests use: only paths and ports change.
"""

import json
import re

import pytest

from manifests import ROOT, one
from serving import deployment

SERVING_OVERLAYS = ["base", "overlays/local", "overlays/gpu", "overlays/tfjob"]


def serving_container(overlay):
    pod = one(overlay, "Deployment", "accresnet-serving")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


@pytest.mark.parametrize("overlay", SERVING_OVERLAYS)
def test_the_serving_deployment_runs_the_deployed_flags(overlay):
    _, container = serving_container(overlay)
    assert tuple(container["args"]) == deployment.DEPLOYED_FLAGS


RELEASE_OVERLAYS = [*SERVING_OVERLAYS, "overlays/gcs", "overlays/kserve"]


@pytest.mark.parametrize("overlay", RELEASE_OVERLAYS)
def test_the_release_jobs_sidecar_is_the_deployed_server_on_the_candidate(overlay):
    """validate checks the candidate on TF Serving itself: the serving image and the deployed flags,
    with the candidate handed over where the Deployment mounts the served base path."""
    pod = one(overlay, "Job", "accresnet-release")["spec"]["template"]["spec"]
    sidecar, validate = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: up before validate, stopped after push
    assert tuple(sidecar["args"]) == deployment.DEPLOYED_FLAGS
    if overlay == "overlays/kserve":
        served_image = one(overlay, "InferenceService", "accresnet")["spec"]["predictor"]["model"]["image"]
    else:
        served_image = serving_container(overlay)[1]["image"]
    assert sidecar["image"] == served_image
    # Its base path is where validate hands the candidate over, once the operations check has passed;
    # it reads nothing else of the pod's volumes (the shipped model config stays visible beside it).
    volumes = {v["name"]: v for v in pod["volumes"]}
    (base_mount,) = [m for m in sidecar["volumeMounts"] if m["mountPath"] == f"{deployment.MODELS_DIR}/"
                     f"{deployment.MODEL_NAME}"]
    assert "emptyDir" in volumes[base_mount["name"]] and base_mount["readOnly"]
    assert not [m for m in sidecar["volumeMounts"] if "persistentVolumeClaim" in volumes[m["name"]]
                or m["mountPath"] in (deployment.MODELS_DIR, "/config")]
    (hand_over,) = [m["mountPath"] for m in validate["volumeMounts"] if m["name"] == base_mount["name"]]
    assert f"--candidate-server-base={hand_over}" in validate["args"]
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert f"--port={ports['grpc']}" in sidecar["args"] and f"--rest_api_port={ports['http']}" in sidecar["args"]
    assert f"--candidate-server=localhost:{ports['grpc']}" in validate["args"]
    assert f"--candidate-rest-server=localhost:{ports['http']}" in validate["args"]


def test_the_gcs_overlay_changes_only_the_model_config():
    _, container = serving_container("overlays/gcs")
    changed = [(a, b) for a, b in zip(container["args"], deployment.DEPLOYED_FLAGS) if a != b]
    assert len(container["args"]) == len(deployment.DEPLOYED_FLAGS)
    assert [b for _, b in changed] == [f"--model_config_file={deployment.MODELS_DIR}/models.config"]


@pytest.mark.parametrize("overlay", SERVING_OVERLAYS)
def test_the_deployed_paths_are_where_the_deployment_mounts_the_volume(overlay):
    pod, container = serving_container(overlay)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == deployment.MODELS_DIR)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == "accresnet-data"
    assert container["readinessProbe"]["httpGet"]["path"] == f"/v1/models/{deployment.MODEL_NAME}/metadata"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert f"--port={ports['grpc']}" in container["args"]
    assert f"--rest_api_port={ports['http']}" in container["args"]


def test_the_serving_image_starts_with_the_deployed_flags_and_files():
    text = (ROOT / "Dockerfile").read_text()
    serving_stage = text.split(" AS serving", 1)[1]
    command = json.loads(re.search(r"^CMD (\[.*?\])\s*$", serving_stage, re.MULTILINE | re.DOTALL)
                         .group(1).replace("\\\n", ""))
    assert tuple(command) == deployment.DEPLOYED_FLAGS
    copied = re.search(r"^COPY (.*) /config/$", serving_stage, re.MULTILINE).group(1).split()
    # The model config comes to /models beside the baked-in model; a mounted volume brings its own.
    template = re.search(r"^COPY (\S+) /models/models.config$", serving_stage, re.MULTILINE).group(1)
    assert ROOT / template == deployment.MODEL_CONFIG_TEMPLATE
    config_files = {arg.split("=", 1)[1] for arg in deployment.DEPLOYED_FLAGS if arg.split("=", 1)[0].endswith("_file")}
    assert {f"{deployment.CONFIG_DIR}/{path.rsplit('/', 1)[1]}" for path in copied} | {
        f"{deployment.MODELS_DIR}/models.config"} == config_files
    for path in copied:
        assert (ROOT / path).is_file()


def test_the_shipped_model_config_serves_from_the_volume():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = text_format.Parse((deployment.SHIPPED_CONFIG_DIR / "models.config").read_text(),
                               model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path) == (deployment.MODEL_NAME, f"{deployment.MODELS_DIR}/{deployment.MODEL_NAME}")


def test_local_mapping_changes_only_paths_and_ports(tmp_path):
    local = deployment.local_deployed_server(tmp_path / "volume", tmp_path / "scratch", 18500, 18501)
    assert len(local.flags) == len(deployment.DEPLOYED_FLAGS)
    for deployed, mapped in zip(deployment.DEPLOYED_FLAGS, local.flags):
        name, value = deployed.split("=", 1)
        assert mapped.split("=", 1)[0] == name
        if not value.startswith("/") and name not in deployment.PORT_FLAGS:
            assert mapped == deployed  # batching, polling: as deployed
    assert "--port=18500" in local.flags and "--rest_api_port=18501" in local.flags
    batching = next(f for f in local.flags if f.startswith("--batching_parameters_file="))
    assert batching.split("=", 1)[1] == str(deployment.SHIPPED_CONFIG_DIR / "batching.config")
    models_config = next(f for f in local.flags if f.startswith("--model_config_file=")).split("=", 1)[1]
    assert f'base_path: "{tmp_path / "volume" / "accresnet"}"' in open(models_config).read()
    described = [str(m) for m in local.mappings]
    assert f"model accresnet base_path: /models/accresnet -> {tmp_path / 'volume' / 'accresnet'}" in described
    # No release wrote a model config on this volume: it starts as the shipped one, and says so.
    assert (tmp_path / "volume" / "models.config").read_text() == deployment.MODEL_CONFIG_TEMPLATE.read_text()
    assert any(m.what.startswith("model config on the volume") for m in local.mappings)
    again = deployment.local_deployed_server(tmp_path / "volume", tmp_path / "scratch", 18500, 18501)
    assert not any(m.what.startswith("model config on the volume") for m in again.mappings)
    assert "--port (port): 8500 -> 127.0.0.1:18500" in described


def test_map_path_takes_the_longest_matching_folder(tmp_path):
    paths = {"/data": tmp_path / "a", "/data/models": tmp_path / "b"}
    assert deployment.map_path("/data/models/x", paths) == tmp_path / "b" / "x"
    assert deployment.map_path("/data/runs", paths) == tmp_path / "a" / "runs"
    assert deployment.map_path("/database", paths) is None


def test_the_serving_guide_shows_the_deployed_flags():
    text = (ROOT / "docs" / "serving.md").read_text()
    section = text.split("## Serving, as deployed", 1)[1]
    flags_block, docker_block = re.findall(r"```(?:sh)?\n(.*?)```", section, re.DOTALL)[:2]
    assert flags_block.split() == list(deployment.DEPLOYED_FLAGS)
    # The server's flags follow the image name.
    server_args = docker_block.replace("\\\n", " ").split("tensorflow/serving:", 1)[1].split()[1:]
    assert server_args == list(deployment.DEPLOYED_FLAGS)
