"""The CPU a request of encoded images costs at worst, per format, within the export's decode
bounds (pipeline/data/image_headers.py), and what the files that the bounds refuse would have cost.

A tiny model is exported with the default bounds and its serving_bytes signature run through a
TF1 session, as TF Serving runs it, on the costliest request of each format that the bounds let
through: files at the pixel and work bounds, as many as the request's work bound allows. CPU
seconds are the process's (TensorFlow's threads included), the best of a few runs.

    python benchmarks/decode_cost.py
"""

from __future__ import annotations

import io
import json
import pathlib
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from hostile_files import _jpeg_segments, jpeg_with_repeated_scan  # noqa: E402


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    file = io.BytesIO()
    image.save(file, fmt, **options)
    return file.getvalue()


def _noise(side: int, block: int = 2) -> Image.Image:
    # Blocky noise: costly for every decoder, yet compressible as its blocks grow.
    small = np.random.default_rng(0).integers(0, 256, (side // block, side // block, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((side, side), Image.NEAREST)


def _requests(bounds) -> dict[str, tuple[list[bytes], str]]:
    """Per format, the costliest request the bounds pass, and a file they refuse."""
    from pipeline.data.image_headers import DECODED_PIXEL_PASSES

    jpeg_side = int(bounds.jpeg_pixels ** 0.5)
    decoded_side = int(bounds.decoded_pixels ** 0.5)
    scans = _jpeg_scans(jpeg_with_repeated_scan(jpeg_side, 0))
    # Repeated first scans up to the file's work bound: (scans + repeats) x full pixels.
    repeats = bounds.file_work // bounds.jpeg_pixels - scans - 2
    jpeg = jpeg_with_repeated_scan(jpeg_side, repeats)
    png = _encode(_noise(decoded_side), "PNG")
    gif = _encode(_noise(decoded_side, 64).convert("P", dither=Image.Dither.NONE), "GIF")
    bmp = _encode(_noise(decoded_side), "BMP")
    decoded = DECODED_PIXEL_PASSES * bounds.decoded_pixels
    per_file = {"JPEG": bounds.file_work, "PNG": decoded, "GIF": decoded, "BMP": decoded}
    files = {"JPEG": jpeg, "PNG": png, "GIF": gif, "BMP": bmp}
    return {name: ([files[name]] * max(1, min(64, bounds.request_work // per_file[name])),
                   f"{len(files[name]) // 1024} KB a file")
            for name in files}


def _jpeg_scans(data: bytes) -> int:
    return sum(1 for marker, _ in _jpeg_segments(data) if marker == 0xDA)


def _cpu_seconds(run, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        run()
        best = min(best, time.process_time() - started)
    return best


def main() -> None:
    import keras

    from pipeline.export import saved_model
    from pipeline.model.architecture import ModelConfig
    from pipeline.data.image_headers import DEFAULT_BOUNDS
    from pipeline.model.network import build_model
    from serving.server.servable import Servable

    keras.utils.set_random_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        path = saved_model.export_saved_model(build_model(ModelConfig("resnet", 8, 3)), ["a", "b", "c"],
                                         pathlib.Path(scratch) / "m")
        servable = Servable("m", 1, path)
        signature = servable.signature("serving_bytes")
        outputs = sorted(signature.outputs)
        rows = {}
        for name, (files, note) in _requests(DEFAULT_BOUNDS).items():
            batch = np.array(files, dtype=object)
            servable.run(signature, {"image_bytes": batch[:1]}, outputs)  # warm
            seconds = _cpu_seconds(lambda: servable.run(signature, {"image_bytes": batch}, outputs))
            rows[name] = {"files": len(files), "note": note, "cpu_seconds": round(seconds, 3)}
            print(f"{name:5s} worst request within the bounds: {len(files):3d} files ({note}), {seconds:.3f} CPU-s")
        attack = np.array([jpeg_with_repeated_scan(1024, 600)], dtype=object)
        started = time.process_time()
        try:
            servable.run(signature, {"image_bytes": attack}, outputs)
            refused = False
        except Exception:
            refused = True
        seconds = time.process_time() - started
        print(f"a 1024x1024 progressive JPEG with its first scan repeated 600 times ({len(attack[0]) // 1024} KB): "
              f"{'refused' if refused else 'decoded'} in {seconds:.3f} CPU-s")
    cpu = next((line.split(":", 1)[1].strip() for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    print(json.dumps({"cpu": cpu, "bounds": DEFAULT_BOUNDS.__dict__, "worst_requests": rows}))


if __name__ == "__main__":
    main()
