"""What an encoded image file will cost to decode, read from its bytes alone, in the graph.

TensorFlow's decoders allocate what a file declares before they look at the
pixel data, so a few kilobytes can ask for gigabytes. The exported
signatures call `decoded_pixels` on every file before decoding it, and TF
Serving runs the same check, since it is part of the graph:

- PNG and BMP declare one image in their header;
- JPEG declares one frame; libjpeg decodes it at a reduced scale (the draft
  scale, pipeline/image_decoding.py) but a progressive file still holds
  coefficients for the full size, so both sizes are bounded;
- GIF declares a logical screen, but every frame declares its own size and
  position, and TensorFlow decodes every frame of the file (the first one is
  kept), each onto a canvas that covers the screen and every frame. So the
  file's blocks are walked, frame by frame, and the cost is frames x canvas.
  Chains of data sub-blocks are skipped by pointer doubling over the file's
  bytes (log2 of its size in gathers, whatever the sub-blocks' lengths); the
  walk over blocks gives up, and the file is refused, after MAX_GIF_BLOCKS.
"""

from __future__ import annotations

import tensorflow as tf

from serving.contract import IMAGE_SIZE

SIZE = IMAGE_SIZE
# Pillow's draft asks for 4x the target size (serving/images.py).
DRAFT_SIZE = 4 * SIZE
JPEG_SCALES = (1, 2, 4, 8)
# 4096x4096: a 48 MiB RGB image, far above what a 32x32 classifier needs.
MAX_DECODED_PIXELS = 4096 * 4096
# A progressive JPEG keeps coefficients for its full size whatever the decoding scale.
MAX_JPEG_FULL_PIXELS = 8192 * 8192
# Blocks of a GIF: a frame is one or two (its graphic control extension).
MAX_GIF_BLOCKS = 4096
# The sub-block walk costs log2(size) passes over the file: 2 MiB keeps it near 0.2 s.
MAX_GIF_BYTES = 2 << 20
GIF_EXTENSION, GIF_IMAGE = 0x21, 0x2C
# decoded_pixels' answers for files that are refused whatever their size.
UNKNOWN_FORMAT = -1
GIF_TOO_LARGE = -2


def unsigned(raw: tf.Tensor, little_endian: tf.Tensor) -> tf.Tensor:
    """Bytes [..., n] (uint8) -> the unsigned integer they encode, int64."""
    values = tf.cast(raw, tf.int64)
    count = raw.shape[-1]
    weights_little = tf.constant([256**i for i in range(count)], tf.int64)
    weights_big = tf.reverse(weights_little, [0])
    weights = tf.where(little_endian, weights_little, weights_big)
    return tf.reduce_sum(values * weights, axis=-1)


def read_bytes(data: tf.Tensor, offsets: tf.Tensor, count: int) -> tf.Tensor:
    """`count` bytes of `data` at each offset (zero beyond its end), uint8 [..., count]."""
    length = tf.strings.length(data)
    offsets = tf.clip_by_value(tf.cast(offsets, tf.int32), 0, length)
    pieces = tf.strings.substr(tf.broadcast_to(data, tf.shape(offsets)), offsets, tf.fill(tf.shape(offsets), count))
    return tf.io.decode_raw(pieces, tf.uint8, fixed_length=count)


def is_jpeg(data: tf.Tensor) -> tf.Tensor:
    return tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")


def _prefix(data: tf.Tensor, count: int) -> tf.Tensor:
    return tf.strings.substr(data, 0, tf.minimum(tf.strings.length(data), count))


def jpeg_draft_scale(data: tf.Tensor) -> tf.Tensor:
    """Pillow's draft scale for a JPEG read at DRAFT_SIZE: the largest of 8, 4, 2, 1
    not above min(width, height) // DRAFT_SIZE."""
    shape = tf.image.extract_jpeg_shape(data)
    fits = tf.minimum(shape[0], shape[1]) // DRAFT_SIZE
    return tf.reduce_max(tf.boolean_mask(tf.constant(JPEG_SCALES), tf.constant(JPEG_SCALES) <= tf.maximum(fits, 1)))


def _chain_ends(values: tf.Tensor) -> tf.Tensor:
    """For every offset of a GIF's bytes [n] (int32), where a chain of data sub-blocks
    starting there ends: the offset of its zero length byte, or n if the file ends first.
    Pointer doubling, so log2(n) gathers instead of one loop step per sub-block."""
    n = tf.size(values)
    offsets = tf.range(n)
    following = tf.where(tf.equal(values, 0), offsets, tf.minimum(offsets + 1 + values, n))
    jumps = tf.concat([following, [n]], 0)  # n, past the end, stays where it is
    rounds = tf.cast(tf.math.ceil(tf.math.log(tf.cast(n + 2, tf.float32)) / tf.math.log(2.0)), tf.int32) + 1
    _, jumps = tf.while_loop(lambda i, _: i < rounds, lambda i, j: (i + 1, tf.gather(j, j)), (0, jumps))
    return jumps


def gif_decoded_pixels(data: tf.Tensor) -> tf.Tensor:
    """Pixels TensorFlow's GIF decoder allocates for `data`: frames x a canvas covering the
    logical screen and every frame (int64); GIF_TOO_LARGE past MAX_GIF_BLOCKS blocks."""
    values = tf.cast(tf.io.decode_raw(data, tf.uint8), tf.int32)
    size = tf.size(values)
    padded = tf.concat([values, tf.zeros([16], tf.int32)], 0)  # reads past the end see zeros
    chain_ends = _chain_ends(values)

    def byte(offset):
        return padded[tf.minimum(offset, size)]

    def word(offset):  # little-endian 16 bits
        return tf.cast(byte(offset) + 256 * byte(offset + 1), tf.int64)

    def colour_table(packed):  # bytes of a global or local colour table, from its packed field
        present = tf.bitwise.bitwise_and(packed, 0x80) > 0
        entries = tf.bitwise.left_shift(tf.constant(2), tf.bitwise.bitwise_and(packed, 7))
        return tf.where(present, 3 * entries, tf.constant(0))

    def after_chain(offset):  # the block after a chain of sub-blocks starting at offset
        return chain_ends[tf.minimum(offset, size)] + 1

    def step(blocks, position, done, frames, right, bottom):
        introducer = byte(position)
        # A block is an extension (introducer, label, sub-blocks) or an image descriptor
        # (10 bytes, a local colour table, the LZW code size, sub-blocks); anything else
        # (the trailer, or bytes libgif refuses) ends the file.
        is_image = tf.equal(introducer, GIF_IMAGE) & (position < size)
        is_extension = tf.equal(introducer, GIF_EXTENSION) & (position < size)
        frames = frames + tf.cast(is_image, tf.int64)
        right = tf.where(is_image, tf.maximum(right, word(position + 1) + word(position + 5)), right)
        bottom = tf.where(is_image, tf.maximum(bottom, word(position + 3) + word(position + 7)), bottom)
        image_data = position + 10 + colour_table(byte(position + 9)) + 1
        position = after_chain(tf.where(is_image, image_data, position + 2))
        return blocks + 1, position, ~(is_image | is_extension), frames, right, bottom

    zero = tf.constant(0, tf.int64)
    start = 13 + colour_table(byte(10))
    _, _, done, frames, right, bottom = tf.while_loop(
        lambda blocks, position, done, *_: ~done & (blocks < MAX_GIF_BLOCKS),
        step, (0, start, tf.constant(False), zero, zero, zero), maximum_iterations=MAX_GIF_BLOCKS)
    canvas = tf.maximum(word(6), right) * tf.maximum(word(8), bottom)
    return tf.where(done, tf.maximum(frames, 1) * canvas, tf.constant(GIF_TOO_LARGE, tf.int64))


def decoded_pixels(data: tf.Tensor) -> tf.Tensor:
    """The pixels decoding an encoded file allocates, from its bytes alone (int64):
    UNKNOWN_FORMAT for a format other than JPEG, PNG, GIF and BMP, GIF_TOO_LARGE
    for a GIF of more than MAX_GIF_BYTES or MAX_GIF_BLOCKS blocks."""
    def header(offset: int, count: int, little_endian: bool) -> tf.Tensor:
        return unsigned(read_bytes(data, tf.constant(offset), count), tf.constant(little_endian))

    def jpeg():
        shape = tf.cast(tf.image.extract_jpeg_shape(data), tf.int64)
        scale = tf.cast(jpeg_draft_scale(data), tf.int64)
        scaled = ((shape[0] + scale - 1) // scale) * ((shape[1] + scale - 1) // scale)
        # Refused as a whole when the full size is beyond what a progressive decode may hold.
        return tf.where(shape[0] * shape[1] > MAX_JPEG_FULL_PIXELS, shape[0] * shape[1], scaled)

    def bmp():
        # Signed 32-bit width and height; a negative height means top-down rows.
        width, height = header(18, 4, True), header(22, 4, True)
        signed = lambda value: tf.where(value >= 2**31, value - 2**32, value)  # noqa: E731
        return tf.abs(signed(width)) * tf.abs(signed(height))

    def gif():
        return tf.cond(tf.strings.length(data) > MAX_GIF_BYTES, lambda: tf.constant(GIF_TOO_LARGE, tf.int64),
                       lambda: gif_decoded_pixels(data))

    magic = _prefix(data, 8)
    is_png = tf.equal(magic, b"\x89PNG\r\n\x1a\n")
    is_gif = tf.strings.regex_full_match(_prefix(magic, 6), "GIF8[79]a")
    is_bmp = tf.equal(_prefix(magic, 2), b"BM")
    return tf.case([(is_jpeg(data), jpeg),
                    (is_png, lambda: header(16, 4, False) * header(20, 4, False)),
                    (is_gif, gif),
                    (is_bmp, bmp)],
                   default=lambda: tf.constant(UNKNOWN_FORMAT, tf.int64))


def check_decodable(data: tf.Tensor, input_name: str) -> tf.Tensor:
    """An assertion that the file is of a known format and that decoding it allocates
    at most MAX_DECODED_PIXELS; the messages name `input_name`."""
    pixels = decoded_pixels(data)
    known = tf.debugging.Assert(
        tf.not_equal(pixels, UNKNOWN_FORMAT),
        [f"input {input_name}: unsupported image format: JPEG, PNG, GIF and BMP files are taken"])
    gif_bounded = tf.debugging.Assert(
        tf.not_equal(pixels, GIF_TOO_LARGE),
        [f"input {input_name}: a GIF may have at most {MAX_GIF_BYTES} bytes and {MAX_GIF_BLOCKS} blocks"])
    with tf.control_dependencies([known, gif_bounded]):
        return tf.debugging.Assert(
            pixels <= MAX_DECODED_PIXELS,
            [f"input {input_name}: the image needs more pixels than the {MAX_DECODED_PIXELS} a file may "
             "decode to (width x height in its header, at JPEG's reduced scale; every frame of a GIF); it "
             "needs", pixels])
