#!/usr/bin/env python3
"""GPU timing of the scan's training forward with checkpoints and the backward
from them, at the G2 shape (bf16 b8 d2048 n16 l2048, z D Δbias softplus):

  fwd        _core.selective_scan_fwd (out + last_state)
  fwd_ck     _core.selective_scan_fwd_ck (+ the 32-step checkpoints)
  bwd        _core.selective_scan_bwd, recomputing the chunk states (pre-pass)
  bwd_ck     _core.selective_scan_bwd(..., checkpoints=ck)

Each: CUDA-event time of N back-to-back calls / N, best of R rounds.
Usage: python bench/kernel_tools/scan_ck_timing.py [b d n l]
"""
import sys

import torch

from mamba_attention import _core


def timeit(fn, n=20, rounds=5):
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(n):
            fn()
        e.record()
        torch.cuda.synchronize()
        best = min(best, s.elapsed_time(e) / n)
    return best


def main():
    b, d, n, l = (int(v) for v in sys.argv[1:5]) if len(sys.argv) > 4 else (8, 2048, 16, 2048)
    g = torch.Generator(device="cuda").manual_seed(0)
    bf = torch.bfloat16
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    u, z, dout = r(b, d, l).to(bf), r(b, d, l).to(bf), r(b, d, l).to(bf)
    delta = (r(b, d, l) * 0.5 - 2.0).to(bf)
    A = -torch.arange(1, n + 1, device="cuda", dtype=torch.float32).repeat(d, 1)
    B, C = r(b, 1, n, l).to(bf), r(b, 1, n, l).to(bf)
    D, bias = r(d), torch.rand(d, device="cuda", generator=g) * 3 - 4
    a = (u, delta, A, B, C, D, z, bias, True)
    _, _, ck = _core.selective_scan_fwd_ck(*a, None)
    res = {
        "fwd": timeit(lambda: _core.selective_scan_fwd(*a, True, None)),
        "fwd_ck": timeit(lambda: _core.selective_scan_fwd_ck(*a, None)),
        "bwd": timeit(lambda: _core.selective_scan_bwd(*a, None, dout, None)),
        "bwd_ck": timeit(lambda: _core.selective_scan_bwd(*a, None, dout, None, ck)),
    }
    g1 = _core.selective_scan_bwd(*a, None, dout, None)
    g2 = _core.selective_scan_bwd(*a, None, dout, None, ck)
    same = [bool(torch.equal(x, y)) for x, y in zip(g1, g2) if x is not None]
    print(f"b{b} d{d} n{n} l{l} bf16 ck {tuple(ck.shape)} {ck.numel() * 4 / 2**20:.0f} MiB")
    for k, v in res.items():
        print(f"  {k:7s} {v:.4f} ms")
    print(f"  fwd+bwd recompute {res['fwd'] + res['bwd']:.4f} ms, "
          f"with ck {res['fwd_ck'] + res['bwd_ck']:.4f} ms")
    print(f"  bitwise equal gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias): {same}")


if __name__ == "__main__":
    main()
