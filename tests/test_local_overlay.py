"""The Kubernetes local overlay, run as local processes (tests/local_cluster.py) in
the order of docs/deployment.md: the data Job writes the images, two training
workers train and export a candidate to the volume's staging folder, the
release Job validates it and pushes it as the first served version (labelled
stable and canary), the model server started with the Deployment's args loads
it, and the client Job classifies the images on the volume with the stable
version."""

import collections
import json

import pytest

from local_cluster import LocalCluster, dockerfile_images
from manifests import one
from serving import labels

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
                                             "accresnet-release": 300, "accresnet-serving": 120,
                                             "accresnet-classify": 300})
    finally:
        cluster.stop()
        print("\n".join(str(m) for m in cluster.mappings))
    assert list(pods) == ["accresnet-prepare-data", "accresnet-train", "accresnet-release", "accresnet-serving",
                          "accresnet-classify"]
    assert len(pods["accresnet-train"]) == one(OVERLAY, "Job", "accresnet-train")["spec"]["completions"] == 2
    # The release: validated (nothing served yet to compare with), pushed whole, labelled.
    volume = tmp_path / "volumes" / "accresnet-data"
    (release,) = pods["accresnet-release"]
    (validate,) = release.init
    assert "blessed:" in validate.output() and "holds no version yet" in validate.output(), validate.output()[-2000:]
    blessing = json.loads((volume / "models" / "accresnet" / "1" / "blessing.json").read_text())
    assert blessing["verdict"] == "blessed" and blessing["candidate"] == str(volume / "staging" / "accresnet" / "1")
    assert labels.labels(volume / "models" / "models.config", "accresnet") == {"stable": 1, "canary": 1}
    (client,) = pods["accresnet-classify"]
    predictions = [json.loads(line) for line in client.output().splitlines() if line.startswith("{")]
    images = sorted((volume / "images").rglob("*.png"))
    assert len(predictions) == len(images) > 0
    truth = {str(path): path.parent.name for path in images}
    correct = sum(p["class_name"] == truth[p["path"]] for p in predictions)
    classes = collections.Counter(truth.values())
    assert correct / len(predictions) > 1 / len(classes)  # better than chance
    # The harness mapped the workers' and the Service's names onto loopback.
    described = [m.what for m in cluster.mappings]
    assert any("worker address" in what for what in described)
    assert any("(Service)" in what for what in described)
