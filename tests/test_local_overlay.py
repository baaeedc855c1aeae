"""The Kubernetes local overlay, run as local processes (tests/local_cluster.py) in
the order of docs/deployment.md: the data Job writes the images, two training
workers train and export to the shared volume, the model server started with
the Deployment's args loads the version, and the client Job classifies the
images on the volume."""

import collections
import json

import pytest

from local_cluster import LocalCluster, dockerfile_images
from manifests import one

OVERLAY = "overlays/local"


def test_the_dockerfile_names_both_images():
    images = dockerfile_images()
    assert images["accresnet-trainer"].entrypoint == ["accresnet"]
    assert images["accresnet-serving"].entrypoint == ["/usr/bin/tensorflow_model_server"]
    assert images["accresnet-serving"].files["/config"].name == "config"


@pytest.mark.slow
def test_the_local_overlay_runs_end_to_end(tmp_path):
    cluster = LocalCluster(OVERLAY, tmp_path)
    try:
        pods = cluster.apply_in_guide_order({"accresnet-prepare-data": 120, "accresnet-train": 600,
                                             "accresnet-serving": 120, "accresnet-classify": 300})
    finally:
        cluster.stop()
        print("\n".join(str(m) for m in cluster.mappings))
    assert list(pods) == ["accresnet-prepare-data", "accresnet-train", "accresnet-serving", "accresnet-classify"]
    assert len(pods["accresnet-train"]) == one(OVERLAY, "Job", "accresnet-train")["spec"]["completions"] == 2
    (client,) = pods["accresnet-classify"]
    predictions = [json.loads(line) for line in client.output().splitlines() if line.startswith("{")]
    images = sorted((tmp_path / "volumes" / "accresnet-data" / "images").rglob("*.png"))
    assert len(predictions) == len(images) > 0
    truth = {str(path): path.parent.name for path in images}
    correct = sum(p["class_name"] == truth[p["path"]] for p in predictions)
    classes = collections.Counter(truth.values())
    assert correct / len(predictions) > 1 / len(classes)  # better than chance
    # The harness mapped the workers' and the Service's names onto loopback.
    described = [m.what for m in cluster.mappings]
    assert any("worker address" in what for what in described)
    assert any("(Service)" in what for what in described)
