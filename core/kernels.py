"""The decoder's matrix products: one small adapter over the CPU matrix libraries.

`Linear(weight, bias)` computes x W^T + b. On a CPU the same product can run through three
kernels, and which is fastest depends on the CPU, the weight's shape and the number of rows
(PERF-NOTES.md: on an AVX2 EPYC, MKL's packed GEMM wins at 1 row and oneDNN's at 16-256):
- `plain`: `F.linear`; always there, the only one on CUDA and for dtypes other than fp32/bf16;
- `mkl`: MKL's packed fp32 GEMM (`torch.ops.mkl._mkl_reorder_linear_weight` / `_mkl_linear`):
  the weight laid out once for the library instead of on every call;
- `onednn`: oneDNN's pre-packed inner product (`torch.ops.mkldnn._reorder_linear_weight` /
  `_linear_pointwise`), in fp32, and in bf16 only where `core.hardware.bf16_packing()` says it
  runs (it raises on AVX2-only CPUs; where bf16 is emulated it is measured like the others).
Which kernels run here is asked of core/hardware.py once; `kernel_plan` times them once per
weight shape at 1, 16, 64 and 256 rows (cached for the process), and each call takes the kernel
measured fastest at the nearest of those row counts (plain unless a packed kernel is over 10%
faster there). The packed kernels are private torch ops:
where one is missing or fails its start-up check, `plain` runs. Left out: int8/fp16 kernels.
"""
from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

from core import hardware

KERNELS = ("plain", "mkl", "onednn")
PLAN_ROWS = (1, 16, 64, 256)  # row counts each kernel is timed at
PLAN_EDGES = (4, 32, 128)  # a call of up to 4 rows uses the 1-row choice, up to 32 the 16-row one...
PLAIN_MARGIN = 1.1  # a packed kernel is chosen where it is over 10% faster than plain
TIMED_OUT_FEATURES = 4096  # wider weights are timed on their first rows (the ranking is the same)
PACK_ROWS = 64  # the row count the libraries are told to expect when packing: measured on a
# Xeon, MKL packed for 64 rows is within a few % of the best packing at every row count from 1
# to 1024, while one packed for 16 runs 1.5-2x slower from 24 rows up


def available_kernels(dtype: torch.dtype, device: str = "cpu") -> tuple[str, ...]:
    """The kernels that run on this machine for weights of `dtype` (plain first)."""
    if device != "cpu":
        return ("plain",)
    if dtype == torch.float32:
        return ("plain",) + (("mkl",) if hardware.fp32_packing() else ()) + \
            (("onednn",) if hardware.onednn_fp32_packing() else ())
    if dtype == torch.bfloat16 and hardware.bf16_packing():
        return ("plain", "onednn")
    return ("plain",)


def pack(kernel: str, weight: torch.Tensor):
    """`weight` (out, in) laid out for `kernel` (plain: as it is)."""
    weight = weight.contiguous()
    if kernel == "mkl":
        return torch.ops.mkl._mkl_reorder_linear_weight(weight, PACK_ROWS)
    if kernel == "onednn":
        return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
    return weight


def run(kernel: str, x: torch.Tensor, packed, weight: torch.Tensor, bias: torch.Tensor | None):
    """x (..., in) -> (..., out) through `kernel`, with `packed = pack(kernel, weight)`."""
    if kernel == "mkl":
        # the packed GEMM runs when told the actual row count (else MKL falls back to F.linear)
        return torch.ops.mkl._mkl_linear(x, packed, weight, bias, x.numel() // x.shape[-1])
    if kernel == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


@functools.lru_cache(maxsize=None)
def kernel_plan(out_features: int, in_features: int, dtype: torch.dtype,
                device: str = "cpu") -> tuple[str, ...]:
    """The fastest kernel at each of PLAN_ROWS for an (out, in) weight of `dtype`: each timed
    after a warm-up call, best of 3 rounds with the kernels interleaved (a busy machine slows
    them alike). Costs about 0.1-0.5 s per distinct shape of a 135M model, once per process."""
    kernels = available_kernels(dtype, device)
    if len(kernels) == 1:
        return kernels * len(PLAN_ROWS)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(min(out_features, TIMED_OUT_FEATURES), in_features, generator=generator)
    weight = (weight / in_features ** 0.5).to(dtype)
    packed = {kernel: pack(kernel, weight) for kernel in kernels}
    plan = []
    with torch.no_grad():
        for rows in PLAN_ROWS:
            x = torch.randn(rows, in_features, generator=generator).to(dtype)
            best = dict.fromkeys(kernels, float("inf"))
            for kernel in kernels:
                run(kernel, x, packed[kernel], weight, None)  # warm-up: oneDNN builds its primitive
            for _ in range(3):
                for kernel in kernels:
                    tic = time.perf_counter()
                    run(kernel, x, packed[kernel], weight, None)
                    best[kernel] = min(best[kernel], time.perf_counter() - tic)
            fastest = min(kernels, key=best.get)
            # a packed kernel has to win clearly: within the timing noise plain F.linear is kept
            # (it needs no second copy of the weight)
            plan.append(fastest if best[fastest] * PLAIN_MARGIN < best["plain"] else "plain")
    return tuple(plan)


def plan_index(rows: int) -> int:
    return sum(rows > edge for edge in PLAN_EDGES)


class Linear:
    """y = x W^T (+ b), each call through the kernel measured fastest at its row count.
    `kernel` forces one kernel at every row count (where it runs here; else plain)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 kernel: str | None = None):
        self.weight, self.bias = weight.contiguous(), bias
        self.out_features = weight.shape[0]
        device = weight.device.type
        if kernel is None:
            self.plan = kernel_plan(*weight.shape, weight.dtype, device)
        else:
            forced = kernel if kernel in available_kernels(weight.dtype, device) else "plain"
            self.plan = (forced,) * len(PLAN_ROWS)
        self.packed = {k: pack(k, self.weight) for k in set(self.plan)}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.plan[plan_index(x.numel() // x.shape[-1])]
        return run(kernel, x, self.packed[kernel], self.weight, self.bias)

    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + x W^T (+ b), the addition fused into oneDNN's product where it runs."""
        kernel = self.plan[plan_index(x.numel() // x.shape[-1])]
        if kernel == "onednn":
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed[kernel],
                                                             self.bias, "add")
        return residual + run(kernel, x, self.packed[kernel], self.weight, self.bias)

    def kernels(self) -> dict[int, str]:
        """{rows timed: kernel}, e.g. for a benchmark's header."""
        return dict(zip(PLAN_ROWS, self.plan))
