#!/usr/bin/env python3
"""Host time per call of selective_state_update on the GPU (G5 b1 / b64 inputs):
back-to-back calls without synchronisation (the host-bound rate), through
ops.selective_state_update and through _core directly, beside the cost of a torch
attribute read per tensor. Usage: python3 bench/kernel_tools/host_overhead.py"""

import time

import torch

from mamba_attention import _core, ops


def per_call_us(fn, n=3000):
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        el = time.perf_counter() - t0
        torch.cuda.synchronize()
        best = min(best, el / n * 1e6)
    return best


for b in (1, 64):
    d, n = 4096, 16
    bf = dict(device="cuda", dtype=torch.bfloat16)
    st = torch.randn(b, d, n, device="cuda")
    x, dt, z = torch.randn(b, d, **bf), torch.randn(b, d, **bf), torch.randn(b, d, **bf)
    A = -torch.rand(d, n, device="cuda")
    B, C = torch.randn(b, n, **bf), torch.randn(b, n, **bf)
    D, bias = torch.randn(d, device="cuda"), torch.randn(d, device="cuda")
    full = lambda: ops.selective_state_update(st, x, dt, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True)  # noqa
    core = lambda: _core.selective_state_update(st, x, dt, A, B, C, D, z, bias, True, None)  # noqa
    attrs = lambda: [(t.dtype, t.shape, t.stride(), t.data_ptr(), t.is_cuda) for t in (st, x, dt, A, B, C, D, z, bias)]  # noqa
    print(f"b{b}: ops {per_call_us(full):.2f} us/call, _core {per_call_us(core):.2f}, "
          f"torch attrs of 9 tensors {per_call_us(attrs):.2f}, empty {per_call_us(lambda: x.new_empty((b, d))):.2f}")
