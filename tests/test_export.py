import concurrent.futures
import io
import pathlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import prediction_log_pb2

from hostile_files import (gif_hiding_a_frame, gif_of_frames, gif_of_sub_blocks, jpeg_declaring, jpeg_with_repeated_scan,
                           png_declaring)
from pipeline.export import saved_model
from pipeline.data.synthetic import CLASS_NAMES


def images(count=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def encode(pixels, fmt="PNG"):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def test_layout_of_a_version(exported_model):
    assert exported_model.name == "1"
    assert (exported_model / "saved_model.pb").is_file()
    assert (exported_model / "assets" / "labels.txt").read_text().splitlines() == list(CLASS_NAMES)
    records = list(tf.data.TFRecordDataset(str(exported_model / "assets.extra" / "tf_serving_warmup_requests")))
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in records]
    assert {log.predict_log.request.model_spec.signature_name for log in logs
            if log.WhichOneof("log_type") == "predict_log"} == {"serving_default", "serving_bytes"}
    assert [log.classify_log.request.model_spec.signature_name for log in logs
            if log.WhichOneof("log_type") == "classify_log"] == ["classify"]
    assert not [p for p in exported_model.parent.iterdir() if p.name.startswith(".")]


def read_meta_graph(path: str):
    """The MetaGraphDef tagged "serve" in `path`/saved_model.pb."""
    from tensorflow.core.protobuf import saved_model_pb2

    with open(f"{path}/saved_model.pb", "rb") as file:
        saved_model = saved_model_pb2.SavedModel.FromString(file.read())
    (meta_graph,) = [m for m in saved_model.meta_graphs if "serve" in m.meta_info_def.tags]
    return meta_graph


def test_every_signature_is_batchable_as_tf_serving_requires(exported_model):
    """TF Serving wraps every signature of a batching-enabled model: each needs an
    input, and every input and output needs the batch dimension first."""
    meta_graph = read_meta_graph(str(exported_model))
    signatures = {k: v for k, v in meta_graph.signature_def.items() if not k.startswith("__")}
    assert set(signatures) == {"serving_default", "serving_bytes", "classify"}
    for key, definition in signatures.items():
        assert definition.inputs, key
        for alias, info in [*definition.inputs.items(), *definition.outputs.items()]:
            dims = [d.size for d in info.tensor_shape.dim]
            assert not info.tensor_shape.unknown_rank and dims and dims[0] == -1, (key, alias, dims)
    assert signatures["classify"].method_name == "tensorflow/serving/classify"
    assert set(signatures["classify"].inputs) == {"inputs"}
    assert set(signatures["classify"].outputs) == {"classes", "scores"}
    assert signatures["serving_default"].method_name == "tensorflow/serving/predict"


def test_a_session_restore_as_tf_serving_does_gives_the_same_outputs(exported_model):
    """TF Serving loads a SavedModel with a plain session restore (its C++ loader), not
    TF2's object-based loader: every variable the signatures read must be restored."""
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph)
    with graph.as_default():
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], str(exported_model))
    signature = meta_graph.signature_def["serving_default"]
    batch = images(3)
    restored = session.run(signature.outputs["probabilities"].name, {signature.inputs["images"].name: batch})
    loaded = tf.saved_model.load(str(exported_model)).signatures["serving_default"](images=tf.constant(batch))
    np.testing.assert_allclose(restored, loaded["probabilities"].numpy(), rtol=1e-5, atol=1e-6)


def test_the_fingerprint_matches_the_rewritten_graph(exported_model):
    from tensorflow.core.protobuf import fingerprint_pb2
    from tensorflow.python.saved_model import fingerprinting
    from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting as pywrap_fingerprinting

    written = fingerprinting.read_fingerprint(str(exported_model))
    fresh = fingerprint_pb2.FingerprintDef.FromString(pywrap_fingerprinting.CreateFingerprintDef(str(exported_model)))
    assert written.saved_model_checksum == fresh.saved_model_checksum


def test_top_k_outputs_name_the_most_probable_classes(exported_model):
    loaded = tf.saved_model.load(str(exported_model))
    served = loaded.signatures["serving_default"](images=tf.constant(images(4)))
    probabilities = served["probabilities"].numpy()
    names = served["top_k_class_names"].numpy()
    top = served["top_k_probabilities"].numpy()
    assert names.shape == (4, 5) and top.shape == (4, 5)
    for row in range(4):
        order = np.argsort(-probabilities[row], kind="stable")[:5]
        assert [n.decode() for n in names[row]] == [CLASS_NAMES[i] for i in order]
        np.testing.assert_allclose(top[row], probabilities[row][order], rtol=1e-6)


def test_classify_signature_answers_classes_and_scores_for_examples(exported_model):
    loaded = tf.saved_model.load(str(exported_model))
    batch = images(3)
    examples = [tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encode(image)]))}))
        .SerializeToString() for image in batch]
    classified = loaded.signatures["classify"](inputs=tf.constant(examples))
    predicted = loaded.signatures["serving_default"](images=tf.constant(batch))
    np.testing.assert_array_equal(classified["classes"].numpy(), predicted["top_k_class_names"].numpy())
    np.testing.assert_allclose(classified["scores"].numpy(), predicted["top_k_probabilities"].numpy(), rtol=1e-5)


def test_top_k_is_capped_at_the_class_count(trained_run, tmp_path):
    model, class_names = saved_model.restore_trained_model(trained_run)
    path = saved_model.export_saved_model(model, class_names, tmp_path, top_k=50)
    served = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images(2)))
    assert served["top_k_class_names"].shape == (2, len(class_names))
    with pytest.raises(saved_model.ExportError, match="at least 1"):
        saved_model.export_saved_model(model, class_names, tmp_path, top_k=0)


def test_signatures_take_raw_pixels_or_encoded_images(exported_model):
    loaded = tf.saved_model.load(str(exported_model))
    default = loaded.signatures["serving_default"]
    spec = default.structured_input_signature[1]["images"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, 32, 32, 3]
    outputs = default.structured_outputs
    assert outputs["probabilities"].dtype == tf.float32 and outputs["probabilities"].shape.as_list() == [None, 10]
    assert outputs["class_ids"].dtype == tf.int64 and outputs["class_names"].dtype == tf.string
    assert loaded.signatures["serving_bytes"].structured_input_signature[1]["image_bytes"].dtype == tf.string


def test_no_training_serving_skew(trained_run, exported_model):
    """The served graph gives the trained Keras model's outputs on the same raw pixels."""
    model, class_names = saved_model.restore_trained_model(trained_run)
    loaded = tf.saved_model.load(str(exported_model))
    batch = images()
    served = loaded.signatures["serving_default"](images=tf.constant(batch))
    expected = np.asarray(model(batch, training=False))
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(served["class_ids"].numpy(), expected.argmax(1))
    assert [n.decode() for n in served["class_names"].numpy()] == [class_names[i] for i in expected.argmax(1)]
    # Lossless 32x32 files decode to the same pixels, so to the same outputs.
    encoded = tf.constant([encode(image) for image in batch])
    from_bytes = loaded.signatures["serving_bytes"](image_bytes=encoded)
    np.testing.assert_allclose(from_bytes["probabilities"].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_bytes_signature_decodes_any_format_size_and_mode(exported_model):
    loaded = tf.saved_model.load(str(exported_model))
    photo = np.random.default_rng(1).integers(0, 256, (70, 50, 3), dtype=np.uint8)
    files = [encode(photo, "JPEG"), encode(photo, "BMP"), encode(photo, "GIF"),
             encode(photo[..., 0], "PNG"), encode(np.dstack([photo, photo[..., :1]]), "PNG")]
    result = loaded.signatures["serving_bytes"](image_bytes=tf.constant(files))
    assert result["probabilities"].shape == (5, 10)
    with pytest.raises(tf.errors.InvalidArgumentError):
        loaded.signatures["serving_bytes"](image_bytes=tf.constant([b"not an image"]))


def test_serving_bytes_refuses_what_would_decode_too_large_or_is_no_known_format(exported_model):
    from pipeline.data.image_headers import DEFAULT_BOUNDS

    serve = tf.saved_model.load(str(exported_model)).signatures["serving_bytes"]
    side = int(DEFAULT_BOUNDS.decoded_pixels ** 0.5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="more pixels than"):
        serve(image_bytes=tf.constant([png_declaring(side + 1, side)]))
    webp = io.BytesIO()
    Image.fromarray(images(1)[0]).save(webp, format="WEBP")
    with pytest.raises(tf.errors.InvalidArgumentError, match="unsupported image format"):
        serve(image_bytes=tf.constant([webp.getvalue()]))
    # A large photo is fine: JPEGs are decoded at a reduced scale ...
    photo = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    assert serve(image_bytes=tf.constant([encode(photo, "JPEG")]))["probabilities"].shape == (1, 10)
    # ... but not one whose full size a progressive decode could not hold.
    with pytest.raises(tf.errors.InvalidArgumentError, match="more pixels than"):
        serve(image_bytes=tf.constant([jpeg_declaring(60000, 60000)]))


def test_every_frame_of_a_gif_counts(exported_model):
    from pipeline.data.image_headers import DEFAULT_BOUNDS

    serve = tf.saved_model.load(str(exported_model)).signatures["serving_bytes"]
    blocks, size = DEFAULT_BOUNDS.gif_blocks, DEFAULT_BOUNDS.gif_bytes
    # A 1x1 screen hiding an 8000x8000 frame; 250 frames of 140x140 (4.9M pixels in all).
    for hostile in (gif_hiding_a_frame(), gif_of_frames(250, (140, 140))):
        with pytest.raises(tf.errors.InvalidArgumentError, match="more pixels than"):
            serve(image_bytes=tf.constant([hostile]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"at most {size} bytes and {blocks}"):
        serve(image_bytes=tf.constant([gif_of_frames(blocks)]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"at most {size} bytes"):
        serve(image_bytes=tf.constant([gif_of_sub_blocks(size // 2)]))
    # Animations within the bounds decode (the first frame), however their data is cut.
    frames = [images(1, seed)[0] for seed in range(3)]
    animation = io.BytesIO()
    Image.fromarray(frames[0]).save(animation, format="GIF", save_all=True,
                                    append_images=[Image.fromarray(f) for f in frames[1:]])
    small = [animation.getvalue(), gif_of_frames(100), gif_of_sub_blocks(5000)]
    assert serve(image_bytes=tf.constant(small))["probabilities"].shape == (3, 10)


def test_decode_work_is_bounded_per_file_and_per_request(exported_model):
    """A progressive JPEG's scans each walk its full size: a few hundred KB of repeated scans
    cost seconds of CPU while declaring few pixels. Work is counted and bounded."""
    from pipeline.data.image_headers import DEFAULT_BOUNDS, file_costs

    serve = tf.saved_model.load(str(exported_model)).signatures["serving_bytes"]
    repeated = jpeg_with_repeated_scan(1024, 300)
    pixels, full, work = file_costs(tf.constant(repeated)).numpy()
    assert full == 1024 * 1024 and work > DEFAULT_BOUNDS.file_work and pixels <= DEFAULT_BOUNDS.decoded_pixels
    with pytest.raises(tf.errors.InvalidArgumentError, match="pixel passes a file may take"):
        serve(image_bytes=tf.constant([repeated]))
    # A phone's progressive photo passes alone; five of them are more than a request may take.
    photo = io.BytesIO()
    Image.new("RGB", (4000, 3000), (10, 200, 90)).save(photo, "JPEG", progressive=True)
    assert serve(image_bytes=tf.constant([photo.getvalue()]))["probabilities"].shape == (1, 10)
    with pytest.raises(tf.errors.InvalidArgumentError, match="pixel passes a request may take"):
        serve(image_bytes=tf.constant([photo.getvalue()] * 5))


@pytest.mark.parametrize("signature, name, value", [
    ("serving_default", "images", np.zeros((1, 3), np.uint8)),
    ("serving_default", "images", np.zeros((32, 32, 3), np.uint8)),
    ("serving_default", "images", np.zeros((1, 1, 1, 3), np.uint8)),
    ("serving_default", "images", np.zeros((0, 32, 32, 3), np.uint8)),
    ("serving_default", "images", np.zeros((1025, 32, 32, 3), np.uint8)),
    ("serving_bytes", "image_bytes", np.array(b"x", object)),
    ("serving_bytes", "image_bytes", np.array([[b"x"]], object)),
    ("classify", "inputs", np.array([[b""]], object)),
])
def test_every_signature_checks_the_shape_it_declares(exported_model, signature, name, value):
    # Through a TF1 session, as TF Serving runs a signature: nothing checks the fed shape but the graph.
    from serving.server.servable import Servable

    servable = Servable("m", 1, str(exported_model))
    with pytest.raises(Exception, match=f"input {name} must have shape .* with 1 to 1024 rows"):
        servable.run(servable.signature(signature), {name: value}, sorted(servable.signature(signature).outputs))


def test_versions_count_up_and_concurrent_exports_never_collide(trained_run, tmp_path):
    model, class_names = saved_model.restore_trained_model(trained_run)
    first = pathlib.Path(saved_model.export_saved_model(model, class_names, tmp_path))
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        paths = [pathlib.Path(p) for p in pool.map(lambda _: saved_model.export_saved_model(model, class_names, tmp_path),
                                                    range(3))]
    assert first.name == "1" and sorted(p.name for p in paths) == ["2", "3", "4"]
    assert saved_model.existing_versions(tmp_path) == [1, 2, 3, 4]
    assert all((p / "saved_model.pb").is_file() for p in paths)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_nothing_to_export(tmp_path):
    with pytest.raises(saved_model.ExportError, match="no finished epoch"):
        saved_model.export_run(tmp_path, tmp_path / "models")


def test_export_to_an_object_store_path(trained_run):
    """gs:// and s3:// go through TensorFlow's file systems; ram:// stands in for them here."""
    model, class_names = saved_model.restore_trained_model(trained_run)
    base = "ram://bucket/models/accresnet"
    assert saved_model.export_saved_model(model, class_names, base) == base + "/1"
    assert saved_model.export_saved_model(model, class_names, base) == base + "/2"
    assert saved_model.existing_versions(base) == [1, 2]
    for name in ("saved_model.pb", "assets/labels.txt", "assets.extra/tf_serving_warmup_requests"):
        assert tf.io.gfile.exists(f"{base}/2/{name}"), name
    loaded = tf.saved_model.load(base + "/2")
    assert loaded.signatures["serving_default"](images=tf.zeros([1, 32, 32, 3], tf.uint8))["probabilities"].shape == (1, 10)


@pytest.mark.slow
def test_a_wide_accumulated_net_exports_like_the_others(tmp_path):
    from pipeline import flags
    from pipeline.settings.config import TrainConfig
    from pipeline.train.loop import train

    train(flags.build(TrainConfig, dict(model_dir=str(tmp_path / "run"), arch="accumulated-wrn", depth=10, width=2,
                                        dataset="synthetic:200", recipe="quick", epochs=1, batch_size=32,
                                        progress=False)))
    path = saved_model.export_run(tmp_path / "run", tmp_path / "models")
    model, _ = saved_model.restore_trained_model(tmp_path / "run")
    assert model.name == "accumulated-wrn-10-2"
    loaded = tf.saved_model.load(path)
    batch = images(3)
    np.testing.assert_allclose(loaded.signatures["serving_default"](images=tf.constant(batch))["probabilities"],
                               np.asarray(model(batch, training=False)), rtol=1e-5, atol=1e-6)
