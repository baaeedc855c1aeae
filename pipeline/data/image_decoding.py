"""Encoded image files -> the model's RGB pixels, inside the exported graph.

The serving_bytes and classify signatures decode files in the graph, so that
TF Serving (which runs no Python) turns a photo into the same pixels as the
trainer's `folder:` reader and the client, which use Pillow
(serving/images.py). Three things make them agree:

- JPEG files are decoded at 1/2, 1/4 or 1/8 scale exactly when Pillow's
  draft mode would (the largest scale that keeps both sides at least 4x the
  target), with libjpeg's own DCT scaling in both;
- the EXIF orientation tag of a JPEG (APP1) or PNG (eXIf) is applied before
  resizing, as Pillow's `ImageOps.exif_transpose` does; TensorFlow's decoders
  ignore it, so the tag is read here from the file's bytes;
- the resize is bilinear with antialiasing in both, then rounded to uint8.

Both round to 8 bits between the horizontal and the vertical pass, half up.
What still differs: Pillow's filter weights are fixed-point, so a sum that
TensorFlow's float weights put on a tie may fall just off it in Pillow: a
pixel may differ by one level (few at 32x32; at scales with many exact ties,
such as 90 to 64 pixels, up to a quarter of them). 16-bit PNGs are scaled
to 8 bits by their own range in Pillow and by 1/257 in TensorFlow.

Before anything is decoded, what decoding the file would allocate is read
from its bytes (pipeline/data/image_headers.py): a 64 KB PNG may declare
23000x23000 pixels, 1.6 GB once decoded, and a 26 KB GIF may hide an
8000x8000 frame behind a 1x1 screen. Such files, and formats other than
JPEG, PNG, GIF and BMP, are refused with INVALID_ARGUMENT, in TF Serving
too, since the check is part of the graph; so is a file, or a request's
files together, whose decoding work (scans x pixels, decoded pixels x
passes) is beyond the export's DecodeBounds. Every file's costs are checked
before the first is decoded; files are decoded one at a time, so a request's
peak is that of its largest file.
"""

from __future__ import annotations

import tensorflow as tf

from pipeline.data.image_headers import (DEFAULT_BOUNDS, JPEG_SCALES, DecodeBounds, check_costs, check_request,
                                    file_costs, is_jpeg, jpeg_draft_scale, read_bytes, unsigned)
from serving.contract import IMAGE_SIZE

# The EXIF block sits in the first segments of a file.
EXIF_SEARCH_BYTES = 1 << 16
ORIENTATION_TAG = 0x0112
MAX_IFD_ENTRIES = 64


def exif_orientation(data: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation (1-8) of an encoded JPEG or PNG file; 1 when it has none."""
    head = tf.strings.substr(data, 0, tf.minimum(tf.strings.length(data), EXIF_SEARCH_BYTES))
    # JPEG: APP1 holds "Exif\0\0" then a TIFF block; PNG: the eXIf chunk holds the TIFF block.
    marker = tf.where(is_jpeg(data), tf.constant(b"Exif\x00\x00"), tf.constant(b"eXIf"))
    parts = tf.strings.split(head, sep=marker, maxsplit=1)
    tiff = tf.cond(tf.size(parts) > 1, lambda: parts[-1], lambda: tf.constant(b""))
    order = tf.strings.substr(tiff, 0, tf.minimum(tf.strings.length(tiff), 2))
    little = tf.equal(order, b"II")
    valid = tf.logical_or(little, tf.equal(order, b"MM"))
    first_ifd = unsigned(read_bytes(tiff, tf.constant(4), 4), little)
    count = tf.minimum(unsigned(read_bytes(tiff, first_ifd, 2), little), MAX_IFD_ENTRIES)
    entries = first_ifd + 2 + 12 * tf.range(count, dtype=tf.int64)
    tags = unsigned(read_bytes(tiff, entries, 2), little)
    # A SHORT value sits in the first two bytes of the entry's 4-byte value field.
    values = unsigned(read_bytes(tiff, entries + 8, 2), little)
    found = tf.boolean_mask(values, tf.equal(tags, ORIENTATION_TAG))
    orientation = tf.cond(tf.logical_and(valid, tf.size(found) > 0), lambda: found[0], lambda: tf.constant(1, tf.int64))
    return tf.where((orientation >= 1) & (orientation <= 8), orientation, tf.constant(1, tf.int64))


def apply_orientation(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Undo an EXIF orientation, as Pillow's exif_transpose does (image [h, w, c])."""
    transpose = lambda x: tf.transpose(x, [1, 0, 2])  # noqa: E731
    branches = [
        lambda: image,                                           # 1: as stored
        lambda: tf.reverse(image, [1]),                          # 2: mirrored
        lambda: tf.reverse(image, [0, 1]),                       # 3: rotated 180
        lambda: tf.reverse(image, [0]),                          # 4: flipped
        lambda: transpose(image),                                # 5: transposed
        lambda: tf.image.rot90(image, k=3),                      # 6: rotated 90 clockwise to undo
        lambda: tf.reverse(transpose(image), [0, 1]),            # 7: transversed
        lambda: tf.image.rot90(image, k=1),                      # 8: rotated 90 counterclockwise to undo
    ]
    return tf.switch_case(tf.cast(orientation - 1, tf.int32), branches)


def _decode_jpeg(data: tf.Tensor, size: int) -> tf.Tensor:
    scale = jpeg_draft_scale(data, size)
    branches = {index: (lambda ratio=ratio: tf.io.decode_jpeg(data, channels=3, ratio=ratio,
                                                                    dct_method="INTEGER_ACCURATE"))
                for index, ratio in enumerate(JPEG_SCALES)}
    index = tf.argmax(tf.cast(tf.equal(tf.constant(JPEG_SCALES), scale), tf.int32), output_type=tf.int32)
    return tf.switch_case(index, branches)


def decode_checked_image(data: tf.Tensor, size: int = IMAGE_SIZE) -> tf.Tensor:
    """Encoded PNG/JPEG/GIF/BMP bytes whose costs were checked -> uint8 [size, size, 3]: the
    first frame of an animation, greyscale and alpha mapped to RGB, EXIF orientation
    applied, resized bilinearly with antialiasing."""
    image = tf.cond(is_jpeg(data), lambda: _decode_jpeg(data, size),
                    lambda: tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8))
    image = apply_orientation(image, exif_orientation(data))
    # Two passes, rounded to 8 bits in between, in Pillow's order: width, then height.
    image = _resize_rounded(image, (tf.shape(image)[0], size))
    return tf.cast(_resize_rounded(image, (size, size)), tf.uint8)


def decode_image(data: tf.Tensor, input_name: str = "image_bytes", size: int = IMAGE_SIZE,
                 bounds: DecodeBounds = DEFAULT_BOUNDS) -> tf.Tensor:
    """One encoded file -> uint8 [size, size, 3], refused unless within the bounds."""
    with tf.control_dependencies([check_costs(file_costs(data, size, bounds), input_name, bounds)]):
        return decode_checked_image(data, size)


def _resize_rounded(image: tf.Tensor, size) -> tf.Tensor:
    resized = tf.image.resize(image, size, method="bilinear", antialias=True)
    # Half up, as Pillow rounds (tf.round rounds half to even: two levels apart when upscaling).
    return tf.clip_by_value(tf.floor(resized + 0.5), 0, 255)


def decode_images(encoded: tf.Tensor, input_name: str = "image_bytes", size: int = IMAGE_SIZE,
                  bounds: DecodeBounds = DEFAULT_BOUNDS) -> tf.Tensor:
    """A batch of encoded files [batch] -> uint8 [batch, size, size, 3], one file at a time,
    once every file's costs and their sum are within the bounds."""
    costs = tf.map_fn(lambda data: file_costs(data, size, bounds), encoded, parallel_iterations=1,
                      fn_output_signature=tf.TensorSpec([3], tf.int64))
    def checked(cost):
        with tf.control_dependencies([check_costs(cost, input_name, bounds)]):
            return tf.identity(cost[0])

    checks = tf.map_fn(checked, costs, parallel_iterations=1, fn_output_signature=tf.int64)
    with tf.control_dependencies([checks, check_request(costs, input_name, bounds)]):
        return tf.map_fn(lambda data: decode_checked_image(data, size), encoded, parallel_iterations=1,
                         fn_output_signature=tf.TensorSpec((size, size, 3), tf.uint8))
