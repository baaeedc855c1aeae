"""Versioned SavedModels for TF Serving, written atomically.

`<export-base>/<version>/` holds a SavedModel with three signatures:

    serving_default  images uint8 [batch, S, S, 3]     (raw pixels)             predict
    serving_bytes    image_bytes string [batch]        (PNG/JPEG/GIF/BMP files) predict
    classify         inputs string [batch]             (serialized tf.Example)  classify

where S is the model's image size (--image-size, 32 by default); files are
decoded to S x S, within decoding bounds that follow S.

The two predict signatures return probabilities float32 [batch, classes],
class_ids int64 [batch], class_names string [batch], and the k most probable
classes, top_k_class_names string [batch, k] and top_k_probabilities float32
[batch, k] (k chosen at export, default 5). `classify` follows TF Serving's
Classify API: each tf.Example carries an encoded image under `image/encoded`,
and the signature answers `classes` and `scores` [batch, k], best first.

Every input and output has the batch dimension first and every signature
has an input: TF Serving wraps all signatures of a model in its batching
session when --enable_batching is on, and that session refuses anything
else. Class names therefore travel as batched outputs, never through an
input-less signature. Scaling, mean subtraction, decoding and resizing all
happen in the graph (pipeline/data/image_decoding.py, which matches the
trainer's and the client's Pillow conversion, EXIF orientation included), so
a client sends pixels or files and nothing else.
The class names are also in assets/labels.txt,
assets.extra/tf_serving_warmup_requests holds requests TF Serving replays
before a version takes traffic, and model_card.json says what made the
version (pipeline/export/model_card.py).

A version is built in a hidden folder beside the numbered ones and renamed
into place, so a server polling the base path never sees half an export. On
object stores (gs://, s3://), which cannot rename atomically, the files are
uploaded with saved_model.pb last.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from PIL import Image
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.saved_model import fingerprinting_utils
from tensorflow_serving.apis import classification_pb2, model_pb2, predict_pb2, prediction_log_pb2

from pipeline.export import model_card
from pipeline.errors import UserError
from pipeline.data.image_decoding import decode_images
from pipeline.data.image_headers import DecodeBounds
from pipeline.export.input_contract import checked_batch
from pipeline.model.network import build_model
from pipeline.train.precision import FLOAT32, policy_scope
from pipeline.train.rundir import RunDir
from serving.contract import (BYTES_INPUT, CLASSIFY, CLASSIFY_METHOD, DEFAULT_TOP_K, EXAMPLES_INPUT, IMAGE_FEATURE,
                              IMAGES_INPUT, LABELS_FILE, MODEL_NAME, SERVING_BYTES, SERVING_DEFAULT, WARMUP_FILE,
                              image_shape, version_number)

log = logging.getLogger(__name__)


class ExportError(UserError):
    """Nothing to export, or nowhere to write it."""


class ServingModule(tf.Module):
    """The model with its serving signatures and the class names baked in."""

    def __init__(self, model: keras.Model, class_names: list[str], labels_file: str, top_k: int = DEFAULT_TOP_K):
        super().__init__(name=MODEL_NAME)
        if top_k < 1:
            raise ExportError(f"--top-k must be at least 1; got {top_k}")
        # The model's own tf.Variables are what the signatures read, so they are
        # what is saved. Tracking the Keras model instead saves copies of its
        # variables that the signatures never read: TF2's object-based loader
        # maps one onto the other, but TF Serving's C++ loader (a plain
        # session restore) leaves the variables the graph reads uninitialized.
        self.model_variables = [variable.value for variable in model.variables]
        self._predict = lambda images: model(images, training=False)
        self.labels = tf.saved_model.Asset(labels_file)
        self._class_names = tf.constant(class_names)
        self.top_k = min(top_k, len(class_names))
        # The model's own input size: the pixels it takes, and the size files are decoded to,
        # with decoding bounds that follow it.
        self.image_size = model_image_size(model)
        self.image_shape = image_shape(self.image_size)
        self.decode_bounds = DecodeBounds.for_image_size(self.image_size)
        self.serve_images = tf.function(
            self._serve_images, input_signature=[tf.TensorSpec([None, *self.image_shape], tf.uint8,
                                                               name=IMAGES_INPUT)])
        self.serve_bytes = tf.function(
            self._serve_bytes, input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT)])
        self.serve_examples = tf.function(
            self._serve_examples, input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])

    def _outputs(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = tf.cast(self._predict(images), tf.float32)
        class_ids = tf.argmax(probabilities, axis=1, output_type=tf.int64)
        top_probabilities, top_ids = tf.math.top_k(probabilities, k=self.top_k)
        return {"probabilities": probabilities, "class_ids": class_ids,
                "class_names": tf.gather(self._class_names, class_ids),
                "top_k_class_names": tf.gather(self._class_names, top_ids),
                "top_k_probabilities": top_probabilities}

    # Each signature checks its inputs first (pipeline/export/input_contract.py): TF Serving does not.
    def _serve_images(self, images):
        return self._outputs(checked_batch(images, IMAGES_INPUT, self.image_shape))

    def _decode(self, encoded, input_name: str):
        return decode_images(encoded, input_name, self.image_size, self.decode_bounds)

    def _serve_bytes(self, image_bytes):
        return self._outputs(self._decode(checked_batch(image_bytes, BYTES_INPUT), BYTES_INPUT))

    def _serve_examples(self, inputs):
        features = tf.io.parse_example(checked_batch(inputs, EXAMPLES_INPUT),
                                       {IMAGE_FEATURE: tf.io.FixedLenFeature([], tf.string)})
        outputs = self._outputs(self._decode(features[IMAGE_FEATURE], f"{EXAMPLES_INPUT} ({IMAGE_FEATURE})"))
        return {"classes": outputs["top_k_class_names"], "scores": outputs["top_k_probabilities"]}

    def signatures(self) -> dict:
        return {SERVING_DEFAULT: self.serve_images, SERVING_BYTES: self.serve_bytes, CLASSIFY: self.serve_examples}


def _mark_classify_signature(saved_model_dir: pathlib.Path) -> None:
    """Give the classify signature TF Serving's classify method name.

    tf.saved_model.save marks every signature as a predict one (tensorflow#38081),
    and TF Serving's Classify API accepts only the classify method, so the
    SignatureDef is rewritten in place before the version is published.
    """
    path = saved_model_dir / "saved_model.pb"
    saved_model = saved_model_pb2.SavedModel.FromString(path.read_bytes())
    for meta_graph in saved_model.meta_graphs:
        meta_graph.signature_def[CLASSIFY].method_name = CLASSIFY_METHOD
    path.write_bytes(saved_model.SerializeToString(deterministic=True))
    if (saved_model_dir / "fingerprint.pb").exists():
        # The fingerprint checksums saved_model.pb; write it again for the new bytes.

        fingerprinting_utils.write_fingerprint(str(saved_model_dir))


# --- versions ------------------------------------------------------------------------


def is_remote(path: str | os.PathLike) -> bool:
    """gs://, s3://, ... paths, which TensorFlow's file systems reach but the os module does not."""
    return "://" in str(path)


def existing_versions(export_base: str | os.PathLike) -> list[int]:
    base = str(export_base)
    if not tf.io.gfile.isdir(base):
        return []
    numbered = ((name, version_number(name)) for name in tf.io.gfile.listdir(base))
    return sorted({number for name, number in numbered
                   if number is not None and tf.io.gfile.isdir(tf.io.gfile.join(base, name.rstrip("/")))})


def export_saved_model(model: keras.Model, class_names: list[str], export_base: str | os.PathLike,
                       top_k: int = DEFAULT_TOP_K, card: model_card.ModelCard | None = None) -> str:
    """Write the next version under `export_base`, with its model card if given; returns its path."""
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="accresnet-export-"))
    local_base = scratch / "base" if is_remote(export_base) else pathlib.Path(export_base)
    local_base.mkdir(parents=True, exist_ok=True)
    staging = local_base / f".export-{uuid.uuid4().hex}"
    try:
        labels = scratch / LABELS_FILE
        labels.write_text("".join(f"{name}\n" for name in class_names))
        module = ServingModule(model, list(class_names), str(labels), top_k)
        tf.saved_model.save(module, str(staging), signatures=module.signatures())
        _mark_classify_signature(staging)
        _write_warmup_requests(staging / WARMUP_FILE, module.image_size)
        if card is not None:
            model_card.write(staging, card)
        if is_remote(export_base):
            return _upload_as_next_version(staging, str(export_base))
        return str(_rename_to_next_version(staging, local_base))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


def publish_as_next_version(saved_model: str | os.PathLike, export_base: str | os.PathLike,
                            check: Callable[[pathlib.Path], None] | None = None,
                            copy: Callable[[str | os.PathLike, pathlib.Path], object] = shutil.copytree) -> str:
    """A copy of the SavedModel folder `saved_model` as the next version under `export_base`,
    appearing whole (as exports do); returns its path. `check` sees the copy before it
    appears (it raises to stop the publication), or the folder itself on object stores;
    `copy(saved_model, staging)` makes the copy."""
    if is_remote(export_base):
        if check is not None:
            check(pathlib.Path(saved_model))
        return _upload_as_next_version(pathlib.Path(saved_model), str(export_base))
    base = pathlib.Path(export_base)
    base.mkdir(parents=True, exist_ok=True)
    staging = base / f".push-{uuid.uuid4().hex}"
    try:
        copy(saved_model, staging)
        if check is not None:
            check(staging)
        return str(_rename_to_next_version(staging, base))
    finally:
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


def model_image_size(model: keras.Model) -> int:
    """The side of the square uint8 RGB images the model takes."""
    _, height, width, channels = model.inputs[0].shape
    if height is None or height != width or channels != 3:
        raise ExportError(f"the model takes images of shape {model.inputs[0].shape}; the export serves square RGB "
                          "images of a fixed size")
    return int(height)


def _write_warmup_requests(path: pathlib.Path, size: int) -> None:
    """A small request per signature, in TF Serving's warmup format (PredictionLog records)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((1, *image_shape(size)), 128, np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels[0]).save(png, format="PNG")
    requests = {
        SERVING_DEFAULT: {IMAGES_INPUT: tf.make_tensor_proto(pixels)},
        SERVING_BYTES: {BYTES_INPUT: tf.make_tensor_proto([png.getvalue()])},
    }
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature, inputs in requests.items():
            request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(signature_name=signature))
            for name, tensor in inputs.items():
                request.inputs[name].CopyFrom(tensor)
            record = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(record.SerializeToString())
        classify = classification_pb2.ClassificationRequest(model_spec=model_pb2.ModelSpec(signature_name=CLASSIFY))
        example = classify.input.example_list.examples.add()
        example.features.feature[IMAGE_FEATURE].bytes_list.value.append(png.getvalue())
        record = prediction_log_pb2.PredictionLog(classify_log=prediction_log_pb2.ClassifyLog(request=classify))
        writer.write(record.SerializeToString())


# --- from a training run -----------------------------------------------------------


def run_checkpoint(run: RunDir) -> tuple[str, int | None]:
    """The checkpoint an export of the run takes, and its epoch where known: the best validation
    epoch's for a run trained with --export-best, else the latest."""
    settings = run.read_settings()
    latest = tf.train.latest_checkpoint(str(run.checkpoints))
    if settings is None or latest is None:
        raise ExportError(f"{run.path} holds no finished epoch of a training run (run.json and checkpoints/)")
    if settings.export_best:
        best = tf.train.latest_checkpoint(str(run.best_checkpoints))
        if best is None:
            raise ExportError(f"{run.path} was trained with --export-best but holds no best checkpoint "
                              f"({run.best_checkpoints}): no epoch has finished with a validation accuracy")
        return best, int(best.rsplit("-", 1)[1])
    summary = run.read_summary()
    return latest, summary.epochs_completed if summary else None


def restore_trained_model(model_dir: str | os.PathLike) -> tuple[keras.Model, list[str]]:
    """The float32 model of a training run's checkpoint (run_checkpoint), and its class names."""
    run = RunDir(pathlib.Path(model_dir))
    checkpoint_path, _ = run_checkpoint(run)
    settings = run.read_settings()
    # Serve in float32 whatever the training precision: the weights are float32 anyway.
    with policy_scope(FLOAT32):
        model = build_model(settings.model_config())
    status = tf.train.Checkpoint(model=model).restore(checkpoint_path)
    status.expect_partial().assert_existing_objects_matched()
    log.info("restored %s", checkpoint_path)
    return model, list(settings.class_names)


def export_run(model_dir: str | os.PathLike, export_base: str | os.PathLike, top_k: int = DEFAULT_TOP_K) -> str:
    """Export a training run's checkpoint (its best epoch's under --export-best, else its latest)
    as the next version under `export_base`."""
    model, class_names = restore_trained_model(model_dir)
    run = RunDir(pathlib.Path(model_dir))
    card = model_card.from_run(run, exported_epoch=run_checkpoint(run)[1])
    path = export_saved_model(model, class_names, export_base, top_k, card)
    log.info("exported %s", path)
    return path
