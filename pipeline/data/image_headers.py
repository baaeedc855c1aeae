"""What an encoded image file will cost to decode, read from its bytes alone, in the graph.

TensorFlow's decoders allocate what a file declares before they look at the
pixel data, so a few kilobytes can ask for gigabytes. The exported
signatures call `decoded_pixels` on every file before decoding it, and TF
Serving runs the same check, since it is part of the graph:

- PNG and BMP declare one image in their header;
- JPEG declares one frame; libjpeg decodes it at a reduced scale (the draft
  scale, pipeline/data/image_decoding.py) but a progressive file still holds
  coefficients for the full size, so both sizes are bounded;
- GIF declares a logical screen, but every frame declares its own size and
  position, and TensorFlow decodes every frame of the file (the first one is
  kept), each onto a canvas that covers the screen and every frame. So the
  file's blocks are walked, frame by frame, and the cost is frames x canvas.
  Chains of data sub-blocks are skipped by pointer doubling over the file's
  bytes (log2 of its size in gathers, whatever the sub-blocks' lengths); the
  walk over blocks gives up, and the file is refused, after DecodeBounds'
  gif_blocks.

Pixels bound memory; work is bounded too (DecodeBounds): a progressive JPEG
is decoded scan by scan over its full size, so a 322 KB file of 8192x8192
whose first scan is repeated 600 times costs seconds of CPU while declaring
few pixels. A file's work is counted in pixel passes, one pass being a JPEG
scan over one pixel (0.4-3 ns on one core): a JPEG costs its full pixels
times its scans; every pixel a file decodes to (frames times canvas for a
GIF) costs DECODED_PIXEL_PASSES more, for inflating or LZW and the
antialiased resize (20-25 ns measured). Work is bounded per file and summed
over a request. The bounds follow the model's input size, and the export
fixes them in the graph.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from serving.contract import IMAGE_SIZE

JPEG_SCALES = (1, 2, 4, 8)
GIF_EXTENSION, GIF_IMAGE = 0x21, 0x2C
# decoded_pixels' answers for files that are refused whatever their size.
UNKNOWN_FORMAT = -1
GIF_TOO_LARGE = -2
JPEG_START_OF_SCAN = b"\xff\xda"
# Pixel passes a decoded pixel costs (decoding and resizing it), against a JPEG scan's pixel.
DECODED_PIXEL_PASSES = 20


@dataclasses.dataclass(frozen=True)
class DecodeBounds:
    """What one encoded file, and one request's files together, may cost to decode.

    Work is in pixel passes (a JPEG scan over one pixel, 0.4-3 ns of one core); the worst
    request of each format within the defaults is in docs/serving.md.
    """

    # Pixels a file decodes to (JPEG at its reduced draft scale; every frame of a GIF).
    decoded_pixels: int
    # Full-size pixels of a JPEG, which a progressive decode holds coefficients for.
    jpeg_pixels: int
    file_work: int
    request_work: int
    # A GIF's blocks (a frame is one or two) and bytes: the walk over them is the check's own cost.
    gif_blocks: int = 512
    gif_bytes: int = 1 << 20

    @classmethod
    def for_image_size(cls, size: int) -> DecodeBounds:
        """Bounds for a model whose input is size x size: files up to 64x its side decoded
        (2048x2048 for 32x32), JPEGs up to 128x its side (4096x4096, a 16-megapixel photo),
        16 scans of that per file (a phone's progressive JPEG has about 10), and twice a file's
        work per request."""
        jpeg_pixels = (128 * size) ** 2
        return cls(decoded_pixels=(64 * size) ** 2, jpeg_pixels=jpeg_pixels, file_work=16 * jpeg_pixels,
                   request_work=32 * jpeg_pixels)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 1:
                raise ValueError(f"DecodeBounds.{field.name} must be positive; got {getattr(self, field.name)}")


DEFAULT_BOUNDS = DecodeBounds.for_image_size(IMAGE_SIZE)


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


def jpeg_draft_scale(data: tf.Tensor, size: int = IMAGE_SIZE) -> tf.Tensor:
    """Pillow's draft scale for a JPEG read at 4x the target size (serving/images.py): the
    largest of 8, 4, 2, 1 not above min(width, height) // (4 size)."""
    shape = tf.image.extract_jpeg_shape(data)
    fits = tf.minimum(shape[0], shape[1]) // (4 * size)
    return tf.reduce_max(tf.boolean_mask(tf.constant(JPEG_SCALES), tf.constant(JPEG_SCALES) <= tf.maximum(fits, 1)))


def jpeg_scans(data: tf.Tensor) -> tf.Tensor:
    """The scans of a JPEG file: its start-of-scan markers (int64). Entropy-coded data
    stuffs every 0xFF with 0x00, so the pair FF DA occurs only as a marker."""
    values = tf.io.decode_raw(data, tf.uint8)
    marker = tf.constant(JPEG_START_OF_SCAN[0], tf.uint8), tf.constant(JPEG_START_OF_SCAN[1], tf.uint8)
    pairs = tf.equal(values[:-1], marker[0]) & tf.equal(values[1:], marker[1])
    return tf.reduce_sum(tf.cast(pairs, tf.int64))


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


def gif_decoded_pixels(data: tf.Tensor, max_blocks: int) -> tf.Tensor:
    """Pixels TensorFlow's GIF decoder allocates for `data`: frames x a canvas covering the
    logical screen and every frame (int64); GIF_TOO_LARGE past `max_blocks` blocks."""
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
        lambda blocks, position, done, *_: ~done & (blocks < max_blocks),
        step, (0, start, tf.constant(False), zero, zero, zero), maximum_iterations=max_blocks)
    canvas = tf.maximum(word(6), right) * tf.maximum(word(8), bottom)
    return tf.where(done, tf.maximum(frames, 1) * canvas, tf.constant(GIF_TOO_LARGE, tf.int64))


def file_costs(data: tf.Tensor, size: int = IMAGE_SIZE, bounds: DecodeBounds = DEFAULT_BOUNDS) -> tf.Tensor:
    """What decoding an encoded file costs, from its bytes alone: int64 [3], the pixels it
    decodes to, a JPEG's full-size pixels (0 for other formats) and its work in pixel
    passes. The pixels are UNKNOWN_FORMAT for a format other than JPEG, PNG, GIF and BMP,
    GIF_TOO_LARGE for a GIF beyond the bounds' bytes or blocks."""
    def header(offset: int, count: int, little_endian: bool) -> tf.Tensor:
        return unsigned(read_bytes(data, tf.constant(offset), count), tf.constant(little_endian))

    def costs(pixels, full=None, scans=None):
        pixels = tf.cast(pixels, tf.int64)
        work = DECODED_PIXEL_PASSES * tf.maximum(pixels, 0)
        if full is None:
            return tf.stack([pixels, tf.constant(0, tf.int64), work])
        return tf.stack([pixels, full, work + full * scans])

    def jpeg():
        shape = tf.cast(tf.image.extract_jpeg_shape(data), tf.int64)
        scale = tf.cast(jpeg_draft_scale(data, size), tf.int64)
        scaled = ((shape[0] + scale - 1) // scale) * ((shape[1] + scale - 1) // scale)
        # Every scan walks the full size's coefficients; the draft-scale pixels are made once.
        return costs(scaled, shape[0] * shape[1], tf.maximum(jpeg_scans(data), 1))

    def bmp():
        # Signed 32-bit width and height; a negative height means top-down rows.
        width, height = header(18, 4, True), header(22, 4, True)
        signed = lambda value: tf.where(value >= 2**31, value - 2**32, value)  # noqa: E731
        return costs(tf.abs(signed(width)) * tf.abs(signed(height)))

    def gif():
        return costs(tf.cond(tf.strings.length(data) > bounds.gif_bytes, lambda: tf.constant(GIF_TOO_LARGE, tf.int64),
                             lambda: gif_decoded_pixels(data, bounds.gif_blocks)))

    magic = _prefix(data, 8)
    is_png = tf.equal(magic, b"\x89PNG\r\n\x1a\n")
    is_gif = tf.strings.regex_full_match(_prefix(magic, 6), "GIF8[79]a")
    is_bmp = tf.equal(_prefix(magic, 2), b"BM")
    return tf.case([(is_jpeg(data), jpeg),
                    (is_png, lambda: costs(header(16, 4, False) * header(20, 4, False))),
                    (is_gif, gif),
                    (is_bmp, bmp)],
                   default=lambda: costs(tf.constant(UNKNOWN_FORMAT, tf.int64)))


def decoded_pixels(data: tf.Tensor, size: int = IMAGE_SIZE, bounds: DecodeBounds = DEFAULT_BOUNDS) -> tf.Tensor:
    """The pixels decoding an encoded file allocates (file_costs' first element)."""
    return file_costs(data, size, bounds)[0]


def check_costs(costs: tf.Tensor, input_name: str, bounds: DecodeBounds = DEFAULT_BOUNDS) -> tf.Tensor:
    """An assertion that a file of these costs (file_costs) is of a known format and within
    the bounds; the messages name `input_name`."""
    pixels, full, work = costs[0], costs[1], costs[2]
    checks = [
        (tf.not_equal(pixels, UNKNOWN_FORMAT),
         [f"input {input_name}: unsupported image format: JPEG, PNG, GIF and BMP files are taken"]),
        (tf.not_equal(pixels, GIF_TOO_LARGE),
         [f"input {input_name}: a GIF may have at most {bounds.gif_bytes} bytes and {bounds.gif_blocks} blocks"]),
        (pixels <= bounds.decoded_pixels,
         [f"input {input_name}: the image needs more pixels than the {bounds.decoded_pixels} a file may decode to "
          "(width x height in its header, at JPEG's reduced scale; every frame of a GIF); it needs", pixels]),
        (full <= bounds.jpeg_pixels,
         [f"input {input_name}: a JPEG may have at most {bounds.jpeg_pixels} pixels at full size; it has", full]),
        (work <= bounds.file_work,
         [f"input {input_name}: decoding the file would take more than the {bounds.file_work} pixel passes a file "
          "may take (a JPEG's full pixels times its scans); it needs", work]),
    ]
    asserts = []
    for condition, message in checks:
        with tf.control_dependencies(asserts):
            asserts = [tf.debugging.Assert(condition, message)]
    return asserts[0]


def check_decodable(data: tf.Tensor, input_name: str, size: int = IMAGE_SIZE,
                    bounds: DecodeBounds = DEFAULT_BOUNDS) -> tf.Tensor:
    """An assertion that the file is of a known format and that decoding it stays within
    the bounds; the messages name `input_name`."""
    return check_costs(file_costs(data, size, bounds), input_name, bounds)


def check_request(costs: tf.Tensor, input_name: str, bounds: DecodeBounds = DEFAULT_BOUNDS) -> tf.Tensor:
    """An assertion that a request's files (costs [n, 3], from file_costs) take at most the
    bounds' request work together."""
    total = tf.reduce_sum(tf.maximum(costs[:, 2], 0))
    return tf.debugging.Assert(
        total <= bounds.request_work,
        [f"input {input_name}: decoding the request's files would take more than the {bounds.request_work} pixel "
         "passes a request may take; they need", total])
