"""What the CPU can do, from /proc/cpuinfo: enough to tell whether bfloat16 is native.

bfloat16 arithmetic is native with AVX512-BF16 (dot products of bf16 pairs)
or AMX; without either, oneDNN converts every bfloat16 element to float32
and back, and mixed precision trains several times slower than float32
(docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import pathlib

CPUINFO = pathlib.Path("/proc/cpuinfo")
NATIVE_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    model_name: str = "unknown CPU"
    family: str = "?"
    model: str = "?"
    flags: frozenset[str] = frozenset()

    @classmethod
    def read(cls, path: pathlib.Path = CPUINFO) -> CpuInfo | None:
        """The first processor's entry; None where there is no /proc/cpuinfo (not Linux)."""
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return None
        fields: dict[str, str] = {}
        for line in lines:
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        return cls(model_name=fields.get("model name", cls.model_name), family=fields.get("cpu family", "?"),
                   model=fields.get("model", "?"), flags=frozenset(fields.get("flags", "").split()))

    @property
    def native_bfloat16(self) -> bool:
        return any(flag in self.flags for flag in NATIVE_BFLOAT16_FLAGS)

    def describe(self) -> str:
        """"AMD EPYC (family 25, model 17; AVX-512, AVX512-BF16)": a virtual machine's model
        name can be that short, so the family and model numbers say which generation it is."""
        features = [name for name, flag in (("AVX-512", "avx512f"), ("AVX512-BF16", "avx512_bf16"),
                                            ("AMX", "amx_bf16")) if flag in self.flags]
        return (f"{self.model_name} (family {self.family}, model {self.model}; "
                f"{', '.join(features) or 'no AVX-512'})")
