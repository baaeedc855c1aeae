"""Opt-in AVX-512 kernels for bfloat16 additions, ReLU and its gradient (--project-bfloat16-kernels).

Under --mixed-precision a CPU training step spends as long in AddV2, AddN,
Relu and ReluGrad as in float32, because TensorFlow's wheel runs them as
Eigen kernels built for its baseline instruction set
(docs/benchmarks.md). pipeline/kernels/bfloat16_elementwise.cc does the same
arithmetic 16 elements at a time, with Eigen's results bit for bit (but for
the sign of a NaN), and registers itself for the standard ops at a higher
priority: the graph, its checkpoints and its exports do not change, only
which code this process runs for them.

They are off unless a run asks for them: they buy a few percent of a
bfloat16 step, are compiled against TensorFlow's internal headers (so any
TensorFlow upgrade may break them) and replace kernels process-wide; TF
Serving never loads them. Asked for, the library is compiled once per
source, TensorFlow installation and compiler into the user's cache (a C++
compiler and TensorFlow's headers are needed, as for any custom op), and
loaded only where it can help: a bfloat16 policy on a CPU with AVX-512
(pipeline/train/precision.py decides).
Where it cannot be built or loaded, training goes on with TensorFlow's
kernels and says why.

An image without a compiler can carry the library built ahead for its own
TensorFlow (`python -m pipeline.kernels.bfloat16 --prebuild DIR`, the
Dockerfile's trainer stage with --build-arg BFLOAT16_KERNELS=yes) and name
the folder in ACCRESNET_BFLOAT16_KERNELS_DIR; a library there is used only
if its name says it was built from this source for this TensorFlow build.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile

import tensorflow as tf

from pipeline.cache import project_cache
from pipeline.cpu import CpuInfo

log = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("bfloat16_elementwise.cc")
# What the vector loops are compiled for (the source's ACCRESNET_AVX512 attribute).
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma")
PREBUILT = "ACCRESNET_BFLOAT16_KERNELS_DIR"  # libraries built ahead, e.g. in the trainer image
# The ops the library has kernels for, in the order of its call counter.
OPS = ("AddV2", "AddN", "Relu", "ReluGrad")
COMPILE_TIMEOUT_SEC = 600

# The library this process loaded (one at most: a second copy's kernels would tie with the first's).
_loaded: list[tuple[pathlib.Path, object]] = []


class KernelBuildError(RuntimeError):
    """The library could not be compiled here; the message says why."""


def missing_flags(cpu: CpuInfo | None) -> list[str]:
    """The instructions the kernels need that `cpu` lacks (all of them when unknown)."""
    return [flag for flag in REQUIRED_FLAGS if cpu is None or flag not in cpu.flags]


def _key(*parts: str | bytes) -> str:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), tf.__version__, tf.version.GIT_VERSION, *parts):
        key.update(part if isinstance(part, bytes) else part.encode())
    return key.hexdigest()[:16]


def library_path(cache: pathlib.Path | None = None) -> pathlib.Path:
    """Where the library for this source, TensorFlow and compiler is cached."""
    key = _key(" ".join(_compile_command("in", "out")), _compiler_version())
    return (cache or project_cache() / "kernels") / f"bfloat16_elementwise-{key}.so"


def prebuilt_path(directory: pathlib.Path) -> pathlib.Path:
    """The name a library built ahead for this source and TensorFlow build has in `directory`
    (no compiler in the key: where libraries are built ahead, there is none to ask)."""
    return directory / f"bfloat16_elementwise-{_key()}.so"


def prebuild(directory: pathlib.Path) -> pathlib.Path:
    """Compile the library into `directory` under its prebuilt name and check that TensorFlow loads it."""
    path = build(prebuilt_path(directory))
    tf.load_op_library(str(path))
    return path


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def _compiler_version() -> str:
    try:
        result = subprocess.run([_compiler(), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "no compiler"
    return result.stdout.splitlines()[0] if result.stdout else f"status {result.returncode}"


def _compile_command(source: str, output: str) -> list[str]:
    # -mavx: what TensorFlow's wheel is built for, so that the stock code compiled in (AddV2's
    # broadcasting) is the wheel's; the AVX-512 loops carry their own target attributes.
    return [_compiler(), "-O2", "-mavx", "-shared", "-fPIC", "-w", *tf.sysconfig.get_compile_flags(), source,
            "-o", output, *tf.sysconfig.get_link_flags()]


def build(target: pathlib.Path) -> pathlib.Path:
    """Compile the library to `target` unless it is there; a half-written file is never
    left under that name (compiled beside it, then renamed)."""
    if target.is_file():
        return target
    if shutil.which(_compiler()) is None:
        raise KernelBuildError(f"no C++ compiler ({_compiler()!r} is not on PATH; set CXX or install g++)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as scratch:
        staged = pathlib.Path(scratch) / target.name
        try:
            result = subprocess.run(_compile_command(str(SOURCE), str(staged)), capture_output=True, text=True,
                                    timeout=COMPILE_TIMEOUT_SEC)
        except subprocess.TimeoutExpired:
            raise KernelBuildError(f"compiling {SOURCE.name} took over {COMPILE_TIMEOUT_SEC} s") from None
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
            raise KernelBuildError(f"compiling {SOURCE.name} failed: {(errors or ['no output'])[0].strip()}")
        # Libraries of other sources or installations stay: another virtualenv may use one.
        os.replace(staged, target)
    return target


def load(cache: pathlib.Path | None = None) -> pathlib.Path | None:
    """Build if needed and load the kernels; returns the library loaded, or None where TensorFlow's
    own kernels stay, with the reason logged. Loading is for the whole process and once. Whether
    they can serve a run (a bfloat16 policy on a CPU with AVX-512) is pipeline/train/precision.py's
    to decide."""
    if _loaded:
        return _loaded[0][0]
    try:
        path = _prebuilt() or build(library_path(cache))
        _loaded.append((path, tf.load_op_library(str(path))))
    except (KernelBuildError, OSError, tf.errors.OpError) as error:
        log.warning("bfloat16 elementwise ops: TensorFlow's kernels, slower under --mixed-precision (%s)", error)
        return None
    log.info("bfloat16 elementwise ops: the project's AVX-512 kernels (%s)", path)
    return path


def _prebuilt() -> pathlib.Path | None:
    """The library built ahead for this installation, where PREBUILT names a folder that has it."""
    if not os.environ.get(PREBUILT):
        return None
    path = prebuilt_path(pathlib.Path(os.environ[PREBUILT]))
    if path.is_file():
        return path
    log.info("bfloat16 elementwise ops: %s has no library for this TensorFlow (%s); building one", PREBUILT, path.name)
    return None


def kernel_calls() -> dict[str, int] | None:
    """How many times each of the project's kernels ran in this process; None when not loaded."""
    if not _loaded:
        return None
    counts = _loaded[0][1].accresnet_bfloat16_kernel_calls().numpy().tolist()
    return dict(zip(OPS, counts))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compile the bfloat16 kernels ahead, for an installation "
                                                 "that will have no compiler (the trainer image).")
    parser.add_argument("--prebuild", type=pathlib.Path, required=True, metavar="DIR",
                        help=f"folder to write the library to; name it in {PREBUILT} where it is used")
    args = parser.parse_args(argv)
    print(prebuild(args.prebuild))


if __name__ == "__main__":
    main()
