#!/usr/bin/env python3
"""Timeline of one G2 step (selective_scan_fn forward + backward through
autograd, bf16 b8 d2048 n16 l2048, z D Δbias softplus, every input's gradient,
as `bench --only G2` runs it): every GPU kernel / memset / copy of one step
with its duration and the idle gap before it (torch.profiler, CUPTI), the
step's GPU span, and the host time of a step (wall time of N steps
back-to-back vs one synchronised step).

Usage: python bench/kernel_tools/g2_profile.py [b d n l]
"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mamba_attention import ops


def main():
    b, d, n, l = (int(v) for v in sys.argv[1:5]) if len(sys.argv) > 4 else (8, 2048, 16, 2048)
    g = torch.Generator(device="cuda").manual_seed(0)
    bf = torch.bfloat16
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    leaves = dict(
        u=r(b, d, l).to(bf), delta=(r(b, d, l) * 0.5 - 2.0).to(bf),
        A=-torch.arange(1, n + 1, device="cuda", dtype=torch.float32).repeat(d, 1),
        B=r(b, 1, n, l).to(bf), C=r(b, 1, n, l).to(bf), D=r(d), z=r(b, d, l).to(bf),
        delta_bias=torch.rand(d, device="cuda", generator=g) * 3 - 4)
    leaves = {k: v.requires_grad_() for k, v in leaves.items()}
    dout = r(b, d, l).to(bf)
    names = list(leaves)

    def step():
        x = leaves
        out = ops.selective_scan_fn(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"],
                                    z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True)
        return torch.autograd.grad(out, [x[k] for k in names], dout)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    # device time per step, CUDA events over 20 steps, best of 5
    best = 1e9
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(20):
            step()
        e.record()
        torch.cuda.synchronize()
        best = min(best, s.elapsed_time(e) / 20)
    # host time of one step (launch-only: measured on the host, no sync)
    host = 1e9
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        host = min(host, time.perf_counter() - t0)
    torch.cuda.synchronize()
    print(f"G2-like step: {best:.4f} ms device (events, 20 steps, best of 5); "
          f"host enqueue of one step {host * 1e3:.3f} ms")

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    evs.sort(key=lambda e: e.time_range.start)
    # split into steps at the forward scan kernel
    starts = [i for i, e in enumerate(evs) if "selective_scan_fwd" in e.name]
    i0, i1 = starts[-2], starts[-1]
    one = evs[i0:i1]
    t_begin = one[0].time_range.start
    prev_end = None
    total_k = 0.0
    print(f"{'start us':>9} {'gap us':>7} {'dur us':>8}  kernel")
    for e in one:
        st, en = e.time_range.start, e.time_range.end
        gap = 0.0 if prev_end is None else st - prev_end
        total_k += en - st
        print(f"{st - t_begin:9.1f} {gap:7.1f} {en - st:8.1f}  {e.name[:90]}")
        prev_end = en
    span = evs[i1].time_range.start - t_begin
    print(f"step span (fwd start to next fwd start) {span:.1f} us; kernels {total_k:.1f} us; "
          f"idle {span - total_k:.1f} us; {len(one)} GPU ops")


if __name__ == "__main__":
    main()
