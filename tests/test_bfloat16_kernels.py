"""The project's bfloat16 kernels: bit for bit TensorFlow's results, registered above the
stock kernels, loaded only where they can run, and never in the way when they cannot be
built.

The comparisons run each side in a subprocess (tests/bfloat16_probe.py): a loaded op
library stays for the life of a process, so one process cannot run both kernels.
"""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO
from pipeline import flags
from pipeline.cpu import CpuInfo
from pipeline.kernels import bfloat16
from pipeline.settings.config import TrainConfig
from pipeline.train import loop as training
from pipeline.train import precision
from pipeline.train.precision import Machine

THIS_CPU = CpuInfo.read()
needs_avx512 = pytest.mark.skipif(bool(bfloat16.missing_flags(THIS_CPU)),
                                  reason="the kernels need AVX-512 (avx512f/bw/vl/dq and FMA)")
AVX512 = CpuInfo(flags=frozenset(bfloat16.REQUIRED_FLAGS))


@pytest.fixture(autouse=True)
def nothing_loaded(monkeypatch):
    """Each test starts as a process that has loaded no library (another test of this worker may
    have loaded the real one, which stays loaded for the worker's life)."""
    monkeypatch.setattr(bfloat16, "_loaded", [])


def is_nan(bits):
    return (bits & 0x7F80 == 0x7F80) & (bits & 0x7F != 0)


def probe(mode, out, kernels, onednn="1"):
    environment = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn, "TF_CPP_MIN_LOG_LEVEL": "3"}
    process = subprocess.run([sys.executable, os.path.join(REPO, "tests", "bfloat16_probe.py"), mode, str(out),
                              kernels],
                             env=environment, capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stderr[-3000:]
    lines = process.stdout.splitlines()
    library = next(line.split(": ", 1)[1] for line in lines if line.startswith("library: "))
    priorities = {line.split()[1].rstrip(":"): json.loads(line.split(": ", 1)[1])
                  for line in lines if line.startswith("priorities ")}
    calls = next((json.loads(line.split(": ", 1)[1]) for line in lines if line.startswith("calls: ")), None)
    return library, priorities, calls


@pytest.mark.slow
@needs_avx512
@pytest.mark.parametrize("onednn", ["1", "0"])
def test_the_kernels_give_tensorflows_bits_and_win_the_registration(tmp_path, onednn):
    library, priorities, calls = probe("ops", tmp_path / "project.npz", "project", onednn)
    assert library.endswith(".so")
    # The project's kernel for each op outranks TensorFlow's (priority 0), and it is the one that ran.
    assert priorities == {op: [0, 1] for op in ("AddV2", "AddN", "Relu", "ReluGrad")}
    # Per size: 3 same-shape additions, 8 sums, 2 ReLUs, 2 gradients (tf.function may add others).
    assert all(calls[op] >= 6 * least for op, least in {"AddV2": 3, "AddN": 8, "Relu": 2, "ReluGrad": 2}.items()), calls
    stock_library, stock_priorities, stock_calls = probe("ops", tmp_path / "stock.npz", "stock", onednn)
    assert stock_library == "stock" and stock_priorities == {op: [0] for op in priorities} and stock_calls is None

    ours, theirs = np.load(tmp_path / "project.npz"), np.load(tmp_path / "stock.npz")
    assert sorted(ours) == sorted(theirs) and len(ours) == 6 * 15 + 5
    for name in theirs:
        # Every bit is compared, but for the sign of a NaN (which IEEE 754 leaves unspecified, and in
        # which TensorFlow's own kernels differ between their vector loops and their remainders).
        differ = np.flatnonzero((ours[name] != theirs[name]) & ~(is_nan(ours[name]) & is_nan(theirs[name])))
        assert differ.size == 0, (name, [(i, hex(ours[name].flat[i]), hex(theirs[name].flat[i])) for i in differ[:5]])
    # What the inputs were built to reach: infinities and NaNs (of both signs), both zeros, kept
    # negative subnormals in a remainder, halfway cases rounded both ways, sums whose order shows.
    odd = theirs["relu_grad_specials_odd"]
    assert (theirs["add_odd"] == 0x7F80).any() and (theirs["relu_odd"] == 0x8000).any()
    assert {0x7FC0, 0xFFC0} <= set(odd[is_nan(odd)].tolist())
    assert (theirs["relu_odd"].reshape(-1)[-8:] & 0x807F > 0x8000).any()  # a negative subnormal left as it is
    ties = theirs["add_ties_chunks"].reshape(-1)  # 1 + k/128 plus or minus 1/256: even k keep 1 + k/128
    kept = ties == 0x3F80 + np.arange(ties.size) % 128
    assert kept.any() and not kept.all()
    assert all(is_nan(ours[name]).sum() == is_nan(theirs[name]).sum() > 0 for name in ("add_chunks", "add_n_17_odd"))


@pytest.mark.slow
@needs_avx512
def test_mixed_precision_training_is_the_same_with_either_kernels(tmp_path):
    library, _, _ = probe("train", tmp_path / "project.json", "project")
    assert library.endswith(".so")
    probe("train", tmp_path / "stock.json", "stock")
    ours, theirs = (json.loads((tmp_path / name).read_text()) for name in ("project.json", "stock.json"))
    assert len(ours) == 4 and ours == theirs


def test_only_a_bfloat16_policy_on_an_avx512_cpu_loads_them(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.train.precision"):
        assert precision.kernels_for("float32", Machine(gpu=False, cpu=AVX512), tmp_path) is None
        assert "not loaded, they serve --mixed-precision on a CPU only" in caplog.text
        avx2 = CpuInfo(flags=frozenset({"avx2", "fma"}))
        assert precision.kernels_for("mixed_bfloat16", Machine(gpu=False, cpu=avx2), tmp_path) is None
        assert precision.kernels_for("mixed_bfloat16", Machine(gpu=True, cpu=AVX512), tmp_path) is None
    assert "lacks avx512f, avx512bw, avx512vl, avx512dq" in caplog.text and "a GPU machine" in caplog.text
    assert bfloat16.missing_flags(None) == list(bfloat16.REQUIRED_FLAGS)
    assert not list(tmp_path.iterdir())  # nothing was compiled


def test_a_run_loads_the_kernels_only_when_asked(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(bfloat16, "load", lambda *args: asked.append("loaded"))
    monkeypatch.setattr(precision.Machine, "read", classmethod(lambda cls: Machine(gpu=False, cpu=AVX512)))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    settings = dict(arch="resnet", depth=8, dataset="synthetic:64", recipe="quick", steps=1, batch_size=16,
                    mixed_precision=True, progress=False)
    training.train(flags.build(TrainConfig, {**settings, "model_dir": str(tmp_path / "default")}))
    assert asked == [] and not (tmp_path / "cache").exists()
    training.train(flags.build(TrainConfig, {**settings, "model_dir": str(tmp_path / "asked"),
                                             "project_bfloat16_kernels": True}))
    assert asked == ["loaded"]


def test_without_a_compiler_training_goes_on_with_the_stock_kernels(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="pipeline.kernels.bfloat16"):
        assert bfloat16.load(tmp_path / "cache") is None
    assert "no C++ compiler" in caplog.text and "TensorFlow's kernels" in caplog.text


def test_a_failed_build_leaves_nothing_under_the_librarys_name(tmp_path, monkeypatch, caplog):
    # A "compiler" that writes half a library and fails: the cache must not keep it.
    compiler = tmp_path / "broken-g++"
    compiler.write_text('#!/bin/sh\nfor last; do :; done\nwhile [ "$1" != "-o" ]; do shift; done\n'
                        'printf half > "$2"\necho "bfloat16_elementwise.cc:1: error: out of disk" >&2\nexit 1\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="pipeline.kernels.bfloat16"):
        assert bfloat16.load(cache) is None
    assert "compiling bfloat16_elementwise.cc failed: bfloat16_elementwise.cc:1: error: out of disk" in caplog.text
    assert list(cache.iterdir()) == []  # neither the library nor the build folder


def test_the_cache_key_follows_the_source_and_the_compiler(tmp_path, monkeypatch):
    first = bfloat16.library_path(tmp_path)
    assert first.parent == tmp_path and first.name.startswith("bfloat16_elementwise-")
    assert bfloat16.library_path(tmp_path) == first
    source = bfloat16.SOURCE
    edited = tmp_path / "bfloat16_elementwise.cc"
    edited.write_bytes(source.read_bytes() + b"// edited\n")
    monkeypatch.setattr(bfloat16, "SOURCE", edited)
    assert bfloat16.library_path(tmp_path) != first
    monkeypatch.setattr(bfloat16, "SOURCE", source)
    assert bfloat16.library_path(tmp_path) == first
    monkeypatch.setenv("CXX", str(tmp_path / "another-compiler"))
    assert bfloat16.library_path(tmp_path) != first


def test_a_build_keeps_the_libraries_of_other_installations(tmp_path, monkeypatch, caplog):
    # Two virtualenvs share the cache, each with its own library: neither build removes the other's.
    compiler = tmp_path / "fake-g++"  # "compiles" to a file that is no library
    compiler.write_text('#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\nprintf "not a library" > "$2"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    cache = tmp_path / "cache"
    cache.mkdir()
    other = cache / "bfloat16_elementwise-0000000000000000.so"
    other.write_text("another installation's")
    with caplog.at_level(logging.WARNING, logger="pipeline.kernels.bfloat16"):
        assert bfloat16.load(cache) is None  # TensorFlow refuses the file
    assert "TensorFlow's kernels" in caplog.text
    assert sorted(path.name for path in cache.iterdir()) == sorted([bfloat16.library_path(cache).name,
                                                                    other.name])


def test_a_prebuilt_library_is_taken_before_any_compiler_is_asked(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    prebuilt = tmp_path / "image"
    prebuilt.mkdir()
    monkeypatch.setenv(bfloat16.PREBUILT, str(prebuilt))
    # Another source's or TensorFlow's library: not taken, and the cache build is tried (no compiler here).
    (prebuilt / "bfloat16_elementwise-0000000000000000.so").write_text("another installation's")
    with caplog.at_level(logging.INFO, logger="pipeline.kernels.bfloat16"):
        assert bfloat16.load(tmp_path / "cache") is None
    assert "has no library for this TensorFlow" in caplog.text and "no C++ compiler" in caplog.text
    caplog.clear()
    # This installation's name: taken without a compiler (here TensorFlow refuses the file, which is no library).
    ours = bfloat16.prebuilt_path(prebuilt)
    ours.write_text("not a library")
    with caplog.at_level(logging.INFO, logger="pipeline.kernels.bfloat16"):
        assert bfloat16.load(tmp_path / "cache") is None
    assert "no C++ compiler" not in caplog.text and "TensorFlow's kernels" in caplog.text
    assert not (tmp_path / "cache").exists()
    assert ours.name != bfloat16.library_path(tmp_path).name  # the cache's key has the compiler too


@pytest.mark.slow
@needs_avx512
def test_a_library_built_ahead_runs_where_no_compiler_is(tmp_path):
    """The trainer image's path: built by `--prebuild`, then loaded by a process without a compiler."""
    built = subprocess.run([sys.executable, "-m", "pipeline.kernels.bfloat16", "--prebuild", str(tmp_path / "lib")],
                           cwd=REPO, capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr[-3000:]
    library = built.stdout.strip().splitlines()[-1]
    environment = {**os.environ, bfloat16.PREBUILT: str(tmp_path / "lib"), "CXX": "/nonexistent/g++",
                   "XDG_CACHE_HOME": str(tmp_path / "empty-cache"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    script = ("import json\nimport tensorflow as tf\nfrom pipeline.kernels import bfloat16\n"
              "print(bfloat16.load())\n"
              "x = tf.cast(tf.range(100.0), tf.bfloat16)\n"
              "print(float(tf.reduce_sum(tf.cast(tf.nn.relu(x + x), tf.float32))))\n"
              "print(json.dumps(bfloat16.kernel_calls()))\n")
    loaded = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=environment, capture_output=True,
                            text=True, timeout=900)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    path, total, calls = loaded.stdout.strip().splitlines()[-3:]
    assert path == library and float(total) == 9900.0
    assert json.loads(calls)["AddV2"] >= 1 and json.loads(calls)["Relu"] >= 1
    assert not (tmp_path / "empty-cache" / "accresnet").exists()  # nothing compiled into the cache
