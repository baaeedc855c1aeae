"""Versioned SavedModels for TF Serving, written atomically.

`<export-base>/<version>/` holds a SavedModel with two signatures:

    serving_default  images uint8 [batch, 32, 32, 3]   (raw pixels)
    serving_bytes    image_bytes string [batch]        (PNG/JPEG/GIF/BMP, any size)

both returning probabilities float32 [batch, classes], class_ids int64
[batch] and class_names string [batch], and a third, `labels`, that takes no
input and returns class_names string [classes], so that a client can name
every column of `probabilities` (its top-k). Scaling, mean subtraction, decoding
and resizing all happen in the graph, so a client sends pixels or files and
nothing else. The class names are also in assets/labels.txt, and
assets.extra/tf_serving_warmup_requests holds requests TF Serving replays
before a version takes traffic.

A version is built in a hidden folder beside the numbered ones and renamed
into place, so a server polling the base path never sees half an export. On
object stores (gs://, s3://), which cannot rename atomically, the files are
uploaded with saved_model.pb last.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import pathlib
import shutil
import tempfile
import uuid

import keras
import numpy as np
import tensorflow as tf

from pipeline.config import ModelConfig, UserError
from pipeline.model import build_model, precision_policy

log = logging.getLogger(__name__)

SERVING_DEFAULT = "serving_default"
SERVING_BYTES = "serving_bytes"
LABELS = "labels"
IMAGE_SHAPE = (32, 32, 3)
LABELS_FILE = "labels.txt"
WARMUP_FILE = "tf_serving_warmup_requests"


class ExportError(UserError):
    """Nothing to export, or nowhere to write it."""


def decode_image(data: tf.Tensor) -> tf.Tensor:
    """Encoded PNG/JPEG/GIF/BMP bytes -> uint8 [32, 32, 3]; the first frame of an
    animation, greyscale and alpha mapped to RGB, resized with antialiasing."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    image = tf.image.resize(image, IMAGE_SHAPE[:2], method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


class ServingModule(tf.Module):
    """The model with its serving signatures and the class names baked in."""

    def __init__(self, model: keras.Model, class_names: list[str], labels_file: str):
        super().__init__(name="accresnet")
        self.model = model
        self.labels = tf.saved_model.Asset(labels_file)
        self._class_names = tf.constant(class_names)
        self.serve_images = tf.function(
            self._serve_images, input_signature=[tf.TensorSpec([None, *IMAGE_SHAPE], tf.uint8, name="images")])
        self.serve_bytes = tf.function(
            self._serve_bytes, input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        self.serve_labels = tf.function(self._serve_labels, input_signature=[])

    def _outputs(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = tf.cast(self.model(images, training=False), tf.float32)
        class_ids = tf.argmax(probabilities, axis=1, output_type=tf.int64)
        return {"probabilities": probabilities, "class_ids": class_ids,
                "class_names": tf.gather(self._class_names, class_ids)}

    def _serve_images(self, images):
        return self._outputs(images)

    def _serve_bytes(self, image_bytes):
        images = tf.map_fn(decode_image, image_bytes, fn_output_signature=tf.TensorSpec(IMAGE_SHAPE, tf.uint8))
        return self._outputs(images)

    def _serve_labels(self):
        return {"class_names": tf.identity(self._class_names)}

    def signatures(self) -> dict:
        return {SERVING_DEFAULT: self.serve_images, SERVING_BYTES: self.serve_bytes, LABELS: self.serve_labels}


# --- versions ------------------------------------------------------------------------


def is_remote(path: str | os.PathLike) -> bool:
    """gs://, s3://, ... paths, which TensorFlow's file systems reach but the os module does not."""
    return "://" in str(path)


def existing_versions(export_base: str | os.PathLike) -> list[int]:
    base = str(export_base)
    if not tf.io.gfile.isdir(base):
        return []
    names = (name.rstrip("/") for name in tf.io.gfile.listdir(base))
    return sorted(int(n) for n in names if n.isdigit() and tf.io.gfile.isdir(tf.io.gfile.join(base, n)))


def export_saved_model(model: keras.Model, class_names: list[str], export_base: str | os.PathLike) -> str:
    """Write the next version under `export_base`; returns its path."""
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="accresnet-export-"))
    local_base = scratch / "base" if is_remote(export_base) else pathlib.Path(export_base)
    local_base.mkdir(parents=True, exist_ok=True)
    staging = local_base / f".export-{uuid.uuid4().hex}"
    try:
        labels = scratch / LABELS_FILE
        labels.write_text("".join(f"{name}\n" for name in class_names))
        module = ServingModule(model, list(class_names), str(labels))
        tf.saved_model.save(module, str(staging), signatures=module.signatures())
        _write_warmup_requests(staging / "assets.extra" / WARMUP_FILE)
        if is_remote(export_base):
            return _upload_as_next_version(staging, str(export_base))
        return str(_rename_to_next_version(staging, local_base))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


def _upload_as_next_version(staging: pathlib.Path, base: str) -> str:
    """Object stores have no atomic rename: copy every file, saved_model.pb last,
    so a poller that finds the version's graph finds its variables too."""
    target = tf.io.gfile.join(base, str((existing_versions(base) or [0])[-1] + 1))
    files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: p.name == "saved_model.pb")
    for file in files:
        destination = tf.io.gfile.join(target, *file.relative_to(staging).parts)
        tf.io.gfile.makedirs(os.path.dirname(destination))
        tf.io.gfile.copy(str(file), destination, overwrite=False)
    return target


def _rename_to_next_version(staging: pathlib.Path, base: pathlib.Path) -> pathlib.Path:
    # rename(2) is atomic and fails onto a non-empty folder, so a version
    # appears whole or not at all, and an exporter racing another for the
    # same number takes the next one.
    for _ in range(100):
        target = base / str((existing_versions(base) or [0])[-1] + 1)
        try:
            os.rename(staging, target)
            return target
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    raise ExportError(f"could not claim a version number under {base}")


def _write_warmup_requests(path: pathlib.Path) -> None:
    """A small request per signature, in TF Serving's warmup format (PredictionLog records)."""
    from PIL import Image
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((1, *IMAGE_SHAPE), 128, np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels[0]).save(png, format="PNG")
    requests = {
        SERVING_DEFAULT: {"images": tf.make_tensor_proto(pixels)},
        SERVING_BYTES: {"image_bytes": tf.make_tensor_proto([png.getvalue()])},
    }
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature, inputs in requests.items():
            request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(signature_name=signature))
            for name, tensor in inputs.items():
                request.inputs[name].CopyFrom(tensor)
            record = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(record.SerializeToString())


# --- from a training run -----------------------------------------------------------


def restore_trained_model(model_dir: str | os.PathLike) -> tuple[keras.Model, list[str]]:
    """The float32 model of a training run's latest checkpoint, and its class names."""
    model_dir = pathlib.Path(model_dir)
    run_file = model_dir / "run.json"
    checkpoint_path = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    if not run_file.exists() or checkpoint_path is None:
        raise ExportError(f"{model_dir} holds no finished epoch of a training run (run.json and checkpoints/)")
    run = json.loads(run_file.read_text())
    # Serve in float32 whatever the training precision: the weights are float32 anyway.
    with precision_policy("float32"):
        model = build_model(ModelConfig(run["arch"], run["depth"], run["num_classes"], width=run.get("width"),
                                        cardinality=run.get("cardinality"),
                                        shortcut=run.get("shortcut", "projection")))
    status = tf.train.Checkpoint(model=model).restore(checkpoint_path)
    status.expect_partial().assert_existing_objects_matched()
    log.info("restored %s", checkpoint_path)
    return model, list(run["class_names"])


def export_run(model_dir: str | os.PathLike, export_base: str | os.PathLike) -> str:
    """Export a training run's latest checkpoint as the next version under `export_base`."""
    model, class_names = restore_trained_model(model_dir)
    path = export_saved_model(model, class_names, export_base)
    log.info("exported %s", path)
    return path
