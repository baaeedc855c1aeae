"""The Kubernetes local overlay, run as local processes (tests/local_cluster.py) in
the order of docs/deployment.md: the data Job writes the images, two training
workers train and export a candidate to the volume's staging folder, the
release Job validates it on its TF Serving sidecar (the model server as
deployed) and pushes it as the first served version (labelled stable and
canary), the model server started with the Deployment's args loads it, and
the client Job classifies the images on the volume with the stable version."""

import pytest

from local_cluster import LocalCluster, check_classified, check_first_release, dockerfile_images
from manifests import one
from serving.deployment import DEPLOYED_FLAGS

pytestmark = pytest.mark.slow  # every test here trains or starts processes

OVERLAY = "overlays/local"


def test_the_dockerfile_names_both_images():
    images = dockerfile_images()
    assert images["accresnet-trainer"].entrypoint == ["accresnet"]
    assert images["accresnet-serving"].entrypoint == ["/usr/bin/tensorflow_model_server"]
    assert images["accresnet-serving"].cmd == list(DEPLOYED_FLAGS)
    assert images["accresnet-trainer"].cmd == ["--help"]
    assert images["accresnet-serving"].files["/config"].name == "config"
    # A single file copied to a path of its own: the shipped model config.
    assert images["accresnet-serving"].files["/models/models.config"].name == "models.config"


@pytest.mark.slow
def test_the_local_overlay_runs_end_to_end(tmp_path):
    cluster = LocalCluster(OVERLAY, tmp_path)
    try:
        pods = cluster.apply_in_guide_order({"accresnet-prepare-data": 120, "accresnet-train": 600,
                                             "accresnet-release": 300, "accresnet-serving": 120,
                                             "accresnet-classify": 300})
    finally:
        cluster.stop()
        print("\n".join(str(m) for m in cluster.mappings))
    assert list(pods) == ["accresnet-prepare-data", "accresnet-train", "accresnet-release", "accresnet-serving",
                          "accresnet-classify"]
    assert len(pods["accresnet-train"]) == one(OVERLAY, "Job", "accresnet-train")["spec"]["completions"] == 2
    volume = tmp_path / "volumes" / "accresnet-data"
    (release,) = pods["accresnet-release"]
    check_first_release(volume, release, str(volume / "staging" / "accresnet" / "1"),
                        cluster.empty_dir("accresnet-release-0", "candidate"))
    (client,) = pods["accresnet-classify"]
    print(check_classified(volume / "images", client.output()))
    # The harness mapped the workers' and the Service's names onto loopback.
    described = [m.what for m in cluster.mappings]
    assert any("worker address" in what for what in described)
    assert any("(Service)" in what for what in described)
    assert any(what.endswith("arg (in the pod)") for what in described)  # validate -> the sidecar
