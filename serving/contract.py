"""What the exporter, the model server, the client and the release chain agree on.

An exported version is the only thing `pipeline/` hands to `serving/`: this
module says what it looks like, so that neither side has to read the other.
Both may import it; it imports neither (nor TensorFlow).

- the model: its default name and the images it takes (uint8 RGB, IMAGE_SIZE square by
  default; a model's own size is its serving_default input's, which clients read from
  its metadata);
- the signatures: keys, input aliases, output aliases, method names;
- the files beside the graph: labels, warm-up requests, model card, blessing;
- the version folders under a base path. TF Serving reads a name as a version
  when absl::SimpleAtoi takes it as an int64
  (sources/storage_path/file_system_storage_path_source.cc) and skips every
  other name; this project is stricter: ASCII digits only, within int64, so
  that `²` or `١` (digits to Python's str.isdigit) and `99999999999999999999`
  are skipped instead of read as versions or breaking the listing.
"""

from __future__ import annotations

import re

MODEL_NAME = "accresnet"
IMAGE_SIZE = 32
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)
# The sides a model may take (--image-size): the blocks' strides need 8 or more, and a side's
# square of uint8 RGB stays a few MiB.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024


def image_shape(size: int) -> tuple[int, int, int]:
    return (size, size, 3)

# Signatures: raw pixels, encoded files, and TF Serving's Classify API on tf.Examples.
SERVING_DEFAULT = "serving_default"
SERVING_BYTES = "serving_bytes"
CLASSIFY = "classify"
IMAGES_INPUT = "images"
BYTES_INPUT = "image_bytes"
EXAMPLES_INPUT = "inputs"  # the input of every classify and regress signature (TF Serving's name)
# The tf.Example feature that carries the encoded image (TensorFlow's usual key).
IMAGE_FEATURE = "image/encoded"
PROBABILITIES = "probabilities"
TOP_K_NAMES = "top_k_class_names"
TOP_K_PROBABILITIES = "top_k_probabilities"
PREDICT_OUTPUTS = (PROBABILITIES, "class_ids", "class_names", TOP_K_NAMES, TOP_K_PROBABILITIES)
CLASSIFY_OUTPUTS = ("classes", "scores")
DEFAULT_TOP_K = 5

PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"

# Files of a version folder besides the SavedModel's own.
LABELS_FILE = "labels.txt"  # under assets/
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"  # TF Serving replays it before serving

INT64_MAX = (1 << 63) - 1
_VERSION_NAME = re.compile(r"[0-9]{1,19}")


def version_number(name: str) -> int | None:
    """The version a folder name stands for, or None when it is not a version's name."""
    name = name.rstrip("/")
    if not _VERSION_NAME.fullmatch(name):
        return None
    number = int(name)
    return number if number <= INT64_MAX else None
