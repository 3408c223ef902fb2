"""The decoder's matrix products (core/kernels.py): every kernel this machine runs computes what
F.linear computes, at every row count, the plan only names kernels that run here, and a call
takes the plan's choice for the nearest row count measured."""
import pytest
import torch
import torch.nn.functional as F

from core import kernels

CASES = [(dtype, kernel) for dtype in (torch.float32, torch.bfloat16) for kernel in kernels.KERNELS]


@pytest.mark.parametrize("dtype,kernel", CASES, ids=[f"{str(d)[6:]}-{k}" for d, k in CASES])
def test_every_kernel_that_runs_here_computes_f_linear(dtype, kernel):
    if kernel not in kernels.available_kernels(dtype):
        pytest.skip(f"{kernel} does not run {dtype} on this CPU")
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 48).to(dtype), torch.randn(96).to(dtype)
    linear = kernels.Linear(weight, bias, kernel=kernel)
    assert set(linear.plan) == {kernel}
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.02}
    for shape in [(1, 48), (5, 48), (16, 48), (64, 48), (300, 48), (3, 7, 48)]:  # decode rows, prefill (m, P, H)
        x, residual = torch.randn(shape).to(dtype), torch.randn(*shape[:-1], 96).to(dtype)
        expected = F.linear(x.float(), weight.float(), bias.float())
        torch.testing.assert_close(linear(x).float(), expected, **tolerance)
        torch.testing.assert_close(linear.add_to(x, residual).float(), expected + residual.float(), **tolerance)


def test_the_plan_names_only_kernels_that_run_here_and_a_call_takes_the_nearest_row_count():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        plan = kernels.kernel_plan(64, 32, dtype)
        assert len(plan) == len(kernels.PLAN_ROWS)
        assert set(plan) <= set(kernels.available_kernels(dtype))
    assert kernels.available_kernels(torch.float32, "cuda") == ("plain",)
    assert [kernels.plan_index(rows) for rows in (1, 4, 5, 32, 33, 128, 129, 4096)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_a_kernel_this_machine_cannot_run_falls_back_to_plain():
    half = kernels.Linear(torch.randn(8, 8).half(), kernel="onednn")  # no packed fp16 kernel
    assert set(half.plan) == {"plain"}
    x = torch.randn(2, 8).half()
    torch.testing.assert_close(half(x), F.linear(x, half.weight))
