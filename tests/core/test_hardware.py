"""The one hardware answer: precision from what the machine computes natively, never a kernel the
CPU cannot run, and the capability forcible so one machine tests the choices of the others."""
import pytest

from core import hardware as hw


@pytest.fixture
def forced(monkeypatch):
    """Answer as a CPU of the given kind would (the cached answers are recomputed)."""
    def force(kind):
        monkeypatch.setenv(hw.FORCE_ENV, kind)
        for cached in (hw.hardware, hw.bf16_packing):
            cached.cache_clear()
        return hw.hardware()
    yield force
    monkeypatch.delenv(hw.FORCE_ENV, raising=False)
    for cached in (hw.hardware, hw.bf16_packing):
        cached.cache_clear()


def test_auto_is_fp32_where_bf16_is_emulated(forced):
    assert forced("avx2").describe() == "cpu AVX2 (no native bf16, forced by RLHF_FORCE_CPU_CAPABILITY)"
    precision = hw.resolve_precision("auto")
    assert precision.name == "fp32" and "no native bf16" in precision.reason
    assert precision.describe().startswith("auto (fp32: this CPU has no native bf16 (AVX2)")
    assert not hw.bf16_packing()  # oneDNN's bf16 packing raises on an AVX2-only CPU


def test_auto_is_bf16_where_it_is_native(forced):
    forced("avx512_bf16")
    assert hw.resolve_precision("auto").name == "bf16"
    assert hw.resolve_precision("fp32").name == "fp32"


def test_forcing_bf16_without_native_support_runs_with_a_warning_that_says_how_slow(forced):
    forced("avx512")
    precision = hw.resolve_precision("bf16")
    assert precision.name == "bf16"
    assert "emulated and likely about" in precision.warning and "x slower than fp32" in precision.warning


def test_impossible_requests_are_one_sentence(forced):
    forced("avx2")
    with pytest.raises(hw.HardwareError, match="fp16 needs a CUDA GPU"):
        hw.resolve_precision("fp16")
    with pytest.raises(hw.HardwareError, match="RLHF_FORCE_CPU_CAPABILITY='z80' is not a CPU kind"):
        forced("z80")


def test_the_real_answer_names_this_machine():
    answer = hw.hardware()
    assert answer.device in ("cpu", "cuda") and answer.capability
    flags = open("/proc/cpuinfo").read() if answer.device == "cpu" else ""
    if answer.device == "cpu" and not answer.forced:
        assert answer.native_bf16 == ("avx512_bf16" in flags or "amx_bf16" in flags)
