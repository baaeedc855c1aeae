"""A run's precision, decided once: the dtype policy, loss scaling and which kernels run.

--mixed-precision computes in float16 on a GPU and in bfloat16 on a CPU, keeping
the weights in float32. float16 needs its loss scaled to keep small gradients;
bfloat16 has float32's range and does not. bfloat16 is native on CPUs with
AVX512-BF16 or AMX; elsewhere oneDNN converts every element to float32 and
back, and a run is warned that it will be several times slower than float32.

The machine is read once per run (its GPUs from TensorFlow, its CPU from
/proc/cpuinfo). TensorFlow's own kernels run unless the run asks for the
project's bfloat16 ones (--project-bfloat16-kernels, pipeline/kernels/) and
they can serve it: a bfloat16 policy on a CPU with AVX-512.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pathlib
from collections.abc import Iterator

import keras
import tensorflow as tf

from pipeline.cpu import CpuInfo
from pipeline.kernels import bfloat16

log = logging.getLogger(__name__)

FLOAT32, MIXED_FLOAT16, MIXED_BFLOAT16 = "float32", "mixed_float16", "mixed_bfloat16"


@dataclasses.dataclass(frozen=True)
class Machine:
    """What a run computes on: whether there are GPUs, and the CPU (None where unknown)."""

    gpu: bool
    cpu: CpuInfo | None

    @classmethod
    def read(cls) -> Machine:
        return cls(gpu=bool(tf.config.list_physical_devices("GPU")), cpu=CpuInfo.read())

    def describe(self) -> str:
        cpu = self.cpu.describe() if self.cpu is not None else "an unknown CPU"
        return f"{cpu} and a GPU" if self.gpu else cpu


@dataclasses.dataclass(frozen=True)
class Precision:
    policy: str  # Keras' dtype policy: FLOAT32, MIXED_FLOAT16 or MIXED_BFLOAT16
    kernels: pathlib.Path | None = None  # the project's library loaded; None: TensorFlow's kernels

    @property
    def loss_scaling(self) -> bool:
        return self.policy == MIXED_FLOAT16

    def optimizer(self, optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
        """`optimizer`, scaling the loss where the policy needs it."""
        return keras.optimizers.LossScaleOptimizer(optimizer) if self.loss_scaling else optimizer

    def scope(self):
        """Layers built inside take the policy."""
        return policy_scope(self.policy)


def choose(mixed_precision: bool, project_kernels: bool = False, machine: Machine | None = None,
           cache: pathlib.Path | None = None) -> Precision:
    """The precision of a run on `machine` (this one by default), its kernels loaded."""
    machine = machine or Machine.read()
    policy = policy_for(mixed_precision, machine)
    log.info("dtype policy %s on %s", policy, machine.describe())
    return Precision(policy, kernels_for(policy, machine, cache) if project_kernels else None)


def policy_for(mixed_precision: bool, machine: Machine) -> str:
    """float16 on GPUs, bfloat16 on CPUs, with a warning on a CPU that has no native bfloat16."""
    if not mixed_precision:
        return FLOAT32
    if machine.gpu:
        return MIXED_FLOAT16
    if machine.cpu is not None and not machine.cpu.native_bfloat16:
        log.warning("--mixed-precision: this CPU (%s) has no native bfloat16 (AVX512-BF16 or AMX), so every "
                    "bfloat16 operation is emulated and training runs several times slower than float32 "
                    "(about 6x on an AVX2 machine, docs/benchmarks.md); leave --mixed-precision off here",
                    machine.cpu.describe())
    return MIXED_BFLOAT16


def kernels_for(policy: str, machine: Machine, cache: pathlib.Path | None = None) -> pathlib.Path | None:
    """The project's bfloat16 kernels, loaded where they can serve `policy` on `machine`;
    None where TensorFlow's kernels stay, with the reason logged."""
    if policy != MIXED_BFLOAT16:
        log.info("--project-bfloat16-kernels: not loaded, they serve --mixed-precision on a CPU only")
        return None
    if machine.gpu:
        log.info("bfloat16 elementwise ops: TensorFlow's kernels (a GPU machine)")
        return None
    lacking = bfloat16.missing_flags(machine.cpu)
    if lacking:
        log.info("bfloat16 elementwise ops: TensorFlow's kernels (this CPU lacks %s)", ", ".join(lacking))
        return None
    return bfloat16.load(cache)


@contextlib.contextmanager
def policy_scope(name: str) -> Iterator[None]:
    """Build layers under the dtype policy `name`; Keras reads it from a global, which is
    restored afterwards."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
