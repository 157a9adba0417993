#!/usr/bin/env python3
"""A/B of the backward's zero-fills at the G2 step (selective_scan_fn forward +
backward through autograd, bf16 b8 d2048 n16 l2048, z D Δbias softplus):
`torch._foreach_zero_` (one launch, what src/ops/scan_bwd.rs does) against
one `zero_()` per buffer (its fallback, forced by hiding _foreach_zero_),
alternated in one process. CUDA events over 20 steps, best of 5, per round.

Usage: python bench/kernel_tools/g2_ab.py [rounds]
"""
import sys

import torch

from mamba_attention import ops


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    b, d, n, l = 8, 2048, 16, 2048
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

    def timed():
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        best = 1e9
        for _ in range(5):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(20):
                step()
            e.record()
            torch.cuda.synchronize()
            best = min(best, s.elapsed_time(e) / 20)
        return best

    fe = torch._foreach_zero_
    ref = step()
    res = {"foreach": [], "zero_ each": []}
    for _ in range(rounds):
        for mode in res:
            torch._foreach_zero_ = fe if mode == "foreach" else None
            res[mode].append(timed())
    torch._foreach_zero_ = None
    other = step()
    torch._foreach_zero_ = fe
    same = all(torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6) for a, b in zip(ref, other))
    for mode, v in res.items():
        print(f"G2 step, {mode:10s}: " + " ".join(f"{x:.4f}" for x in v) + f" ms  (best {min(v):.4f})")
    print(f"gradients agree: {same}")


if __name__ == "__main__":
    main()
