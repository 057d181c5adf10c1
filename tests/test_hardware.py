"""Precision chosen by the hardware: the decision is a function of the CPU flags, so it is tested on both kinds."""

import pytest

from lancet.errors import LancetError
from lancet.hardware import choose_precision, cpu_flags

NO_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"


def test_auto_is_fp32_on_a_cpu_without_native_bf16():
    p = choose_precision("auto", "cpu", cpu_flags(NO_BF16))
    assert (p.name, p.bf16) == ("fp32", False) and "no avx512_bf16" in p.reason


def test_auto_is_bf16_with_native_bf16_and_on_cuda():
    assert choose_precision("auto", "cpu", cpu_flags(BF16)).name == "bf16"
    assert choose_precision("auto", "cpu", frozenset({"amx_bf16"})).bf16
    assert choose_precision("auto", "cuda:0", frozenset()).name == "bf16"


def test_explicit_precision_overrides_and_bad_names_fail():
    assert choose_precision("fp32", "cuda", cpu_flags(BF16)).name == "fp32"
    assert choose_precision("bf16", "cpu", cpu_flags(NO_BF16)).name == "bf16"
    with pytest.raises(LancetError, match="unknown precision"):
        choose_precision("fp16")
    assert cpu_flags("model name: x\n") == frozenset()
