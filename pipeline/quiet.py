"""TensorFlow's start-up lines, shown only with `accresnet -v`.

Importing TensorFlow 2.21 and finding its devices prints, on a machine
without a GPU, about seven lines that say nothing about the run:

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 ... port.cc:153] oneDNN custom operations are on. ...
    I0000 ... cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
    (the three again: libtensorflow_framework's initialisers run twice during the import)
    E0000 ... cuda_platform.cc:52] failed call to cuInit: ... (at the first device discovery)

What silences each, measured: TF_CPP_MIN_LOG_LEVEL does not reach the first
group at any level, since absl writes every message to stderr until
absl::InitializeLog, which runs later (only TF_ENABLE_ONEDNN_OPTS=0 drops the
oneDNN line, by turning oneDNN off); the cuInit line is an ERROR that only
TF_CPP_MIN_LOG_LEVEL=3 hides, together with every real TensorFlow error; the
Python `absl` and `tensorflow` loggers carry none of them. So, without -v, the
first import of TensorFlow runs with file descriptor 2 pointed at a file,
devices included, and what it wrote is then passed on without these lines:
anything else (a warning, a traceback) still reaches stderr.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# The lines of TensorFlow's start-up that TF_CPP_MIN_LOG_LEVEL=2 cannot hide: absl's notice,
# INFO and WARNING lines in absl's format ("I0000 00:00:17... 123 file.cc:45] ..."), and the
# CUDA driver missing on a machine without one.
_STARTUP_LINE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} \d\d:\d\d:[\d.]+\s+\d+ [\w.]+:\d+\] "
    r"|E\d{4} \d\d:\d\d:[\d.]+\s+\d+ cuda_\w+\.cc:\d+\] failed call to cuInit")


def is_startup_line(line: str) -> bool:
    return bool(_STARTUP_LINE.match(line))


@contextlib.contextmanager
def startup_lines_dropped() -> Iterator[None]:
    """Run the body with stderr (the file descriptor, so C++ writes too) caught; then write
    what it caught to stderr, less TensorFlow's start-up lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not is_startup_line(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
    """TensorFlow's own loader, run with its start-up lines dropped, devices found inside."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with startup_lines_dropped():
            self._loader.exec_module(module)
            module.config.list_physical_devices()  # the cuInit line; the runtime is not started

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: later imports are TensorFlow's own business
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def quiet_tensorflow_startup() -> None:
    """Drop TensorFlow's start-up lines when this process first imports it (whichever module
    does); a no-op once TensorFlow is imported."""
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())
