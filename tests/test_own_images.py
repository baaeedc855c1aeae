"""Your own images on the cluster: the component k8s/components/own-images makes the data
Job fetch the folder an overlay names (k8s/components/own-images/fetch_images.py) onto the
volume, and every stage read it from there. The fetch is tested over http from a local
server, from a path and through TensorFlow's file systems; the local overlay with the
component runs its whole chain as processes (tests/local_cluster.py) against a local web
server."""

import contextlib
import functools
import http.server
import importlib.util
import io
import shutil
import subprocess
import tarfile
import threading
import zipfile

import numpy as np
import pytest
import yaml
from PIL import Image

from local_cluster import LocalCluster, check_classified
from manifests import OVERLAYS, ROOT, kubectl, objects, one

COMPONENT = ROOT / "k8s" / "components" / "own-images"
OWN_FOLDER = "/data/own-images"
DATASET_ARG = f"--dataset=folder:{OWN_FOLDER}"


def load_fetch():
    spec = importlib.util.spec_from_file_location("fetch_images", COMPONENT / "fetch_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fetch_images = load_fetch()


def photos(folder, classes=("cats", "dogs", "owls"), per_class=6, size=16):
    """A folder of PNGs, one subfolder per class, each class a colour of its own."""
    for index, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for number in range(per_class):
            colour = tuple(int(c) for c in (255 * (index == 0), 255 * (index == 1), 255 * (index == 2)))
            Image.new("RGB", (size, size), colour).save(folder / name / f"{number}.png")
    return folder


def tar_gz(source, archive, top="my-photos"):
    with tarfile.open(archive, "w:gz") as opened:
        opened.add(source, arcname=top)
    return archive


@contextlib.contextmanager
def web_server(folder):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def class_files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# --- the fetch -------------------------------------------------------------------------------

def test_an_archive_over_http_lands_unwrapped_and_replaces_the_folder_whole(tmp_path):
    source = photos(tmp_path / "src")
    served = tmp_path / "www"
    served.mkdir()
    tar_gz(source, served / "my-photos.tar.gz")
    dest = tmp_path / "volume" / "own-images"
    (dest / "stale").mkdir(parents=True)
    with web_server(served) as url:
        assert fetch_images.main([f"{url}/my-photos.tar.gz", str(dest)]) == 0
    assert class_files(dest) == class_files(source)  # the top folder unwrapped, the stale one gone
    assert sorted(p.name for p in dest.parent.iterdir()) == ["own-images"]  # no download or staging left


def test_a_zip_path_and_a_folder_url_of_the_pods_file_system(tmp_path):
    source = photos(tmp_path / "src", classes=("a", "b"))
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as opened:
        for file in source.rglob("*.png"):
            opened.write(file, file.relative_to(source))
        opened.writestr("__MACOSX/a/._0.png", b"resource fork")  # what macOS adds, dropped
    assert fetch_images.main([str(archive), str(tmp_path / "from-zip")]) == 0
    assert class_files(tmp_path / "from-zip") == class_files(source)
    assert fetch_images.main([source.as_uri(), str(tmp_path / "from-folder")]) == 0
    assert class_files(tmp_path / "from-folder") == class_files(source)


def test_an_archive_and_a_folder_through_tensorflows_file_systems(tmp_path):
    """Any other scheme (gs:// on a cluster) goes through tf.io.gfile: an archive from its
    in-memory file system here; a folder, which that one cannot list, from a local path."""
    import tensorflow as tf

    source = photos(tmp_path / "src", classes=("x", "y"), per_class=2)
    with tf.io.gfile.GFile("ram://bucket/photos.tar.gz", "wb") as out:
        out.write(tar_gz(source, tmp_path / "photos.tar.gz").read_bytes())
    assert fetch_images.main(["ram://bucket/photos.tar.gz", str(tmp_path / "from-archive")]) == 0
    assert class_files(tmp_path / "from-archive") == class_files(source)
    fetch_images.copy_tree(str(source), tmp_path / "from-folder", [1 << 20])
    assert class_files(tmp_path / "from-folder") == class_files(source)


@pytest.mark.parametrize("source, message", [
    ("s3://bucket/photos/", "no file system for s3://"),
    ("https://example.invalid/photos/", "must be an archive"),
])
def test_a_source_it_cannot_read_is_refused_with_what_to_do(source, message, tmp_path, capsys):
    assert fetch_images.main([source, str(tmp_path / "dest")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "dest").exists()


def test_an_archive_that_escapes_the_folder_or_holds_no_classes_is_refused(tmp_path, capsys):
    escaping = tmp_path / "escape.tar"
    with tarfile.open(escaping, "w") as opened:
        data = b"pwned"
        member = tarfile.TarInfo("../outside.txt")
        member.size = len(data)
        opened.addfile(member, io.BytesIO(data))
    assert fetch_images.main([str(escaping), str(tmp_path / "dest")]) == 2
    assert not (tmp_path / "outside.txt").exists()
    one_class = tar_gz(photos(tmp_path / "one", classes=("only",)), tmp_path / "one.tgz")
    assert fetch_images.main([str(one_class), str(tmp_path / "dest")]) == 2
    assert "one subfolder per class" in capsys.readouterr().err
    big = tar_gz(photos(tmp_path / "big"), tmp_path / "big.tar.gz")
    assert fetch_images.main([str(big), str(tmp_path / "dest"), "--max-bytes", "100"]) == 2
    assert "--max-bytes" in capsys.readouterr().err


# --- the manifests ---------------------------------------------------------------------------

def with_component(tmp_path, overlay: str, uri: str) -> str:
    """The overlay with the component and a source set, as a user's overlay names them."""
    root = tmp_path / "k8s"
    if not root.exists():
        shutil.copytree(ROOT / "k8s", root)
    mine = root / "overlays" / f"mine-{overlay.replace('/', '-')}"
    mine.mkdir()
    source = yaml.safe_load((ROOT / "k8s" / "overlays" / "own-images" / "images-source.yaml").read_text())
    source["data"]["uri"] = uri
    (mine / "images-source.yaml").write_text(yaml.safe_dump(source))
    (mine / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [f"../../{overlay}", "images-source.yaml"], "components": ["../../components/own-images"]}))
    return str(mine)


def container_args(overlay: str) -> dict[tuple[str, str], list[str]]:
    """(workload, container) -> args, for every Job and TFJob container."""
    found = {}
    for doc in objects(overlay):
        if doc["kind"] == "Job":
            pods = [doc["spec"]["template"]["spec"]]
        elif doc["kind"] == "TFJob":
            pods = [replica["template"]["spec"] for replica in doc["spec"]["tfReplicaSpecs"].values()]
        else:
            continue
        for pod in pods:
            for container in pod.get("initContainers", []) + pod["containers"]:
                found[(doc["metadata"]["name"], container["name"])] = container.get("args", [])
    return found


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o not in ("overlays/own-images", "overlays/prometheus")])
def test_the_component_changes_only_the_dataset_and_adds_the_fetch_in_any_overlay(overlay, tmp_path):
    before = container_args(overlay)
    mine = with_component(tmp_path, overlay, "https://example.com/photos.tar.gz")
    after = container_args(mine)
    assert after.pop(("accresnet-prepare-data", "fetch-images")) == ["https://example.com/photos.tar.gz", OWN_FOLDER]
    # The fetch runs the data Job's image, as the overlay names and pulls it.
    job = one(mine, "Job", "accresnet-prepare-data")
    (fetch,), (prepare,) = job["spec"]["template"]["spec"]["initContainers"], job["spec"]["template"]["spec"]["containers"]
    assert (fetch["image"], fetch["imagePullPolicy"]) == (prepare["image"], prepare["imagePullPolicy"])
    assert after.keys() == before.keys()
    changed = 0
    for key, args in before.items():
        expected = [DATASET_ARG if arg.startswith("--dataset=") else arg for arg in args]
        assert after[key] == expected, key
        changed += args != expected
    # The data Job, training and the release's validation read the fetched folder.
    assert changed == 3, before


def test_the_overlay_fetches_before_preparing_with_the_trainer_image():
    job = one("overlays/own-images", "Job", "accresnet-prepare-data")
    pod = job["spec"]["template"]["spec"]
    (fetch,) = pod["initContainers"]
    (prepare,) = pod["containers"]
    assert fetch["image"] == prepare["image"] and fetch["command"] == ["python3", "/scripts/fetch_images.py"]
    assert fetch["args"] == ["gs://BUCKET/my-photos/", OWN_FOLDER]
    scripts = next(v for v in pod["volumes"] if v["name"] == "scripts")
    config_map = one("overlays/own-images", "ConfigMap", scripts["configMap"]["name"])
    assert config_map["data"]["fetch_images.py"] == (COMPONENT / "fetch_images.py").read_text()
    # Both write where the same claim is mounted.
    assert {m["mountPath"] for m in fetch["volumeMounts"]} >= {"/data", "/scripts", "/tmp"}
    assert DATASET_ARG in prepare["args"]
    # The source's setting is read by kustomize, never applied.
    assert not [d for d in objects("overlays/own-images", "ConfigMap") if d["metadata"]["name"] ==
                "accresnet-images-source"]


@pytest.mark.slow
def test_the_chain_trains_serves_and_classifies_the_folder_the_overlay_names(tmp_path):
    """The local overlay with the component, its steps as processes (tests/local_cluster.py):
    fetch-images downloads the archive the overlay names from a web server, prepare-data holds
    out images of its classes, two workers train on the folder, the release validates on it,
    and the client classifies the held-out images with the served version."""
    source = tmp_path / "src"
    generator = np.random.default_rng(0)
    for index, name in enumerate(("cats", "dogs", "owls")):
        (source / name).mkdir(parents=True)
        for number in range(60):
            pixels = generator.integers(0, 80, (32, 32, 3), dtype=np.uint8)
            pixels[..., index] += 150  # each class a colour of its own, with noise
            Image.fromarray(pixels).save(source / name / f"{number}.png")
    served = tmp_path / "www"
    served.mkdir()
    tar_gz(source, served / "my-photos.tar.gz")
    with web_server(served) as url:
        cluster = LocalCluster(with_component(tmp_path, "overlays/local", f"{url}/my-photos.tar.gz"),
                               tmp_path / "cluster")
        try:
            pods = cluster.apply_in_guide_order({"accresnet-prepare-data": 300, "accresnet-train": 900,
                                                 "accresnet-release": 600, "accresnet-serving": 300,
                                                 "accresnet-classify": 300})
        finally:
            cluster.stop()
    volume = tmp_path / "cluster" / "volumes" / "accresnet-data"
    assert class_files(volume / "own-images") == class_files(source)
    (data,) = pods["accresnet-prepare-data"]
    (fetch,) = data.init
    assert "180 files in 3 classes (cats, dogs, owls)" in fetch.output()
    assert any(m.deployed == "/scripts" for m in cluster.mappings)
    (client,) = pods["accresnet-classify"]
    print(check_classified(volume / "images", client.output()))
    assert {p.parent.name for p in (volume / "images").rglob("*.png")} == {"cats", "dogs", "owls"}
