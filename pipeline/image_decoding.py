"""Encoded image files -> 32x32 RGB pixels, inside the exported graph.

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

What still differs: Pillow rounds to 8 bits between its horizontal and
vertical resize passes, so a pixel may differ by one level; 16-bit PNGs are
scaled to 8 bits by their own range in Pillow and by 1/257 in TensorFlow.

Before anything is decoded, the size the file declares in its header is
checked: a 64 KB PNG may declare 23000x23000 pixels, 1.6 GB once decoded.
Files declaring more than MAX_DECODED_PIXELS, and formats other than JPEG,
PNG, GIF and BMP, are refused with INVALID_ARGUMENT, in TF Serving too,
since the check is part of the graph.
"""

from __future__ import annotations

import tensorflow as tf

SIZE = 32
# Pillow's draft asks for 4x the target size (serving/images.py).
DRAFT_SIZE = 4 * SIZE
JPEG_SCALES = (1, 2, 4, 8)
# The EXIF block sits in the first segments of a file.
EXIF_SEARCH_BYTES = 1 << 16
ORIENTATION_TAG = 0x0112
MAX_IFD_ENTRIES = 64
# 4096x4096: a 48 MiB RGB image, far above what a 32x32 classifier needs.
MAX_DECODED_PIXELS = 4096 * 4096


def is_jpeg(data: tf.Tensor) -> tf.Tensor:
    return tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")


def _unsigned(raw: tf.Tensor, little_endian: tf.Tensor) -> tf.Tensor:
    """Bytes [..., n] (uint8) -> the unsigned integer they encode, int64."""
    values = tf.cast(raw, tf.int64)
    count = raw.shape[-1]
    weights_little = tf.constant([256**i for i in range(count)], tf.int64)
    weights_big = tf.reverse(weights_little, [0])
    weights = tf.where(little_endian, weights_little, weights_big)
    return tf.reduce_sum(values * weights, axis=-1)


def _read_bytes(data: tf.Tensor, offsets: tf.Tensor, count: int) -> tf.Tensor:
    """`count` bytes of `data` at each offset (zero beyond its end), uint8 [..., count]."""
    length = tf.strings.length(data)
    offsets = tf.clip_by_value(tf.cast(offsets, tf.int32), 0, length)
    pieces = tf.strings.substr(tf.broadcast_to(data, tf.shape(offsets)), offsets, tf.fill(tf.shape(offsets), count))
    return tf.io.decode_raw(pieces, tf.uint8, fixed_length=count)


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
    first_ifd = _unsigned(_read_bytes(tiff, tf.constant(4), 4), little)
    count = tf.minimum(_unsigned(_read_bytes(tiff, first_ifd, 2), little), MAX_IFD_ENTRIES)
    entries = first_ifd + 2 + 12 * tf.range(count, dtype=tf.int64)
    tags = _unsigned(_read_bytes(tiff, entries, 2), little)
    # A SHORT value sits in the first two bytes of the entry's 4-byte value field.
    values = _unsigned(_read_bytes(tiff, entries + 8, 2), little)
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


def jpeg_draft_scale(data: tf.Tensor) -> tf.Tensor:
    """Pillow's draft scale for a JPEG read at DRAFT_SIZE: the largest of 8, 4, 2, 1
    not above min(width, height) // DRAFT_SIZE."""
    shape = tf.image.extract_jpeg_shape(data)
    fits = tf.minimum(shape[0], shape[1]) // DRAFT_SIZE
    return tf.reduce_max(tf.boolean_mask(tf.constant(JPEG_SCALES), tf.constant(JPEG_SCALES) <= tf.maximum(fits, 1)))


def declared_pixels(data: tf.Tensor) -> tf.Tensor:
    """The pixels the decoder would allocate for an encoded file, from its header
    alone (int64); -1 for a format other than JPEG, PNG, GIF and BMP."""
    def header(offset: int, count: int, little_endian: bool) -> tf.Tensor:
        return _unsigned(_read_bytes(data, tf.constant(offset), count), tf.constant(little_endian))

    def jpeg():
        shape = tf.cast(tf.image.extract_jpeg_shape(data), tf.int64)
        scale = tf.cast(jpeg_draft_scale(data), tf.int64)
        return ((shape[0] + scale - 1) // scale) * ((shape[1] + scale - 1) // scale)

    def bmp():
        # Signed 32-bit width and height; a negative height means top-down rows.
        width, height = header(18, 4, True), header(22, 4, True)
        signed = lambda value: tf.where(value >= 2**31, value - 2**32, value)  # noqa: E731
        return tf.abs(signed(width)) * tf.abs(signed(height))

    magic = tf.strings.substr(data, 0, tf.minimum(tf.strings.length(data), 8))
    is_png = tf.equal(magic, b"\x89PNG\r\n\x1a\n")
    is_gif = tf.strings.regex_full_match(tf.strings.substr(magic, 0, tf.minimum(tf.strings.length(magic), 6)),
                                         "GIF8[79]a")
    is_bmp = tf.equal(tf.strings.substr(magic, 0, tf.minimum(tf.strings.length(magic), 2)), b"BM")
    return tf.case([(is_jpeg(data), jpeg),
                    (is_png, lambda: header(16, 4, False) * header(20, 4, False)),
                    (is_gif, lambda: header(6, 2, True) * header(8, 2, True)),
                    (is_bmp, bmp)],
                   default=lambda: tf.constant(-1, tf.int64))


def check_declared_size(data: tf.Tensor) -> tf.Tensor:
    """An assertion that the file is of a known format and declares at most MAX_DECODED_PIXELS."""
    pixels = declared_pixels(data)
    known = tf.debugging.assert_non_negative(
        pixels, message="unsupported image format: serving_bytes and classify take JPEG, PNG, GIF and BMP files")
    with tf.control_dependencies([known]):
        return tf.debugging.assert_less_equal(
            pixels, tf.constant(MAX_DECODED_PIXELS, tf.int64),
            message=f"the image declares more pixels than the {MAX_DECODED_PIXELS} a request may decode "
                    "(width x height in its header, at JPEG's reduced decoding scale)")


def _decode_jpeg(data: tf.Tensor) -> tf.Tensor:
    scale = jpeg_draft_scale(data)
    branches = {index: (lambda ratio=ratio: tf.io.decode_jpeg(data, channels=3, ratio=ratio,
                                                                    dct_method="INTEGER_ACCURATE"))
                for index, ratio in enumerate(JPEG_SCALES)}
    index = tf.argmax(tf.cast(tf.equal(tf.constant(JPEG_SCALES), scale), tf.int32), output_type=tf.int32)
    return tf.switch_case(index, branches)


def decode_image(data: tf.Tensor) -> tf.Tensor:
    """Encoded PNG/JPEG/GIF/BMP bytes -> uint8 [32, 32, 3]: the first frame of an
    animation, greyscale and alpha mapped to RGB, EXIF orientation applied,
    resized bilinearly with antialiasing. Refuses what check_declared_size refuses."""
    with tf.control_dependencies([check_declared_size(data)]):
        image = tf.cond(is_jpeg(data), lambda: _decode_jpeg(data),
                        lambda: tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8))
    image = apply_orientation(image, exif_orientation(data))
    # Two passes, rounded to 8 bits in between, in Pillow's order: width, then height.
    image = _resize_rounded(image, (tf.shape(image)[0], SIZE))
    return tf.cast(_resize_rounded(image, (SIZE, SIZE)), tf.uint8)


def _resize_rounded(image: tf.Tensor, size) -> tf.Tensor:
    resized = tf.image.resize(image, size, method="bilinear", antialias=True)
    return tf.clip_by_value(tf.round(resized), 0, 255)


def decode_images(encoded: tf.Tensor) -> tf.Tensor:
    """A batch of encoded files [batch] -> uint8 [batch, 32, 32, 3]."""
    return tf.map_fn(decode_image, encoded, fn_output_signature=tf.TensorSpec((SIZE, SIZE, 3), tf.uint8))
