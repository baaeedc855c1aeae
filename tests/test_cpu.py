"""Native bfloat16 told from /proc/cpuinfo, --mixed-precision's warning where it is not, and its policy."""

import logging

from pipeline.cpu import CpuInfo
from pipeline.train.precision import Machine, Precision, policy_for

CPUINFO = """processor\t: {index}
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu sse avx2 fma {extra}
"""


def cpu(tmp_path, extra):
    path = tmp_path / "cpuinfo"
    path.write_text("\n".join(CPUINFO.format(index=i, extra=extra) for i in range(2)))
    return CpuInfo.read(path)


def test_native_bfloat16_is_avx512_bf16_or_amx(tmp_path):
    assert cpu(tmp_path, "avx512f avx512_bf16").native_bfloat16
    assert cpu(tmp_path, "avx512f amx_bf16 amx_tile").native_bfloat16
    assert not cpu(tmp_path, "avx512f avx512_vnni").native_bfloat16
    assert cpu(tmp_path, "avx512f avx512_bf16").describe() == "AMD EPYC (family 25, model 17; AVX-512, AVX512-BF16)"
    assert cpu(tmp_path, "").describe() == "AMD EPYC (family 25, model 17; no AVX-512)"
    assert CpuInfo.read(tmp_path / "missing") is None


def test_mixed_precision_warns_where_bfloat16_is_emulated(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.train.precision"):
        assert policy_for(True, Machine(gpu=False, cpu=cpu(tmp_path, "avx512f avx512_bf16"))) == "mixed_bfloat16"
        assert not caplog.records
        assert policy_for(False, Machine(gpu=False, cpu=cpu(tmp_path, ""))) == "float32"
        assert not caplog.records
        assert policy_for(True, Machine(gpu=False, cpu=cpu(tmp_path, "avx2"))) == "mixed_bfloat16"
    assert "no native bfloat16" in caplog.text and "slower than float32" in caplog.text


def test_a_gpu_computes_in_float16_with_its_loss_scaled(tmp_path):
    gpu = policy_for(True, Machine(gpu=True, cpu=cpu(tmp_path, "avx2")))
    assert gpu == "mixed_float16" and Precision(gpu).loss_scaling
    assert not Precision(policy_for(True, Machine(gpu=False, cpu=None))).loss_scaling
