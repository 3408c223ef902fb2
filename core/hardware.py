"""The one answer to "which device, which precision, which kernels" (every step, the server, the
decoder and the benchmarks ask here; nothing else probes the hardware).

- `hardware()`: the device (cuda or cpu), the CPU's vector capability and whether it computes
  bf16 natively (AVX512-BF16 or AMX on a CPU; `torch.cuda.is_bf16_supported()` on CUDA).
- `resolve_precision("auto" | "bf16" | "fp16" | "fp32")`: the precision a run uses and why.
  auto is bf16 (fp32 master weights) where bf16 is native, fp16 with loss scaling on a CUDA GPU
  without bf16, fp32 on a CPU without native bf16: there bf16 is emulated (measured ~3x slower
  than fp32 on an AVX512 Xeon without AVX512-BF16, ~20x on an AVX2-only EPYC).
- `bf16_packing()`: whether oneDNN's bf16 weight packing runs here (it raises on AVX2-only
  CPUs); `fp32_packing()`: whether MKL's packed fp32 GEMM runs here; `onednn_fp32_packing()`:
  whether oneDNN's packed fp32 inner product runs here. Each is tried once; which of them is
  fastest for a given product is measured by core/kernels.py.

`RLHF_FORCE_CPU_CAPABILITY=avx2|avx512|avx512_bf16|amx` makes a CPU answer as that kind would,
so a test on one machine covers the choices of the others (a forced kind never claims a kernel
the real CPU cannot run: packing is still tried for real).
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

from core.errors import UserError

FORCE_ENV = "RLHF_FORCE_CPU_CAPABILITY"
FORCIBLE = {"avx2": ("AVX2", False), "avx512": ("AVX512", False),
            "avx512_bf16": ("AVX512_BF16", True), "amx": ("AMX", True)}
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


class HardwareError(UserError):
    """A precision or kernel this machine cannot run was asked for."""


@dataclass(frozen=True)
class Hardware:
    device: str             # "cuda" or "cpu"
    capability: str         # CPU: AVX2, AVX512, AVX512_BF16, AMX, ... ; CUDA: the GPU's name
    native_bf16: bool       # bf16 products run in hardware, not emulated
    forced: bool = False    # the CPU kind comes from RLHF_FORCE_CPU_CAPABILITY

    def describe(self) -> str:
        """One line for logs and benchmark headers, e.g. 'cpu AVX512 (no native bf16)'."""
        bf16 = "native bf16" if self.native_bf16 else "no native bf16"
        forced = f", forced by {FORCE_ENV}" if self.forced else ""
        return f"{self.device} {self.capability} ({bf16}{forced})"


@functools.lru_cache(maxsize=None)
def hardware() -> Hardware:
    import torch

    if torch.cuda.is_available():
        return Hardware("cuda", torch.cuda.get_device_name(), torch.cuda.is_bf16_supported())
    forced = os.environ.get(FORCE_ENV, "").strip().lower()
    if forced:
        if forced not in FORCIBLE:
            raise HardwareError(f"{FORCE_ENV}={forced!r} is not a CPU kind: use one of "
                                f"{', '.join(FORCIBLE)}, or unset it.")
        capability, native = FORCIBLE[forced]
        return Hardware("cpu", capability, native, forced=True)
    flags = _cpu_flags()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    capability = torch.backends.cpu.get_cpu_capability()
    if native and "AVX512" in capability:
        capability = "AMX" if "amx_bf16" in flags else "AVX512_BF16"
    return Hardware("cpu", capability, native)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def device():
    """The torch device computations go to (this process's GPU under a launcher)."""
    import torch

    if hardware().device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# ---- precision ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Precision:
    name: str                  # bf16, fp16 or fp32: what runs
    asked: str                 # what the option said (auto, bf16, fp16, fp32)
    reason: str                # why, in words, for train.log, config.yaml and the app
    warning: str | None = None # a forced choice likely to be slow here

    def describe(self) -> str:
        return f"{self.asked} ({self.name}: {self.reason})" if self.asked == "auto" else \
            f"{self.name} ({self.reason})"


def resolve_precision(asked: str = "auto") -> Precision:
    hw = hardware()
    if asked not in PRECISIONS:
        raise HardwareError(f"precision {asked!r} is not one of {', '.join(PRECISIONS)}.")
    if asked == "auto":
        if hw.native_bf16:
            return Precision("bf16", asked, f"this {hw.device} computes bf16 natively "
                                            f"({hw.capability})")
        if hw.device == "cuda":
            return Precision("fp16", asked, f"{hw.capability} has no bf16: fp16 with loss scaling")
        return Precision("fp32", asked, f"this CPU has no native bf16 ({hw.capability}): bf16 "
                                        "would be emulated")
    if asked == "fp16" and hw.device != "cuda":
        raise HardwareError("precision fp16 needs a CUDA GPU (CPU fp16 training is not supported): "
                            "use auto, bf16 or fp32.")
    if asked == "bf16" and not hw.native_bf16:
        if hw.device == "cuda":
            raise HardwareError(f"{hw.capability} has no bf16: use auto (fp16) or fp32.")
        return Precision("bf16", asked, "asked for", warning=(
            f"this CPU has no native bf16 ({hw.capability}): bf16 is emulated and likely about "
            f"{bf16_slowdown():.0f}x slower than fp32 here; --precision auto picks fp32."))
    return Precision(asked, asked, "asked for")


def torch_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


@functools.lru_cache(maxsize=None)
def bf16_slowdown() -> float:
    """How many times slower a bf16 matrix product is than an fp32 one here (measured once)."""
    import torch

    def seconds(dtype) -> float:
        a, b = torch.randn(256, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
        a @ b
        tic = time.perf_counter()
        for _ in range(3):
            a @ b
        return time.perf_counter() - tic

    return max(1.0, seconds(torch.bfloat16) / seconds(torch.float32))


# ---- kernels ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def bf16_packing() -> bool:
    """Whether oneDNN's pre-packed bf16 linear runs on this CPU (tried once, never assumed)."""
    import torch

    hw = hardware()
    if hw.device != "cpu" or (hw.forced and hw.capability == "AVX2"):
        return False
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=torch.bfloat16), 1)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 8, dtype=torch.bfloat16), weight,
                                                 None, "none", [], "")
        return bool(out.float().sum().item() == 64.0)
    except (RuntimeError, AttributeError):
        return False


@functools.lru_cache(maxsize=None)
def fp32_packing() -> bool:
    """Whether MKL's pre-packed fp32 GEMM (`torch.ops.mkl._mkl_linear`) runs on this CPU."""
    import torch

    if hardware().device != "cpu":
        return False
    try:
        weight = torch.ones(8, 8)
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, 1)
        out = torch.ops.mkl._mkl_linear(torch.ones(1, 8), packed, weight, None, 1)
        return bool(out.sum().item() == 64.0)
    except (RuntimeError, AttributeError):
        return False


@functools.lru_cache(maxsize=None)
def onednn_fp32_packing() -> bool:
    """Whether oneDNN's pre-packed linear (`torch.ops.mkldnn._linear_pointwise`) runs in fp32 here."""
    import torch

    if hardware().device != "cpu":
        return False
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8), 1)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 8), weight, None, "none", [], "")
        return bool(out.sum().item() == 64.0)
    except (RuntimeError, AttributeError):
        return False
